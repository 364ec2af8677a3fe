"""LR scaling: best LR per setting, its grid interval and the ratio to full finetuning's, on
hand-made run folders with known held-out losses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from learnforget.analysis.lr_scaling import format_lr_table, lr_table, write_lr_table
from learnforget.errors import ConfigError


def make_run(root: Path, method: str, r: int | None, lr: float, loss: float, seed: int = 0,
             drift: float | None = None) -> None:
    summary = f"{method}_r{r}" if r else method
    d = root / f"{summary}-lr{lr:g}-s{seed}"
    (d / "train").mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"status": "finished", "run": {
        "name": d.name, "model": "m", "data": "code", "method": method,
        "method_summary": summary, "method_settings": {"r": r} if r else {}, "seed": seed}}))
    (d / "config.yaml").write_text(f"train:\n  lr: {lr}\n")
    (d / "train/metrics.jsonl").write_text(
        json.dumps({"step": 1, "heldout_loss": loss + 1}) + "\n"
        + json.dumps({"step": 2, "loss": 9.0}) + "\n"
        + json.dumps({"step": 4, "heldout_loss": loss}) + "\n")
    if drift is not None:
        (d / "eval").mkdir()
        (d / "eval/summary-s.json").write_text(json.dumps({"rows": [
            {"checkpoint": "base", "step": 0, "drift_kl": 0.0},
            {"checkpoint": "step-000002", "step": 2, "drift_kl": drift / 2},
            {"checkpoint": "step-000004", "step": 4, "drift_kl": drift}]}))


def test_best_lr_interval_and_ratio_by_hand(tmp_path):
    for lr, loss in ((5e-5, 2.42), (1e-4, 2.40), (2e-4, 2.41), (5e-4, 2.53)):
        make_run(tmp_path, "full", None, lr, loss, drift=0.01 if lr == 1e-4 else 0.5)
    for lr, loss in ((5e-4, 2.43), (1e-3, 2.41), (2e-3, 2.39), (5e-3, 2.43)):
        for seed, shift in ((0, -0.01), (1, 0.01)):  # mean over seeds = loss
            make_run(tmp_path, "lora", 8, lr, loss + shift, seed,
                     drift=0.03 + seed * 0.01 if lr == 2e-3 else 0.9)
    for lr, loss in ((1e-3, 2.50), (2e-3, 2.45)):  # best at the grid's top: open interval
        make_run(tmp_path, "lora", 64, lr, loss)
    t = lr_table(tmp_path).set_index("setting")
    assert t.loc["full", "best_lr"] == 1e-4 and t.loc["lora_r8", "best_lr"] == 2e-3
    assert t.loc["full", "lr_low"] == pytest.approx(math.sqrt(5e-5 * 1e-4))
    assert t.loc["full", "lr_high"] == pytest.approx(math.sqrt(1e-4 * 2e-4))
    assert t.loc["lora_r8", "heldout_loss"] == pytest.approx(2.39)
    assert t.loc["lora_r8", "seeds"] == 2
    assert t.loc["lora_r8", "ratio_to_full"] == pytest.approx(20.0)
    assert t.loc["lora_r8", "ratio_low"] == pytest.approx(
        math.sqrt(1e-3 * 2e-3) / math.sqrt(1e-4 * 2e-4))
    assert t.loc["lora_r8", "ratio_high"] == pytest.approx(
        math.sqrt(2e-3 * 5e-3) / math.sqrt(5e-5 * 1e-4))
    assert t.loc["lora_r8", "drift_kl"] == pytest.approx(0.035)  # mean of the 2 best-LR seeds
    assert t.loc["full", "drift_kl"] == pytest.approx(0.01)
    assert t.loc["lora_r64", "edge"] == "high" and t.loc["lora_r64", "lr_high"] == 2e-3
    assert t.loc["full", "ratio_to_full"] == 1.0
    md = format_lr_table(t.reset_index())
    assert "| lora_r8 | 0.0005 0.001 0.002 0.005 | 0.002 [0.00141, 0.00316] |" in md
    assert "(grid edge: high)" in md
    _, paths = write_lr_table(tmp_path, tmp_path / "out")
    assert [p.name for p in paths] == ["lr_scaling.csv", "lr_scaling.md"]


def test_no_lr_search_gives_no_table_and_no_runs_is_an_error(tmp_path):
    make_run(tmp_path, "full", None, 1e-4, 2.4)
    assert write_lr_table(tmp_path, tmp_path / "out") is None
    with pytest.raises(ConfigError, match="no run with a learning rate"):
        lr_table(tmp_path / "empty")


def test_matched_learning_uses_each_settings_best_lr(tmp_path):
    """In an LR search, matched learning sees only the best-LR run of each setting."""
    import pandas as pd

    from learnforget.analysis.stage import _at_best_lr

    for lr, loss in ((1e-4, 2.40), (2e-4, 2.41)):
        make_run(tmp_path, "full", None, lr, loss)
    for lr, loss in ((1e-3, 2.41), (2e-3, 2.39)):
        make_run(tmp_path, "lora", 8, lr, loss)
    part = pd.DataFrame({"run": ["full-lr0.0001-s0", "full-lr0.0002-s0", "lora_r8-lr0.001-s0",
                                 "lora_r8-lr0.002-s0"]})
    assert list(_at_best_lr(tmp_path, part)["run"]) == ["full-lr0.0001-s0", "lora_r8-lr0.002-s0"]
