"""Intrinsic-dimension finetuning, `method=said` and `method=did` (conf/method/said.yaml,
did.yaml): a method family package.

__init__ registers the family (METHODS); config.py holds the settings' checks (no torch);
fastfood.py the Walsh-Hadamard transform and the Fastfood projection, model.py the
reparametrisation, saving, loading and ΔW (torch, imported only when a model is adapted).
"""

from __future__ import annotations

from learnforget.methods.base import Method
from learnforget.methods.said.config import validate_intrinsic


class IntrinsicMethod(Method):
    """W_i = W0_i + λ_i P_i(θ_d) (SAID; DID without λ) on the linear weights method.targets
    selects. Its checkpoints hold θ_d, λ and the projection seed (said.safetensors,
    said_config.json); ΔW is rebuilt from them alone."""
    keys = ("d", "projection_seed", "targets")
    checkpoint = "said"
    intrinsic = True  # the d90 analysis's intrinsic-dimension runs (learnforget.analysis.d90)
    abbreviations = {"d": "d", "projection_seed": "ps"}

    def validate(self, cfg):
        super().validate(cfg)
        validate_intrinsic(cfg.d, cfg.projection_seed)

    def apply(self, model, cfg, ctx):
        from learnforget.methods.said.model import add_intrinsic

        spec = add_intrinsic(model, cfg.d, self.name, cfg.targets, cfg.projection_seed,
                             ctx.model_name)
        ctx.notes.append(
            f"method={self.name}: θ_d of length {cfg.d} through Fastfood projections of "
            f"{len(spec['modules'])} linear weights (method.targets={cfg.targets}; the reference "
            "code projects every parameter tensor)"
            + (f"; plus one scale λ per weight ({len(spec['modules'])})" if self.name == "said"
               else "")
            + "; projections regenerated in each step (Π a keyed integer bijection, G_i = D_Π(i) "
            "from one Gaussian vector per seed shared by all weights; the reference draws and "
            "stores Π and G per tensor)")
        return model

    def extra_memory(self, model):
        from learnforget.methods.said.model import memory

        return memory(model)

    def delta_route(self, fmt, adapter_cfg, ckpt, lora_via):
        return "said" if fmt == "said" else super().delta_route(fmt, adapter_cfg, ckpt, lora_via)


METHODS = (IntrinsicMethod("said"), IntrinsicMethod("did"))
