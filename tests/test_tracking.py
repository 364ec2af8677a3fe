"""W&B mirrors the disk record offline, without secrets; logger=none writes no W&B files; a
W&B failure (at init or at log) never stops a run, and WANDB_MODE=offline wins over a key."""

from __future__ import annotations

import json
import time

import pytest

from learnforget.eval.stage import evaluate_run
from learnforget.runfolder import RunFolder, RunLock
from learnforget.tracking import scrub, wandb_mode
from learnforget.train.loop import fit, setup


def test_scrub_redacts_secret_keys():
    cfg = {"logger": {"api_key": "k"}, "hf_token": "t", "lr": 1, "nested": [{"password": "p"}]}
    assert scrub(cfg) == {"logger": {"api_key": "<redacted>"}, "hf_token": "<redacted>",
                          "lr": 1, "nested": [{"password": "<redacted>"}]}


def test_wandb_offline_mirror(make_cfg, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = make_cfg("logger=wandb", "experiment_name=study7", "+hf_token=hf_SECRET_abc123")
    out = fit(setup(cfg))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # offline by default: `wandb sync` uploads it later
    expected = (b"study7", b"train", b"lora", out.name.encode(), b"loss")
    # wandb's service process writes the offline file; on a loaded machine the last records
    # can land a moment after finish() returns, so read until they are there (or 60 s pass)
    deadline = time.monotonic() + 60
    while True:
        blob = b"".join(f.read_bytes() for f in runs[0].glob("*.wandb"))
        if all(e in blob for e in expected) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for e in expected:
        assert e in blob, e
    for p in out.rglob("*"):
        if p.is_file():
            assert b"hf_SECRET_abc123" not in p.read_bytes(), p
    assert "<redacted>" in (out / "config.yaml").read_text()
    assert RunFolder(out).read_record().status == "finished"


def test_logger_none_writes_only_the_disk_record(make_cfg):
    out = fit(setup(make_cfg("logger=none")))
    assert not (out / "wandb").exists()
    assert (out / "train" / "metrics.jsonl").read_text().count("\n") >= 3


# ------------------------------------------------------------------ W&B never kills a run

FAKE_KEY = "fake0wandb0key0" + "7" * 25  # 40 characters, like a real key


def _run_files_without(root, secret: bytes) -> list:
    """Every file under root that contains `secret`."""
    return [p for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


@pytest.mark.parametrize("env, requested, expected", [
    ({"WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "offline"}, "auto", "offline"),
    ({"WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "offline"}, "online", "offline"),
    ({"WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "disabled"}, "auto", "disabled"),
    ({"WANDB_API_KEY": FAKE_KEY}, "auto", "online"),
    ({"WANDB_MODE": "dryrun"}, "auto", "offline"),
    ({}, "auto", "offline"),
    ({}, "online", "online"),
])
def test_wandb_mode_respects_an_offline_environment(monkeypatch, env, requested, expected):
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert wandb_mode(requested) == expected


def test_offline_mode_with_a_key_trains_and_scores_without_leaking_it(make_cfg, runs_dir,
                                                                      monkeypatch, capsys):
    """A compute node: WANDB_API_KEY set, WANDB_MODE=offline. Train and eval finish offline."""
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg("logger=wandb", "experiment_name=node", "eval=smoke", "eval.limit=2",
                   "eval.max_gen_toks=8", "eval.diversity.prompts=[]")
    out = fit(setup(cfg))
    assert RunFolder(out).read_record().status == "finished"
    summary = json.loads(evaluate_run(out, cfg.eval, cfg.logger).read_text())
    assert [r["checkpoint"] for r in summary["rows"]] == ["base", "step-000001", "step-000002"]
    assert len(list((out / "wandb").glob("offline-run-*"))) == 2  # train and eval
    assert "W&B mirror off" not in capsys.readouterr().err
    assert _run_files_without(runs_dir, FAKE_KEY.encode()) == []


def _refuse_init(**kwargs):
    import wandb

    raise wandb.errors.AuthenticationError(f"API key {FAKE_KEY} is not valid (401)")


def test_wandb_init_failure_leaves_the_disk_record_and_warns(make_cfg, monkeypatch, capsys):
    import wandb

    monkeypatch.setattr(wandb, "init", _refuse_init)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)  # the message quotes it: the warning must not
    cfg = make_cfg("logger=wandb", "eval=smoke", "eval.limit=2", "eval.max_gen_toks=8",
                   "eval.diversity.prompts=[]")
    out = fit(setup(cfg))
    info = RunFolder(out).read_record()
    assert info.status == "finished" and info.train.steps_done == 2
    assert len(metrics := (out / "train/metrics.jsonl").read_text().splitlines()) >= 3, metrics
    evaluate_run(out, cfg.eval, cfg.logger)
    assert (out / "eval/summary-smoke.json").exists()
    err = [line for line in capsys.readouterr().err.splitlines() if "W&B mirror off" in line]
    assert len(err) == 2, err  # one line per stage: train, eval
    assert "AuthenticationError" in err[0] and "wandb.init failed for train" in err[0]
    assert FAKE_KEY not in err[0] and "<redacted>" in err[0]
    assert not (out / "wandb").exists() or not list((out / "wandb").glob("*run-*"))


def test_wandb_log_failure_turns_the_mirror_off_once(make_cfg, monkeypatch, capsys):
    from learnforget import tracking

    calls = []

    def broken_log(self, record):
        calls.append(record)
        raise ConnectionError("server down")

    monkeypatch.setattr(tracking.WandbLogger, "log", broken_log)
    out = fit(setup(make_cfg("logger=wandb", "train.checkpoints.at=[2,3]")))
    assert RunFolder(out).read_record().status == "finished"
    steps = [json.loads(x)["step"] for x in (out / "train/metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 2, 3, 3]  # the disk record is whole
    assert len(calls) == 1  # dropped after its first failure
    err = [line for line in capsys.readouterr().err.splitlines() if "W&B mirror off" in line]
    assert len(err) == 1 and "WandbLogger.log failed: ConnectionError: server down" in err[0]


def test_a_failed_setup_never_leaves_run_json_running(make_cfg, monkeypatch):
    from learnforget.train import loop as train_mod

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(train_mod, "make_loggers", broken)
    s = setup(make_cfg())
    with pytest.raises(OSError, match="disk full"):
        fit(s)
    assert RunFolder(s.out).read_record().status == "failed"
    assert RunLock(s.out).acquire()  # the lock was released
