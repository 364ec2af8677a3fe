"""Real SmolLM2-135M (from the PyPI package, converted once into the cache): a short LoRA
code-CPT run lowers the held-out code loss. Slow: minutes on 2 cores, ~100 MB download once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from learnforget.config import compose
from learnforget.train.loop import fit, setup

pytestmark = pytest.mark.slow


def test_smollm2_lora_lowers_heldout_code_loss(tmp_path):
    cache = os.environ.get("LEARNFORGET_CACHE_DIR", str(Path.home() / ".cache/learnforget"))
    cfg = compose([f"paths.runs_dir={tmp_path}", f"paths.cache_dir={cache}", "logger=none",
                   "model=smollm2_135m", "method=lora", "method.r=8", "data=stdlib_code",
                   "data.max_docs=60", "data.heldout_docs=8", "train.seq_len=128",
                   "train.batch_size=4", "train.lr=1e-3", "train.checkpoints.unit=steps",
                   "train.checkpoints.at=[6]", "train.heldout_batches=4"])
    s = setup(cfg)
    assert s.trainable == 30 * (4 * 8 * (576 + 576) - 2 * 8 * (576 - 192) + 3 * 8 * (576 + 1536))
    out = fit(s)
    rows = [json.loads(x) for x in (out / "train/metrics.jsonl").read_text().splitlines()]
    held = [r["heldout_loss"] for r in rows if "heldout_loss" in r]
    assert len(held) == 2 and held[1] < held[0] - 0.01, held
