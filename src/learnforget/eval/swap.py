"""One base model per eval process: adapter checkpoints scored by swapping adapters (eval.swap_adapters).

Scoring a run's checkpoints used to load the base model once per checkpoint (and once more for
the base's own scores). For methods whose checkpoints are peft adapters on a base that loading
leaves unchanged (`learnforget.methods.registry.shares_base_in_eval`: LoRA, DoRA, IA3, VeRA,
LoHa, ...; PiSSA/OLoRA/CorDA checkpoints are saved as plain LoRA on the original base), a
`SharedBase` loads the base once and moves from one checkpoint to the next with peft's own API:
`PeftModel.load_adapter` (the new checkpoint, under a fresh adapter name), `set_adapter`, and
`delete_adapter` (the previous one). Where the next adapter does not fit the wrappers in place
(another peft type or other target modules, or a config peft refuses next to the current one),
`unload()` takes every adapter layer out (the base's own modules, untouched) and
`PeftModel.from_pretrained` wraps the same base afresh. The base's own scores, when not cached,
come from the same model with every adapter unloaded.

What stays as with a fresh load, so the per-item log-likelihoods are the same
(equal, item by item, to separate loads):
- eval mode (no adapter dropout), as `PeftModel.from_pretrained` and `load_adapter` leave it;
- eval.head: the fp32 LM head (learnforget.eval.head) is installed once, from the head weight as
  loaded, and stays for the base and every checkpoint (adapters never target the LM head here:
  a checkpoint whose config would, or that saves whole modules, is loaded fresh);
- eval.precision: the adapter of a newly loaded checkpoint is cast to the scoring dtype like the
  rest of the model (`scoring.cast_for_scoring` casts whatever is not in it); peft creates the
  adapter weights in fp32 (it upcasts bf16/fp16), so a cast model gets the same values as a
  fresh load cast after loading.
Not swapped (loaded fresh per checkpoint, as before): full-weight checkpoints (full, bitfit,
topk), bottleneck adapters, QLoRA (its quantised base) and prompt learning (prefix, prompt
tuning), and any checkpoint whose saved peft config is prompt learning or saves whole modules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from learnforget.files import read_json
from learnforget.runfolder import MANIFEST

NOTE = ("eval.swap_adapters: the base model is loaded once per eval process and each adapter "
        "checkpoint is swapped onto it (peft load_adapter/set_adapter/delete_adapter), with the "
        "same per-item scores as a separate load per checkpoint")


def base_key(run_cfg: DictConfig, cache_dir: Path, device: str) -> str:
    """What identifies the loaded base: the model config (resolved), the cache, the device."""
    model = OmegaConf.to_container(run_cfg.model, resolve=True)
    return json.dumps({"model": model, "cache": str(cache_dir), "device": device},
                      sort_keys=True, default=str)


def swappable(adapter_cfg: Any) -> bool:
    """Whether a saved peft config can be swapped in: no prompt learning (virtual tokens), no
    whole modules saved with it (modules_to_save, trainable tokens), no LM-head target."""
    if adapter_cfg.is_prompt_learning or adapter_cfg.is_adaption_prompt:
        return False
    if getattr(adapter_cfg, "modules_to_save", None):
        return False
    if getattr(adapter_cfg, "trainable_token_indices", None):
        return False
    targets = getattr(adapter_cfg, "target_modules", None)
    if isinstance(targets, str):  # a regular expression: may reach the head
        return "head" not in targets
    return not any("head" in str(t) for t in (targets or ()))


def _structure(adapter_cfg: Any) -> tuple:
    """What decides which modules a peft config wraps and how: two adapters with the same
    structure share the wrappers (load_adapter); others need a fresh wrap."""
    def norm(v):
        return sorted(v) if isinstance(v, (set, list, tuple)) else v

    return (str(adapter_cfg.peft_type), norm(getattr(adapter_cfg, "target_modules", None)),
            norm(getattr(adapter_cfg, "feedforward_modules", None)),
            norm(getattr(adapter_cfg, "layers_to_transform", None)),
            norm(getattr(adapter_cfg, "exclude_modules", None)))


class SharedBase:
    """The base model of one (model config, cache, device), loaded on first use and kept; adapter
    checkpoints are put on it in turn (`checkpoint_model`), the base alone is `base_model()`."""

    def __init__(self, run_cfg: DictConfig, cache_dir: Path, device: str):
        self.run_cfg, self.cache_dir, self.device = run_cfg, Path(cache_dir), device
        self.key = base_key(run_cfg, self.cache_dir, device)
        self._base = None   # the transformers model
        self._peft = None   # the PeftModel around it, while an adapter is on
        self._active: str | None = None
        self._count = 0
        self.loads = 0      # base loads (1 after first use)
        self.swaps = 0      # checkpoints put on by load_adapter
        self.wraps = 0      # checkpoints put on by a fresh PeftModel wrap

    def _loaded(self):
        if self._base is None:
            from learnforget.assets.models import load_model
            from learnforget.methods.registry import method_of

            method = method_of(self.run_cfg.method).base_config(self.run_cfg.method)
            self._base, _, _ = load_model(self.run_cfg.model, method, self.cache_dir, self.device)
            self._base.eval()
            self.loads += 1
        return self._base

    def _unwrap(self) -> None:
        """Every adapter layer out (peft's unload: each wrapped module replaced by its own base
        layer, weights untouched)."""
        if self._peft is None:
            return
        base = self._peft.unload()
        # peft copies its config dict onto the wrapped model and leaves it there after unload;
        # a later wrap would take the stale entries for adapters of its own
        base.__dict__.pop("peft_config", None)
        self._base, self._peft, self._active = base, None, None

    def base_model(self):
        """The base alone (in eval mode), the same object the checkpoints are put on."""
        self._unwrap()
        return self._loaded().eval()

    def checkpoint_model(self, ckpt: Path):
        """The model of adapter checkpoint `ckpt`: its adapter on the shared base, active, in
        eval mode. None where the checkpoint cannot be swapped in (the caller loads it fresh)."""
        import peft

        manifest = read_json(Path(ckpt) / MANIFEST)
        if manifest.get("format") != "peft_adapter":
            return None
        new_cfg = peft.PeftConfig.from_pretrained(str(ckpt))
        if not swappable(new_cfg):
            return None
        self._count += 1
        name = f"ckpt{self._count}"
        if self._peft is not None:
            old = self._active
            current = self._peft.peft_config[old]
            if _structure(current) == _structure(new_cfg):
                try:
                    self._peft.load_adapter(str(ckpt), adapter_name=name)
                except ValueError:  # peft refuses it next to the current one: wrap afresh
                    pass
                else:
                    self._peft.set_adapter(name, inference_mode=True)
                    self._peft.delete_adapter(old)
                    self._active = name
                    self.swaps += 1
                    return self._peft.eval()
            self._unwrap()
        self._peft = peft.PeftModel.from_pretrained(self._loaded(), str(ckpt), adapter_name=name)
        self._active = name
        self.wraps += 1
        return self._peft.eval()


class BasePool:
    """The shared base of one eval process (one at a time: a run on another base replaces it and
    lets the previous one go)."""

    def __init__(self):
        self.current: SharedBase | None = None

    def for_run(self, run_cfg: DictConfig, ev: DictConfig, cache_dir: Path,
                device: str) -> SharedBase | None:
        """The shared base for this run's checkpoints, or None where they are loaded fresh
        (eval.swap_adapters=false, or a method the registry says does not share its base)."""
        from learnforget.methods.registry import shares_base_in_eval

        if not swap_enabled(ev) or not shares_base_in_eval(run_cfg.method):
            return None
        key = base_key(run_cfg, Path(cache_dir), device)
        if self.current is None or self.current.key != key:
            self.current = None  # the previous base goes before the next one loads
            self.current = SharedBase(run_cfg, cache_dir, device)
        return self.current


def swap_enabled(ev: DictConfig) -> bool:
    """eval.swap_adapters, checked (true by default)."""
    from learnforget.errors import ConfigError

    value = ev.get("swap_adapters", True)
    if not isinstance(value, bool):
        raise ConfigError(f"eval.swap_adapters must be true or false, got {value!r}")
    return value
