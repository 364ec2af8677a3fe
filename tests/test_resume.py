"""A run killed after its first checkpoint resumes and ends where an uninterrupted run ends.

The kill is `os._exit(137)` right after the first checkpoint (crash_hook.die_after_step_N,
registered through the loop's ordinary `train.callbacks`): no clean-up, no final write, as
with SIGKILL. Tolerance: weights and losses equal to 1e-6
(on one thread they are bit-identical in practice).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST
from crash_hook import crash_after
from safetensors.torch import load_file

from learnforget.config import IDENTITY_VERSION
from learnforget.runfolder import RunFolder

COMMON = [*FAST, "train.checkpoints.at=[2,4]", "train.num_threads=1", "data.max_docs=8",
          "data.heldout_docs=2", "method.r=4"]


def _train(runs: Path, cache: Path, *overrides: str,
           crash_at: int | None = None) -> subprocess.CompletedProcess:
    """`learnforget train` in a subprocess; with `crash_at`, it dies (os._exit) after that step."""
    env = {**os.environ, "LEARNFORGET_RUNS_DIR": str(runs), "LEARNFORGET_CACHE_DIR": str(cache)}
    env, hook = crash_after(crash_at, env)
    return subprocess.run([sys.executable, "-m", "learnforget.cli", "train", *COMMON, *overrides,
                           *hook],
                          env=env, capture_output=True, text=True, timeout=300)


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run / "train/metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss", r.get("heldout_loss"))) for r in rows]


def killed_and_straight(runs: Path, cache: Path, *overrides: str, crash_at: int = 2
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train `overrides` straight through, and again killed after step `crash_at` then
    resumed; assert the resume happened and both loss curves agree to 1e-6. Returns the final
    (step 4) checkpoint weights of the straight and of the resumed run."""
    assert _train(runs, cache, *overrides, "experiment_name=straight").returncode == 0
    killed = _train(runs, cache, *overrides, "experiment_name=killed", crash_at=crash_at)
    assert killed.returncode == 137, killed.stderr[-2000:]
    resumed = _train(runs, cache, *overrides, "experiment_name=killed")
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr[-2000:]
    run_a, run_b = next((runs / "straight").iterdir()), next((runs / "killed").iterdir())
    for (_, x), (_, y) in zip(_losses(run_a), _losses(run_b), strict=True):
        assert abs(x - y) <= 1e-6
    return (_weights(run_a / "checkpoints/step-000004"),
            _weights(run_b / "checkpoints/step-000004"))


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (ckpt / "adapter_model.safetensors").exists() \
        else "model.safetensors"
    return load_file(ckpt / name)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, cache_dir, method):
    runs = tmp_path / "runs"
    ref = _train(runs, cache_dir, f"method={method}", "experiment_name=straight")
    assert ref.returncode == 0, ref.stderr[-2000:]

    killed = _train(runs, cache_dir, f"method={method}", "experiment_name=killed",
                    crash_at=2)
    assert killed.returncode == 137, killed.stderr[-2000:]
    run_b = next((runs / "killed").iterdir())
    assert RunFolder(run_b).read_record().status == "running"  # died mid-run
    assert (run_b / "checkpoints/step-000002").exists()
    assert not (run_b / "checkpoints/step-000004").exists()

    resumed = _train(runs, cache_dir, f"method={method}", "experiment_name=killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout

    run_a = next((runs / "straight").iterdir())
    assert run_a.name == run_b.name  # same config (train.callbacks is not hashed), same name
    info_b = RunFolder(run_b).read_record()
    assert info_b.run.identity_version == IDENTITY_VERSION == 1  # recorded in run.json
    assert info_b.status == "finished" and "resumed from step 2" in info_b.train.notes
    la, lb = _losses(run_a), _losses(run_b)
    assert [s for s, _ in la] == [s for s, _ in lb]
    for (_, x), (_, y) in zip(la, lb, strict=True):
        assert abs(x - y) <= 1e-6
    wa, wb = _weights(run_a / "checkpoints/step-000004"), _weights(run_b / "checkpoints/step-000004")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)


