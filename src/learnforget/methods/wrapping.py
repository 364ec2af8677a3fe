"""The torch side of the method families (learnforget.methods.families): the freezing helpers of
the base-weight methods, and one peft path for every peft method, built-in or described by its
config's `peft:` section. learnforget.methods.apply.apply_method is the entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel

from learnforget.errors import ConfigError
from learnforget.methods import calibrated_init
from learnforget.methods.base import TARGET_SETS, ApplyContext, peft_settings
from learnforget.methods.lora_variants import capture_initial, mutates_base, peft_init
from learnforget.methods.modules import decoder_layers, final_norm, linear_modules, resolve_targets


def train_biases(model: PreTrainedModel, model_name: str) -> None:
    """BitFit: only the bias parameters train."""
    n = 0
    for pname, p in model.named_parameters():
        p.requires_grad_(pname.endswith(".bias") or pname == "bias")
        n += p.requires_grad
    if n == 0:
        raise ConfigError(
            f"method=bitfit: model={model_name} has no bias parameters (expected a model with "
            "biases, e.g. model=tiny_gpt2 or a Llama with model.arch.attention_bias=true)")


def train_top_blocks(model: PreTrainedModel, k: int) -> None:
    """Only the last k transformer blocks and the final norm train."""
    layers = decoder_layers(model)
    if k > len(layers):
        raise ConfigError(f"method.top_k={k} exceeds the model's {len(layers)} transformer blocks")
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = list(layers[len(layers) - k:])
    norm = final_norm(model)
    if norm is not None:
        trainable.append(norm)
    for module in trainable:
        for p in module.parameters():
            p.requires_grad_(True)


# ---------------------------------------------------------------------------- peft

def builtin_arguments(model, cfg: DictConfig, kind: str, ctx: ApplyContext, eff: dict[str, Any],
                      dora: bool = False) -> dict[str, Any]:
    """peft arguments from a built-in method's shared keys (r, alpha, targets, ...); `eff` its
    effective settings, `dora` LoRA's use_dora."""
    model_name, tokenizer_path = ctx.model_name, ctx.tokenizer_path
    if kind == "LORA":
        return {"r": eff["r"], "lora_alpha": eff["alpha"], "lora_dropout": eff["dropout"],
                "target_modules": resolve_targets(model, cfg.targets, model_name),
                "use_dora": dora, "bias": "none",
                "init_lora_weights": peft_init(cfg.get("init", "default")),
                "use_rslora": bool(cfg.get("rslora", False))}
    if kind == "IA3":
        if cfg.targets == "all":
            return {}  # peft's per-architecture defaults
        resolved = resolve_targets(model, cfg.targets, model_name)
        groups = linear_modules(model)
        ff = [t for t in resolved if any(n.endswith(t) and g == "mlp" for n, g in groups.items())]
        return {"target_modules": resolved, "feedforward_modules": ff}
    if kind == "PREFIX_TUNING":
        return {"num_virtual_tokens": cfg.num_virtual_tokens,
                "prefix_projection": bool(cfg.prefix_projection),
                "encoder_hidden_size": cfg.encoder_hidden_size or model.config.hidden_size}
    if kind == "PROMPT_TUNING":
        text = cfg.prompt_init == "text"
        if text and not tokenizer_path:
            raise ConfigError("method.prompt_init=text needs the tokenizer's folder")
        return {"num_virtual_tokens": cfg.num_virtual_tokens,
                "prompt_tuning_init": "TEXT" if text else "RANDOM",
                "prompt_tuning_init_text": cfg.prompt_init_text if text else None,
                "tokenizer_name_or_path": tokenizer_path if text else None}
    raise ConfigError(f"method={cfg.name}: method.peft.type {kind!r} does not fit a built-in "
                      "method (expected LORA, IA3, PREFIX_TUNING or PROMPT_TUNING)")


