"""The mixed-precision policy of a training run: which dtype computes, which dtype the
trainable weights and their optimizer state live in, and which dtype frozen weights keep.

The paper's stack (bf16 mixed precision) computes in bfloat16 but keeps fp32 *master* weights
and fp32 optimizer state. Training bf16 weights directly loses every update smaller than half a
bf16 ulp of the weight: at the paper's full-finetuning LR (1e-5) that is almost all of them.

    train.precision       auto | bf16 | fp32   the compute dtype (auto: bf16 where the device
                                               has bf16 arithmetic: a GPU that supports it, or
                                               a CPU with AVX512-BF16 / AMX; else fp32)
    train.master_weights  fp32 | model_dtype   fp32 (default): trainable weights and optimizer
                                               state in float32, whatever model.dtype is;
                                               model_dtype: train them in model.dtype directly
                                               (opt-in, warned and noted: lossy in 16 bit)

Frozen weights of adapter methods keep model.dtype under bf16 compute (a bf16 7B base costs half
the memory). Under fp32 compute every weight is float32. Methods that train the base model's own
weights (full, bitfit, topk) load the whole model in float32 under fp32 masters, so that the
checkpoint's own values (e.g. Llama-2's fp16 weights) are the exact starting point of ΔW.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

from learnforget.errors import ConfigError
from learnforget.methods.registry import family

PRECISIONS = ("auto", "fp32", "bf16")
MASTER_WEIGHTS = ("fp32", "model_dtype")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True on CPUs with bf16 arithmetic (AVX512-BF16 or AMX-BF16; Linux /proc/cpuinfo, read by
    learnforget.runfolder.cpu_info, which run.json records)."""
    from learnforget.runfolder import cpu_info

    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_info()["bf16_flags"]))


def device_has_bf16(device: str) -> bool:
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


@dataclass(frozen=True)
class PrecisionPolicy:
    """How a run's tensors are typed. Recorded in run.json (train.precision_policy)."""

    compute: str        # bf16 | fp32: the autocast dtype of forward and backward
    master: str         # float32 | bfloat16 | float16: trainable weights, gradients, optimizer
    frozen: str         # float32 | bfloat16 | float16: frozen weights (adapter methods' base)
    load: str           # the dtype the base model is loaded in
    requested: str      # train.precision as configured
    reason: str         # how `auto` resolved, or why a dtype differs from model.dtype

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.compute == "bf16" else None

    @property
    def master_dtype(self) -> torch.dtype:
        return _DTYPES[self.master]

    @property
    def lossy_master(self) -> bool:
        """Trainable weights in 16 bit: small updates are rounded away."""
        return self.master != "float32"

    def autocast(self, device: str) -> AbstractContextManager:
        """The compute context of a forward pass (no-op in fp32)."""
        if self.compute != "bf16":
            return nullcontext()
        return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)

    def record(self) -> dict[str, str]:
        return asdict(self)


def resolve(precision: str, master_weights: str, model_dtype: str, method: str,
            device: str) -> PrecisionPolicy:
    """The policy for train.precision x train.master_weights x model.dtype x method x device."""
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision {precision!r} is unknown (expected one of: "
                          f"{', '.join(PRECISIONS)})")
    if master_weights not in MASTER_WEIGHTS:
        raise ConfigError(f"train.master_weights {master_weights!r} is unknown (expected one of: "
                          f"{', '.join(MASTER_WEIGHTS)})")
    if model_dtype not in _DTYPES:
        raise ConfigError(f"model.dtype {model_dtype!r} is unknown (expected one of: "
                          f"{', '.join(_DTYPES)})")
    if precision == "auto":
        bf16 = device_has_bf16(device)
        compute = "bf16" if bf16 else "fp32"
        reason = (f"auto: {device} has bf16 arithmetic" if bf16 else
                  f"auto: {device} has no bf16 arithmetic, fp32 compute")
    else:
        compute, reason = precision, "as configured"
    if compute == "fp32":  # every weight float32: 16-bit frozen weights cannot meet fp32 inputs
        if model_dtype != "float32":
            reason += f"; model.dtype={model_dtype} loaded as float32 for fp32 compute"
        return PrecisionPolicy(compute, "float32", "float32", "float32", precision, reason)
    if master_weights == "model_dtype":
        return PrecisionPolicy(compute, model_dtype, model_dtype, model_dtype, precision, reason)
    if family(method).trains_base_weights:  # full, bitfit, topk
        if model_dtype != "float32":
            reason += (f"; method={method} trains the base weights: loaded as float32 masters "
                       f"(model.dtype={model_dtype} is the compute copy only)")
        return PrecisionPolicy(compute, "float32", "float32", "float32", precision, reason)
    return PrecisionPolicy(compute, "float32", model_dtype, model_dtype, precision, reason)


def apply(model: torch.nn.Module, policy: PrecisionPolicy) -> list[str]:
    """Cast trainable floating parameters to the master dtype (in place); returns notes. Frozen
    parameters keep the dtype they were loaded in (policy.load); quantised ones are untouched."""
    notes: list[str] = []
    target = policy.master_dtype
    moved = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != target:
            p.data = p.data.to(target)
            moved += 1
    if moved:
        notes.append(f"precision: {moved} trainable tensors cast to {policy.master} master weights")
    if policy.lossy_master:
        msg = (f"train.master_weights=model_dtype trains {policy.master} weights directly: updates "
               f"below half a {policy.master} ulp of a weight are rounded away (at LR 1e-5 most "
               "of them); the paper's stack keeps float32 masters")
        warnings.warn(msg, stacklevel=2)
        notes.append("WARNING: " + msg)
    return notes


def trainable_bytes(policy: PrecisionPolicy) -> int:
    return torch.finfo(policy.master_dtype).bits // 8


def dtype_bytes(name: str) -> int:
    return torch.finfo(_DTYPES[name]).bits // 8
