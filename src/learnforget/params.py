"""`learnforget params`: exact parameter counts and a memory estimate, on the meta device.

Nothing is downloaded and no weights are allocated, so it answers for Llama-2-7B in seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM

from learnforget.methods import (
    LORA_FAMILY,
    PEFT_METHODS,
    apply_method,
    count_parameters,
    linear_modules,
)
from learnforget.models import build_config, torch_dtype

OPTIMIZER_STATES = {  # bytes of optimizer state per trainable parameter, given param bytes b
    "adamw": lambda b: 2 * b, "paged_adamw": lambda b: 2 * b,
    "lion": lambda b: b, "lionw": lambda b: b, "paged_lion": lambda b: b,
    "adamw8bit": lambda b: 2 + 8 / 256, "paged_adamw8bit": lambda b: 2 + 8 / 256,
}


@dataclass
class ParamReport:
    model: str
    method: str
    trainable: int
    total: int
    base_total: int
    dtype: str
    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    optimizer: str

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes


def quantised_bytes_per_param(blocksize: int = 64, double_quant: bool = True) -> float:
    """4-bit weight plus its quantisation constants (QLoRA paper: 0.127 extra bits with DQ)."""
    extra_bits = (8 / blocksize + 32 / (blocksize * 256)) if double_quant else 32 / blocksize
    return (4 + extra_bits) / 8


def param_report(cfg: DictConfig) -> ParamReport:
    """Counts and memory for cfg.model x cfg.method x cfg.train.optimizer on the meta device."""
    method = cfg.method.copy()
    if method.name == "prompt":  # text initialisation needs a tokenizer; the counts do not
        OmegaConf.update(method, "prompt_init", "random")
    qlora = method.name == "qlora"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_config(cfg.model))
        base_trainable, base_total = count_parameters(model)
        quant_params = sum(dict(model.named_modules())[n].weight.numel()
                           for n in linear_modules(model)) if qlora else 0
        if qlora:  # same adapter as LoRA on a base whose linear weights are 4-bit
            OmegaConf.update(method, "name", "lora")
        model, _ = apply_method(model, method, model_name=cfg.model.name)
    trainable, total = count_parameters(model)
    dtype = torch_dtype(cfg.method.compute_dtype if qlora else cfg.model.dtype)
    b = torch.finfo(dtype).bits / 8
    # peft keeps adapter weights in float32 even on a half-precision base (autocast_adapter_dtype)
    tb = 4.0 if cfg.method.name in PEFT_METHODS else b
    frozen = total - trainable
    if qlora:
        weights = (quant_params * quantised_bytes_per_param(64, bool(cfg.method.double_quant))
                   + (frozen - quant_params) * b + trainable * tb)
    else:
        weights = frozen * b + trainable * tb
    optimizer = str(cfg.train.optimizer)
    state_b = OPTIMIZER_STATES[optimizer](tb)
    return ParamReport(model=cfg.model.name, method=cfg.method.name
                       if cfg.method.name not in LORA_FAMILY
                       else f"{cfg.method.name} r={cfg.method.r}",
                       trainable=trainable, total=total, base_total=base_total,
                       dtype=str(dtype).removeprefix("torch."), weights_bytes=weights,
                       grads_bytes=trainable * tb, optimizer_bytes=trainable * state_b,
                       optimizer=optimizer)


def format_report(r: ParamReport) -> str:
    gib = 2**30
    lines = [
        f"model      {r.model}",
        f"method     {r.method}",
        f"trainable  {r.trainable:,} ({100 * r.trainable / r.total:.4f}% of {r.total:,})",
        f"base model {r.base_total:,} parameters",
        f"memory estimate ({r.dtype} base weights, {r.optimizer}; activations excluded):",
        f"  weights    {r.weights_bytes / gib:9.3f} GiB",
        f"  gradients  {r.grads_bytes / gib:9.3f} GiB",
        f"  optimizer  {r.optimizer_bytes / gib:9.3f} GiB",
        f"  total      {r.total_bytes / gib:9.3f} GiB",
    ]
    return "\n".join(lines)


def report_dict(r: ParamReport) -> dict:
    return {**asdict(r), "total_bytes": r.total_bytes}
