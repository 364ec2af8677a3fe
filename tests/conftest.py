"""Shared fixtures: composed real configs, pointed at temporary run and cache folders."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from learnforget.assets.eval_data import SUITE_DATA  # noqa: E402
from learnforget.config import compose  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


def small_run_overrides() -> list[str]:
    """conf/debug/fast.yaml, the one definition of a small run, as key=value overrides (value
    overrides, so that they replace what a study or an earlier override sets, as `debug=fast`
    on its own would not)."""
    import yaml

    raw = yaml.safe_load((Path(__file__).parents[1] / "conf" / "debug" / "fast.yaml").read_text())
    out = [f"{k.removeprefix('override /')}={v}" for d in raw.pop("defaults", [])
           for k, v in d.items()]

    def flat(prefix: str, node) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                flat(f"{prefix}{k}.", v)
            else:
                out.append(f"{prefix}{k}=" + (f"[{','.join(map(str, v))}]" if isinstance(v, list)
                                              else str(v)))

    flat("", raw)
    return out


# A run of 2 optimizer steps on tiny data: checkpoints after step 1 and step 2.
FAST = small_run_overrides()
# Offline data sets with their required settings.
OFFLINE_DATA = {
    "stdlib_code": ["data.max_docs=8", "data.heldout_docs=2"],
    "arith_ift": ["data.max_docs=40", "data.heldout_docs=4", "train.seq_len=96"],
    "local_text": [f"data.path={SUITE_DATA / 'tiny_corpus.jsonl'}", "data.heldout_docs=2"],
    "local_instruct": [f"data.path={FIXTURES / 'tiny_instruct.jsonl'}", "data.heldout_docs=2",
                       "train.seq_len=96"],
}


# The fast tier (`make test-fast`, or `pytest -m fast`): the tests whose node id (under
# tests/) starts with one of these are marked `fast`. Together they cover configs and the
# documented commands, parameter counts and memory estimates, the run folder (layout, atomic
# writes, locks), the statistics (paired deltas, matched learning, the Gaussian baseline, LR
# scaling) and bad input, within 60 s on 2 cores with 2 workers (docs/development.md has the
# measured time). `learnforget params` in a subprocess and LoRA counts at r=64/256 stay in the
# default suite only.
FAST_TESTS = (
    "test_architecture.py", "test_bad_input.py", "test_cli_help.py", "test_docs_commands.py",
    "test_files.py", "test_locks.py", "test_lr_scaling.py", "test_matched.py",
    "test_noise_baseline.py", "test_paired.py", "test_runfolder.py", "test_suite_data.py",
    "test_params.py::test_hand_count_is_the_published_size",
    "test_params.py::test_lora_counts_are_exact[all-16]",
    "test_params.py::test_lora_counts_are_exact[attention-16]",
    "test_params.py::test_lora_counts_are_exact[mlp-16]",
    "test_params.py::test_full_and_other_methods",
    "test_params.py::test_methods_added_by_yaml_count_exactly",
    "test_params.py::test_qlora_memory_uses_4bit_weights",
)


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config, items):
    """`fast` marks the fast tier's tests; `gpu` tests run where CUDA is available and are
    skipped (with the reason) elsewhere."""
    for item in items:
        if item.nodeid.removeprefix("tests/").startswith(FAST_TESTS):
            item.add_marker(pytest.mark.fast)
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (tests/test_gpu.py: -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


# ------------------------------------------------------------------ multi-rank runs (DDP, FSDP)

# A tiny full-finetuning run that one process (batch 4) and two ranks (batch 2 each) must
# train to the same losses (to 1e-5: fp32 compute, since bf16 rounds a batch of 4 and two of 2
# differently; tests/test_paper_toy.py runs the bf16 policy on 2 FSDP ranks).
MULTI_RANK = [*FAST, "method=full", "train.checkpoints.at=[2,4]", "train.num_threads=1",
              "data.max_docs=8", "data.heldout_docs=2", "train.lr=1e-3", "train.precision=fp32"]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def free_port() -> int:
    """A TCP port the OS reports free now, for a rendezvous: tests run in parallel workers
    (pytest -n 2), so none may use a fixed port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multi_rank_env(tmp_path: Path, cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "LEARNFORGET_RUNS_DIR": str(tmp_path / "runs"),
            "LEARNFORGET_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}


def train_single_process(env: dict[str, str]) -> None:
    """The one-process reference run of MULTI_RANK, in runs/single."""
    single = subprocess.run(
        [sys.executable, "-m", "learnforget.cli", "train", *MULTI_RANK, "train.batch_size=4",
         "experiment_name=single"], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "train/metrics.jsonl").read_text().splitlines()]


def step_losses(run: Path) -> list[float]:
    return [r["loss"] for r in metrics_rows(run) if "loss" in r]


def tiny_hflm(**kwargs):
    """lm-eval's HFLM around a seeded, randomly initialised tiny Llama (eval mode) with the
    package's tiny tokenizer: the model of the lm-eval parity tests."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import LlamaConfig, LlamaForCausalLM

    from learnforget.assets.models import tiny_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512)).eval()
    return HFLM(pretrained=model, tokenizer=tiny_tokenizer(), **kwargs)


# ------------------------------------------------------------------ a model's logits, its base

def logits_input():
    """A fixed 8-token input for comparing a model's logits (ids valid in every tiny vocab)."""
    import torch

    return torch.tensor([[5, 17, 300, 42, 1000, 7, 99, 12]])


def eval_logits(model):
    """The model's logits on logits_input(), in eval mode, without gradients."""
    import torch

    model.eval()
    ids = logits_input()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def load_base(cfg):
    """The run config's base model as `learnforget.assets.models.load_model` loads it (CPU)."""
    from learnforget.assets.models import load_model

    model, _, _ = load_model(cfg.model, cfg.method, Path(cfg.paths.cache_dir), "cpu")
    return model
