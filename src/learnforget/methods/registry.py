"""What a method config means, without torch: the methods, the keys each reads, their checks,
and the part of a method config that identifies a run (effective settings, run-name summary).

Two kinds of method:

- built-in methods (USES): full, bitfit, topk, adapter and the peft methods lora, dora, qlora,
  ia3, prefix, prompt, whose shared keys (r, alpha, targets, ...) are translated to peft's
  arguments in learnforget.methods.apply;
- peft methods described by data: any other name whose config has a `peft:` section naming a
  peft type and its arguments (conf/method/vera.yaml, loha.yaml). Their settings are that
  section, resolved; a shared key it interpolates (`r: ${..r}`) counts as used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from learnforget.errors import ConfigError
from learnforget.methods.calibrated_init import (
    DEFAULT_CALIBRATION_BATCHES,
    is_calibrated,
    validate_calibration,
)
from learnforget.methods.loftq import DEFAULT_ITER as LOFTQ_DEFAULT_ITER
from learnforget.methods.loftq import validate_loftq
from learnforget.methods.lora_variants import mutates_base, validate_init

# The method keys each built-in method reads; the others are ignored (and left out of the run name).
USES: dict[str, tuple[str, ...]] = {
    "full": (),
    "lora": ("r", "alpha", "dropout", "targets", "init", "rslora", "calibration_batches"),
    "dora": ("r", "alpha", "dropout", "targets", "init", "rslora", "calibration_batches"),
    "qlora": ("r", "alpha", "dropout", "targets", "quant_type", "double_quant", "compute_dtype",
              "init", "rslora", "calibration_batches", "loftq_iter"),
    "ia3": ("targets",),
    "prefix": ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size"),
    "prompt": ("num_virtual_tokens", "prompt_init", "prompt_init_text"),
    "bitfit": (),
    "topk": ("top_k",),
    "adapter": ("bottleneck", "placement", "adapter_act"),
    "said": ("d", "projection_seed", "targets"),
    "did": ("d", "projection_seed", "targets"),
}
BUILTIN = tuple(USES)
LORA_FAMILY = ("lora", "dora", "qlora")
QUANT_TYPES = ("nf4", "fp4", "int8")  # qlora's frozen base: 4-bit NF4/FP4 or 8-bit LLM.int8
TARGET_SETS = ("attention", "mlp", "all")
# LoRA variants (learnforget.methods.lora_variants); at these values a run is plain LoRA
VARIANT_DEFAULTS: dict[str, Any] = {"init": "default", "rslora": False}
# Bottleneck adapters (learnforget.methods.bottleneck): where they go, their torch.nn activation
PLACEMENTS = {"houlsby": ("attention", "mlp"), "pfeiffer": ("mlp",)}
ADAPTER_ACTS = {"relu": "ReLU", "gelu": "GELU", "silu": "SiLU", "tanh": "Tanh"}
INTRINSIC = ("said", "did")  # intrinsic-dimension finetuning (learnforget.methods.said)
PEFT = "peft"  # the method config's section naming a peft type and its arguments
_SHARED_REF = re.compile(r"\$\{\.\.(\w+)\}")  # `${..r}` in the peft section: method.r


def is_data_method(cfg: Mapping) -> bool:
    """A method described by its config alone: not built in, with a `peft:` section."""
    return cfg.get("name") not in USES and cfg.get(PEFT) is not None


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(_refs(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node)) if node else set()
    return set(_SHARED_REF.findall(node)) if isinstance(node, str) else set()


def uses(cfg: DictConfig) -> tuple[str, ...]:
    """The shared method keys this method reads."""
    if cfg.name in USES:
        return USES[cfg.name]
    raw = OmegaConf.to_container(cfg[PEFT], resolve=False)
    return tuple(sorted(k for k in _refs(raw) if k in cfg and k not in ("name", PEFT)))


def peft_settings(cfg: DictConfig) -> dict[str, Any]:
    """The `peft:` section resolved to plain values (empty when there is none)."""
    node = cfg.get(PEFT)
    return {} if node is None else OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def peft_type(cfg: DictConfig) -> str | None:
    """The peft type a method wraps the model with (LORA, IA3, VERA, ...), None if none."""
    return peft_settings(cfg).get("type")


def checkpoint_format(cfg: Mapping) -> str:
    """manifest.json's "format" of a method's checkpoints (how to load them)."""
    if cfg.get("name") == "adapter":
        return "bottleneck_adapter"
    if cfg.get("name") in INTRINSIC:
        return "said"
    return "peft_adapter" if cfg.get(PEFT) is not None else "safetensors"


# peft types whose adapters add inputs (virtual tokens) rather than wrapping modules
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT",
                   "ADAPTION_PROMPT")


def quantised_base(cfg: Mapping) -> bool:
    """The method trains on a quantised frozen base (qlora): it loads, computes and is counted
    in its own dtypes (method.compute_dtype), not model.dtype."""
    return cfg.get("name") == "qlora"


def shares_base_in_eval(cfg: DictConfig) -> bool:
    """Can an eval process score this method's checkpoints on one loaded base by swapping peft
    adapters (learnforget.eval.swap)? Yes for peft adapters that wrap modules of an unquantised
    base which loading leaves unchanged (lora, dora, ia3, vera, loha, ...; pissa/olora/corda
    checkpoints are saved as plain LoRA on the original base). No for full-weight checkpoints
    (full, bitfit, topk), bottleneck adapters, qlora (its own quantised base) and prompt
    learning (prefix, prompt)."""
    if checkpoint_format(cfg) != "peft_adapter" or cfg.get("name") == "qlora":
        return False
    return str(peft_type(cfg) or "").upper() not in PROMPT_LEARNING


def effective_method(cfg: DictConfig) -> dict[str, Any]:
    """The method's settings that matter (alpha resolved to 2r): this defines the run."""
    validate_method(cfg)
    out: dict[str, Any] = {"name": cfg.name}
    if is_data_method(cfg):  # the shared keys it reads (r for sweeps, collect) and its section
        out.update({k: _plain(cfg[k]) for k in uses(cfg)})
        out[PEFT] = peft_settings(cfg)
        return out
    for key in USES[cfg.name]:
        value = cfg.get(key, VARIANT_DEFAULTS.get(key))
        if key in VARIANT_DEFAULTS and value == VARIANT_DEFAULTS[key]:
            continue  # plain LoRA: the run's name and hash stay what they were
        if key == "calibration_batches":
            if not is_calibrated(cfg.get("init", "default")):
                continue  # read only by the data-driven inits (eva, corda)
            value = cfg.get(key, DEFAULT_CALIBRATION_BATCHES)
        if key == "loftq_iter":
            if str(cfg.get("init", "default")) != "loftq":
                continue  # read only by method.init=loftq
            value = cfg.get(key, LOFTQ_DEFAULT_ITER)
        if isinstance(value, ListConfig):
            value = list(value)
        out[key] = value
    if "alpha" in out and out["alpha"] is None:
        out["alpha"] = 2 * out["r"]
    if out.get("quant_type") == "int8":
        out.pop("double_quant", None)  # 4-bit only: not part of an int8 run
    extra = {k: v for k, v in peft_settings(cfg).items() if k != "type"}
    if extra:  # peft arguments added to a built-in method's section define the run too
        out[PEFT] = extra
    return out


