"""Bottleneck adapters' settings and their checks, without torch (method.bottleneck, placement,
adapter_act in conf/method/_base.yaml)."""

from __future__ import annotations

from typing import Any

from learnforget.errors import ConfigError

# where adapters go (the sub-blocks they follow), and their torch.nn activation
# parallel (He et al. 2022): beside the MLP, on the MLP's input, its output added to the MLP's
PLACEMENTS = {"houlsby": ("attention", "mlp"), "pfeiffer": ("mlp",), "parallel": ("mlp",)}
PARALLEL = ("parallel",)  # placements whose adapter reads the sub-block's input, not its output
ADAPTER_ACTS = {"relu": "ReLU", "gelu": "GELU", "silu": "SiLU", "tanh": "Tanh"}


def validate_adapter(bottleneck: Any, placement: Any, act: Any, scale: Any = 1.0) -> None:
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
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ConfigError(f"method.adapter_scale must be a number > 0 (s in h + s·up(act(down"
                          f"(x))); 1: plain, 4: He et al.'s scaled parallel adapter), got {scale!r}")
