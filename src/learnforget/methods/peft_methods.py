"""Finetuning methods: which parameters train, and the peft wrapping for adapter methods."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from transformers import PreTrainedModel

from learnforget.errors import ConfigError

# The method keys each method reads; the others are ignored (and left out of the run name).
USES: dict[str, tuple[str, ...]] = {
    "full": (),
    "lora": ("r", "alpha", "dropout", "targets", "init", "rslora"),
    "dora": ("r", "alpha", "dropout", "targets", "init", "rslora"),
    "qlora": ("r", "alpha", "dropout", "targets", "quant_type", "double_quant", "compute_dtype",
              "init", "rslora"),
    "ia3": ("targets",),
    "prefix": ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size"),
    "prompt": ("num_virtual_tokens", "prompt_init", "prompt_init_text"),
    "bitfit": (),
    "topk": ("top_k",),
    "adapter": ("bottleneck", "placement", "adapter_act"),
}
METHODS = tuple(USES)
PEFT_METHODS = ("lora", "dora", "qlora", "ia3", "prefix", "prompt")
# Methods whose checkpoints hold only new weights (float32, like peft's), loaded onto the base.
ADAPTER_METHODS = (*PEFT_METHODS, "adapter")
LORA_FAMILY = ("lora", "dora", "qlora")
QUANT_TYPES = ("nf4", "fp4", "int8")  # qlora's frozen base: 4-bit NF4/FP4 or 8-bit LLM.int8
TARGET_SETS = ("attention", "mlp", "all")
# LoRA variants (learnforget.methods.lora_variants); at these values a run is plain LoRA
VARIANT_DEFAULTS: dict[str, Any] = {"init": "default", "rslora": False}


def effective_method(cfg: DictConfig) -> dict[str, Any]:
    """The method's settings that matter (alpha resolved to 2r): this defines the run."""
    validate_method(cfg)
    out: dict[str, Any] = {"name": cfg.name}
    for key in USES[cfg.name]:
        value = cfg.get(key, VARIANT_DEFAULTS.get(key))
        if key in VARIANT_DEFAULTS and value == VARIANT_DEFAULTS[key]:
            continue  # plain LoRA: the run's name and hash stay what they were
        if isinstance(value, ListConfig):
            value = list(value)
        out[key] = value
    if "alpha" in out and out["alpha"] is None:
        out["alpha"] = 2 * out["r"]
    if out.get("quant_type") == "int8":
        out.pop("double_quant", None)  # 4-bit only: not part of an int8 run
    return out


def ignored_keys(cfg: DictConfig) -> list[str]:
    """Keys set in the method config that this method does not read."""
    uses = USES[cfg.name]
    if cfg.name == "qlora" and cfg.get("quant_type") == "int8":
        uses = tuple(k for k in uses if k != "double_quant")
    return sorted(k for k in cfg if k != "name" and k not in uses)


def validate_method(cfg: DictConfig) -> None:
    name = cfg.get("name")
    if name not in USES:
        raise ConfigError(f"unknown method {name!r} (expected one of: {', '.join(METHODS)})")
    uses = USES[name]
    if "r" in uses and (not isinstance(cfg.r, int) or isinstance(cfg.r, bool) or cfg.r <= 0):
        raise ConfigError(f"method.r must be a positive integer, got {cfg.r!r}")
    if "alpha" in uses and cfg.alpha is not None and not cfg.alpha > 0:
        raise ConfigError(f"method.alpha must be > 0 (or null for 2r), got {cfg.alpha!r}")
    if "dropout" in uses and not 0 <= cfg.dropout < 1:
        raise ConfigError(f"method.dropout must be in [0, 1), got {cfg.dropout!r}")
    if "num_virtual_tokens" in uses and (not isinstance(cfg.num_virtual_tokens, int)
                                         or cfg.num_virtual_tokens <= 0):
        raise ConfigError(
            f"method.num_virtual_tokens must be a positive integer, got {cfg.num_virtual_tokens!r}")
    if "prompt_init" in uses and cfg.prompt_init not in ("random", "text"):
        raise ConfigError(f"method.prompt_init must be 'random' or 'text', got {cfg.prompt_init!r}")
    if "init" in uses:
        from learnforget.methods.lora_variants import mutates_base, validate_init

        init = cfg.get("init", "default")
        validate_init(init, cfg.r)
        if name == "qlora" and mutates_base(init):
            raise ConfigError(f"method.init={init} with method=qlora is not supported (it writes "
                              "a residual into the 4-bit base; expected default, gaussian or "
                              "orthogonal)")
    if "rslora" in uses and not isinstance(cfg.get("rslora", False), bool):
        raise ConfigError(f"method.rslora must be true or false, got {cfg.rslora!r}")
    if "top_k" in uses and (not isinstance(cfg.top_k, int) or cfg.top_k <= 0):
        raise ConfigError(f"method.top_k must be a positive integer, got {cfg.top_k!r}")
    if name == "adapter":
        from learnforget.methods.bottleneck import validate as validate_adapter

        validate_adapter(cfg.bottleneck, cfg.placement, cfg.adapter_act)
    if "quant_type" in uses and cfg.quant_type not in QUANT_TYPES:
        raise ConfigError(f"method.quant_type must be one of {', '.join(QUANT_TYPES)} (int8: "
                          f"bitsandbytes LLM.int8), got {cfg.quant_type!r}")
    if "targets" in uses:
        t = cfg.targets
        if isinstance(t, str) and t not in TARGET_SETS:
            raise ConfigError(
                f"method.targets {t!r} is not a named set (expected one of {', '.join(TARGET_SETS)}, "
                "or a list of module names such as [q_proj,v_proj])")
        if isinstance(t, ListConfig) and len(t) == 0:
            raise ConfigError("method.targets is an empty list (expected at least one module name)")