def peft_config(method, model, cfg: DictConfig, model_name: str = "",
                tokenizer_path: str | None = None):
    """The peft config object for a peft method: its `peft:` section (type and arguments), with a
    built-in method's shared keys translated (its Method's peft_arguments), and target sets
    (attention | mlp | all, or a list) resolved against the model."""
    import peft

    args = peft_settings(cfg)
    kind = str(args.pop("type"))
    if kind not in peft.PeftType.__members__:
        raise ConfigError(f"method.peft.type {kind!r} is not a peft type (expected one of: "
                          f"{', '.join(peft.PeftType.__members__)})")
    ctx = ApplyContext(model_name, tokenizer_path)
    args = {**method.peft_arguments(model, cfg, kind, ctx), **args}
    if kind == "LORA" and method.lora_adapter:  # eva/corda sub-configs (a user's kept)
        args.update(calibrated_init.calibrated_arguments(cfg.get("init", "default"), args))
    targets = args.get("target_modules")
    if targets in TARGET_SETS or isinstance(targets, list):
        args["target_modules"] = resolve_targets(model, targets, model_name)
    try:
        return peft.get_peft_config({"peft_type": kind, "task_type": "CAUSAL_LM", **args})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method={cfg.name}: peft's {kind} config rejects method.peft "
                          f"{args}: {str(e).splitlines()[0]}") from e


def apply_peft(method, model, cfg: DictConfig, ctx: ApplyContext):
    """Wrap the model with the peft method's adapter (LoRA's init variants: calibrated on the
    training data, LoftQ, or written into the base as a residual)."""
    import peft

    model_name, notes = ctx.model_name, ctx.notes
    config = peft_config(method, model, cfg, model_name, ctx.tokenizer_path)
    init = str(cfg.get("init", "default")) if method.lora_adapter else "default"
    batches = _calibration_batches(model, cfg, init, ctx.calibration)
    try:
        if init == "corda":  # the covariance statistics, on the base model before wrapping
            calibrated_init.prepare_corda(model, config, batches)
        wrapped = peft.get_peft_model(model, config, low_cpu_mem_usage=init == "eva")
        if init == "eva":  # A from the activations' SVD, after wrapping (peft's EVA recipe)
            calibrated_init.initialise_eva(wrapped, batches)
        if init == "loftq":  # base Q and factors B, A from the checkpoint's W (CPU LoftQ)
            from learnforget.methods.loftq import initialise_loftq

            notes.append(initialise_loftq(wrapped, cfg))
    except ValueError as e:
        raise ConfigError(f"method={cfg.name} on model={model_name}: {e}") from e
    if batches:
        notes.append(calibrated_init.calibration_note(init, len(batches),
                                                      len(batches[0]["input_ids"])))
    if method.lora_adapter and mutates_base(init):
        capture_initial(wrapped)
        notes.append(f"method.init={init}: the base holds W - s B0 A0; checkpoints are "
                     "converted to rank-2r LoRA adapters on the original base")
    return wrapped


def _calibration_batches(model, cfg, init: str, calibration):
    """The calibration batches of a data-driven init (None for the others)."""
    if not calibrated_init.is_calibrated(init):
        return None
    if calibration is None:
        raise ConfigError(f"method.init={init} needs the run's training data to calibrate on "
                          "(apply_method(calibration=...): the train stage passes it)")
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    n = int(cfg.get("calibration_batches", calibrated_init.DEFAULT_CALIBRATION_BATCHES))
    return calibrated_init.calibration_batches(calibration, n, device)


def changes_weights(adapter_folder: Path) -> bool:
    """Does the peft adapter saved in this folder change weight matrices (so that merged minus
    base is its ΔW)? False for prompt learning (prefix, prompt tuning), which adds inputs."""
    import peft

    return not peft.PeftConfig.from_pretrained(str(adapter_folder)).is_prompt_learning


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            shape = getattr(p, "quant_state", None)
            n = int(torch.Size(shape.shape).numel()) if shape is not None else n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
