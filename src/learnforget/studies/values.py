"""Hydra override texts and the values a study's rules, exclusions and costs match."""

from __future__ import annotations

import math
from typing import Any

from learnforget.errors import ConfigError


def fmt(value: Any) -> str:
    """A YAML value as the value part of a Hydra override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def split_override(text: str) -> tuple[str, str]:
    """'+train.lr=1e-4' -> ('train.lr', '1e-4'); the key without +, ++ or ~."""
    if "=" not in text:
        if text.startswith("~"):
            return text[1:], ""
        raise ConfigError(f"{text!r} is not an override (expected key=value)")
    key, value = text.split("=", 1)
    return key.lstrip("+~"), value


def same_value(a: Any, b: Any) -> bool:
    a, b = fmt(a) if not isinstance(a, str) else a, fmt(b) if not isinstance(b, str) else b
    if a == b:
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-12)
    except ValueError:
        return False


def matches(values: dict[str, Any], pattern: dict[str, Any]) -> bool:
    """Every key of the pattern has one of its values (a list value: any of it)."""
    for key, want in pattern.items():
        have = values.get(str(key))
        options = want if isinstance(want, list) else [want]
        if have is None or not any(same_value(have, w) for w in options):
            return False
    return True
