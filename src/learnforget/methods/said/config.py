"""SAID/DID settings and their checks, without torch (method.d, method.projection_seed and
method.targets in conf/method/_base.yaml)."""

from __future__ import annotations

from typing import Any

from learnforget.errors import ConfigError

VARIANTS = ("said", "did")  # with a learned scale per target weight (SAID) or without (DID)


def validate_intrinsic(d: Any, seed: Any, rebuild_weight: Any = True) -> None:
    """SAID/DID settings; ConfigError naming the bad value and what was expected."""
    if not isinstance(rebuild_weight, bool):
        raise ConfigError(f"method.rebuild_weight must be true or false (rebuild W0 + ΔW in the "
                          f"backward instead of keeping it), got {rebuild_weight!r}")
    if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
        raise ConfigError(f"method.d must be a positive integer (the intrinsic dimension: the "
                          f"length of the trained vector θ_d), got {d!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"method.projection_seed must be an integer >= 0 (the seed of the fixed "
                          f"random projections), got {seed!r}")