def test_sigterm_saves_state_and_the_rerun_finishes(tmp_path, cache_dir):
    """SLURM's pre-emption signal: the run stops at a step boundary with a resume state."""
    import signal
    import time

    runs = tmp_path / "runs"
    env = {**os.environ, "LEARNFORGET_RUNS_DIR": str(runs), "LEARNFORGET_CACHE_DIR": str(cache_dir)}
    args = [sys.executable, "-m", "learnforget.cli", "train", *COMMON, "method=lora",
            "train.checkpoints.at=[2,40]"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(runs.glob("default/*/checkpoints/step-000002")) and time.time() < deadline:
        time.sleep(0.05)
    # held mid-run (SIGSTOP) while SIGTERM is queued, so it arrives before the run can finish
    # however fast the machine is; the handler runs on SIGCONT
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "SIGTERM received" in stdout
    run = next((runs / "default").iterdir())
    info = RunFolder(run).read_record()
    assert info.status == "interrupted" and 2 <= info.train.steps_done < 40
    assert (run / "train/resume.pt").exists()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming {run.name} from step {info.train.steps_done}" in done.stdout
    info = RunFolder(run).read_record()
    assert info.status == "finished" and info.train.steps_done == 40
    # the wall and CPU seconds go on from the resume state, not from 0 in the new process
    rows = [json.loads(x) for x in (run / "train/metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "cpu_time_s" in r]
    assert [r["step"] for r in rows][-1] == 40 and len(rows) >= 20
    for key in ("wall_time_s", "cpu_time_s"):
        seq = [r[key] for r in rows]
        assert all(b >= a for a, b in zip(seq, seq[1:], strict=False)), (key, seq)
    assert info.train.cpu_time_s == pytest.approx(rows[-1]["cpu_time_s"])
    assert 0 < info.train.cpu_time_s


# ------------------------------------------------------------------ no double training

def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_a_start_set_up_while_another_trained_does_not_train_again(make_cfg, capsys):
    """The second of two identical commands loads its model while the first trains; it takes
    the run lock only after the first finished. It must see "finished" under the lock and do
    nothing, and a finished run keeps no resume state."""
    from learnforget.train.loop import fit, setup

    cfg = make_cfg("method=lora", "method.r=4")
    second = setup(cfg)  # started while the first is mid-run: not finished yet
    out = fit(setup(cfg))
    assert RunFolder(out).read_record().status == "finished"
    assert not (out / "train/resume.pt").exists()
    before = _snapshot(out)
    capsys.readouterr()
    assert fit(second) == out
    assert "is already finished" in capsys.readouterr().out
    assert _snapshot(out) == before  # nothing retrained, nothing rewritten


def test_a_stale_resume_state_of_a_finished_run_is_ignored(make_cfg):
    """A finished run that still holds a train/resume.pt (as older versions left it) is not
    resumed by a start that set up before it finished (the file would not even load)."""
    from learnforget.train.loop import fit, setup

    cfg = make_cfg("method=lora", "method.r=4")
    stale = setup(cfg)
    out = fit(setup(cfg))
    torch.save({"progress": {"step": 1}}, out / "train/resume.pt")
    before = _snapshot(out)
    assert fit(stale) == out
    assert _snapshot(out) == before


def test_a_second_process_started_mid_run_skips_it(tmp_path, cache_dir):
    """Two identical commands at once: the second finds the run locked and leaves it alone;
    the first finishes, every step trained once."""
    import signal
    import time

    runs = tmp_path / "runs"
    env = {**os.environ, "LEARNFORGET_RUNS_DIR": str(runs), "LEARNFORGET_CACHE_DIR": str(cache_dir)}
    args = [sys.executable, "-m", "learnforget.cli", "train", *COMMON, "method=lora",
            "train.checkpoints.at=[2,40]"]
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 120
    while not list(runs.glob("default/*/checkpoints/step-000002")) and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # hold it mid-run, lock taken
    try:
        run = next((runs / "default").iterdir())
        assert RunFolder(run).read_record().status == "running"
        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert second.returncode == 0, second.stderr[-2000:]
    assert "is being trained by another process" in second.stdout
    assert "resuming" not in second.stdout + stdout
    info = RunFolder(run).read_record()
    assert info.status == "finished" and info.train.steps_done == 40
    steps = [s for s, _ in _losses(run)]
    assert steps.count(3) == 1 and steps.count(40) == 2  # step 40: loss and held-out loss
    assert not (run / "train/resume.pt").exists()


# ------------------------------------------------------------------ timed resume saves

def test_a_run_killed_between_budgets_resumes_from_its_timed_save(tmp_path, cache_dir):
    """train.resume_every_min: a run killed (os._exit, as SIGKILL) at step 5, between its
    budgets at steps 2 and 6, resumes from the timed save after step 4 (every step is past
    the tiny interval; the write is in the background, so a kill during it would leave step
    3's), not from the budget at step 2, and ends bit-identical to an uninterrupted run."""
    runs = tmp_path / "runs"
    timed = ["method=lora", "train.checkpoints.at=[2,6]", "train.resume_every_min=0.0001"]
    ref = _train(runs, cache_dir, *timed, "experiment_name=straight")
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = _train(runs, cache_dir, *timed, "experiment_name=killed", crash_at=5)
    assert killed.returncode == 137, killed.stderr[-2000:]
    run_b = next((runs / "killed").iterdir())
    saved = torch.load(run_b / "train/resume.pt", weights_only=False)["progress"]["step"]
    assert saved in (3, 4), saved  # the interval (one step here), not back to the budget at 2
    resumed = _train(runs, cache_dir, *timed, "experiment_name=killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"from step {saved}" in resumed.stdout
    run_a = next((runs / "straight").iterdir())
    assert run_a.name == run_b.name  # resume_every_min is not part of the run's identity
    assert RunFolder(run_b).read_record().status == "finished"
    assert not (run_b / "train/resume.pt").exists()  # a finished run keeps none
    la, lb = _losses(run_a), _losses(run_b)
    assert la == lb  # bit-identical losses, the resumed steps logged again once
    for label in ("step-000002", "step-000006"):
        wa, wb = _weights(run_a / "checkpoints" / label), _weights(run_b / "checkpoints" / label)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), label


def test_the_timed_save_is_decided_by_rank_0s_clock_and_the_interval(monkeypatch):
    """One process: no save before the interval, one after it, none at the last step; a stop
    signal wins over a due timed save; every save resets the clock."""
    from learnforget.train import saving
    from learnforget.train.distributed import Dist

    now = [1000.0]
    monkeypatch.setattr(saving.time, "monotonic", lambda: now[0])
    saver = saving.ResumeSaver(60.0, Dist(), sharded=False)
    assert saver.decide(None, 1, 10) is None
    now[0] += 59.9
    assert saver.decide(None, 2, 10) is None
    now[0] += 0.2
    assert saver.decide(None, 3, 10) == saving.TIMED
    assert saver.decide(None, 10, 10) is None  # the run ends here: nothing to resume
    assert saver.decide("SIGTERM", 3, 10) == saving.STOP
    saver.last = now[0]  # what save() does
    assert saver.decide(None, 4, 10) is None
    assert saving.ResumeSaver(0.0, Dist(), sharded=False).decide(None, 3, 10) is None


@pytest.mark.parametrize("value", ["-1", "'often'"])
def test_a_bad_resume_interval_is_one_config_error(make_cfg, value):
    from learnforget.errors import ConfigError
    from learnforget.train.saving import resume_every_s

    with pytest.raises(ConfigError, match="train.resume_every_min"):
        resume_every_s(make_cfg(f"train.resume_every_min={value}").train)
