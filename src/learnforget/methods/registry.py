"""Method name -> Method object (learnforget.methods.base), without torch.

The families: the built-in ones (learnforget.methods.families) and every package under
learnforget.methods that defines METHODS (learnforget.methods.bottleneck); any other name
whose config has a `peft:` section is a generic PeftMethod (conf/method/vera.yaml, loha.yaml).

`method_of(cfg)` gives the object for a method config, `family(name)` for a name read back
from a run folder. The functions below ask that object; they are kept for their callers.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from omegaconf import DictConfig

from learnforget.errors import ConfigError
from learnforget.methods.base import (  # noqa: F401 - re-exported for their callers
    PEFT,
    QUANT_TYPES,
    TARGET_SETS,
    Method,
    peft_settings,
)
from learnforget.methods.families import METHODS as BUILTIN_METHODS
from learnforget.methods.families import PROMPT_LEARNING, VARIANT_DEFAULTS, PeftMethod  # noqa: F401


@lru_cache(maxsize=1)
def methods() -> dict[str, Method]:
    """Every registered method by name: the built-in families, then the family packages."""
    import learnforget.methods as pkg

    out = {m.name: m for m in BUILTIN_METHODS}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if not info.ispkg:
            continue
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for m in getattr(module, "METHODS", ()):
            if m.name in out:
                raise ConfigError(f"method {m.name!r} is registered twice ({out[m.name]!r} and "
                                  f"{m!r} in {module.__name__})")
            out[m.name] = m
    return out


def family(name: str) -> Method:
    """The Method registered under `name`; a generic PeftMethod for any other name (a method
    described by its config's `peft:` section, or one read back from an older run)."""
    return methods().get(str(name)) or PeftMethod(str(name))


def method_of(cfg: Mapping) -> Method:
    """The Method of a method config (checked: an unknown name needs a `peft:` section)."""
    name = cfg.get("name")
    if name not in methods() and cfg.get(PEFT) is None:
        raise ConfigError(f"unknown method {name!r} (expected one of: {', '.join(methods())}, "
                          "or a method config with a peft: section naming a peft type)")
    return family(str(name))



def is_data_method(cfg: Mapping) -> bool:
    """A method described by its config alone: not registered, with a `peft:` section."""
    return cfg.get("name") not in methods() and cfg.get(PEFT) is not None


def uses(cfg: DictConfig) -> tuple[str, ...]:
    """The shared method keys this method reads."""
    return method_of(cfg).uses(cfg)


def peft_type(cfg: DictConfig) -> str | None:
    """The peft type a method wraps the model with (LORA, IA3, VERA, ...), None if none."""
    return peft_settings(cfg).get("type")


def checkpoint_format(cfg: Mapping) -> str:
    """manifest.json's "format" of a method's checkpoints (how to load them)."""
    return method_of(cfg).checkpoint_format(cfg)  # type: ignore[arg-type]


def quantised_base(cfg: Mapping) -> bool:
    """The method trains on a quantised frozen base (qlora): it loads, computes and is counted
    in its own dtypes (method.compute_dtype), not model.dtype."""
    return method_of(cfg).quantisation(cfg) is not None  # type: ignore[arg-type]


def shares_base_in_eval(cfg: DictConfig) -> bool:
    """Can an eval process score this method's checkpoints on one loaded base by swapping peft
    adapters (learnforget.eval.swap)? Yes for peft adapters on an unquantised base that loading
    leaves unchanged; no for full weights, bottleneck adapters, qlora, prefix and prompt."""
    return method_of(cfg).shares_base_in_eval(cfg)


def effective_method(cfg: DictConfig) -> dict[str, Any]:
    """The method's settings that matter (alpha resolved to 2r): this defines the run."""
    return method_of(cfg).effective(cfg)


def ignored_keys(cfg: DictConfig) -> list[str]:
    """Keys set in the method config that this method does not read."""
    return method_of(cfg).ignored(cfg)


def validate_method(cfg: DictConfig) -> None:
    """Check the method config's values (peft itself checks a data method's arguments when the
    model is wrapped)."""
    method_of(cfg).validate(cfg)


def method_summary(cfg: DictConfig) -> str:
    """A short, filesystem-safe description: 'lora_r16_a32_all', 'full', 'topk_k2',
    'vera_r256_all' (a data method: its name and the shared keys it reads; the hash in the run
    name tells its other peft settings apart)."""
    return method_of(cfg).summary(cfg)


BUILTIN = tuple(methods())  # the registered method names
