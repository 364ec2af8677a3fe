"""W&B mirrors the disk record offline, without secrets; logger=none writes no W&B files."""

from __future__ import annotations

import json
import time

from learnforget.tracking import scrub
from learnforget.train import fit, setup


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
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_logger_none_writes_only_the_disk_record(make_cfg):
    out = fit(setup(make_cfg("logger=none")))
    assert not (out / "wandb").exists()
    assert (out / "train" / "metrics.jsonl").read_text().count("\n") >= 3
