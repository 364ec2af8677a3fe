"""The Method protocol: what the harness may ask of a finetuning method, one class per family.

The harness never compares method names. It looks the method up
(`learnforget.methods.registry.method_of(cfg.method)`, or `family(name)` for a name read back
from a run folder) and asks the object:

    uses(cfg)               the method config keys it reads (the others are ignored, noted in
                            run.json and left out of the run name)
    validate(cfg)           ConfigError naming a bad value and what was expected
    effective(cfg)          the settings that define the run (run identity), summary(cfg) the
                            run-name part ('lora_r16_a32_all')
    apply(model, cfg, ctx)  freeze or wrap the model for training (torch; imported lazily)
    checkpoint_format(cfg)  what its checkpoints hold: "safetensors" (full weights),
                            "peft_adapter" or "bottleneck_adapter"
    quantisation(cfg)       its frozen base's quantisation (None: an ordinary base), and with
                            it base_config(cfg), the method config that loads that base
    shares_base_in_eval     can eval swap its adapters on one loaded base
    delta_route(...)        how ΔW is rebuilt for spectra and intruders
    counting_config, label  how `learnforget params` builds and names it on the meta device
    per_rank_reason(cfg)    why every rank must read the base weights itself (None: rank 0 can)

and its flags: trains_base_weights (full, bitfit, topk: fp32 master copies of base weights),
lora_adapter (its adapter is LoRA factors B, A: rank labels, init variants, intruder mitigation),
quantised (its base is quantised) and reference (full finetuning, the baseline of comparisons).

Registering a family (see docs/methods.md, and methods/bottleneck/ for a worked example):

1. a package learnforget/methods/<family>/ whose __init__ defines METHODS, a tuple of
   instances of a Method subclass (one per method name); __init__ and the subclass's module
   import no torch (config composes without it): apply() imports the model code lazily;
2. conf/method/<name>.yaml: `defaults: [_base]`, `name: <name>`, and defaults for any new key
   (new keys also go in conf/method/_base.yaml with a line of doc, so that sweeps compose).

The registry finds every such package by itself. A method that peft implements needs no
Python at all: a YAML file with a `peft:` section (conf/method/vera.yaml) is served by the
generic PeftMethod family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from learnforget.errors import ConfigError

PEFT = "peft"  # the method config's section naming a peft type and its arguments
TARGET_SETS = ("attention", "mlp", "all")
QUANT_TYPES = ("nf4", "fp4", "int8")  # a quantised frozen base: 4-bit NF4/FP4 or 8-bit LLM.int8
SKIP = object()  # Method.setting: the key does not enter the run's identity
# run-name prefixes of the shared keys: 'r16', 'a32', 'k2'; "" the value alone; None left out
ABBREV: dict[str, str | None] = {
    "r": "r", "alpha": "a", "dropout": "do", "top_k": "k", "num_virtual_tokens": "v",
    "quant_type": "", "double_quant": "dq", "compute_dtype": "", "prefix_projection": "mlp",
    "prompt_init": "init", "encoder_hidden_size": "h", "prompt_init_text": None, "init": "",
    "rslora": "rs", "calibration_batches": "cb", "loftq_iter": "it", PEFT: None}


@dataclass(frozen=True)
class Quantisation:
    """A method's quantised frozen base (bitsandbytes)."""
    quant_type: str
    double_quant: bool
    compute_dtype: str

    @property
    def frozen(self) -> str:
        """The precision policy's description of the frozen weights."""
        return f"{self.quant_type} (rest {self.compute_dtype})"

    @property
    def label(self) -> str:
        """'nf4+dq', 'fp4', 'int8' (double quantisation is 4-bit only)."""
        dq = self.double_quant and self.quant_type != "int8"
        return self.quant_type + ("+dq" if dq else "")

    @property
    def base_suffix(self) -> str:
        """Appended to the model name to name the base a method's checkpoints are scored on."""
        if self.quant_type == "int8":
            return f"-8bit-int8-{self.compute_dtype}"
        return f"-4bit-{self.quant_type}{'-dq' if self.double_quant else ''}-{self.compute_dtype}"


@dataclass
class ApplyContext:
    """What apply() may need beside the model and the method config."""
    model_name: str = ""
    tokenizer_path: str | None = None
    calibration: Any = None              # learnforget.methods.calibrated_init.BatchSource
    notes: list[str] = field(default_factory=list)  # run.json notes, appended to


def peft_settings(cfg: DictConfig) -> dict[str, Any]:
    """The `peft:` section resolved to plain values (empty when there is none)."""
    node = cfg.get(PEFT)
    return {} if node is None else OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def plain(value: Any) -> Any:
    return list(value) if isinstance(value, ListConfig) else value


