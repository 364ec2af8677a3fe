"""The LM head and its cross-entropy over chunks of tokens (train.speed.loss_chunk > 0).

transformers' causal-LM loss takes the logits of every token (tokens x vocabulary; SmolLM2's
49,152-word vocabulary makes them 200 MB in fp32 at 4 x 256 tokens), upcasts them to fp32 and
keeps the log-softmax for the backward pass. Its own options do not avoid that: `logits_to_keep`
only drops positions and `loss_function` receives finished logits. This path calls the decoder,
then per chunk of `chunk` tokens computes the logits, the summed token losses and, in the same
pass, the chunk's gradients with respect to the hidden states and to the head's weight
(softmax - one-hot), as fused linear-cross-entropy kernels do on GPUs (e.g. Liger's); no chunk's
logits outlive it. The backward only scales the stored gradients. Same arithmetic as the
unchunked path: the matmuls in the autocast dtype when autocast is on, softmax and loss in fp32.
Only the positions with a label enter the chunks: in instruction finetuning the prompt's tokens
and the padding (label -100) get no logits at all, which transformers' loss computes and then
ignores, so the LM head's FLOPs fall by the unlabelled share of the batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum over valid tokens of cross_entropy(hidden @ weight.T (+ bias), labels) / divisor."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, divisor: float, chunk: int, dtype):
        h_all = hidden.reshape(-1, hidden.shape[-1])
        y_all = labels.reshape(-1)
        # only the positions that carry a label: an IFT prompt's tokens and padding (label -100)
        # add nothing to the loss or to any gradient, so their logits are never computed
        rows = (y_all != IGNORE).nonzero().squeeze(1)
        h2, y = h_all.index_select(0, rows), y_all.index_select(0, rows)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_rows = torch.zeros_like(h2) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, h2.shape[0], chunk):
            hc = h2[start:start + chunk].to(dtype)
            yc = y[start:start + chunk]
            logits = F.linear(hc, w, b).float()
            total += F.cross_entropy(logits, yc, reduction="sum")
            if not (need_h or need_w or need_b):
                continue
            g = torch.softmax(logits, dim=-1)  # d(sum of losses) / d logits = softmax - one-hot
            g[torch.arange(len(yc), device=g.device), yc] -= 1.0
            g = g.to(dtype)
            if need_h:
                grad_rows[start:start + chunk] = (g @ w).to(grad_rows.dtype)
            if need_w:
                grad_w += (g.t() @ hc).float()
            if need_b:
                grad_b += g.float().sum(0)
        grad_h = None
        if need_h:
            grad_h = torch.zeros_like(h_all)
            grad_h.index_copy_(0, rows, grad_rows)
        ctx.divisor = divisor
        ctx.shape = hidden.shape
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.which = (need_h, need_w, need_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        scale = grad_out / ctx.divisor
        need_h, need_w, need_b = ctx.which
        gh = (next(saved) * scale).reshape(ctx.shape) if need_h else None
        gw = (next(saved) * scale).to(ctx.dtypes[0]) if need_w else None
        gb = (next(saved) * scale).to(ctx.dtypes[1]) if need_b else None
        return gh, gw, gb, None, None, None, None


def supported(model: torch.nn.Module) -> str | None:
    """None when the chunked loss can replace this model's forward loss, else why not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        return "prompt learning feeds virtual tokens through the peft wrapper"
    if not isinstance(getattr(base, "model", None), torch.nn.Module):
        return f"{type(base).__name__} has no decoder at .model"
    if type(getattr(base, "lm_head", None)) is not torch.nn.Linear:
        return "the LM head is not a plain nn.Linear (an adapter on it, or another head)"
    if getattr(base.config, "final_logit_softcapping", None):
        return "the model soft-caps its logits"
    return None


def chunked_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int,
                 num_items_in_batch: float | None = None, **_: Any) -> torch.Tensor:
    """The causal-LM loss of `batch` as transformers computes it (labels shifted by one, -100
    ignored; summed / num_items_in_batch, or the mean over valid tokens), chunked."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=batch["input_ids"],
                        attention_mask=batch.get("attention_mask")).last_hidden_state
    labels = F.pad(batch["labels"], (0, 1), value=IGNORE)[..., 1:].to(hidden.device)
    divisor = float(num_items_in_batch) if num_items_in_batch is not None \
        else float(max(1, int((labels != IGNORE).sum())))
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) \
        else base.lm_head.weight.dtype
    with torch.autocast(device, enabled=False):
        return _ChunkedHeadLoss.apply(hidden, base.lm_head.weight, base.lm_head.bias, labels,
                                      divisor, chunk, dtype)
