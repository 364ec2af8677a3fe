"""`--size toy` of every paper study keeps the paper's numerics (dtype policy, optimizer, LR,
schedule shape, clipping) and shrinks only the model, data and budgets; and at those numerics
(LR 1e-5 on a bf16-loaded model) no update is lost and the held-out loss falls, in one process
and as 2-rank FSDP over gloo."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TORCHRUN, free_port, multi_rank_env
from safetensors.torch import load_file

from learnforget.studies.plan import expand
from learnforget.studies.study import apply_size, find_study, load_study
from learnforget.train.loop import train

PAPER_STUDIES = ["code_cpt", "math_cpt", "code_ift", "math_ift", "lr_search"]
# what --size toy may change; every other train.* key must equal the paper job's
SHRINKS = {"batch_size", "grad_accum", "seq_len", "checkpoints", "heldout_batches", "warmup_steps",
           "distributed", "num_threads"}


def _plan(study: str, size: str | None, tmp: Path, cache: Path):
    s, extra = apply_size(load_study(find_study(study)), size,
                          [f"paths.runs_dir={tmp}", f"paths.cache_dir={cache}"])
    return expand(s, extra)


def _pick(plan, method: str):
    return next(j for j in plan.jobs if j.cfg.method.name == method)


def _trainable_moved(a: dict, b: dict, frozen_prefix: str = "") -> float:
    keys = [k for k in a if "embed_tokens" not in k]
    moved = sum(int((a[k].float() != b[k].float()).sum()) for k in keys)
    return moved / sum(a[k].numel() for k in keys)


def _checkpoint_tensors(run: Path) -> list[dict[str, torch.Tensor]]:
    out = []
    for ck in sorted(p for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")):
        f = ck / "model.safetensors"
        out.append(load_file(f if f.exists() else ck / "adapter_model.safetensors"))
    return out


def _heldout(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    return [r["heldout_loss"] for r in rows if "heldout_loss" in r]


def _assert_learns(run: Path) -> dict:
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished"
    pol = info["train"]["precision_policy"]
    assert (pol["compute"], pol["master"]) == ("bf16", "float32")
    first, last = _checkpoint_tensors(run)[:2]
    assert all(v.dtype == torch.float32 for v in last.values())  # checkpoints keep the masters
    assert _trainable_moved(last, first) >= 0.99  # every trainable weight moved between budgets
    held = _heldout(run)
    assert held[-1] < held[0]  # held-out loss below the base model's
    return info


@pytest.mark.parametrize("study", PAPER_STUDIES)
def test_toy_keeps_the_paper_numerics(study, tmp_path, cache_dir):
    paper, toy = _plan(study, None, tmp_path, cache_dir), _plan(study, "toy", tmp_path, cache_dir)
    for method in ("full", "lora"):
        p, t = _pick(paper, method).cfg, _pick(toy, method).cfg
        for key in p.train:
            if key not in SHRINKS:
                assert t.train[key] == p.train[key], (study, method, key)
        assert t.model.dtype == p.model.dtype == "bfloat16"
        assert t.method == p.method or method == "lora"  # lora: the first rank of each
        assert t.method.dropout == p.method.dropout and t.method.alpha == p.method.alpha


@pytest.mark.parametrize("study", PAPER_STUDIES)
def test_toy_full_and_lora_learn_at_the_paper_lr(study, tmp_path, cache_dir):
    plan = _plan(study, "toy", tmp_path, cache_dir)
    for method in ("full", "lora"):
        job = _pick(plan, method)
        info = _assert_learns(train(job.cfg))
        assert info["train"]["precision_policy"]["frozen"] == (
            "float32" if method == "full" else "bfloat16")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
@pytest.mark.parametrize("study,ckpt", [
    ("code_ift", "true"),
    pytest.param("code_cpt", "false", marks=pytest.mark.slow),
    pytest.param("math_cpt", "false", marks=pytest.mark.slow),
    pytest.param("math_ift", "false", marks=pytest.mark.slow),
    pytest.param("lr_search", "true", marks=pytest.mark.slow)])
def test_toy_full_finetuning_as_two_rank_fsdp(study, ckpt, tmp_path, cache_dir):
    """The full job of each paper study on 2 gloo ranks with FSDP2 (fp32 sharded masters
    all-gathered in bf16, gradients reduced in fp32), some with activation checkpointing; the
    IFT study with checkpointing in the default suite (test_fsdp covers FSDP without it), the
    other four marked slow."""
    job = _pick(_plan(study, "toy", tmp_path, cache_dir), "full")
    env = {**multi_rank_env(tmp_path, cache_dir), "OMP_NUM_THREADS": "1"}
    args = [a for a in job.overrides if not a.startswith(("paths.", "train.distributed.strategy"))]
    port = free_port()
    out = subprocess.run([str(TORCHRUN), "--nproc_per_node=2", f"--master_port={port}", "-m",
                          "learnforget.cli", "train", *args, "train.distributed.strategy=fsdp",
                          "train.num_threads=1", "train.batch_size=2", "experiment_name=fsdp",
                          f"train.activation_checkpointing={ckpt}"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run = next((tmp_path / "runs" / "fsdp").iterdir())
    info = _assert_learns(run)
    assert info["train"]["distributed"] == "fsdp" and info["train"]["ranks"] == 2
    assert info["train"]["activation_checkpointing"] is (ckpt == "true")
