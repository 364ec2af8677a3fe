"""How fast a training step runs, never what it computes: `train.speed` (docs/throughput.md).

    train.speed.optimizer_impl  fused | foreach | for_loop   torch's AdamW implementation.
        fused (default): one kernel over all parameters (torch's `fused=True`, on CPU and CUDA);
        where torch has no fused kernel for the device or dtype, torch's default with a note.
        for_loop: torch's CPU default, and the harness's path before 2026-12.
    train.speed.frozen_cast     true | false   adapter methods under bf16 compute: the frozen
        weights of linear layers cast to bf16 once, instead of autocast casting them at every
        forward (the same rounding: identical results; half their memory).
    train.speed.loss_chunk      0 | tokens     the LM head and its cross-entropy over chunks of
        this many tokens (learnforget.train.lm_loss): the full fp32 logits (tokens x vocabulary)
        never exist. 0: transformers' own loss on the full logits.
    train.speed.compile         false | true   torch.compile the model in place (inductor); where
        that cannot work (no C++ compiler for inductor's CPU backend) eager, with a warning.

None of them is part of a run's identity (config.run_identity): they change rounding at most,
within 2e-3 relative on the loss curve (measured in docs/throughput.md), and a resumed run keeps
its own settings (config.yaml), so a resume stays exact.
"""

from __future__ import annotations

import shutil
import warnings
from typing import Any

import torch
from omegaconf import DictConfig

from learnforget.errors import ConfigError

OPTIMIZER_IMPLS = ("fused", "foreach", "for_loop")
DEFAULTS: dict[str, Any] = {"optimizer_impl": "fused", "frozen_cast": True, "loss_chunk": 0,
                            "compile": False}


def settings(t: DictConfig) -> dict[str, Any]:
    """train.speed with its defaults, checked."""
    given = dict(t.get("speed") or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"train.speed.{unknown[0]} is unknown (expected one of: "
                          f"{', '.join(DEFAULTS)})")
    out = {**DEFAULTS, **given}
    if out["optimizer_impl"] not in OPTIMIZER_IMPLS:
        raise ConfigError(f"train.speed.optimizer_impl {out['optimizer_impl']!r} is unknown "
                          f"(expected one of: {', '.join(OPTIMIZER_IMPLS)})")
    for key in ("frozen_cast", "compile"):
        if not isinstance(out[key], bool):
            raise ConfigError(f"train.speed.{key} must be true or false, got {out[key]!r}")
    chunk = out["loss_chunk"]
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ConfigError(f"train.speed.loss_chunk must be an integer >= 0 (tokens per chunk; "
                          f"0: off), got {chunk!r}")
    return out


def adamw_kwargs(impl: str, params: list[torch.nn.Parameter]) -> tuple[dict[str, bool], list[str]]:
    """The implementation arguments of torch.optim.AdamW for train.speed.optimizer_impl, and its
    run.json note. Where torch has no fused kernel for the parameters' device or dtype, AdamW
    refuses fused=True and learnforget.train.optim falls back to torch's default."""
    if impl == "for_loop":
        return {"foreach": False}, []
    if impl == "foreach":
        return {"foreach": True}, []
    if any(type(p.data) is not torch.Tensor for p in params):  # FSDP2's DTensor shards
        return {}, ["train.speed.optimizer_impl=fused: sharded (DTensor) parameters keep torch's "
                    "default AdamW implementation"]
    return {"fused": True}, ["train.speed.optimizer_impl=fused: torch's fused AdamW kernel (runs "
                             "before 2026-12 used torch's for-loop AdamW on CPU: the same update "
                             "up to rounding; for_loop restores it)"]