# ---------------------------------------------------------------------------- targets

def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def linear_modules(model: PreTrainedModel) -> dict[str, str]:
    """Every linear layer except the LM head, as {full name: 'attention' | 'mlp' | 'other'}."""
    head = model.get_output_embeddings()
    out = {}
    wrapped: list[str] = []  # peft layers: count the wrapper, not its base_layer/lora_* parts
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        is_wrapper = hasattr(module, "base_layer")
        if is_wrapper:
            wrapped.append(name)
        if module is head or name.endswith("lm_head") or not (is_wrapper or _is_linear(module)):
            continue
        parts = name.lower().split(".")[:-1]
        if any("attn" in p or "attention" in p for p in parts):
            out[name] = "attention"
        elif any(p in ("mlp", "feed_forward", "ffn") or "mlp" in p for p in parts):
            out[name] = "mlp"
        else:
            out[name] = "other"
    return out


def _suffix(name: str) -> str:
    """'model.layers.0.self_attn.q_proj' -> 'self_attn.q_proj' (parent + leaf)."""
    return ".".join(name.split(".")[-2:])


def resolve_targets(model: PreTrainedModel, targets: Any, model_name: str = "") -> list[str]:
    """Module-name suffixes for peft's target_modules, resolved against this model."""
    linear = linear_modules(model)
    if isinstance(targets, str):
        if targets not in TARGET_SETS:
            raise ConfigError(f"method.targets {targets!r} is not one of {TARGET_SETS} or a list")
        groups = ("attention", "mlp", "other") if targets == "all" else (targets,)
        found = sorted({_suffix(n) for n, g in linear.items() if g in groups})
        if not found:
            raise ConfigError(
                f"method.targets={targets!r} matches no linear layer of model={model_name} "
                f"(its linear layers: {sorted({_suffix(n) for n in linear})})")
        return found
    wanted = [str(t) for t in targets]
    available = sorted({n.split(".")[-1] for n in linear} | {_suffix(n) for n in linear})
    for t in wanted:
        if not any(n == t or n.endswith("." + t) for n in linear):
            raise ConfigError(
                f"method.targets: {t!r} matches no linear layer of model={model_name} "
                f"(expected names among: {', '.join(available)})")
    return wanted


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The stack of transformer blocks (model.model.layers, transformer.h, ...)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError(f"method=topk: cannot find the {n} transformer blocks of this model")


def _final_norm(model: PreTrainedModel) -> torch.nn.Module | None:
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    for holder in (base, getattr(model, "transformer", None), getattr(model, "model", None)):
        if holder is None:
            continue
        for attr in ("norm", "ln_f", "final_layernorm"):
            if hasattr(holder, attr):
                return getattr(holder, attr)
    return None


# ---------------------------------------------------------------------------- apply

