"""`learnforget params`: exact parameter counts and a memory estimate, on the meta device.

Nothing is downloaded and no weights are allocated, so it answers for Llama-2-7B in seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM

from learnforget.assets.models import build_config, torch_dtype
from learnforget.methods.apply import apply_method, count_parameters
from learnforget.methods.modules import decoder_layers, linear_modules
from learnforget.methods.registry import checkpoint_format, method_of
from learnforget.train.activations import step_activations

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
    batch_size: int = 0
    seq_len: int = 0
    activations_bytes: float | None = None  # traced on the meta device (learnforget.train.activations)
    logits_bytes: float | None = None
    activations_note: str = ""
    compute: str = "fp32"              # the precision policy the estimate follows
    master: str = "float32"
    frozen: str = "float32"
    checkpointing: bool = False
    recompute_bytes: float = 0.0       # checkpointing: one layer's activations rebuilt in backward
    layer_params: int = 0              # one decoder layer's parameters (FSDP's gathered unit)
    root_params: int = 0               # outside the decoder layers (embeddings, norm, LM head)
    method_note: str = ""              # what the method holds beside parameters (Method.extra_memory)
    workspace_bytes: float = 0.0       # the method's transient backward memory (Method.backward_workspace)

    @property
    def total_bytes(self) -> float:
        """Weights, gradients and optimizer state (no activations)."""
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def peak_bytes(self) -> float:
        """The estimated peak of a training step: weights + optimizer state + max(the step's
        activations (learnforget.train.activations.step_activations), gradients); without
        traced activations, weights + gradients + optimizer state."""
        if self.activations_bytes is None:
            return self.total_bytes
        return self.weights_bytes + self.optimizer_bytes + max(self.step_activations_bytes,
                                                               self.grads_bytes)

    @property
    def step_activations_bytes(self) -> float:
        """Activations at the step's peak (0 when they were not traced)."""
        return step_activations(self.activations_bytes or 0.0, self.logits_bytes or 0.0,
                                self.recompute_bytes, self.workspace_bytes)


def quantised_bytes_per_param(blocksize: int = 64, double_quant: bool = True) -> float:
    """4-bit weight plus its quantisation constants (QLoRA paper: 0.127 extra bits with DQ)."""
    extra_bits = (8 / blocksize + 32 / (blocksize * 256)) if double_quant else 32 / blocksize
    return (4 + extra_bits) / 8


def _buffer_bytes(model: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers())


def param_report(cfg: DictConfig, activations: bool = True, device: str = "cpu") -> ParamReport:
    """Counts and memory for cfg.model x cfg.method x cfg.train.optimizer on the meta device,
    under the precision policy the run would use on `device` (learnforget.train.precision: fp32
    master weights and optimizer state, frozen weights in model.dtype, bf16 compute); with
    `activations`, one training forward pass of train.batch_size x train.seq_len tokens is
    traced (learnforget.train.activations), with activation checkpointing if the config has it."""
    from learnforget.train.precision import dtype_bytes, resolve

    t = cfg.train
    policy = resolve(str(t.precision), str(t.get("master_weights", "fp32")), str(cfg.model.dtype),
                     str(cfg.method.name), device)
    checkpointing = bool(t.get("activation_checkpointing", False))
    family = method_of(cfg.method)
    # the same trainable parameters without what needs real weights, data or a tokenizer
    # (a quantised base: the same adapter on an ordinary one, its quantised bytes counted below)
    method = family.counting_config(cfg.method)
    quant = family.quantisation(cfg.method)
    qlora = quant is not None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_config(cfg.model))
        base_trainable, base_total = count_parameters(model)
        base_buffers = _buffer_bytes(model)
        quant_params = sum(dict(model.named_modules())[n].weight.numel()
                           for n in linear_modules(model)) if qlora else 0
        quant_rows = sum(dict(model.named_modules())[n].weight.shape[0]
                         for n in linear_modules(model)) if qlora else 0
        layers = decoder_layers(model)
        layer_params = sum(p.numel() for p in layers[0].parameters())
        root_params = base_total - len(layers) * layer_params
        model, _ = apply_method(model, method, model_name=cfg.model.name)
        method_buffers = _buffer_bytes(model) - base_buffers  # e.g. VeRA's shared projections
        extra = family.extra_memory(model)  # e.g. SAID's shared gains, not a buffer
        if extra is not None:
            method_buffers += extra[0]
        workspace = family.backward_workspace(model, 2 if policy.compute == "bf16" else 4)
        frozen_dtype = torch_dtype(quant.compute_dtype if quant else policy.frozen)
        for p in model.parameters():  # the dtypes a real run trains in (learnforget.train.precision)
            p.data = p.data.to(policy.master_dtype if p.requires_grad else frozen_dtype)
        if not qlora:  # frozen linear weights cast once to bf16 (learnforget.train.speed)
            from learnforget.train import speed

            speed.frozen_cast(model, cfg.method, policy.compute,
                              speed.settings(t)["frozen_cast"])
    trainable, total = count_parameters(model)
    act, act_note = None, "" if activations else "not traced"
    bsz, seq = int(cfg.train.batch_size), int(cfg.train.seq_len)
    if activations:
        from learnforget.train.activations import trace_activations

        try:
            act = trace_activations(model, bsz, seq, int(model.config.vocab_size),
                                    compute_dtype=policy.autocast_dtype,
                                    checkpointing=checkpointing)
        except Exception as e:  # a method whose forward cannot run on meta tensors
            act_note = f"activation trace failed: {type(e).__name__}: {e}"[:200]
    dtype = torch_dtype(quant.compute_dtype if quant else policy.frozen)
    b = torch.finfo(dtype).bits / 8
    # trainable weights, their gradients and optimizer state: the master dtype (fp32 unless
    # train.master_weights=model_dtype; peft and bottleneck adapters are float32 anyway)
    adapter = checkpoint_format(cfg.method) != "safetensors"
    tb = 4.0 if adapter else float(dtype_bytes(policy.master))
    frozen = total - trainable
    if quant is not None and quant.quant_type == "int8":  # LLM.int8: 1 byte + a float32 scale per row
        weights = (quant_params + 4 * quant_rows + (frozen - quant_params) * b + trainable * tb)
    elif quant is not None:
        weights = (quant_params * quantised_bytes_per_param(64, quant.double_quant)
                   + (frozen - quant_params) * b + trainable * tb)
    else:  # frozen weights in the dtype each has (train.speed.frozen_cast: some in bf16)
        weights = sum(p.numel() * p.element_size() for p in model.parameters()
                      if not p.requires_grad) + trainable * tb
    weights += method_buffers
    optimizer = str(cfg.train.optimizer)
    state_b = OPTIMIZER_STATES[optimizer](tb)
    return ParamReport(model=cfg.model.name, method=family.label(cfg.method),
                       trainable=trainable, total=total, base_total=base_total,
                       dtype=str(dtype).removeprefix("torch."), weights_bytes=weights,
                       grads_bytes=trainable * tb, optimizer_bytes=trainable * state_b,
                       optimizer=optimizer, batch_size=bsz, seq_len=seq,
                       activations_bytes=None if act is None else act.activations_bytes,
                       logits_bytes=None if act is None else act.logits_bytes,
                       activations_note=act_note, compute=policy.compute, master=policy.master,
                       frozen=policy.frozen, checkpointing=checkpointing,
                       recompute_bytes=0.0 if act is None else float(act.recompute_bytes),
                       layer_params=layer_params, root_params=root_params,
                       method_note="" if extra is None else extra[1],
                       workspace_bytes=workspace)


