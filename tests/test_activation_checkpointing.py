"""Activation checkpointing (train.activation_checkpointing): the same gradients as without it,
less activation memory measured on real tensors, and both modelled by the estimate."""

from __future__ import annotations

import pytest
import torch
from conftest import OFFLINE_DATA

from learnforget.bench.runner import bench_memory
from learnforget.errors import ConfigError
from learnforget.methods.modules import decoder_layers
from learnforget.train.loop import setup, train
from learnforget.train.plan import micro_batch

SHAPE = ["train.batch_size=4", "train.seq_len=128"]


def _grads(make_cfg, method: str, ckpt: bool, precision: str
           ) -> tuple[dict[str, torch.Tensor], int, int]:
    """(gradients of one micro-batch, decoder layers, MLP forward calls during forward and
    backward). setup() leaves the model as from_pretrained does, in eval mode, where
    transformers never checkpoints: the step is taken in training mode, as train() does."""
    s = setup(make_cfg(f"method={method}", *SHAPE, f"train.precision={precision}",
                       f"train.activation_checkpointing={str(ckpt).lower()}"))
    s.model.train()
    layers = decoder_layers(s.model)
    calls = [0]
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
             for layer in layers]  # inside the checkpointed forward: recomputation calls it again
    batch = micro_batch(s.data, s.plan, s.cfg.train, 0, 0, s.tokenizer.pad_token_id)
    torch.manual_seed(0)  # LoRA dropout: the recomputed forward restores the RNG state
    with s.policy.autocast(s.device):
        loss = s.model(**batch).loss
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in s.model.named_parameters() if p.grad is not None}
    return grads, len(layers), calls[0]


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_gradients_with_and_without_checkpointing(make_cfg, method, precision):
    """Checkpointing recomputed every layer in the backward pass (twice the MLP calls) and gave
    the same gradients. Tolerance: 1e-6 relative to each tensor's largest gradient (measured in
    training mode, with the recomputation: identical, 0.0 for all four; the recomputation runs
    the same kernels on the same inputs)."""
    (plain, n, calls_plain), (ckpt, _, calls_ckpt) = (
        _grads(make_cfg, method, c, precision) for c in (False, True))
    assert (calls_plain, calls_ckpt) == (n, 2 * n)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name, g in plain.items():
        assert (ckpt[name] - g).abs().max() <= 1e-6 * g.abs().max(), name


def test_checkpointing_lowers_measured_activation_memory(tmp_path, cache_dir):
    extra = [f"paths.cache_dir={cache_dir}", *OFFLINE_DATA["stdlib_code"],
             "train.precision=bf16"]
    peaks = {}
    for ckpt in ("false", "true"):
        r = bench_memory("tiny_llama", repeats=1, batch_size=4, seq_len=128,
                         runs_dir=tmp_path / ckpt, extra=[*extra,
                                                          f"train.activation_checkpointing={ckpt}"])
        peaks[ckpt] = {m: v["measured_parts"]["activation"] for m, v in r["methods"].items()}
        for v in r["methods"].values():  # the estimate models both
            assert v["estimate_over_measured"]["median"] == pytest.approx(1.0, abs=0.10)
    for method in ("lora", "full"):  # measured in fp32: 13.6 -> 4.5 MiB (lora), 10.9 -> 4.7 (full)
        assert peaks["true"][method] < 0.6 * peaks["false"][method]


def test_checkpointing_trains_and_is_recorded(make_cfg):
    import json

    out = train(make_cfg("method=lora", "method.r=4", "train.activation_checkpointing=true"))
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["train"]["activation_checkpointing"] is True


def test_checkpointing_with_prefix_tuning_is_one_line_error(make_cfg):
    with pytest.raises(ConfigError, match="does not work with method=prefix"):
        setup(make_cfg("method=prefix", "train.activation_checkpointing=true"))
