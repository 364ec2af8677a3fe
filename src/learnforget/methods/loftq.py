"""LoftQ (Li et al. 2023) for QLoRA, on the CPU: `method=qlora method.init=loftq
[method.loftq_iter=N]`.

peft 0.21's LoftQ (init_lora_weights=loftq, replace_lora_weights_loftq) moves every weight to a
"cuda"/"xpu" device; this is its algorithm (peft.utils.loftq_utils.loftq_init) on the device the
run trains on, with peft's own CPU pieces (private: reached through learnforget.private_api):
its `_SafetensorLoader` reads W from the base checkpoint and its `_low_rank_decomposition`
takes the SVD. Per quantised linear layer, from
R = W and for N iterations:

    Q = quant(R)                     bitsandbytes quantize_4bit with the run's settings (quant_type,
                                     double_quant, compute_dtype, blocks of 64): the loader's own
    L, R' = rank-r SVD of W - deQ(Q)  sqrt(S) split between them (peft's decomposition)
    R = W - L R'                     (not after the last iteration)

and the layer trains on deQ(Q) + s B A with s B A = L R' (B = L / sqrt(s), A = R' / sqrt(s), s
the LoRA scaling; peft assigns B = L, A = R' and so is exact only when s = 1). The first Q is
quant(W): with loftq_iter=1 (peft's default) the base is exactly the one the qlora loader built,
and eval, which scores a qlora adapter on that base, computes what the run trained. More
iterations quantise W - L R' instead, a base neither eval nor the spectra rebuild: refused.

Checkpoints are plain rank-r LoRA adapters on the quantised base (as for every qlora run):
their spectra are of s B A = W_ft - deQ(Q), and W_ft - W_original = s B A - (W - deQ(Q)). The
quantisation residual is reported beside it: train.quantisation (||W - deQ(Q)|| / ||W|| per
layer) and a run.json note with LoftQ's ||W - deQ(Q) - s B0 A0|| / ||W|| at initialisation.
The initialisation is deterministic; resume re-runs it and restores B, A.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from learnforget.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where tensors are handled: method validation needs none
    import torch

DEFAULT_ITER = 1
MAX_RUN_ITER = 1  # more iterations change the 4-bit base, which eval and spectra do not rebuild


def validate_loftq(method_cfg: Any) -> None:
    """One-line errors for method.init=loftq's settings (its method is checked by the caller)."""
    n = method_cfg.get("loftq_iter", DEFAULT_ITER)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"method.loftq_iter must be a positive integer (LoftQ's alternating "
                          f"iterations), got {n!r}")
    if n > MAX_RUN_ITER:
        raise ConfigError(f"method.loftq_iter={n} is not supported for runs (expected 1): with "
                          "more iterations the 4-bit base is quant(W - s B A), which eval and the "
                          "spectra, scoring adapters on the loader's quant(W), do not rebuild")
    if method_cfg.get("quant_type") not in ("nf4", "fp4"):
        raise ConfigError(f"method.init=loftq needs a 4-bit base (method.quant_type nf4 or fp4), "
                          f"got quant_type={method_cfg.get('quant_type')!r}")


def quantise_4bit(w: torch.Tensor, method_cfg: Any):
    """(packed weight, quant_state): W quantised as the qlora loader quantises it (transformers'
    Params4bit on CPU: the weight in compute_dtype, blocks of 64)."""
    import bitsandbytes.functional as bnbf
    import torch

    # compute_dtype was checked when the base loaded (learnforget.assets.models.torch_dtype)
    return bnbf.quantize_4bit(w.to(getattr(torch, str(method_cfg.compute_dtype))).contiguous(),
                              blocksize=64, compress_statistics=bool(method_cfg.double_quant),
                              quant_type=str(method_cfg.quant_type))


def dequantise_4bit(q: torch.Tensor, state) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(q, state).float()


