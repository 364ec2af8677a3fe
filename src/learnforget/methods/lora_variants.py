"""LoRA variants through peft: rsLoRA scaling and peft's initialisations.

    method.rslora=true          scaling alpha / sqrt(r) instead of alpha / r (peft use_rslora)
    method.init=default         peft's default (Kaiming-uniform A, B = 0: ΔW starts at 0)
    method.init=gaussian        A ~ N(0, 1/r), B = 0
    method.init=orthogonal      A, B from one orthogonal r x r matrix (r even), ΔW != 0 at start
    method.init=pissa           A, B = the top-r singular triplets of W: W_res = W - s B A
    method.init=pissa_niter_N   the same through N subspace iterations of a randomised SVD
    method.init=olora           B A from the QR of W (first r columns of Q, rows of R):
                                W_res = W - s B A
    method.init=eva             A from the SVD of each layer's input activations, B = 0
    method.init=corda           B A from the SVD of W C (C the input covariance): W_res = W - s B A
                                (eva, corda: calibrated on the run's own training data, see
                                learnforget.methods.calibrated_init)

PiSSA, OLoRA and CorDA change the base: the model trains W_res + s B A, with W_res = W - s B0 A0
(s the scaling, B0 A0 the initial factors). Every checkpoint is therefore converted, as peft's
`save_pretrained(path_initial_model_for_weight_conversion=...)` does, to a plain LoRA adapter
of rank 2r against the ORIGINAL base: B' = [B | -B0], A' = [A ; A0], alpha doubled (times
sqrt 2 with rsLoRA) so the scaling stays s. Then ΔW = s (B A - B0 A0) = W_ft - W_original, and
eval, spectra and intruders read the checkpoint like any LoRA adapter
(test_lora_variants.py checks the files against peft's own conversion and ΔW against a
numpy truncated SVD; test_calibrated_init.py checks CorDA's against numpy). Resume re-runs the
(deterministic) initialisation on the original base and restores B, A, so B0 A0 are the same
as in the first session. EVA leaves the base unchanged (B0 = 0): its checkpoints are plain LoRA.
    method.init=loftq           (qlora only) B A from the SVD of the quantisation residual
                                W - deQ(Q): learnforget.methods.loftq, peft's algorithm on CPU
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from learnforget.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where tensors are handled: method validation needs none
    import torch

INITS = ("default", "gaussian", "orthogonal", "pissa", "olora", "eva", "corda", "loftq")
UNSUPPORTED = {"mica": "freezes lora_B (a different trainable count)"}
MUTATES_BASE = ("pissa", "olora", "corda")
_NITER = re.compile(r"^pissa_niter_(\d+)$")


def validate_init(init: Any, r: int) -> None:
    """One-line errors for a bad method.init."""
    s = str(init)
    if s in UNSUPPORTED:
        raise ConfigError(f"method.init={s} is not supported yet: it {UNSUPPORTED[s]} "
                          f"(expected one of: {', '.join(INITS)}, pissa_niter_N)")
    if s not in INITS and not _NITER.match(s):
        raise ConfigError(f"method.init {s!r} is unknown (expected one of: {', '.join(INITS)}, "
                          "pissa_niter_N with N a positive integer)")
    m = _NITER.match(s)
    if m and int(m.group(1)) < 1:
        raise ConfigError(f"method.init {s!r}: N must be a positive integer")
    if s == "orthogonal" and r % 2:
        raise ConfigError(f"method.init=orthogonal needs an even rank, got method.r={r}")


def peft_init(init: Any) -> bool | str:
    """The value for peft's LoraConfig(init_lora_weights=...): loftq wraps with the default and
    sets the factors after (peft's own LoftQ runs on CUDA only)."""
    s = str(init)
    return True if s in ("default", "loftq") else s


def mutates_base(init: Any) -> bool:
    return str(init).startswith(MUTATES_BASE)


# ------------------------------------------------------------------ conversion to plain LoRA

def capture_initial(model: torch.nn.Module) -> None:
    """Remember B0, A0 of every LoRA layer (PiSSA/OLoRA/CorDA) on the model, for the conversion."""
    init = {n: p.detach().cpu().clone() for n, p in model.named_parameters()
            if ".lora_A." in n or ".lora_B." in n}
    model._learnforget_initial_lora = init  # type: ignore[attr-defined]


def initial_factors(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    base = model
    for _ in range(3):  # DDP / FSDP wrappers hold the peft model as .module
        if hasattr(base, "_learnforget_initial_lora"):
            return base._learnforget_initial_lora
        base = getattr(base, "module", base)
    return None


def _saved_key(param_name: str) -> str:
    """'base_model.model.x.lora_A.default.weight' -> 'base_model.model.x.lora_A.weight' (peft's
    saved form drops the adapter name)."""
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", param_name)


def convert_saved_adapter(folder: Path, initial: dict[str, torch.Tensor]) -> None:
    """Rewrite a saved PiSSA/OLoRA/CorDA adapter in `folder` as a rank-2r LoRA on the original base
    (peft's subtract_mutated_init + the config changes of save_pretrained)."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    weights = load_file(str(folder / "adapter_model.safetensors"))
    init = {_saved_key(k): v for k, v in initial.items()}
    out = {}
    for k, v in weights.items():
        if ".lora_A." in k:
            out[k] = torch.cat([v, init[k].to(v.dtype)], dim=0).contiguous()
        elif ".lora_B." in k:
            out[k] = torch.cat([v, -init[k].to(v.dtype)], dim=1).contiguous()
        else:
            out[k] = v
    source = cfg["init_lora_weights"]
    cfg["init_lora_weights"] = True
    cfg["r"] *= 2
    cfg["lora_alpha"] *= 2 ** 0.5 if cfg.get("use_rslora") else 2
    if cfg.get("rank_pattern"):
        cfg["rank_pattern"] = {k: 2 * v for k, v in cfg["rank_pattern"].items()}
    if cfg.get("alpha_pattern"):
        cfg["alpha_pattern"] = {k: 2 * v for k, v in cfg["alpha_pattern"].items()}
    cfg["learnforget_converted_from"] = source
    save_file(out, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
