"""What a run cost, read from its folder alone: training wall and process CPU seconds (the
trunk and each cooldown branch's own share), and the eval stage's scorings of its checkpoints.

Training: train/metrics.jsonl logs `wall_time_s` and `cpu_time_s` per step. The wall time
always runs from the run's start over resumes; since run.json records `train.cpu_time_s`, so
does the CPU time. In runs trained before that, `cpu_time_s` counted the process from its
loop's start: a branch's own CPU is then its last value, and a segment before a resume is not
counted (the result says so). A branch starts from its trunk's state at `from_step`, so its own
share is its last value minus the trunk's at that step.

Eval: each checkpoint's result for the suite has `wall_time_s` and, since it was recorded,
`cpu_time_s`. The base model's scoring is cached outside the run and not counted here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from learnforget.files import read_result
from learnforget.runfolder import RunFolder


def _metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "wall_time_s" in r]


def _at(rows: list[dict[str, Any]], step: int, key: str) -> float:
    """The value logged at the last step <= `step` (exact when every step is logged)."""
    before = [r for r in rows if r["step"] <= step and r.get(key) is not None]
    return float(before[-1][key]) if before else 0.0


def train_cost(run_dir: Path) -> dict[str, Any]:
    """{steps, wall_s, cpu_s, note}: the trunk plus every cooldown branch's own steps."""
    folder = RunFolder(Path(run_dir))
    rec = folder.read_record()
    rows = _metrics(folder.metrics)
    if rec is None or not rows:
        return {"steps": 0, "wall_s": None, "cpu_s": None, "note": "not trained"}
    carried = rec.train.cpu_time_s is not None
    steps = int(rows[-1]["step"])
    wall = float(rows[-1]["wall_time_s"])
    cpu = float(rows[-1].get("cpu_time_s") or 0.0)
    resumed = any(n.startswith("resumed from step") for n in rec.train.notes)
    for info in ((rec.cooldown or {}).get("branches") or {}).values():
        b_folder = RunFolder(Path(run_dir) / str(info.get("branch", "")))
        b_rows = _metrics(b_folder.metrics)
        if not b_rows:
            continue
        start = int(info.get("from_step", 0))
        b_rec = b_folder.read_record()
        steps += int(b_rows[-1]["step"]) - start
        wall += float(b_rows[-1]["wall_time_s"]) - _at(rows, start, "wall_time_s")
        b_cpu = float(b_rows[-1].get("cpu_time_s") or 0.0)
        b_carried = b_rec is not None and b_rec.train.cpu_time_s is not None
        cpu += b_cpu - _at(rows, start, "cpu_time_s") if b_carried else b_cpu
        resumed |= b_rec is not None and any(  # a branch starts as a resume from from_step
            n.startswith("resumed from step") and n != f"resumed from step {start}"
            for n in b_rec.train.notes)
    note = ("" if carried or not resumed else
            "CPU before a resume not counted (trained before run.json recorded train.cpu_time_s)")
    return {"steps": steps, "wall_s": wall, "cpu_s": cpu, "note": note}


def eval_cost(run_dir: Path, suite: str | None = None) -> dict[str, Any]:
    """{scorings, wall_s, cpu_s}: the suite's scorings of the run's checkpoints (cpu_s None
    when a scoring predates the CPU record)."""
    folder = RunFolder(Path(run_dir))
    n, wall, cpu = 0, 0.0, 0.0
    for label in folder.checkpoint_labels():
        res = read_result(folder.eval_result(label))
        if not res or (suite is not None and res.get("suite") != suite):
            continue
        n += 1
        wall += float(res.get("wall_time_s") or 0.0)
        cpu = None if cpu is None or res.get("cpu_time_s") is None else cpu + float(res["cpu_time_s"])
    return {"scorings": n, "wall_s": wall if n else None, "cpu_s": cpu if n else None}
