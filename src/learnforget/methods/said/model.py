"""Intrinsic-dimension finetuning on a model: `method=said` and `method=did`.

    DID   W_i = W0_i + P_i(θ_d)           (Li et al. 2018, the Fastfood variant)
    SAID  W_i = W0_i + λ_i · P_i(θ_d)     (Aghajanyan et al. 2020)

One trained vector θ_d (length method.d, zeros at the start) is shared by every target weight;
each target weight i has its own fixed Fastfood projection P_i (learnforget.methods.said.fastfood)
and, for SAID, one trained scale λ_i (ones at the start, as the reference). The targets are the
weights of the linear layers that method.targets selects (attention | mlp | all | names: the
same sets as LoRA's), not every parameter tensor as in the reference code.

Each target weight gets a torch.nn.utils.parametrize parametrization W0 -> W0 + λ_i P_i(θ_d)
(what `module.weight` returns: merging, ΔW, anything that reads the weight), the frozen W0 lives
at `<module>.parametrizations.weight.original`, and θ_d and λ are the parameters of one child
module of the model (`intrinsic`), so they are its only trainable parameters (d, plus one λ per
target for SAID). ΔW is computed in float32 and added in W0's dtype. The target's forward
(an instance attribute, removed by merging) runs through `linear.IntrinsicLinear`, which keeps
no weight-sized tensor for the backward: W0 + ΔW is rebuilt there, one target at a time.

A checkpoint holds θ_d and λ (`said.safetensors`) and `said_config.json` (variant, d, projection
seed, target names and shapes): the projections are regenerated from the seed. `load_said`
rebuilds base + ΔW (merged into plain weights by default, for evaluation); `checkpoint_deltas`
gives ΔW_i = λ_i P_i(θ_d) from the checkpoint alone (no base weights needed).
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from learnforget.errors import ConfigError
from learnforget.methods.said.config import VARIANTS, validate_intrinsic
from learnforget.methods.said.fastfood import PROJECTION, Projection, projection_memory
from learnforget.methods.said.linear import CONV1D, LINEAR, IntrinsicLinear, workspace_bytes

CHILD = "intrinsic"  # the model's child module holding θ_d and λ
WEIGHTS_FILE = "said.safetensors"
CONFIG_FILE = "said_config.json"
FORMAT = "said"  # manifest.json "format" of a SAID/DID checkpoint


class IntrinsicVector(nn.Module):
    """θ_d (zeros) and, for SAID, one scale per target weight (ones): the trained parameters."""

    def __init__(self, d: int, n_targets: int, said: bool, device: torch.device | str | None):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(d, dtype=torch.float32, device=device))
        self.lam = (nn.Parameter(torch.ones(n_targets, dtype=torch.float32, device=device))
                    if said else None)


class FastfoodDelta(nn.Module):
    """The parametrization W0 -> W0 + λ_i P_i(θ_d) of one target weight (no buffers: the
    projection is recomputed from its keys)."""

    def __init__(self, vector: IntrinsicVector, index: int, projection: Projection,
                 layout: str = LINEAR):
        super().__init__()
        self._vector = [vector]  # shared, not registered here: θ_d has one name in the model
        self.index = index
        self.projection = projection
        self.layout = layout  # how the layer applies its weight (linear.LINEAR | CONV1D)

    def delta(self) -> torch.Tensor:
        """λ_i P_i(θ_d), flat, float32."""
        v = self._vector[0]
        return self.projection(v.theta, None if v.lam is None else v.lam[self.index])

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        return w0 + self.delta().view(w0.shape).to(w0.dtype)

    def linear(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for input x with weight W0 + λ_i P_i(θ_d), without saving W."""
        v = self._vector[0]
        return IntrinsicLinear.apply(x, module.parametrizations.weight.original, module.bias,
                                     v.theta, None if v.lam is None else v.lam[self.index],
                                     self.projection, self.layout)


def _target_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A reparametrised target's forward (bound to it as an instance attribute)."""
    return module.parametrizations.weight[0].linear(module, x)


def target_names(model: nn.Module, targets: Any, model_name: str = "") -> list[str]:
    """Full names of the linear layers method.targets selects (the LM head never)."""
    from learnforget.methods.modules import linear_modules, resolve_targets

    suffixes = resolve_targets(model, targets, model_name)
    return [n for n in linear_modules(model)
            if any(n == t or n.endswith("." + t) for t in suffixes)]


