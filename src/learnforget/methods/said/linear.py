"""The forward of a reparametrised target layer, y = x (W0 + λ P(θ_d))ᵀ + b, as one autograd
Function that keeps no weight-sized tensor for the backward.

Through the parametrization alone (`module.weight` = W0 + λ P(θ_d), then the layer's own
forward) the linear op saves its weight argument, a new weight-sized tensor per target, until
the backward: at Llama-2-7B's shapes in float32 that is 24 GiB for one step. `IntrinsicLinear`
instead saves the input (the copy the linear op itself would keep: under autocast its cast to
the compute dtype), W0 (a parameter: no new memory), θ_d and λ_i. Its backward rebuilds W0 + ΔW
from them, one target at a time, for the input's gradient (one more projection forward per
target and step, skipped where the input needs no gradient), and pushes dL/dW = gᵀx through the
projection's transpose as the Fastfood Function does (dθ_d = λ_i Pᵀ g, dλ_i = <Pᵀ g, θ_d>).

Forward and backward do the same arithmetic as the parametrized path (the same W, the same
dtype casts; the same matrix products up to the kernels' summation order), so gradients agree
to float32 rounding. Two layouts: nn.Linear (weight out x in, y = F.linear(x, W, b)) and
transformers' Conv1D (weight in x out, y = addmm(b, x, W), GPT-2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from learnforget.methods.said.fastfood import Projection

LINEAR, CONV1D = "linear", "conv1d"  # weight layouts: out x in (nn.Linear), in x out (Conv1D)


def effective_weight(w0: torch.Tensor, theta: torch.Tensor, lam: torch.Tensor | None,
                     projection: Projection) -> torch.Tensor:
    """W0 + λ P(θ_d) without autograd: ΔW in float32, added in W0's dtype (the
    parametrization's arithmetic, learnforget.methods.said.model.FastfoodDelta)."""
    delta = projection.forward(theta)
    if lam is not None:
        delta.mul_(lam.detach().float())
    return w0.detach() + delta.view(w0.shape).to(w0.dtype)


def _apply(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
           layout: str) -> torch.Tensor:
    """The layer's own op (nn.Linear.forward, Conv1D.forward) with weight w."""
    if layout == LINEAR:
        return F.linear(x, w, bias)
    out = torch.addmm(bias, x.view(-1, x.size(-1)), w)
    return out.view(x.size()[:-1] + (w.shape[1],))


class IntrinsicLinear(torch.autograd.Function):
    """(x, W0, b, θ_d, λ_i) -> the layer's output with weight W0 + λ_i P_i(θ_d). Saves x (as
    the linear op would), W0, θ_d and λ_i; W is rebuilt in the backward."""

    @staticmethod
    def forward(ctx, x, w0, bias, theta, lam, projection: Projection,  # type: ignore[override]
                layout: str):
        w = effective_weight(w0, theta, lam, projection)
        y = _apply(x, w, bias, layout)  # autocast (if on) casts x, W and b here, as usual
        ctx.projection, ctx.layout = projection, layout
        ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # the compute dtype is the output's: keep x in it, as the linear op keeps its (cast) input
        ctx.save_for_backward(x.to(y.dtype), w0, theta, lam)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        xc, w0, theta, lam = ctx.saved_tensors
        need_x, _, need_b, need_theta, need_lam = ctx.needs_input_grad[:5]
        g = grad.reshape(-1, grad.shape[-1])
        x2 = xc.reshape(-1, xc.shape[-1])
        grad_x = grad_b = d_theta = d_lam = None
        if need_x:  # W0 + ΔW rebuilt for this target alone, freed before the next
            w = effective_weight(w0, theta, lam, ctx.projection).to(g.dtype)
            gx = g @ w if ctx.layout == LINEAR else g @ w.t()
            del w
            grad_x = gx.view(xc.shape).to(ctx.x_dtype)
        if need_b:
            grad_b = g.sum(0).to(ctx.bias_dtype)
        if need_theta or need_lam:
            gw = g.t() @ x2 if ctx.layout == LINEAR else x2.t() @ g  # dL/dW in W's layout
            # the casts the parametrized path's backward makes: to W's dtype, then float32
            gw = gw.to(ctx.w_dtype).float().reshape(-1)
            pt_g = ctx.projection.backward(gw)  # Pᵀ g, float32, length d
            del gw
            if lam is not None and need_lam:
                d_lam = torch.dot(pt_g, theta.detach().float()).to(lam.dtype).reshape(lam.shape)
            if need_theta:
                d_theta = (pt_g if lam is None else pt_g * lam.detach().float()).to(theta.dtype)
        return grad_x, None, grad_b, d_theta, d_lam, None, None


def workspace_bytes(projection: Projection, weight_numel: int, compute_bytes: int) -> int:
    """Transient bytes of one target's backward, an upper bound: the projection's work arrays
    (`WORK_BYTES` per padded entry: they bound the rebuilt W too) while dL/dW is alive in the
    compute dtype and in float32. Targets run one after another, so the largest counts."""
    from learnforget.methods.said.fastfood import WORK_BYTES

    return WORK_BYTES * projection.length + (4 + compute_bytes) * weight_numel