def _shared_params(model: torch.nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied embeddings and LM heads)."""
    seen: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def cast_frozen_linears(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast the weight and bias of every nn.Linear whose parameters are all frozen and held by it
    alone to `dtype`, in place; returns how many layers. Under CPU/CUDA autocast F.linear casts
    its weight and bias to the autocast dtype at every call: the same rounding, done once.
    Tied parameters (an LM head that is also the embedding table) are left alone: the embedding
    lookup is not autocast, so casting it would change the result."""
    shared = _shared_params(model)
    n = 0
    for m in model.modules():
        if type(m) is not torch.nn.Linear:
            continue
        ps = list(m.parameters(recurse=False))
        if not ps or any(p.requires_grad or id(p) in shared or p.dtype not in
                         (torch.float32, torch.float64) for p in ps):
            continue
        for p in ps:
            p.data = p.data.to(dtype)
        n += 1
    return n


def frozen_cast(model: torch.nn.Module, method_cfg: DictConfig, compute: str,
                enabled: bool) -> list[str]:
    """train.speed.frozen_cast for this run: notes for run.json. Only for methods whose
    checkpoints hold the adapter alone (a safetensors checkpoint keeps every weight: its frozen
    ones stay in the dtype they were loaded in)."""
    from learnforget.methods.registry import checkpoint_format, quantised_base

    if (not enabled or compute != "bf16" or checkpoint_format(method_cfg) == "safetensors"
            or quantised_base(method_cfg)):
        return []
    if _uses_dora(model):
        return ["train.speed.frozen_cast: not applied to DoRA (it reads the frozen weight "
                "outside autocast to compute its norm)"]
    n = cast_frozen_linears(model, torch.bfloat16)
    return [f"train.speed.frozen_cast: the frozen weights of {n} linear layers cast to bf16 once "
            "(autocast cast them at every step: identical results)"] if n else []


def _uses_dora(model: torch.nn.Module) -> bool:
    for m in model.modules():
        flags = getattr(m, "use_dora", None)
        if isinstance(flags, dict) and any(flags.values()):
            return True
    return False


def inductor_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would call (CXX, else g++/c++/clang++ on PATH)."""
    import os

    cxx = os.environ.get("CXX")
    if cxx and shutil.which(cxx):
        return shutil.which(cxx)
    for name in ("g++", "c++", "clang++"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def compile_model(model: torch.nn.Module, enabled: bool, device: str) -> list[str]:
    """train.speed.compile: `nn.Module.compile()` in place (state_dict keys unchanged, so
    checkpoints and resume files are the same); eager with a one-line warning where inductor
    has no C++ compiler on CPU. Inductor failures later fall back to eager (dynamo's
    suppress_errors), also warned by torch."""
    if not enabled:
        return []
    if device == "cpu" and inductor_compiler() is None:
        msg = ("train.speed.compile=true: no C++ compiler (CXX, g++, c++, clang++) for "
               "inductor's CPU backend; the model runs eager")
        warnings.warn(msg, stacklevel=2)
        return [msg]
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, "model", None)
    target = decoder if isinstance(decoder, torch.nn.Module) else model
    target.compile()
    return [f"train.speed.compile: {'the decoder' if target is decoder else 'the model'} is "
            "compiled in place (torch.compile, inductor; the first steps include compile time)"]


def loss_chunk(t: DictConfig, model: torch.nn.Module, world: int) -> tuple[int, str | None]:
    """The chunk size the step's loss uses (0: transformers' loss) and why not, if asked but not
    possible (several ranks: DDP and FSDP hook the wrapped model's forward)."""
    from learnforget.train.lm_loss import supported

    chunk = settings(t)["loss_chunk"]
    if not chunk:
        return 0, None
    why = "several ranks (DDP and FSDP wrap the model's own forward)" if world > 1 \
        else supported(model)
    return (0, why) if why else (chunk, None)


def loss_note(t: DictConfig, model: torch.nn.Module, world: int) -> list[str]:
    chunk, why = loss_chunk(t, model, world)
    if why:
        return [f"train.speed.loss_chunk={settings(t)['loss_chunk']}: transformers' loss on the "
                f"full logits is used ({why})"]
    if chunk:
        return [f"train.speed.loss_chunk={chunk}: LM head and cross-entropy computed over chunks "
                f"of {chunk} labelled tokens, gradients in the same pass (learnforget.train.lm_loss): "
                "the full logits never exist, positions with label -100 get none; the loss "
                "differs from transformers' by summation order"]
    return []