def ignored_keys(cfg: DictConfig) -> list[str]:
    """Keys set in the method config that this method does not read."""
    used = uses(cfg)
    if cfg.name == "qlora" and cfg.get("quant_type") == "int8":
        used = tuple(k for k in used if k != "double_quant")
    if not is_calibrated(cfg.get("init", "default")):  # read by method.init=eva|corda only
        used = tuple(k for k in used if k != "calibration_batches")
    if str(cfg.get("init", "default")) != "loftq":  # read by method.init=loftq only
        used = tuple(k for k in used if k != "loftq_iter")
    return sorted(k for k in cfg if k not in ("name", PEFT) and k not in used)


def validate_adapter(bottleneck: Any, placement: Any, act: Any) -> None:
    """Bottleneck adapter settings; ConfigError naming the bad value and what was expected."""
    if not isinstance(bottleneck, int) or isinstance(bottleneck, bool) or bottleneck <= 0:
        raise ConfigError(f"method.bottleneck must be a positive integer (the adapter's inner "
                          f"width), got {bottleneck!r}")
    if placement not in PLACEMENTS:
        raise ConfigError(f"method.placement {placement!r} is unknown (expected one of: "
                          f"{', '.join(PLACEMENTS)})")
    if act not in ADAPTER_ACTS:
        raise ConfigError(f"method.adapter_act {act!r} is unknown (expected one of: "
                          f"{', '.join(ADAPTER_ACTS)})")


def validate_intrinsic(d: Any, seed: Any) -> None:
    """SAID/DID settings; ConfigError naming the bad value and what was expected."""
    if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
        raise ConfigError(f"method.d must be a positive integer (the intrinsic dimension: the "
                          f"length of the trained vector θ_d), got {d!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"method.projection_seed must be an integer >= 0 (the seed of the fixed "
                          f"random projections), got {seed!r}")


def _validate_peft_section(cfg: DictConfig) -> None:
    section = cfg.get(PEFT)
    if section is None:
        return
    if not isinstance(section, DictConfig):
        raise ConfigError(f"method.peft must be a mapping such as {{type: VERA, r: 256}}, got "
                          f"{section!r}")
    kind = section.get("type")
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"method.peft.type must name a peft type (e.g. LORA, VERA, LOHA), got "
                          f"{kind!r}")


