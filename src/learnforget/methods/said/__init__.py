"""Intrinsic-dimension finetuning, `method=said` and `method=did` (conf/method/said.yaml,
did.yaml): a method family package.

__init__ registers the family (METHODS); config.py holds the settings' checks (no torch);
fastfood.py the Walsh-Hadamard transform and the Fastfood projection, model.py the
reparametrisation, saving, loading and ΔW (torch, imported only when a model is adapted).
"""

from __future__ import annotations

from learnforget.methods.base import SKIP, Method
from learnforget.methods.said.config import validate_intrinsic


class IntrinsicMethod(Method):
    """W_i = W0_i + λ_i P_i(θ_d) (SAID; DID without λ) on the linear weights method.targets
    selects. Its checkpoints hold θ_d, λ and the projection seed (said.safetensors,
    said_config.json); ΔW is rebuilt from them alone."""
    keys = ("d", "projection_seed", "targets", "rebuild_weight")
    checkpoint = "said"
    intrinsic = True  # the d90 analysis's intrinsic-dimension runs (learnforget.analysis.d90)
    abbreviations = {"d": "d", "projection_seed": "ps"}

    def validate(self, cfg):
        super().validate(cfg)
        validate_intrinsic(cfg.d, cfg.projection_seed, cfg.get("rebuild_weight", True))

    def setting(self, cfg, key):
        if key == "rebuild_weight":
            return SKIP  # where W0 + ΔW comes from in the backward: the same gradients
        return super().setting(cfg, key)

    def apply(self, model, cfg, ctx):
        from learnforget.methods.said.model import add_intrinsic

        rebuild = bool(cfg.get("rebuild_weight", True))
        spec = add_intrinsic(model, cfg.d, self.name, cfg.targets, cfg.projection_seed,
                             ctx.model_name, rebuild_weight=rebuild)
        ctx.notes.append(
            f"method={self.name}: θ_d of length {cfg.d} through Fastfood projections of "
            f"{len(spec['modules'])} linear weights (method.targets={cfg.targets}; the reference "
            "code projects every parameter tensor)"
            + (f"; plus one scale λ per weight ({len(spec['modules'])})" if self.name == "said"
               else "")
            + "; projections regenerated in each step (Π a keyed integer bijection, G_i = D_Π(i) "
            "from one Gaussian vector per seed shared by all weights; the reference draws and "
            "stores Π and G per tensor)"
            + ("; W0 + ΔW is not kept for the backward but rebuilt there (method.rebuild_weight="
               "true: one more projection per weight and step whose input needs a gradient; "
               "before 2026-12-07 each weight-sized W0 + ΔW was kept; the same gradients)"
               if rebuild else "; method.rebuild_weight=false: each target's W0 + ΔW is kept "
               "from the forward for the backward (one weight-sized tensor per target)"))
        return model

    def extra_memory(self, model):
        from learnforget.methods.said.model import memory

        return memory(model)

    def backward_workspace(self, model, compute_bytes):
        from learnforget.methods.said.model import workspace

        return float(workspace(model, compute_bytes))

    def delta_route(self, fmt, adapter_cfg, ckpt, lora_via):
        return "said" if fmt == "said" else super().delta_route(fmt, adapter_cfg, ckpt, lora_via)


METHODS = (IntrinsicMethod("said"), IntrinsicMethod("did"))