def loftq_factors(w: torch.Tensor, r: int, n_iter: int, scale: float, quantise):
    """LoftQ on one weight: (Q, quant_state, A, B) with deQ(Q) + scale B A ~ W. `quantise(x)`
    returns (Q, quant_state); A is (r, in), B (out, r), float32 (no autograd: W is detached)."""
    from learnforget.private_api import low_rank_decomposition

    w = w.detach().float()
    res = w
    for i in range(n_iter):
        q, state = quantise(res)
        left, right = low_rank_decomposition(w - dequantise_4bit(q, state), r)
        if i + 1 < n_iter:
            res = w - left @ right
    root = math.sqrt(scale)
    return q, state, (right / root).contiguous(), (left / root).contiguous()


def place_4bit(weight: torch.Tensor, q: torch.Tensor, state) -> None:
    """Make the 4-bit parameter `weight` hold packed weight `q` and its quant_state, both on
    `weight`'s device: the kernels read absmax and the code table (and, with double
    quantisation, the nested state) beside the packed bytes. bitsandbytes' QuantState.to moves
    them in place."""
    state.to(weight.device)
    weight.data, weight.quant_state = q.to(weight.device), state


def _checkpoint_folder(model: torch.nn.Module) -> str:
    """The local folder of the base model's safetensors (a hub id resolved in the cache)."""
    from learnforget.methods.quantisation import _checkpoint_files

    path = str(model.get_base_model().config._name_or_path)
    files = _checkpoint_files(path)
    if not files:
        raise ConfigError(f"method.init=loftq needs the base model's .safetensors weights, none "
                          f"found for {path}")
    return str(files[0].parent)


def initialise_loftq(model: torch.nn.Module, method_cfg: Any, adapter: str = "default") -> str:
    """Set every 4-bit LoRA layer of the peft `model` to LoftQ: its base to Q, its factors to
    B, A. Returns a note for run.json with the mean relative errors before and after."""
    import torch
    from peft.tuners.lora import Linear4bit

    from learnforget.private_api import safetensor_loader

    n_iter = int(method_cfg.get("loftq_iter", DEFAULT_ITER))
    loader = safetensor_loader(model, _checkpoint_folder(model))
    prefix = "base_model.model."
    quant_err, loftq_err = [], []
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit) or adapter not in module.lora_A:
            continue
        w = loader.get_tensor(name.removeprefix(prefix) + ".weight").float()
        scale = float(module.scaling[adapter])
        q, state, a, b = loftq_factors(w, module.r[adapter], n_iter, scale,
                                       lambda x: quantise_4bit(x, method_cfg))
        deq = dequantise_4bit(q, state)  # on the CPU, beside W
        norm = float(torch.linalg.norm(w))
        quant_err.append(float(torch.linalg.norm(w - deq)) / norm)
        loftq_err.append(float(torch.linalg.norm(w - deq - scale * (b @ a))) / norm)
        place_4bit(module.get_base_layer().weight, q, state)
        with torch.no_grad():  # copy_ moves A and B to the factors' device
            module.lora_A[adapter].weight.copy_(a)
            module.lora_B[adapter].weight.copy_(b)
    if not quant_err:
        raise ConfigError("method.init=loftq found no 4-bit LoRA layers (expected method=qlora "
                          "with quant_type nf4 or fp4)")
    mean = sum(quant_err) / len(quant_err)
    return (f"method.init=loftq ({n_iter} iteration{'s' * (n_iter > 1)}, {len(quant_err)} layers):"
            f" mean ||W - deQ(Q)||/||W|| {mean:.4g} -> ||W - deQ(Q) - s B0 A0||/||W|| "
            f"{sum(loftq_err) / len(loftq_err):.4g}; checkpoints are LoRA adapters on the 4-bit "
            "base deQ(Q): spectra of s B A = W_ft - deQ(Q), W_ft - W = s B A - (W - deQ(Q))")
