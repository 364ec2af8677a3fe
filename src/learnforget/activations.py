"""Activation memory of one training step, traced on the meta device (nothing is allocated).

A forward pass of the model (method applied, train mode, so dropout copies count) runs on meta
tensors while a saved-tensors hook records every distinct storage autograd keeps for the
backward pass, parameters excluded: that is the activation memory a real step holds at the end
of its forward pass. Attention is traced as the fused SDPA kernels that real steps use on CPU
and GPU (flash / memory-efficient: they keep q, k, v, the output and a log-sum-exp, not the
T x T attention matrix), because on meta tensors torch would take the math path instead.

The peak of a step is then estimated as

    weights + optimizer state + max(activations + 2 x logits, gradients)

where `2 x logits` are the float32 gradients of the log-softmax output and of the logits that
exist together at the start of the backward pass. `learnforget bench memory` checks the
estimate against the peak measured on real tensors.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ActivationEstimate:
    batch_size: int
    seq_len: int
    activations_bytes: int   # kept for backward at the end of the forward pass
    logits_bytes: int        # one float32 batch x seq x vocab tensor
    saved_tensors: int       # distinct storages autograd keeps


class _FusedAttention(torch.autograd.Function):
    """Stand-in for a fused SDPA kernel on meta tensors: same output, same saved tensors."""

    @staticmethod
    def forward(ctx, q, k, v):
        b, h, t, _ = q.shape  # fused kernels write (batch, seq, heads, dim): the
        out = q.new_empty(b, t, h, v.shape[-1]).transpose(1, 2)  # transpose back is free
        lse = q.new_empty(*q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never run: the trace has no backward pass
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


@contextmanager
def _fused_sdpa_on_meta():
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, *args, **kwargs):
        if query.device.type != "meta":
            return original(query, key, value, *args, **kwargs)
        return _FusedAttention.apply(query, key, value)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def trace_activations(model: torch.nn.Module, batch_size: int, seq_len: int,
                      vocab_size: int) -> ActivationEstimate:
    """Trace one training forward pass of a meta-device `model` on a batch of token ids."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    params |= {b.untyped_storage()._cdata for b in model.buffers()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st._cdata not in params:
            saved[st._cdata] = st.nbytes()
        return t

    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    was_training = model.training
    model.train()
    try:
        with _fused_sdpa_on_meta(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)  # no padding: packed blocks, the causal kernel
    finally:
        model.train(was_training)
    return ActivationEstimate(batch_size, seq_len, sum(saved.values()),
                              batch_size * seq_len * vocab_size * 4, len(saved))


def peak_estimate(weights: float, grads: float, optimizer: float,
                  act: ActivationEstimate | None) -> float:
    """Weights + optimizer + max(activations + 2 x logits, gradients); no activations: the sum
    of weights, gradients and optimizer state."""
    if act is None:
        return weights + grads + optimizer
    return weights + optimizer + max(act.activations_bytes + 2 * act.logits_bytes, grads)
