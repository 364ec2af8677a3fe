"""A data config's settings (with defaults and one-line errors) and how a raw record becomes text.

Two regimes (``cfg.regime``): ``cpt`` (documents) and ``ift`` ((prompt, response) pairs); six
sources (``cfg.source``): ``stdlib``, ``local``, ``synthetic``, ``hub``, ``shakespeare`` and
``shakespeare_works`` (see :mod:`learnforget.data.sources`). Data selection and the
train/held-out split use a fixed data seed (:data:`DATA_SEED`), not the run seed: every method
and every run seed sees exactly the same training and held-out data, so differences between
runs come from the method and the run seed only (init, order).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf.errors import MissingMandatoryValue

from learnforget.errors import ConfigError

REGIMES = ("cpt", "ift")
SOURCES = ("stdlib", "local", "synthetic", "hub", "shakespeare", "shakespeare_works")
DATA_SEED = 0
"""Seed for the stdlib file selection, the synthetic generator and the held-out split."""

STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
)
LOCAL_FILE_SUFFIXES = (".txt", ".jsonl", ".json")
LOCAL_FOLDER_SUFFIXES = (".txt", ".py", ".md")
SYNTHETIC_DEFAULT_PAIRS = 2000
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
OFFLINE_SETS = "data=stdlib_code, data=arith_ift, data=local_text data.path=..."

# Values of the keys in conf/data/_base.yaml, used when a plain dict lacks a key.
_DEFAULTS: dict[str, Any] = {
    "name": "<unnamed>",
    "regime": "cpt",
    "source": None,
    "path": None,
    "hub_id": None,
    "hub_config": None,
    "hub_split": "train",
    "streaming": False,
    "text_field": "text",
    "prompt_field": "prompt",
    "response_field": "response",
    "prompt_template": "{prompt}\n",
    "max_docs": None,
    "heldout_docs": 32,
    "train_chars": None,
}

Record = str | tuple[str, str]


def cfg_name(cfg: Any) -> str:
    try:
        return str(cfg_get(cfg, "name"))
    except ConfigError:
        return "<unnamed>"


def cfg_get(cfg: Any, key: str) -> Any:
    """``cfg[key]``, the _base.yaml default when absent, ConfigError when ``???``."""
    try:
        return cfg[key]
    except MissingMandatoryValue:
        name = "<unnamed>" if key == "name" else cfg_name(cfg)
        raise ConfigError(f"data.{key} is required for data={name} (give data.{key}=...)") from None
    except KeyError:
        return _DEFAULTS[key]


def cfg_regime(cfg: Any) -> str:
    regime = cfg_get(cfg, "regime")
    if regime not in REGIMES:
        raise ConfigError(
            f"data.regime={regime!r} is not known (data={cfg_name(cfg)}): use one of {', '.join(REGIMES)}"
        )
    return regime


def cfg_source(cfg: Any) -> str:
    source = cfg_get(cfg, "source")
    if source not in SOURCES:
        raise ConfigError(
            f"data.source={source!r} is not known (data={cfg_name(cfg)}): use one of {', '.join(SOURCES)}"
        )
    return source


def _positive_int_or_none(cfg: Any, key: str, unit: str = "") -> int | None:
    """data.<key>: a positive integer, or None (null); a one-line error otherwise."""
    n = cfg_get(cfg, key)
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"data.{key}={n!r}: expected a positive integer{unit} or null")
    return n


def cfg_max_docs(cfg: Any) -> int | None:
    return _positive_int_or_none(cfg, "max_docs")


def cfg_heldout_docs(cfg: Any) -> int:
    heldout = cfg_get(cfg, "heldout_docs")
    if isinstance(heldout, bool) or not isinstance(heldout, int) or heldout < 0:
        raise ConfigError(f"data.heldout_docs={heldout!r}: expected an integer >= 0")
    return heldout


def cfg_train_chars(cfg: Any) -> int | None:
    """data.train_chars: keep the first this many characters of the training split (None: all)."""
    return _positive_int_or_none(cfg, "train_chars", " (characters)")


def render_prompt(cfg: Any, prompt: str) -> str:
    template = cfg_get(cfg, "prompt_template")
    try:
        return str(template).format(prompt=prompt)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"data.prompt_template={template!r} cannot be filled ({type(err).__name__}: {err}): "
            "use {prompt} as the only field and write literal braces as {{ }}"
        ) from None


# --------------------------------------------------------------------------- records


def _field_text(record: Mapping[str, Any], key: str, setting: str, where: str) -> str:
    if not isinstance(record, Mapping):
        raise ConfigError(
            f"{where}: expected a JSON object (a record), got {type(record).__name__}"
        )
    if key not in record:
        raise ConfigError(
            f"data.{setting}={key!r}: the record at {where} has no field {key!r} "
            f"(keys present: {sorted(map(str, record))})"
        )
    value = record[key]
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(
        f"data.{setting}={key!r}: the field {key!r} of the record at {where} is "
        f"{type(value).__name__}, expected a string"
    )


def record_to_text(cfg: Any, record: Mapping[str, Any], where: str = "record") -> Record:
    """Map one raw record to a document (cpt: ``record[text_field]``) or a
    ``(prompt, response)`` pair (ift: ``record[prompt_field]``, ``record[response_field]``).

    ``where`` (e.g. ``"pairs.jsonl:12"``) goes into the error for a missing field.
    """
    if cfg_regime(cfg) == "cpt":
        return _field_text(record, cfg_get(cfg, "text_field"), "text_field", where)
    prompt = _field_text(record, cfg_get(cfg, "prompt_field"), "prompt_field", where)
    response = _field_text(record, cfg_get(cfg, "response_field"), "response_field", where)
    return prompt, response


def expected_record(cfg: Any) -> str:
    """What one record of this data config must look like, e.g. ``{"text": "..."}``."""
    if cfg_regime(cfg) == "cpt":
        fields = [cfg_get(cfg, "text_field")]
    else:
        fields = [cfg_get(cfg, "prompt_field"), cfg_get(cfg, "response_field")]
    return "a JSON object like {" + ", ".join(f'"{f}": "..."' for f in fields) + "}"


def take_records(records: Iterable[Record], regime: str, max_docs: int | None) -> list[Record]:
    """The first ``max_docs`` records, skipping empty cpt documents."""
    if regime == "cpt":
        records = (r for r in records if isinstance(r, str) and r.strip())
    return list(itertools.islice(records, max_docs))