def disable_bnb_cpu_fastpath(model: torch.nn.Module) -> int:
    """Turn off bitsandbytes' AVX512-BF16 4-bit CPU path on every Linear4bit.

    After the first no-grad eval forward it repacks the weights and routes training through
    `gemv_4bit`, which has no autograd kernel: gradients through frozen 4-bit layers are then
    silently wrong (bitsandbytes 0.50, CPUs with AVX512-BF16). Returns the number of layers.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def apply_method(
    model: PreTrainedModel,
    cfg: DictConfig,
    *,
    model_name: str = "",
    tokenizer_path: str | None = None,
) -> tuple[torch.nn.Module, list[str]]:
    """Freeze/wrap the model for the method. Returns the model to train and notes for run.json."""
    validate_method(cfg)
    name = cfg.name
    notes = [f"method.{k} is ignored by method={name}" for k in ignored_keys(cfg)
             if k in ("r", "alpha", "targets", "top_k", "num_virtual_tokens")]
    if name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, notes
    if name == "bitfit":
        n = 0
        for pname, p in model.named_parameters():
            p.requires_grad_(pname.endswith(".bias") or pname == "bias")
            n += p.requires_grad
        if n == 0:
            raise ConfigError(
                f"method=bitfit: model={model_name} has no bias parameters (expected a model with "
                "biases, e.g. model=tiny_gpt2 or a Llama with model.arch.attention_bias=true)")
        return model, notes
    if name == "topk":
        layers = decoder_layers(model)
        if cfg.top_k > len(layers):
            raise ConfigError(
                f"method.top_k={cfg.top_k} exceeds the model's {len(layers)} transformer blocks")
        for p in model.parameters():
            p.requires_grad_(False)
        trainable = list(layers[len(layers) - cfg.top_k:])
        norm = _final_norm(model)
        if norm is not None:
            trainable.append(norm)
        for module in trainable:
            for p in module.parameters():
                p.requires_grad_(True)
        return model, notes
    if name == "adapter":
        from learnforget.methods.bottleneck import add_adapters

        add_adapters(model, cfg.bottleneck, cfg.placement, cfg.adapter_act)
        return model, notes
    return _apply_peft(model, cfg, model_name, tokenizer_path, notes)


def checkpoint_format(method: str) -> str:
    """manifest.json's "format" of a method's checkpoints (how to load them)."""
    if method == "adapter":
        return "bottleneck_adapter"
    return "peft_adapter" if method in PEFT_METHODS else "safetensors"


def _apply_peft(model, cfg, model_name, tokenizer_path, notes):
    import peft

    from learnforget.methods.lora_variants import capture_initial, mutates_base, peft_init

    eff = effective_method(cfg)
    task = peft.TaskType.CAUSAL_LM
    if cfg.name in LORA_FAMILY:
        if cfg.name == "qlora":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            n = disable_bnb_cpu_fastpath(model)
            if n:
                notes.append(f"qlora: bitsandbytes' AVX512-BF16 CPU fast path disabled on {n} "
                             "4-bit layers (it gives wrong gradients)")
        peft_cfg = peft.LoraConfig(
            task_type=task,
            r=eff["r"],
            lora_alpha=eff["alpha"],
            lora_dropout=eff["dropout"],
            target_modules=resolve_targets(model, cfg.targets, model_name),
            use_dora=cfg.name == "dora",
            bias="none",
            init_lora_weights=peft_init(cfg.get("init", "default")),
            use_rslora=bool(cfg.get("rslora", False)),
        )
    elif cfg.name == "ia3":
        targets = cfg.targets
        if targets == "all":
            peft_cfg = peft.IA3Config(task_type=task)  # peft's per-architecture defaults
        else:
            resolved = resolve_targets(model, targets, model_name)
            groups = linear_modules(model)
            ff = [t for t in resolved
                  if any(n.endswith(t) and g == "mlp" for n, g in groups.items())]
            peft_cfg = peft.IA3Config(task_type=task, target_modules=resolved,
                                      feedforward_modules=ff)
    elif cfg.name == "prefix":
        peft_cfg = peft.PrefixTuningConfig(
            task_type=task,
            num_virtual_tokens=cfg.num_virtual_tokens,
            prefix_projection=bool(cfg.prefix_projection),
            encoder_hidden_size=cfg.encoder_hidden_size or model.config.hidden_size,
        )
    elif cfg.name == "prompt":
        text = cfg.prompt_init == "text"
        if text and not tokenizer_path:
            raise ConfigError("method.prompt_init=text needs the tokenizer's folder")
        peft_cfg = peft.PromptTuningConfig(
            task_type=task,
            num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=peft.PromptTuningInit.TEXT if text else peft.PromptTuningInit.RANDOM,
            prompt_tuning_init_text=cfg.prompt_init_text if text else None,
            tokenizer_name_or_path=tokenizer_path if text else None,
        )
    else:  # pragma: no cover - guarded by validate_method
        raise ConfigError(f"unknown method {cfg.name!r}")
    try:
        wrapped = peft.get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ConfigError(f"method={cfg.name} on model={model_name}: {e}") from e
    if cfg.name in LORA_FAMILY and mutates_base(cfg.get("init", "default")):
        capture_initial(wrapped)
        notes.append(f"method.init={cfg.init}: the base holds W - s B0 A0; checkpoints are "
                     "converted to rank-2r LoRA adapters on the original base")
    return wrapped, notes


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


def method_summary(cfg: DictConfig) -> str:
    """A short, filesystem-safe description: 'lora_r16_a32_all', 'full', 'topk_k2'."""
    eff = effective_method(cfg)
    parts = [cfg.name]
    abbrev = {"r": "r", "alpha": "a", "dropout": "do", "top_k": "k", "num_virtual_tokens": "v",
              "quant_type": "", "double_quant": "dq", "compute_dtype": "", "prefix_projection": "mlp",
              "prompt_init": "init", "encoder_hidden_size": "h", "prompt_init_text": None,
              "bottleneck": "b", "placement": "", "adapter_act": "", "init": "",
              "rslora": "rs"}
    for key, value in eff.items():
        if key == "name" or abbrev.get(key, key) is None:
            continue
        if key == "targets":
            value = value if isinstance(value, str) else "+".join(value)
        if key == "dropout" and value == 0.05:
            continue
        if isinstance(value, bool):
            if value:
                parts.append(abbrev[key])
            continue
        if value is None:
            continue
        parts.append(f"{abbrev.get(key, '')}{value}")
    return "_".join(str(p).replace("/", "-") for p in parts)


def to_plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