_REPORTS: dict[str, ParamReport] = {}  # per process: see cached_param_report


def _report_key(cfg: DictConfig, activations: bool, device: str) -> str:
    """What param_report reads: the model, the method (its effective settings and its whole
    section), the optimizer, the precision policy's dtypes, checkpointing and (with
    activations) the micro-batch shape; not
    the LR, seeds, budgets, data or the device itself (cpu and cuda share a key when their
    policies type the tensors alike)."""
    import json

    from learnforget.methods.registry import effective_method
    from learnforget.train.precision import resolve

    t = cfg.train
    policy = resolve(str(t.precision), str(t.get("master_weights", "fp32")), str(cfg.model.dtype),
                     str(cfg.method.name), device)
    shape = [int(t.batch_size), int(t.seq_len)] if activations else []
    # the whole method section: some keys change memory and not the run (method.rebuild_weight)
    return json.dumps([OmegaConf.to_container(cfg.model, resolve=True),
                       effective_method(cfg.method),
                       OmegaConf.to_container(cfg.method, resolve=True), str(t.optimizer),
                       policy.compute,
                       policy.master, policy.frozen, bool(t.get("activation_checkpointing", False)),
                       *shape], sort_keys=True, default=str)


def cached_param_report(cfg: DictConfig, activations: bool = True,
                        device: str = "cpu") -> ParamReport:
    """param_report, computed once per distinct setting in this process (a dry run asks for
    the same 7B report once per job and per table). Without `activations`, a report that
    traced them already serves (its counts and state bytes are the same)."""
    key = _report_key(cfg, activations, device)
    if key not in _REPORTS and not activations:
        traced = _REPORTS.get(_report_key(cfg, True, device))
        if traced is not None:
            return traced
    if key not in _REPORTS:
        _REPORTS[key] = param_report(cfg, activations=activations, device=device)
    return _REPORTS[key]


def format_report(r: ParamReport) -> str:
    gib = 2**30
    lines = [
        f"model      {r.model}",
        f"method     {r.method}",
        f"trainable  {r.trainable:,} ({100 * r.trainable / r.total:.4f}% of {r.total:,})",
        f"base model {r.base_total:,} parameters",
        f"precision  {r.compute} compute, {r.master} trainable weights + optimizer state, "
        f"{r.frozen} frozen weights" + (", activation checkpointing" if r.checkpointing else ""),
        f"memory estimate ({r.dtype} base weights, {r.optimizer}):",
        f"  weights    {r.weights_bytes / gib:9.3f} GiB"
        + (f"  (with the method's: {r.method_note})" if r.method_note else ""),
        f"  gradients  {r.grads_bytes / gib:9.3f} GiB",
        f"  optimizer  {r.optimizer_bytes / gib:9.3f} GiB",
        f"  total      {r.total_bytes / gib:9.3f} GiB  (weights + gradients + optimizer)",
    ]
    if r.activations_bytes is not None:
        lines += [
            f"  activations {r.activations_bytes / gib:8.3f} GiB  (one step of {r.batch_size} x "
            f"{r.seq_len} tokens, traced on meta; logits {r.logits_bytes / gib:.3f} GiB"
            + (f"; recompute {r.recompute_bytes / gib:.3f} GiB" if r.checkpointing else "")
            + (f"; the method's backward workspace {r.workspace_bytes / gib:.3f} GiB"
               if r.workspace_bytes else "") + ")",
            f"  peak       {r.peak_bytes / gib:9.3f} GiB  "
            "(weights + optimizer + max(activations + max(2 x logits, recompute"
            + (" + workspace" if r.workspace_bytes else "") + "), gradients))",
        ]
    else:
        lines.append(f"  activations not estimated ({r.activations_note})")
    return "\n".join(lines)


def report_dict(r: ParamReport) -> dict:
    return {**asdict(r), "total_bytes": r.total_bytes, "peak_bytes": r.peak_bytes}
