"""Bottleneck adapters, `method=adapter` (conf/method/adapter.yaml): a method family package.

__init__ registers the family: METHODS, the Method objects the registry
(learnforget.methods.registry) collects from every package under learnforget.methods. config.py
holds the settings and their checks (no torch), model.py the modules, saving and loading (torch,
imported only when a model is adapted).
"""

from __future__ import annotations

from learnforget.methods.base import SKIP, Method
from learnforget.methods.bottleneck.config import validate_adapter


class BottleneckMethod(Method):
    """Residual bottleneck MLPs after attention and/or MLP outputs; the base stays frozen. Its
    checkpoints hold the adapters alone (adapter.safetensors, bottleneck_config.json)."""
    keys = ("bottleneck", "placement", "adapter_act", "adapter_scale")
    checkpoint = "bottleneck_adapter"
    abbreviations = {"bottleneck": "b", "placement": "", "adapter_act": "", "adapter_scale": "s"}

    def validate(self, cfg):
        super().validate(cfg)
        validate_adapter(cfg.bottleneck, cfg.placement, cfg.adapter_act,
                         cfg.get("adapter_scale", 1.0))

    def setting(self, cfg, key):
        if key == "adapter_scale" and cfg.get(key, 1.0) == 1.0:
            return SKIP  # s = 1, the adapters before the key: their runs keep their names
        return super().setting(cfg, key)

    def apply(self, model, cfg, ctx):
        from learnforget.methods.bottleneck.model import add_adapters

        add_adapters(model, cfg.bottleneck, cfg.placement, cfg.adapter_act,
                     cfg.get("adapter_scale", 1.0))
        return model

    def delta_route(self, fmt, adapter_cfg, ckpt, lora_via):
        return None  # new modules beside the frozen base: ΔW is not defined


METHODS = (BottleneckMethod("adapter"),)
