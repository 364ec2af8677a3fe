"""d90 (learnforget.analysis.d90): the threshold, the grid bracket, the log-linear estimate, the
bisection's next d and LoRA's matched count, on a hand-made table with answers worked by hand;
the said_d90 study expands to its grid (full and LoRA merged over d and seeds)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from learnforget.analysis.d90 import bracket, d90_table, next_d, threshold
from learnforget.errors import ConfigError


def _table() -> pd.DataFrame:
    rows = []
    # seed 0 crosses 0.72 (= 0.9 x 0.8) between d=100 (0.70) and d=1000 (0.74)
    for d, s in [(10, 0.50), (100, 0.70), (1000, 0.74), (10000, 0.79)]:
        rows.append({"method": "said", "d": d, "projection_seed": 0, "score": s,
                     "trainable_params": d + 14})
    # seed 1: not monotone; the first passing d is 1000, the largest failing d below it 100
    for d, s in [(10, 0.60), (100, 0.71), (1000, 0.73), (10000, 0.71)]:
        rows.append({"method": "said", "d": d, "projection_seed": 1, "score": s,
                     "trainable_params": d + 14})
    for r, s in [(1, 0.71), (4, 0.75), (8, 0.78)]:
        rows.append({"method": "lora", "d": None, "projection_seed": None, "score": s,
                     "trainable_params": 100_000 * r})
    rows.append({"method": "full", "d": None, "projection_seed": None, "score": 0.80,
                 "trainable_params": 10**8})
    return pd.DataFrame(rows)


def test_threshold_for_accuracy_and_for_a_loss():
    assert threshold(0.8) == pytest.approx(0.72)
    assert threshold(1.0, 2.0, higher_is_better=False) == pytest.approx(1.1)  # 2 - 0.9 x 1
    with pytest.raises(ConfigError, match="needs the base model's score"):
        threshold(1.0, higher_is_better=False)
    with pytest.raises(ConfigError, match="fraction must be in"):
        threshold(1.0, fraction=1.5)


def test_d90_table_by_hand():
    t = d90_table(_table(), "score", full_score=0.80).set_index("projection_seed")
    s0 = t.loc[0]
    assert (s0.d_lo, s0.d_hi) == (100, 1000)
    # log-linear: t = (0.72 - 0.70) / (0.74 - 0.70) = 0.5 -> d = 10^(2 + 0.5) = 316.2
    assert s0.d90_estimate == pytest.approx(10 ** 2.5)
    assert s0.next_d == 316  # round(sqrt(100 x 1000))
    assert s0.trainable_at_d_hi == 1014
    s1 = t.loc[1]
    assert (s1.d_lo, s1.d_hi) == (100, 1000)
    assert s1.d90_estimate == pytest.approx(math.exp(math.log(100) + 0.5 * math.log(10)))
    assert set(t.lora_matched_params) == {400_000}  # r=1 (0.71) misses 0.72, r=4 passes


def test_bracket_edges_and_bisection_end():
    assert bracket({10: 0.9, 100: 0.95}, 0.72) == (None, 10)  # every d passes
    assert bracket({10: 0.1, 100: 0.2}, 0.72) == (100, None)  # none does
    assert bracket({10: 3.0, 100: 1.05}, 1.1, higher_is_better=False) == (10, 100)
    assert next_d(100, 101) is None and next_d(10, 1000) == 100
    t = d90_table(_table(), "score", full_score=0.80, bisect_ratio=20)
    assert t.next_d.isna().all()  # d_hi / d_lo = 10 <= 20: the bisection has ended


def test_missing_columns_are_a_clear_error():
    with pytest.raises(ConfigError, match=r"columns \['projection_seed'\] are missing"):
        d90_table(_table().drop(columns="projection_seed"), "score", full_score=0.8)


def test_said_d90_study_expands_to_its_grid(tmp_path):
    from learnforget.studies.study import expand_overrides, find_study, load_study

    ex = expand_overrides(load_study(find_study("said_d90")), [f"paths.runs_dir={tmp_path}"])
    jobs = [dict(o.split("=", 1) for o in varying) for _, varying in ex.jobs]
    said = [j for j in jobs if j["method"] == "said"]
    assert len(jobs) == 29 and len(said) == 24
    assert {(int(j["method.d"]), int(j["method.projection_seed"])) for j in said} == {
        (d, s) for d in (10, 30, 100, 300, 1000, 3000, 10000, 30000) for s in (0, 1, 2)}
    assert sorted(int(j["method.r"]) for j in jobs if j["method"] == "lora") == [1, 2, 4, 8]
    assert {float(j["train.lr"]) for j in said} == {1e-2}


def test_said_d90_laptop_study_is_the_cut_grid(tmp_path):
    from learnforget.studies.study import expand_overrides, find_study, load_study

    ex = expand_overrides(load_study(find_study("said_d90_laptop")), [f"paths.runs_dir={tmp_path}"])
    jobs = [dict(o.split("=", 1) for o in varying) for _, varying in ex.jobs]
    said = [j for j in jobs if j["method"] == "said"]
    assert len(jobs) == 13 and len(said) == 10
    assert {(int(j["method.d"]), int(j["method.projection_seed"])) for j in said} == {
        (d, s) for d in (10, 100, 1000, 10000, 100000) for s in (0, 1)}
    assert sorted(int(j["method.r"]) for j in jobs if j["method"] == "lora") == [1, 4]
    common = ex.jobs[0][0]
    assert {"train.batch_size=8", "train.seq_len=128", "train.checkpoints.at=[64]"} <= set(common)


@pytest.mark.slow
def test_said_d90_laptop_bisection_adds_one_run(tmp_path):
    """The d90 table's follow-up command: full and LoRA keep their run folders (done: skipped),
    the grid's SAID settings collapse to the one new d and seed."""
    from learnforget.studies.plan import expand
    from learnforget.studies.study import find_study, load_study

    study = load_study(find_study("said_d90_laptop"))
    plan = expand(study, [f"paths.runs_dir={tmp_path}"])
    more = expand(study, [f"paths.runs_dir={tmp_path}", "method.d=316", "method.projection_seed=1"])
    names = {j.run_dir.name for j in more.jobs}
    new = names - {j.run_dir.name for j in plan.jobs}
    assert len(plan.jobs) == 13 and len(names) == 4 and len(new) == 1
    assert "said_d316_ps1" in new.pop()


