"""Activation memory of one training step, traced on the meta device (nothing is allocated).

A forward pass of the model (method applied, train mode, so dropout copies count) runs on meta
tensors while a saved-tensors hook records every distinct storage autograd keeps for the
backward pass, parameters excluded: that is the activation memory a real step holds at the end
of its forward pass. Attention is traced as the fused SDPA kernels that real steps use on CPU
and GPU (flash / memory-efficient: they keep q, k, v, the output and a log-sum-exp, not the
T x T attention matrix), because on meta tensors torch would take the math path instead.

The peak of a step is then estimated as

    weights + optimizer state + max(activations + max(2 x logits, recompute + workspace),
                                    gradients)

where `2 x logits` are the float32 gradients of the log-softmax output and of the logits that
exist together at the start of the backward pass, `recompute` (activation checkpointing
only) is one decoder layer's activations rebuilt later in the backward pass, and `workspace`
what the method's backward builds for a while beyond them (Method.backward_workspace: SAID
rebuilding one target weight; 0 for the others). Under bf16
compute the trace emulates autocast (meta tensors bypass it), so the 16-bit copies of inputs
and fp32 master weights that autocast makes are counted as a real step keeps them. `learnforget bench memory` checks the
estimate against the peak measured on real tensors.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import DynamicCache


@dataclass
class ActivationEstimate:
    batch_size: int
    seq_len: int
    activations_bytes: int   # kept for backward at the end of the forward pass
    logits_bytes: int        # one float32 batch x seq x vocab tensor
    saved_tensors: int       # distinct storages autograd keeps
    checkpointing: bool = False
    compute_dtype: str = "float32"
    recompute_bytes: int = 0  # checkpointing: one layer's activations, rebuilt in the backward


# Ops that autocast runs in the low-precision dtype (torch's CPU and CUDA autocast lists, the
# ones a decoder-only transformer calls): their floating inputs are cast, so the 16-bit copies
# of activations and of fp32 weights are what autograd keeps.
_AUTOCAST_OPS = {F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm,
                 torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm,
                 F.scaled_dot_product_attention}


class _MetaAutocast(TorchFunctionMode):
    """torch.autocast for meta tensors (which autocast's dispatch key does not reach): the same
    casts of the same ops' inputs, so the trace keeps what a real autocast step keeps."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _AUTOCAST_OPS:
            def cast(x):
                return x.to(self.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() \
                    else x
            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


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


def _saved_bytes(model: torch.nn.Module, batch_size: int, seq_len: int,
                 compute_dtype: torch.dtype | None) -> tuple[int, int]:
    """(bytes, storages) autograd keeps after one training forward pass on meta tensors."""
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
    amp = _MetaAutocast(compute_dtype) if compute_dtype is not None else nullcontext()
    try:
        with _fused_sdpa_on_meta(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                amp:
            # no padding: packed blocks, the causal kernel. Under checkpointing transformers
            # drops the cache and then inspects position ids for packed sequences, which needs
            # values (meta tensors have none): an explicit cache avoids that; it only
            # references k and v, which attention keeps anyway
            extra = {"past_key_values": DynamicCache(config=_checkpointable(model).config)} \
                if checkpointing_on(model) else {}
            model(input_ids=ids, labels=ids, **extra)
    finally:
        model.train(was_training)
    return sum(saved.values()), len(saved)


def _checkpointable(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable_checkpointing(model: torch.nn.Module) -> None:
    """transformers' per-decoder-layer activation checkpointing, non-reentrant (works with
    frozen embeddings, DDP and FSDP); the KV cache is off in training anyway."""
    model.config.use_cache = False
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpointing_on(model: torch.nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def disable_checkpointing(model: torch.nn.Module) -> None:
    (getattr(model, "activation_checkpointing_disable", None)
     or model.gradient_checkpointing_disable)()


def trace_activations(model: torch.nn.Module, batch_size: int, seq_len: int, vocab_size: int,
                      compute_dtype: torch.dtype | None = None,
                      checkpointing: bool = False) -> ActivationEstimate:
    """Trace one training forward pass of a meta-device `model` on a batch of token ids, under
    (emulated) autocast to `compute_dtype` if given.

    With `checkpointing` (activation checkpointing per decoder layer) the forward keeps only
    what lies outside the layers plus each layer's input: activations = (trace with
    checkpointing) + L x one layer's input. The backward then rebuilds one layer at a time,
    after the logits' gradients are gone: recompute_bytes = one layer's own activations,
    (trace without - trace with) / L, which the peak takes instead of 2 x logits if larger."""
    full, n = _saved_bytes(model, batch_size, seq_len, compute_dtype)
    logits = batch_size * seq_len * vocab_size * 4
    dtype = str(compute_dtype or torch.float32).removeprefix("torch.")
    if not checkpointing:
        return ActivationEstimate(batch_size, seq_len, full, logits, n, False, dtype)
    base = _checkpointable(model)
    layers = int(getattr(base.config, "num_hidden_layers", 1) or 1)
    hidden = int(getattr(base.config, "hidden_size", 0) or 0)
    was, use_cache = checkpointing_on(base), base.config.use_cache
    if not was:
        enable_checkpointing(base)
    try:
        kept, n = _saved_bytes(model, batch_size, seq_len, compute_dtype)
    finally:
        if not was:
            disable_checkpointing(base)
            base.config.use_cache = use_cache
    param_dtype = next(base.parameters()).dtype  # the residual stream's dtype
    inputs = layers * batch_size * seq_len * hidden * (torch.finfo(param_dtype).bits // 8)
    one_layer = max(0, full - kept) // layers
    return ActivationEstimate(batch_size, seq_len, kept + inputs, logits, n, True, dtype,
                              one_layer)


def step_activations(activations: float, logits: float, recompute: float,
                     workspace: float = 0.0) -> float:
    """What a training step holds beside its weights, optimizer state and gradients, at its
    peak: the traced activations + max(2 x logits (the fp32 logits and their gradient at the
    loss), one checkpointed layer's recompute + the method's backward workspace). The one
    formula behind ParamReport.peak_bytes and learnforget.train.gpu_fit.per_gpu_bytes."""
    return activations + max(2 * logits, recompute + workspace)