class Method:
    """One method (conf/method/<name>.yaml) of a family; subclasses override what differs."""

    keys: tuple[str, ...] = ()            # the shared method keys it reads
    checkpoint: str = "safetensors"       # what its checkpoints hold (checkpoint_format)
    trains_base_weights: bool = False     # its trainable parameters are base model weights
    lora_adapter: bool = False            # its adapter is LoRA factors B, A
    quantised: bool = False               # its frozen base is quantised (see quantisation)
    reference: bool = False               # the baseline others are compared with (full)
    no_activation_checkpointing: str = ""  # why train.activation_checkpointing cannot work
    abbreviations: dict[str, str | None] = {}  # run-name prefixes of its own keys (see ABBREV)

    def __init__(self, name: str, keys: tuple[str, ...] | None = None) -> None:
        self.name = name
        if keys is not None:
            self.keys = keys

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # ------------------------------------------------------------------ configuration

    def uses(self, cfg: DictConfig) -> tuple[str, ...]:
        """The shared method keys this method reads."""
        return self.keys

    def validate(self, cfg: DictConfig) -> None:
        """Check the method config's values (ConfigError naming the bad value)."""
        validate_peft_section(cfg)
        validate_shared(cfg, self.uses(cfg))

    def setting(self, cfg: DictConfig, key: str) -> Any:
        """A used key's value in the run's identity, or SKIP to leave it out."""
        return plain(cfg.get(key))

    def effective(self, cfg: DictConfig) -> dict[str, Any]:
        """The method's settings that matter: this defines the run."""
        self.validate(cfg)
        out: dict[str, Any] = {"name": cfg.name}
        for key in self.uses(cfg):
            value = self.setting(cfg, key)
            if value is not SKIP:
                out[key] = value
        extra = {k: v for k, v in peft_settings(cfg).items() if k != "type"}
        if extra:  # peft arguments added to a built-in method's section define the run too
            out[PEFT] = extra
        return out

    def ignored(self, cfg: DictConfig) -> list[str]:
        """Keys set in the method config that this method does not read."""
        used = set(self.uses(cfg))
        return sorted(k for k in cfg if k not in ("name", PEFT) and k not in used)

    def summary(self, cfg: DictConfig) -> str:
        """A short, filesystem-safe description for the run name: 'lora_r16_a32_all'."""
        abbrev = {**ABBREV, **self.abbreviations}
        parts = [cfg.name]
        for key, value in self.effective(cfg).items():
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

    # ------------------------------------------------------------------ training

    def apply(self, model: Any, cfg: DictConfig, ctx: ApplyContext) -> Any:
        """Freeze or wrap `model` for training; returns the model to train."""
        raise NotImplementedError(f"method={self.name}: {type(self).__name__}.apply")

    def quantisation(self, cfg: DictConfig) -> Quantisation | None:
        """The quantisation of the frozen base this method trains on (None: not quantised)."""
        return None

    def base_config(self, cfg: DictConfig) -> DictConfig:
        """The method config that loads this method's base model (learnforget.assets.models):
        the method's own when its base is quantised, else an ordinary one."""
        return cfg if self.quantisation(cfg) is not None else OmegaConf.create({"name": "full"})

    def per_rank_reason(self, cfg: DictConfig) -> str | None:
        """Why every rank must read the base weights itself (None: rank 0 can read them)."""
        return None

    # ------------------------------------------------------------------ checkpoints, eval, analysis

    def checkpoint_format(self, cfg: DictConfig) -> str:
        """manifest.json's "format" of its checkpoints (how to load them)."""
        return self.checkpoint

    def shares_base_in_eval(self, cfg: DictConfig) -> bool:
        """Can one eval process score its checkpoints on one loaded base by swapping adapters
        (learnforget.eval.swap)?"""
        return False

    def delta_route(self, fmt: str | None, adapter_cfg: dict[str, Any], ckpt: Path,
                    lora_via: str) -> str | None:
        """How ΔW of a checkpoint (manifest format `fmt`) is rebuilt: "full" (W_ft - W_base),
        "factors" (scale B A), "merge" (peft merged minus base), None (no weight matrix
        changes: prompt learning, bottleneck adapters)."""
        if fmt == "bottleneck_adapter":
            return None
        if fmt == "safetensors":
            return "full"
        peft_type = adapter_cfg.get("peft_type")
        if peft_type == "LORA" and not adapter_cfg.get("use_dora") and (
                lora_via == "factors" or self.quantised):
            return "factors"
        if peft_type is not None:
            import peft

            if not peft.PeftConfig.from_pretrained(str(ckpt)).is_prompt_learning:
                return "merge"  # any other peft type (DoRA, IA3, VeRA, LoHa, ...)
        return None  # prompt learning: adds inputs, changes no weight matrix

    # ------------------------------------------------------------------ parameter counts

    def counting_config(self, cfg: DictConfig) -> DictConfig:
        """The method config `learnforget params` builds on the meta device (the same trainable
        parameters, without what needs real weights, data or a tokenizer)."""
        return cfg

    def label(self, cfg: DictConfig) -> str:
        """The method as the parameter report names it."""
        return self.name

    def extra_memory(self, model) -> tuple[float, str] | None:
        """Bytes the adapted model holds beside its parameters and buffers (counted with the
        weights), and a line for the parameter report; None: nothing."""
        return None

    def backward_workspace(self, model, compute_bytes: int) -> float:
        """Transient bytes the method's backward needs beyond the traced activations, at most
        (SAID rebuilds one target weight at a time); the peak estimate adds them to one decoder
        layer's recompute. `compute_bytes`: 2 under bf16 compute, else 4."""
        return 0.0


# ---------------------------------------------------------------------------- shared checks

def validate_peft_section(cfg: DictConfig) -> None:
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


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_shared(cfg: DictConfig, used: tuple[str, ...]) -> None:
    """The checks of the shared keys (conf/method/_base.yaml) a method reads."""
    if "r" in used and not _positive_int(cfg.r):
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
    if "rslora" in used and not isinstance(cfg.get("rslora", False), bool):
        raise ConfigError(f"method.rslora must be true or false, got {cfg.rslora!r}")
    if "top_k" in used and (not isinstance(cfg.top_k, int) or cfg.top_k <= 0):
        raise ConfigError(f"method.top_k must be a positive integer, got {cfg.top_k!r}")
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