def test_d90_from_a_collected_table_takes_last_checkpoints_base_and_full():
    """A collect()-shaped table (base rows, two checkpoints per run) with a loss: the threshold
    is base - 0.9 (base - full) = 3.0 - 0.9 x 2.0 = 1.2."""
    from learnforget.analysis.d90 import d90_from_table

    rows = []

    def run(name, method, losses, d=None, seed=None, trainable=0):
        rows.append({"run": name, "method": method, "checkpoint": "base", "step": 0,
                     "target_ce": 3.0, "d": d, "projection_seed": seed,
                     "trainable_params": trainable})
        for step, loss in zip((5, 10), losses, strict=True):
            rows.append({"run": name, "method": method, "checkpoint": f"step-{step:06d}",
                         "step": step, "target_ce": loss, "d": d, "projection_seed": seed,
                         "trainable_params": trainable})

    run("full", "full", [2.0, 1.0], trainable=10**6)
    run("s10", "said", [0.5, 2.5], d=10, seed=0, trainable=24)  # last checkpoint counts: 2.5
    run("s100", "said", [2.0, 1.3], d=100, seed=0, trainable=114)
    run("s1000", "said", [2.0, 1.1], d=1000, seed=0, trainable=1014)
    run("r1", "lora", [2.0, 1.25], trainable=500)
    run("r2", "lora", [2.0, 1.15], trainable=1000)
    t = d90_from_table(pd.DataFrame(rows), "target_ce")
    (row,) = t.to_dict("records")
    assert row["threshold"] == pytest.approx(1.2)
    assert (row["d_lo"], row["d_hi"]) == (100, 1000)
    # log-linear between (100, 1.3) and (1000, 1.1): halfway -> 10^2.5
    assert row["d90_estimate"] == pytest.approx(10 ** 2.5)
    assert row["lora_matched_params"] == 1000