def validate_method(cfg: DictConfig) -> None:
    """Check the method config's values (peft itself checks a data method's arguments when the
    model is wrapped)."""
    name = cfg.get("name")
    if name not in USES and cfg.get(PEFT) is None:
        raise ConfigError(f"unknown method {name!r} (expected one of: {', '.join(BUILTIN)}, or a "
                          "method config with a peft: section naming a peft type)")
    _validate_peft_section(cfg)
    used = uses(cfg)
    if "r" in used and (not isinstance(cfg.r, int) or isinstance(cfg.r, bool) or cfg.r <= 0):
        raise ConfigError(f"method.r must be a positive integer, got {cfg.r!r}")
    if "alpha" in used and cfg.alpha is not None and not cfg.alpha > 0:
        raise ConfigError(f"method.alpha must be > 0 (or null for 2r), got {cfg.alpha!r}")
    if "dropout" in used and not 0 <= cfg.dropout < 1:
        raise ConfigError(f"method.dropout must be in [0, 1), got {cfg.dropout!r}")
    if "num_virtual_tokens" in used and (not isinstance(cfg.num_virtual_tokens, int)
                                         or cfg.num_virtual_tokens <= 0):
        raise ConfigError(
            f"method.num_virtual_tokens must be a positive integer, got {cfg.num_virtual_tokens!r}")
    if "prompt_init" in used and cfg.prompt_init not in ("random", "text"):
        raise ConfigError(f"method.prompt_init must be 'random' or 'text', got {cfg.prompt_init!r}")
    if "init" in used:
        init = cfg.get("init", "default")
        if str(init) == "loftq" and name != "qlora":
            raise ConfigError(f"method.init=loftq needs method=qlora (LoftQ initialises LoRA "
                              f"against a quantised base), got method={name}")
        validate_init(init, cfg.r)
        if str(init) == "loftq":
            validate_loftq(cfg)
        validate_calibration(init, cfg.get("calibration_batches", DEFAULT_CALIBRATION_BATCHES))
        if name == "qlora" and mutates_base(init):
            raise ConfigError(f"method.init={init} with method=qlora is not supported (it writes "
                              "a residual into the 4-bit base; expected default, gaussian, "
                              "orthogonal or eva)")
    if "rslora" in used and not isinstance(cfg.get("rslora", False), bool):
        raise ConfigError(f"method.rslora must be true or false, got {cfg.rslora!r}")
    if "top_k" in used and (not isinstance(cfg.top_k, int) or cfg.top_k <= 0):
        raise ConfigError(f"method.top_k must be a positive integer, got {cfg.top_k!r}")
    if name == "adapter":
        validate_adapter(cfg.bottleneck, cfg.placement, cfg.adapter_act)
    if name in INTRINSIC:
        validate_intrinsic(cfg.d, cfg.projection_seed)
    if "quant_type" in used and cfg.quant_type not in QUANT_TYPES:
        raise ConfigError(f"method.quant_type must be one of {', '.join(QUANT_TYPES)} (int8: "
                          f"bitsandbytes LLM.int8), got {cfg.quant_type!r}")
    if "targets" in used:
        t = cfg.targets
        if isinstance(t, str) and t not in TARGET_SETS:
            raise ConfigError(
                f"method.targets {t!r} is not a named set (expected one of {', '.join(TARGET_SETS)}, "
                "or a list of module names such as [q_proj,v_proj])")
        if isinstance(t, ListConfig) and len(t) == 0:
            raise ConfigError("method.targets is an empty list (expected at least one module name)")


_ABBREV = {"r": "r", "alpha": "a", "dropout": "do", "top_k": "k", "num_virtual_tokens": "v",
           "quant_type": "", "double_quant": "dq", "compute_dtype": "", "prefix_projection": "mlp",
           "prompt_init": "init", "encoder_hidden_size": "h", "prompt_init_text": None,
           "bottleneck": "b", "placement": "", "adapter_act": "", "init": "", "rslora": "rs",
           "calibration_batches": "cb", "loftq_iter": "it", "d": "d", "projection_seed": "ps",
           PEFT: None}


def method_summary(cfg: DictConfig) -> str:
    """A short, filesystem-safe description: 'lora_r16_a32_all', 'full', 'topk_k2',
    'vera_r256_all' (a data method: its name and the shared keys it reads; the hash in the run
    name tells its other peft settings apart)."""
    eff = effective_method(cfg)
    parts = [cfg.name]
    for key, value in eff.items():
        if key == "name" or _ABBREV.get(key, key) is None:
            continue
        if key == "targets":
            value = value if isinstance(value, str) else "+".join(value)
        if key == "dropout" and value == 0.05:
            continue
        if isinstance(value, bool):
            if value:
                parts.append(_ABBREV[key])
            continue
        if value is None:
            continue
        parts.append(f"{_ABBREV.get(key, '')}{value}")
    return "_".join(str(p).replace("/", "-") for p in parts)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, ListConfig) else value
