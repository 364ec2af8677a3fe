"""A run's cost from its folder alone (learnforget.analysis.cost), on hand-written folders
whose sums are worked out by hand: the trunk, each cooldown branch's own share, the eval
scorings, and runs trained before run.json recorded the training CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from learnforget.analysis.cost import eval_cost, train_cost


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _metrics(path: Path, rows: list[tuple[int, float, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0, "wall_time_s": w, "cpu_time_s": c})
                            + "\n" for s, w, c in rows)
                    + json.dumps({"step": rows[-1][0], "heldout_loss": 2.0}) + "\n")


def _run(tmp_path: Path, carried: bool, branch_notes: list[str]) -> Path:
    run = tmp_path / "run"
    train = {"notes": [], **({"cpu_time_s": 40.0} if carried else {})}
    _write(run / "run.json", {"schema_version": 2, "status": "finished", "run": {"name": "r"},
                              "train": train, "meta": {}, "cooldown": {"branches": {
                                  "token-000080": {"branch": "branches/token-000080",
                                                   "from_step": 8, "to_step": 10}}}})
    _metrics(run / "train/metrics.jsonl", [(s, 10.0 * s, 4.0 * s) for s in range(1, 11)])
    b = run / "branches/token-000080"
    b_train = {"notes": branch_notes, **({"cpu_time_s": 44.0} if carried else {})}
    _write(b / "run.json", {"schema_version": 2, "status": "finished", "run": {"name": "r"},
                            "train": b_train, "meta": {}})
    # the branch's own steps 9 and 10: 7 s and 3 CPU-s each
    if carried:  # CPU from the run's start: the trunk's 32 at step 8, then + 3 per step
        _metrics(b / "train/metrics.jsonl", [(9, 87.0, 35.0), (10, 94.0, 38.0)])
    else:  # CPU from the branch process's start
        _metrics(b / "train/metrics.jsonl", [(9, 87.0, 3.0), (10, 94.0, 6.0)])
    return run


@pytest.mark.parametrize("carried", [True, False])
def test_training_cost_is_the_trunk_plus_each_branch_own_share(tmp_path, carried):
    cost = train_cost(_run(tmp_path, carried, ["resumed from step 8"]))
    # trunk 10 steps, 100 s wall, 40 CPU-s; branch 2 steps, 94 - 80 = 14 s, 6 CPU-s
    assert cost["steps"] == 12
    assert cost["wall_s"] == pytest.approx(114.0)
    assert cost["cpu_s"] == pytest.approx(46.0)
    assert cost["note"] == ""  # a branch's start is not a resume that loses CPU


def test_an_old_run_resumed_mid_branch_says_its_cpu_is_a_lower_bound(tmp_path):
    cost = train_cost(_run(tmp_path, False, ["resumed from step 8", "resumed from step 9"]))
    assert "CPU before a resume not counted" in cost["note"]


def test_eval_cost_sums_the_suite_scorings_and_says_when_cpu_is_missing(tmp_path):
    run = _run(tmp_path, True, [])
    for label, suite, wall, cpu in [("step-000010", "regime", 30.0, 50.0),
                                    ("token-000080", "regime", 20.0, None)]:
        _write(run / "checkpoints" / label / "manifest.json", {"label": label, "step": 10})
        _write(run / "eval" / f"{label}.json", {"suite": suite, "wall_time_s": wall,
                                                **({"cpu_time_s": cpu} if cpu else {})})
    got = eval_cost(run, "regime")
    assert got["scorings"] == 2 and got["wall_s"] == pytest.approx(50.0) and got["cpu_s"] is None
    assert eval_cost(run, "other") == {"scorings": 0, "wall_s": None, "cpu_s": None}
    _write(run / "eval/token-000080.json", {"suite": "regime", "wall_time_s": 20.0,
                                            "cpu_time_s": 25.0})
    assert eval_cost(run, "regime")["cpu_s"] == pytest.approx(75.0)
