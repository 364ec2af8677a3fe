"""Per-budget cooldowns as branches of one plateau run (learnforget.train.cooldown): the branch
points, the schedule (checked against the inverse-sqrt formula written out by hand), and end
to end: each branch ends with the same weights and loss as a separate full-length run at its
budget with its own cooldown."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from learnforget.config import validate
from learnforget.errors import ConfigError
from learnforget.runfolder import RunFolder
from learnforget.studies.job import stage_complete
from learnforget.train.cooldown import branch_plan, plateau
from learnforget.train.loop import train
from learnforget.train.optim import make_scheduler
from learnforget.train.plan import Plan

BRANCHES = ["train.schedule=inverse_sqrt", "train.warmup_steps=2", "train.cooldown_ratio=0.25",
            "train.num_threads=1", "data.format=shards", "data.shard_tokens=4000",
            "method=lora", "method.r=4", "train.lr=1e-3"]


def test_branch_points_at_one_minus_ratio_of_each_budget(make_cfg):
    t = make_cfg(*BRANCHES, "train.cooldown_mode=branches").train
    plan = branch_plan(Plan(100, 100.0, 20, {8: "step-000008", 20: "step-000020"}), t)
    assert plan.branch_points == {6: "step-000008", 15: "step-000020"}  # 8 - 2, 20 - 5
    assert plan.total_steps == 15 and plan.checkpoints == {}
    assert plan.budgets == {8: "step-000008", 20: "step-000020"}


@pytest.mark.parametrize("overrides, words", [
    (["train.schedule=cosine"], "train.schedule inverse_sqrt or constant"),
    (["train.cooldown_ratio=0"], "0 < train.cooldown_ratio < 1"),
    (["train.cooldown_mode=both"], "train.cooldown_mode='both' is unknown"),
])
def test_bad_branch_settings_are_one_line_errors(make_cfg, overrides, words):
    cfg = make_cfg(*BRANCHES, "train.cooldown_mode=branches", *overrides)
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")) as e:
        validate(cfg)
    assert "\n" not in str(e.value)


def test_budget_too_short_for_its_cooldown(make_cfg):
    t = make_cfg(*BRANCHES, "train.cooldown_mode=branches", "train.cooldown_ratio=0.9").train
    with pytest.raises(ConfigError, match="budget step-000001 is 1 step"):
        branch_plan(Plan(10, 10.0, 2, {1: "step-000001", 2: "step-000002"}), t)


def test_plateau_then_branch_is_the_full_length_schedule(make_cfg):
    t = make_cfg(*BRANCHES, "train.cooldown_mode=branches").train
    budget, start, warmup = 20, 15, 2  # branch from 20 - round(0.25 * 20)

    def by_hand(step: int) -> float:  # inverse sqrt after a linear warmup, linear to 0 at 20
        if step < warmup:
            return (step + 1) / (warmup + 1)
        f = math.sqrt(warmup / step)
        return f * (budget - step) / (budget - start) if step >= start else f

    def factors(train_cfg, total: int, steps: range) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make_scheduler(opt, train_cfg, total)
        return [sched.lr_lambdas[0](s) for s in steps]

    main = factors(plateau(t), start, range(start))
    branch = factors(make_cfg(*BRANCHES).train, budget, range(start, budget))
    assert main + branch == pytest.approx([by_hand(s) for s in range(budget)], abs=1e-12)
    assert branch[-1] == pytest.approx(math.sqrt(2 / 19) / 5)


def _final(run, label):
    ck = run / "checkpoints" / label
    return load_file(ck / "adapter_model.safetensors"), json.loads((ck / "manifest.json").read_text())


def test_branch_ends_match_separate_full_length_runs(make_cfg):
    cfg = make_cfg(*BRANCHES, "train.cooldown_mode=branches", "train.checkpoints.at=[4,8]",
                   "experiment_name=branches")
    main = train(cfg)
    info = RunFolder(main).read_record()
    assert info.status == "finished" and info.train.total_steps == 6  # 8 - 2
    assert info.train.data["accounting"]["sequences"] == 8 * 2  # to the last budget
    cool = info.cooldown
    assert cool["complete"] and set(cool["branches"]) == {"step-000004", "step-000008"}
    assert cool["branches"]["step-000004"]["from_step"] == 3
    assert stage_complete(cfg, "train", main)
    for budget in (4, 8):
        label = f"step-{budget:06d}"
        sep = train(make_cfg(*BRANCHES, f"train.checkpoints.at=[{budget}]",
                             f"experiment_name=separate{budget}"))
        w_branch, m_branch = _final(main, label)
        w_sep, m_sep = _final(sep, label)
        assert m_branch["cooldown"] == "branch" and "cooldown" not in m_sep
        assert m_branch["step"] == m_sep["step"] == budget
        assert m_branch["loss"] == pytest.approx(m_sep["loss"], abs=1e-6)
        assert m_branch["heldout_loss"] == pytest.approx(m_sep["heldout_loss"], abs=1e-6)
        for k in w_sep:
            torch.testing.assert_close(w_branch[k], w_sep[k], atol=1e-6, rtol=0)
    # a rerun finds everything done and trains nothing
    again = train(cfg)
    assert RunFolder(again).read_record().cooldown == cool


@pytest.mark.slow
def test_a_branch_killed_midway_resumes_to_the_uninterrupted_end(tmp_path, cache_dir):
    """Budgets 4 and 12 steps branch at steps 3 and 9; a hard kill at step 10 (inside the
    12-step branch) and a rerun end with the weights of an uninterrupted run."""
    import os
    import subprocess
    import sys

    from conftest import FAST
    from crash_hook import crash_after

    env = {**os.environ, "LEARNFORGET_RUNS_DIR": str(tmp_path / "runs"),
           "LEARNFORGET_CACHE_DIR": str(cache_dir)}
    args = [sys.executable, "-m", "learnforget.cli", "train", *FAST, *BRANCHES,
            "data.max_docs=8", "data.heldout_docs=2", "train.cooldown_mode=branches",
            "train.checkpoints.at=[4,12]"]

    def run(*extra: str, crash_at: int | None = None) -> subprocess.CompletedProcess:
        run_env, hook = crash_after(crash_at, env)
        return subprocess.run([*args, *extra, *hook], env=run_env, capture_output=True,
                              text=True, timeout=300)

    assert run("experiment_name=straight").returncode == 0
    killed = run("experiment_name=killed", crash_at=10)
    assert killed.returncode == 137, killed.stderr[-2000:]
    main = next((tmp_path / "runs/killed").iterdir())
    assert (main / "checkpoints/step-000004/manifest.json").exists()  # first branch published
    assert not (main / "checkpoints/step-000012").exists()
    again = run("experiment_name=killed")
    assert again.returncode == 0 and "resuming step-000012 from step 9" in again.stdout
    ref = next((tmp_path / "runs/straight").iterdir())
    for label in ("step-000004", "step-000012"):
        (wa, ma), (wb, mb) = _final(ref, label), _final(main, label)
        assert ma["loss"] == mb["loss"] and ma["heldout_loss"] == mb["heldout_loss"]
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=0, rtol=0)
