"""The built-in method families (the Method protocol: learnforget.methods.base), without torch:

- BaseWeights: Full, BitFit, TopK train the base model's own weights (full-weight checkpoints);
- PeftMethod: any peft method, its `peft:` section naming the peft type and its arguments.
  Methods described by data alone (conf/method/vera.yaml, loha.yaml) are plain PeftMethods;
  the built-in ones translate shared keys to peft arguments: Lora (lora, dora), QLora (qlora,
  on a quantised base), Ia3, Prefix, Prompt.

Bottleneck adapters (method=adapter) are a family package of their own: methods/bottleneck/.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from learnforget.errors import ConfigError
from learnforget.methods.base import (
    PEFT,
    SKIP,
    ApplyContext,
    Method,
    Quantisation,
    peft_settings,
    plain,
    validate_peft_section,
)
from learnforget.methods.calibrated_init import (
    DEFAULT_CALIBRATION_BATCHES,
    is_calibrated,
    validate_calibration,
)
from learnforget.methods.loftq import DEFAULT_ITER as LOFTQ_DEFAULT_ITER
from learnforget.methods.loftq import validate_loftq
from learnforget.methods.lora_variants import mutates_base, validate_init

# peft types whose adapters add inputs (virtual tokens) rather than wrapping modules
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT",
                   "ADAPTION_PROMPT")
# LoRA variants (learnforget.methods.lora_variants); at these values a run is plain LoRA
VARIANT_DEFAULTS: dict[str, Any] = {"init": "default", "rslora": False}
_SHARED_REF = re.compile(r"\$\{\.\.(\w+)\}")  # `${..r}` in the peft section: method.r


class BaseWeights(Method):
    """Methods that train (some of) the base model's own weights; full-weight checkpoints."""
    trains_base_weights = True


class Full(BaseWeights):
    """Full finetuning: every parameter trains (the paper's reference)."""
    reference = True

    def apply(self, model, cfg, ctx):
        for p in model.parameters():
            p.requires_grad_(True)
        return model


class BitFit(BaseWeights):
    """Only the bias terms train (needs a model with biases)."""

    def apply(self, model, cfg, ctx):
        from learnforget.methods.wrapping import train_biases

        train_biases(model, ctx.model_name)
        return model


class TopK(BaseWeights):
    """The last top_k transformer blocks and the final norm train."""
    keys = ("top_k",)

    def apply(self, model, cfg, ctx):
        from learnforget.methods.wrapping import train_top_blocks

        train_top_blocks(model, cfg.top_k)
        return model


class PeftMethod(Method):
    """A peft method: its `peft:` section's type and arguments. Described by data alone (not a
    built-in name), the shared keys it reads are those its section interpolates (`r: ${..r}`),
    and its settings are that section, resolved."""
    checkpoint = "peft_adapter"

    def uses(self, cfg):
        raw = OmegaConf.to_container(cfg[PEFT], resolve=False)
        return tuple(sorted(k for k in _refs(raw) if k in cfg and k not in ("name", PEFT)))

    def validate(self, cfg):
        if cfg.get(PEFT) is None:
            raise ConfigError(f"unknown method {cfg.get('name')!r} (expected one of the built-in "
                              "methods, or a method config with a peft: section naming a peft "
                              "type)")
        super().validate(cfg)

    def effective(self, cfg):
        self.validate(cfg)
        out: dict[str, Any] = {"name": cfg.name}
        out.update({k: plain(cfg[k]) for k in self.uses(cfg)})
        out[PEFT] = peft_settings(cfg)
        return out

    def peft_arguments(self, model, cfg, kind: str, ctx: ApplyContext) -> dict[str, Any]:
        """peft arguments from the shared keys (built-in methods); the section's own win."""
        return {}

    def prepare(self, model, ctx: ApplyContext):
        """The model before peft wraps it."""
        return model

    def apply(self, model, cfg, ctx):
        from learnforget.methods.wrapping import apply_peft

        return apply_peft(self, self.prepare(model, ctx), cfg, ctx)

    def shares_base_in_eval(self, cfg):
        """Yes for peft adapters that wrap modules of an unquantised base which loading leaves
        unchanged (lora, dora, ia3, vera, loha, ...; pissa/olora/corda checkpoints are saved as
        plain LoRA on the original base); no on a quantised base or for prompt learning."""
        if self.quantisation(cfg) is not None:
            return False
        return str(peft_settings(cfg).get("type") or "").upper() not in PROMPT_LEARNING


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(_refs(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node)) if node else set()
    return set(_SHARED_REF.findall(node)) if isinstance(node, str) else set()


class BuiltinPeft(PeftMethod):
    """A built-in peft method: its keys are listed, and translated to peft's arguments."""

    def uses(self, cfg):
        return self.keys

    def validate(self, cfg):
        validate_peft_section(cfg)
        Method.validate(self, cfg)

    def effective(self, cfg):
        return Method.effective(self, cfg)

    def peft_arguments(self, model, cfg, kind, ctx):
        from learnforget.methods.wrapping import builtin_arguments

        return builtin_arguments(model, cfg, kind, ctx, self.effective(cfg),
                                 dora=getattr(self, "dora", False))


LORA_KEYS = ("r", "alpha", "dropout", "targets", "init", "rslora", "calibration_batches")