def has_intrinsic(model: nn.Module) -> bool:
    return isinstance(getattr(model, CHILD, None), IntrinsicVector)


def add_intrinsic(model: nn.Module, d: int, variant: str = "said", targets: Any = "all",
                  seed: int = 0, model_name: str = "", names: list[str] | None = None,
                  rebuild_weight: bool = True) -> dict[str, Any]:
    """Freeze the model and reparametrise its target weights; returns the spec that
    `said_config.json` records (`names`: these modules instead of method.targets).
    `rebuild_weight`: the targets' forwards run through IntrinsicLinear (W0 + ΔW rebuilt in
    the backward); False: the layers' own forwards, which read the parametrized weight (the
    linear op keeps it for the backward)."""
    validate_intrinsic(d, seed, rebuild_weight)
    if variant not in VARIANTS:
        raise ConfigError(f"intrinsic-dimension variant {variant!r} is unknown (expected one of: "
                          f"{', '.join(VARIANTS)})")
    if has_intrinsic(model):
        raise ConfigError(f"method={variant}: this model is already reparametrised")
    names = list(names) if names is not None else target_names(model, targets, model_name)
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    device = modules[names[0]].weight.device
    vector = IntrinsicVector(d, len(names), variant == "said", device)
    model.add_module(CHILD, vector)
    shapes = []
    for i, name in enumerate(names):
        module = modules[name]
        w = module.weight
        shapes.append(list(w.shape))
        layout = CONV1D if type(module).__name__ == "Conv1D" else LINEAR
        parametrize.register_parametrization(  # unsafe: no trial forward (shape, dtype kept)
            module, "weight",
            FastfoodDelta(vector, i, Projection(w.numel(), d, seed, name), layout), unsafe=True)
        if rebuild_weight:
            module.forward = types.MethodType(_target_forward, module)
    spec = {"method": variant, "d": d, "projection_seed": seed, "projection": PROJECTION,
            "model_type": getattr(getattr(model, "config", None), "model_type", ""),
            "modules": names, "shapes": shapes}
    model.said_spec = spec
    return spec


def parametrizations(model: nn.Module) -> Iterator[tuple[str, nn.Module, FastfoodDelta]]:
    """(module name, module, its FastfoodDelta) for every reparametrised weight."""
    for name in getattr(model, "said_spec", {}).get("modules", []):
        module = model.get_submodule(name)
        yield name, module, module.parametrizations.weight[0]


def rebuilds_weight(model: nn.Module) -> bool:
    """Whether the targets' forwards run through IntrinsicLinear (add_intrinsic's
    rebuild_weight)."""
    return any("forward" in vars(module) for _, module, _ in parametrizations(model))


def memory(model: nn.Module) -> tuple[int, str]:
    """(bytes held beside the parameters: the shared D, a line for the parameter report)."""
    mem = projection_memory([p.projection for _, _, p in parametrizations(model)])
    kept = ("W0 + ΔW is not kept for the backward but rebuilt there, one target at a time (the "
            "peak's workspace: that transient plus the largest target's dL/dW)"
            if rebuilds_weight(model) else "method.rebuild_weight=false: each target's W0 + ΔW "
            "is kept for the backward (in the traced activations)")
    mib = 2**20
    return mem["shared"], (
        f"projections regenerated from the seed in each forward and backward: nothing stored per "
        f"weight, {mem['shared'] / mib:,.1f} MiB shared (D, float32), {mem['working'] / mib:,.1f} "
        f"MiB transient (one weight at a time); stored factors (9 bytes per padded entry) would "
        f"take {mem['stored_reference'] / mib:,.1f} MiB; {kept}")


def workspace(model: nn.Module, compute_bytes: int) -> int:
    """Transient bytes of the backward beyond the traced activations: the largest target's
    (`linear.workspace_bytes`; the targets' backwards run one after another)."""
    return max((workspace_bytes(p.projection, module.parametrizations.weight.original.numel(),
                                compute_bytes)
                for _, module, p in parametrizations(model)), default=0)


@torch.no_grad()
def model_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """ΔW_i = λ_i P_i(θ_d) of every target weight, float32, in the weight's shape."""
    return {name: p.delta().view(module.parametrizations.weight.original.shape).detach().cpu()
            for name, module, p in parametrizations(model)}


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    vector = getattr(model, CHILD)
    out = {"theta": vector.theta.detach().cpu().contiguous()}
    if vector.lam is not None:
        out["lam"] = vector.lam.detach().cpu().contiguous()
    return out


