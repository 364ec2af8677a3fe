"""Shared fixtures: composed real configs, pointed at temporary run and cache folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from learnforget.config import compose  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
# A run of 2 optimizer steps on tiny data: checkpoints after step 1 and step 2.
FAST = [
    "logger=none",
    "train.batch_size=2",
    "train.seq_len=32",
    "train.checkpoints.unit=steps",
    "train.checkpoints.at=[1,2]",
    "train.heldout_batches=1",
]
# Offline data sets with their required settings.
OFFLINE_DATA = {
    "stdlib_code": ["data.max_docs=8", "data.heldout_docs=2"],
    "arith_ift": ["data.max_docs=40", "data.heldout_docs=4", "train.seq_len=96"],
    "local_text": [f"data.path={FIXTURES / 'tiny_corpus.jsonl'}", "data.heldout_docs=2"],
    "local_instruct": [f"data.path={FIXTURES / 'tiny_instruct.jsonl'}", "data.heldout_docs=2",
                       "train.seq_len=96"],
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the session: the tiny base model is built once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def make_cfg(runs_dir, cache_dir):
    """Compose the real config with test paths and a 2-step schedule."""

    def make(*overrides: str, data: str = "stdlib_code"):
        return compose([f"paths.runs_dir={runs_dir}", f"paths.cache_dir={cache_dir}",
                        f"data={data}", *FAST, *OFFLINE_DATA.get(data, []), *overrides])

    return make
