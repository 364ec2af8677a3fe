"""Checks that need one CUDA GPU (`pytest -m gpu`; skipped elsewhere): the mixed-precision
path, activation checkpointing, FSDP on one rank, and the memory estimate of `learnforget
params` against torch.cuda.max_memory_allocated on a ~1B-parameter Llama-shaped model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from learnforget.config import compose
from learnforget.train.loop import setup, train
from learnforget.train.params import param_report
from learnforget.train.plan import micro_batch

pytestmark = pytest.mark.gpu

PAPER = ["method=full", "model.dtype=bfloat16", "train.precision=bf16", "train.optimizer=lionw",
         "train.betas=[0.9,0.95]", "train.weight_decay=1e-6", "train.schedule=constant",
         "train.checkpoints.at=[3]"]
# ~1.1B parameters, Llama-2 shaped (head dim 128), built on the GPU from its config
LLAMA_1B = ["model=tiny_llama", "model.arch.vocab_size=2048", "model.arch.hidden_size=2048",
            "model.arch.intermediate_size=5504", "model.arch.num_hidden_layers=22",
            "model.arch.num_attention_heads=16", "model.arch.num_key_value_heads=16",
            "model.arch.attention_bias=false", "model.arch.mlp_bias=false",
            "model.arch.max_position_embeddings=2048"]


def test_fp32_masters_on_cuda_keep_every_update(make_cfg):
    def run(lr):
        out = train(make_cfg(*PAPER, f"train.lr={lr}"))
        return out, load_file(out / "checkpoints" / "step-000003" / "model.safetensors")

    out, w1 = run("1e-5")
    _, w0 = run("1e-30")
    info = json.loads((out / "run.json").read_text())
    assert info["train"]["device"].startswith("cuda")
    assert info["train"]["precision_policy"]["master"] == "float32"
    keys = [k for k in w1 if "embed_tokens" not in k]
    moved = sum(int((w1[k] != w0[k]).sum()) for k in keys) / sum(w1[k].numel() for k in keys)
    assert moved >= 0.99


def test_activation_checkpointing_gradients_on_cuda(make_cfg):
    """In training mode (setup() leaves the model in eval mode, where transformers does not
    checkpoint): the checkpointed run recomputes every layer (twice the MLP calls)."""
    from learnforget.methods.modules import decoder_layers

    grads, calls = [], []
    for ckpt in ("false", "true"):
        s = setup(make_cfg("method=full", "train.precision=bf16", "train.batch_size=4",
                           "train.seq_len=128", f"train.activation_checkpointing={ckpt}"))
        s.model.train()
        layers = decoder_layers(s.model)
        n = [0]
        for layer in layers:
            layer.mlp.register_forward_pre_hook(lambda *_, n=n: n.__setitem__(0, n[0] + 1))
        b = {k: v.cuda() for k, v in micro_batch(s.data, s.plan, s.cfg.train, 0, 0,
                                                  s.tokenizer.pad_token_id).items()}
        with s.policy.autocast(s.device):
            loss = s.model(**b).loss
        loss.backward()
        grads.append({n: p.grad.float().cpu() for n, p in s.model.named_parameters()})
        calls.append(n[0] / len(layers))
    assert calls == [1, 2]
    for n, g in grads[0].items():  # cuDNN/cuBLAS may pick other kernels on recompute
        assert (grads[1][n] - g).abs().max() <= 1e-3 * g.abs().max() + 1e-8, n


def test_fsdp_on_one_rank_matches_unsharded(make_cfg, monkeypatch):
    """FSDP2 with the bf16 mixed-precision policy on a 1-rank NCCL group: same losses as the
    unsharded model within bf16 tolerance."""
    import torch.distributed as dist

    from learnforget.methods.modules import decoder_layers
    from learnforget.train import distributed

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    from conftest import free_port

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        losses = {}
        for sharded in (False, True):
            s = setup(make_cfg("method=full", "train.precision=bf16", "train.optimizer=adamw",
                               "train.lr=1e-3"))
            s.model.train()  # as train() does (setup() leaves from_pretrained's eval mode)
            if sharded:
                distributed.shard_model(s.model, decoder_layers(s.model), True, torch.bfloat16)
            opt = torch.optim.AdamW([p for p in s.model.parameters() if p.requires_grad], lr=1e-3)
            out = []
            for i in range(3):
                b = {k: v.cuda() for k, v in micro_batch(s.data, s.plan, s.cfg.train, i, 0,
                                                          s.tokenizer.pad_token_id).items()}
                with s.policy.autocast(s.device):
                    loss = s.model(**b).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                out.append(float(loss))
            losses[sharded] = out
        for a, b in zip(losses[False], losses[True], strict=True):
            assert abs(a - b) <= 2e-2 * abs(a)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_memory_estimate_within_10_percent_on_1b_llama(tmp_path, cache_dir, method):
    overrides = [*LLAMA_1B, f"method={method}", "method.r=16", "train.precision=bf16",
                 "train.batch_size=2", "train.seq_len=1024", "train.optimizer=adamw",
                 f"paths.runs_dir={tmp_path}", f"paths.cache_dir={cache_dir}",
                 "data=stdlib_code", "data.max_docs=64", "data.heldout_docs=2", "logger=none",
                 "train.checkpoints.unit=steps", "train.checkpoints.at=[2]"]
    est = param_report(compose(overrides), device="cuda")
    s = setup(compose(overrides))
    s.model.train()  # as train() does: LoRA dropout keeps its masks for the backward
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for i in range(2):  # the second step has optimizer state
        b = {k: v.cuda() for k, v in micro_batch(s.data, s.plan, s.cfg.train, i, 0,
                                                  s.tokenizer.pad_token_id).items()}
        with s.policy.autocast(s.device):
            loss = s.model(**b).loss
        loss.backward()
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated()
    assert base > 0.9 * est.weights_bytes  # the weights were resident before the steps
    assert est.peak_bytes == pytest.approx(peak, rel=0.10), (est.peak_bytes / 2**30, peak / 2**30)