def save_said(model: nn.Module, folder: Path) -> None:
    """Write said.safetensors (θ_d, λ) and said_config.json to `folder`."""
    from safetensors.torch import save_file

    if not has_intrinsic(model):
        raise ValueError("save_said: the model has no intrinsic-dimension vector (add_intrinsic)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(trained_state(model), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(model.said_spec, indent=2) + "\n")


def is_said_dir(folder: Path) -> bool:
    return (Path(folder) / CONFIG_FILE).exists()


def read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        spec = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{folder} is not a SAID/DID checkpoint (no {CONFIG_FILE})") from e
    if spec.get("projection") != PROJECTION:
        made = spec.get("projection", "numpy-drawn stored factors (before 2026-12-07)")
        raise ConfigError(f"SAID/DID checkpoint {folder}: its projections are {made!r}; this "
                          f"version regenerates {PROJECTION!r} only: train it again")
    state = load_file(str(folder / WEIGHTS_FILE))
    want = {"theta", "lam"} if spec["method"] == "said" else {"theta"}
    if set(state) != want or state["theta"].numel() != spec["d"]:
        raise ConfigError(f"SAID/DID checkpoint {folder}: weights {sorted(state)} do not match "
                          f"its config (expected {sorted(want)}, θ_d of length {spec['d']})")
    return spec, state


def load_said(model: nn.Module, folder: Path, merge: bool = True) -> nn.Module:
    """Base `model` + the checkpoint's ΔW. `merge`: W0 + ΔW written into plain weights and the
    parametrizations removed (an ordinary model, for evaluation); otherwise reparametrised with
    θ_d and λ loaded (trainable)."""
    spec, state = read_checkpoint(folder)
    modules = dict(model.named_modules())
    missing = [n for n in spec["modules"] if n not in modules]
    shapes = [list(modules[n].weight.shape) for n in spec["modules"] if n in modules]
    if missing or shapes != spec["shapes"]:
        raise ConfigError(f"SAID/DID checkpoint {folder} does not fit this base model (modules "
                          f"{missing[:2] or spec['modules'][:2]}...: missing or other shapes)")
    add_intrinsic(model, spec["d"], spec["method"], seed=spec["projection_seed"],
                  names=spec["modules"])
    vector = getattr(model, CHILD)
    with torch.no_grad():
        vector.theta.copy_(state["theta"])
        if vector.lam is not None:
            vector.lam.copy_(state["lam"])
    return merge_intrinsic(model) if merge else model


def merge_intrinsic(model: nn.Module) -> nn.Module:
    """Write W0 + ΔW into each target's plain weight and drop the parametrizations and θ_d."""
    with torch.no_grad():
        for _, module, _ in list(parametrizations(model)):
            module.__dict__.pop("forward", None)  # the layer's own forward again
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            module.weight.requires_grad_(False)
    delattr(model, CHILD)
    del model.said_spec
    return model


def checkpoint_delta(spec: dict[str, Any], state: dict[str, torch.Tensor],
                     name: str) -> torch.Tensor:
    """ΔW of one target from a checkpoint's spec and weights (`read_checkpoint`) alone: its
    projection regenerated from the projection seed."""
    i = spec["modules"].index(name)
    shape = spec["shapes"][i]
    numel = int(torch.Size(shape).numel())
    projection = Projection(numel, spec["d"], spec["projection_seed"], name)
    with torch.no_grad():
        lam = state["lam"][i].float() if "lam" in state else None
        delta = projection(state["theta"].float(), lam)
    return delta.view(shape)


def delta_source(spec: dict[str, Any]) -> str:
    """How a checkpoint's ΔW is made, for the analysis records."""
    scale = "λ_i · P_i(θ_d)" if spec["method"] == "said" else "P_i(θ_d)"
    return (f"{scale} reshaped (Fastfood projections regenerated from projection seed "
            f"{spec['projection_seed']}, d={spec['d']})")


def checkpoint_deltas(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(module name, ΔW) for every target of a checkpoint, one at a time."""
    spec, state = read_checkpoint(folder)
    for name in spec["modules"]:
        yield name, checkpoint_delta(spec, state, name)
