"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), the torch part of `method=adapter`.

An adapter is a small residual MLP, h + up(act(down(h))) with down: hidden -> bottleneck and
up: bottleneck -> hidden, inserted on the output of a sub-block of every decoder layer, before
that sub-block's residual add:

    houlsby   after the attention block's output projection and after the MLP (2 per layer)
    pfeiffer  after the MLP only (1 per layer)
    parallel  beside the MLP (He et al. 2022, 1 per layer): MLP(x) + s·up(act(down(x))) on
              the MLP's own input x (method.adapter_scale s: 1 plain, 4 the scaled variant)

A serial adapter with method.adapter_scale s computes h + s·up(act(down(h))) (s = 1: as before).

The up-projection starts at zero, so a fresh adapter is the identity and the adapted model's
output equals the base model's exactly. The base model stays frozen; only adapters train.

Each adapter is registered as a child module (`bottleneck_adapter`) of the attention or MLP
module it follows, and a forward hook on that module applies it to the module's output: the
base model's parameter names, classes and forward code are untouched, so generation, lm-eval
and data-parallel training see an ordinary transformers model. Like peft's adapters, the
adapter weights are kept in float32 whatever the base dtype.

A checkpoint holds only the adapters: `adapter.safetensors` (parameter names as in the
adapted model) and `bottleneck_config.json` (settings, hidden size, adapted modules);
`load_adapter(base, folder)` rebuilds base + adapter.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from learnforget.errors import ConfigError
from learnforget.methods.bottleneck.config import (
    ADAPTER_ACTS,
    PARALLEL,
    PLACEMENTS,
    validate_adapter,
)
from learnforget.methods.modules import decoder_layers

CHILD = "bottleneck_adapter"  # the adapter's attribute name on the module it follows
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "bottleneck_config.json"
FORMAT = "bottleneck_adapter"  # manifest.json "format" of an adapter checkpoint
# Sub-block attribute names of a decoder layer, per role (Llama: self_attn/mlp; GPT-2: attn/mlp).
SUBMODULES = {"attention": ("self_attn", "attn", "attention", "self_attention"),
              "mlp": ("mlp", "feed_forward", "ffn")}


class BottleneckAdapter(nn.Module):
    """h -> h + s·up(act(down(h))), computed in float32 and returned in h's dtype."""

    def __init__(self, hidden: int, bottleneck: int, act: str = "relu",
                 device: torch.device | str | None = None, scale: float = 1.0):
        super().__init__()
        self.scale = float(scale)
        self.down = nn.Linear(hidden, bottleneck, device=device, dtype=torch.float32)
        self.act = getattr(nn, ADAPTER_ACTS[act])()
        self.up = nn.Linear(bottleneck, hidden, device=device, dtype=torch.float32)
        nn.init.zeros_(self.up.weight)  # identity at the start: the base model's output
        nn.init.zeros_(self.up.bias)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s·up(act(down(x))) in x's dtype."""
        out = self.up(self.act(self.down(x.to(self.down.weight.dtype))))
        return (out if self.scale == 1.0 else self.scale * out).to(x.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h)