class Lora(BuiltinPeft):
    """LoRA (and DoRA: use_dora) with peft's init variants and rsLoRA scaling."""
    keys = LORA_KEYS
    lora_adapter = True

    def __init__(self, name: str, keys: tuple[str, ...] | None = None, dora: bool = False):
        super().__init__(name, keys)
        self.dora = dora  # peft use_dora: a learned magnitude vector

    def init(self, cfg: DictConfig) -> str:
        return str(cfg.get("init", "default"))

    def validate(self, cfg):
        super().validate(cfg)
        init = cfg.get("init", "default")
        if str(init) == "loftq" and not self.quantised:
            raise ConfigError(f"method.init=loftq needs method=qlora (LoftQ initialises LoRA "
                              f"against a quantised base), got method={cfg.name}")
        validate_init(init, cfg.r)
        if str(init) == "loftq":
            validate_loftq(cfg)
        validate_calibration(init, cfg.get("calibration_batches", DEFAULT_CALIBRATION_BATCHES))
        if self.quantised and mutates_base(init):
            raise ConfigError(f"method.init={init} with method={cfg.name} is not supported (it "
                              "writes a residual into the 4-bit base; expected default, gaussian, "
                              "orthogonal or eva)")

    def setting(self, cfg, key):
        value = cfg.get(key, VARIANT_DEFAULTS.get(key))
        if key in VARIANT_DEFAULTS and value == VARIANT_DEFAULTS[key]:
            return SKIP  # plain LoRA: the run's name and hash stay what they were
        if key == "calibration_batches":
            if not is_calibrated(self.init(cfg)):
                return SKIP  # read only by the data-driven inits (eva, corda)
            value = cfg.get(key, DEFAULT_CALIBRATION_BATCHES)
        if key == "loftq_iter":
            if self.init(cfg) != "loftq":
                return SKIP  # read only by method.init=loftq
            value = cfg.get(key, LOFTQ_DEFAULT_ITER)
        return plain(value)

    def effective(self, cfg):
        out = super().effective(cfg)
        if "alpha" in out and out["alpha"] is None:
            out["alpha"] = 2 * out["r"]
        return out

    def ignored(self, cfg):
        out = super().ignored(cfg)
        if not is_calibrated(self.init(cfg)):  # read by method.init=eva|corda only
            out.append("calibration_batches")
        if self.init(cfg) != "loftq":  # read by method.init=loftq only
            out.append("loftq_iter")
        return sorted(k for k in set(out) if k in cfg)

    def per_rank_reason(self, cfg):
        init = cfg.get("init", "default")
        if mutates_base(init) or is_calibrated(init) or str(init) == "loftq":
            return f"method.init={init} initialises from the base weights or data"
        return None

    def counting_config(self, cfg):
        method = cfg.copy()
        if "init" in method:  # PiSSA/OLoRA need real weights (an SVD/QR); the counts do not
            OmegaConf.update(method, "init", "default")
        return method

    def label(self, cfg):
        return f"{self.name} r={cfg.r}"


class QLora(Lora):
    """LoRA on a frozen base quantised by bitsandbytes (nf4 | fp4 4-bit, int8 LLM.int8)."""
    keys = ("r", "alpha", "dropout", "targets", "quant_type", "double_quant", "compute_dtype",
            "init", "rslora", "calibration_batches", "loftq_iter")
    quantised = True

    def quantisation(self, cfg):
        return Quantisation(str(cfg.quant_type), bool(cfg.double_quant), str(cfg.compute_dtype))

    def effective(self, cfg):
        out = super().effective(cfg)
        if out.get("quant_type") == "int8":
            out.pop("double_quant", None)  # 4-bit only: not part of an int8 run
        return out

    def ignored(self, cfg):
        out = super().ignored(cfg)
        if cfg.get("quant_type") == "int8" and "double_quant" in cfg:
            out.append("double_quant")
        return sorted(set(out))

    def prepare(self, model, ctx):
        import peft

        from learnforget.methods.quantisation import disable_bnb_cpu_fastpath

        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        n = disable_bnb_cpu_fastpath(model)
        if n:
            ctx.notes.append(f"qlora: bitsandbytes' AVX512-BF16 CPU fast path disabled on {n} "
                             "4-bit layers (it gives wrong gradients)")
        return model

    def per_rank_reason(self, cfg):
        return f"method={self.name}: bitsandbytes quantises the 4-bit base while loading it"

    def counting_config(self, cfg):
        """The same adapter as LoRA (the caller counts the base's quantised bytes)."""
        method = super().counting_config(cfg)
        OmegaConf.update(method, "name", "lora")
        return method


class Ia3(BuiltinPeft):
    """IA3: learned rescaling vectors (targets=all: peft's per-architecture defaults)."""
    keys = ("targets",)


class Prefix(BuiltinPeft):
    """Prefix tuning: trained key/value prefixes in every layer."""
    keys = ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size")
    no_activation_checkpointing = ("prefix tuning feeds its prefix through the KV cache, which "
                                   "gradient checkpointing turns off")


class Prompt(BuiltinPeft):
    """Prompt tuning: trained soft-prompt embeddings at the input."""
    keys = ("num_virtual_tokens", "prompt_init", "prompt_init_text")

    def per_rank_reason(self, cfg):
        if cfg.get("prompt_init") == "text":
            return "method.prompt_init=text initialises from the word embeddings"
        return None

    def counting_config(self, cfg):
        method = cfg.copy()  # text initialisation needs a tokenizer; the counts do not
        OmegaConf.update(method, "prompt_init", "random")
        return method


METHODS: tuple[Method, ...] = (
    Full("full"), Lora("lora"), Lora("dora", dora=True), QLora("qlora"), Ia3("ia3"),
    Prefix("prefix"), Prompt("prompt"), BitFit("bitfit"), TopK("topk"),
)
