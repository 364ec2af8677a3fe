"""What every benchmark shares: the config of a benchmark run, the harness's own step times, the
hypervisor's stolen CPU time, and repeated measurements as median [min, max].
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METHODS = {"lora": ["method=lora", "method.r=8", "train.lr=1e-3"],
           "full": ["method=full", "train.lr=2e-4"]}


def spread(xs: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs),
            "values": list(xs)}


def fmt_spread(s: dict[str, Any], digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def run_cfg(model: str, method: str, runs_dir: Path, tag: str, *, batch_size: int, seq_len: int,
            steps: int, extra: Sequence[str] = ()):
    """The config of one benchmark run: CPT on the stdlib code, `steps` steps, no logger."""
    from learnforget.config import compose

    return compose([f"model={model}", *METHODS[method], "data=stdlib_code", "logger=none",
                    f"train.batch_size={batch_size}", f"train.seq_len={seq_len}",
                    "train.checkpoints.unit=steps", f"train.checkpoints.at=[{steps}]",
                    "train.heldout_batches=0", "train.schedule=constant", f"experiment_name={tag}",
                    f"paths.runs_dir={runs_dir}", *extra])


def harness_steps(s, steps: int) -> dict[str, list]:
    """`train.fit` for `steps` steps: wall seconds, process CPU seconds and tokens of each of
    steps 2..`steps`, from the run's own metrics (wall_time_s and cpu_time_s are taken after
    each step; the logging and progress bar of a step fall into the next one's time)."""
    from learnforget.runfolder import RunFolder
    from learnforget.train.loop import fit

    out = fit(s)
    rows = [json.loads(line) for line in RunFolder(out).metrics.read_text().splitlines()]
    rows = {r["step"]: r for r in rows if "wall_time_s" in r}
    ks = range(2, steps + 1)
    return {"wall": [rows[k]["wall_time_s"] - rows[k - 1]["wall_time_s"] for k in ks],
            "cpu": [rows[k]["cpu_time_s"] - rows[k - 1]["cpu_time_s"] for k in ks],
            "tokens": [rows[k]["tokens"] - rows[k - 1]["tokens"] for k in ks]}


def cpu_steal_s() -> float | None:
    """Seconds of CPU time the hypervisor gave to other guests so far (Linux /proc/stat, all
    CPUs together); None where unknown. Stolen time slows every loop it falls in."""
    import os

    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def steal_since(start: float | None) -> float | None:
    """Seconds stolen by the hypervisor since `start` (a cpu_steal_s() reading); None where
    unknown."""
    now = cpu_steal_s()
    return None if start is None or now is None else now - start