def _apply_child(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: run the module's adapter on its output (the first item of a tuple)."""
    adapter = getattr(module, CHILD)
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def _apply_parallel(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
    """Forward hook (with kwargs): add the adapter's s·up(act(down(x))) of the module's input x
    to its output (the first item of a tuple)."""
    x = args[0] if args else next(iter(kwargs.values()))
    delta = getattr(module, CHILD).delta(x)
    if isinstance(output, tuple):
        return (output[0] + delta, *output[1:])
    return output + delta


def _submodule(layer: nn.Module, role: str, model_type: str) -> tuple[str, nn.Module]:
    for attr in SUBMODULES[role]:
        module = getattr(layer, attr, None)
        if isinstance(module, nn.Module):
            return attr, module
    raise ConfigError(f"method=adapter: cannot find the {role} block of a {model_type} decoder "
                      f"layer (expected an attribute among {', '.join(SUBMODULES[role])}; it has "
                      f"{', '.join(n for n, _ in layer.named_children())})")


def adapters(model: nn.Module) -> Iterator[tuple[str, BottleneckAdapter]]:
    """(name, adapter) for every bottleneck adapter in the model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, BottleneckAdapter):
            yield name, module


def has_adapters(model: nn.Module) -> bool:
    return next(adapters(model), None) is not None


def add_adapters(model: nn.Module, bottleneck: int = 64, placement: str = "houlsby",
                 act: str = "relu", scale: float = 1.0) -> dict[str, Any]:
    """Freeze the model and insert adapters in every decoder layer; returns the adapter spec
    (what `bottleneck_config.json` records). Adapters go on the device of the module they
    follow (the meta device included, for `learnforget params`)."""
    validate_adapter(bottleneck, placement, act, scale)
    if has_adapters(model):
        raise ConfigError("method=adapter: this model already has bottleneck adapters")
    model_type = getattr(model.config, "model_type", type(model).__name__)
    hidden = int(model.config.hidden_size)
    try:
        layers = decoder_layers(model)
    except ConfigError as e:
        raise ConfigError(f"method=adapter: {e}".replace("method=topk: ", "")) from e
    for p in model.parameters():
        p.requires_grad_(False)
    layer_names = {id(m): n for n, m in model.named_modules()}
    adapted = []
    for layer in layers:
        for role in PLACEMENTS[placement]:
            attr, module = _submodule(layer, role, model_type)
            device = next(module.parameters()).device
            module.add_module(CHILD, BottleneckAdapter(hidden, bottleneck, act, device=device,
                                                       scale=scale))
            if placement in PARALLEL:
                module.register_forward_hook(_apply_parallel, with_kwargs=True)
            else:
                module.register_forward_hook(_apply_child)
            adapted.append(f"{layer_names[id(layer)]}.{attr}")
    spec = {"method": "adapter", "bottleneck": bottleneck, "placement": placement,
            "adapter_act": act, "adapter_scale": float(scale), "hidden_size": hidden, "model_type": model_type,
            "modules": adapted}
    model.bottleneck_spec = spec
    return spec


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights, keyed by their names in the adapted model."""
    return {f"{name}.{k}": v.detach().cpu().contiguous()
            for name, adapter in adapters(model) for k, v in adapter.state_dict().items()}


def save_adapter(model: nn.Module, folder: Path) -> None:
    """Write adapter.safetensors and bottleneck_config.json (only the adapters) to `folder`."""
    from safetensors.torch import save_file

    spec = getattr(model, "bottleneck_spec", None)
    if spec is None or not has_adapters(model):
        raise ValueError("save_adapter: the model has no bottleneck adapters (see add_adapters)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(spec, indent=2) + "\n")


def is_adapter_dir(folder: Path) -> bool:
    return (Path(folder) / CONFIG_FILE).exists()


def load_adapter(model: nn.Module, folder: Path) -> nn.Module:
    """Insert the adapters saved in `folder` into the base `model` and load their weights
    (strictly: every adapter weight must be there, and nothing else)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        spec = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{folder} is not a bottleneck adapter checkpoint (no {CONFIG_FILE})"
                          ) from e
    if int(model.config.hidden_size) != spec["hidden_size"]:
        raise ConfigError(f"adapter {folder} was trained on hidden size {spec['hidden_size']}, "
                          f"this base model has {model.config.hidden_size}")
    add_adapters(model, spec["bottleneck"], spec["placement"], spec["adapter_act"],
                 spec.get("adapter_scale", 1.0))  # checkpoints from before the key: 1
    if model.bottleneck_spec["modules"] != spec["modules"]:
        raise ConfigError(f"adapter {folder} does not fit this base model (adapted modules "
                          f"{spec['modules'][:2]}... vs {model.bottleneck_spec['modules'][:2]}...)")
    saved = load_file(str(folder / WEIGHTS_FILE))
    expected = adapter_state(model)
    if set(saved) != set(expected):
        missing = sorted(set(expected) - set(saved))
        extra = sorted(set(saved) - set(expected))
        raise ConfigError(f"adapter {folder}: weights do not match the adapters (missing "
                          f"{missing[:2]}, unexpected {extra[:2]})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in saved.items():
            params[k].copy_(v)
    return model
