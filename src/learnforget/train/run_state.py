"""What a run leaves on disk to continue from or to be scored: its resume state (trainable
weights, optimizer, schedule, RNG, data position; FSDP: sharded) and its budget checkpoints,
each written atomically."""

from __future__ import annotations

import copy
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learnforget.errors import ConfigError
from learnforget.files import atomic_open, atomic_write_json, disk_full_guard
from learnforget.runfolder import MANIFEST
from learnforget.train import distributed
from learnforget.train.distributed import Dist


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_resume(path: Path, model, optimizer, scheduler, progress: dict[str, Any],
                d: Dist | None = None) -> None:
    """Everything needed to continue exactly: trainable weights, optimizer, schedule, RNG,
    data position. Written to a temporary file and renamed. An FSDP model's weights and
    optimizer state go to a sharded folder beside it (every rank calls this; rank 0 writes
    the file)."""
    shards = None
    if d is not None and distributed.is_sharded(model):
        shards = distributed.save_sharded(path.parent, model, optimizer, d)
        if not d.main:
            return
    write_resume(path, resume_state(model, optimizer, scheduler, progress, shards), shards)


def resume_state(model, optimizer, scheduler, progress: dict[str, Any],
                 shards: str | None = None, snapshot: bool = False) -> dict[str, Any]:
    """The resume state as it is now (with `snapshot`: a CPU copy that later training steps
    cannot change, for a write in the background)."""
    state = {
        "model": trainable_state(model) if shards is None else {},
        "optimizer": optimizer.state_dict() if shards is None else None,
        "sharded": shards,
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": np.random.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "progress": progress,
    }
    if snapshot:  # trainable_state is a copy already
        state = {k: v if k == "model" else _cpu_copy(v) for k, v in state.items()}
    return state


def _cpu_copy(obj: Any) -> Any:
    """Tensors copied to the CPU, containers rebuilt, other mutable leaves deep-copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors and arrays in a nested state (about what torch.save writes)."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def checkpoint_bytes(model: torch.nn.Module,
                     state_dict: dict[str, torch.Tensor] | None = None) -> int:
    """About the bytes of a budget checkpoint: the adapter's tensors (peft), the trainable
    ones (bottleneck adapters) or every distinct tensor of the model."""
    if state_dict is None:
        from peft import PeftModel, get_peft_model_state_dict

        from learnforget.methods.bottleneck import model as bottleneck

        if isinstance(model, PeftModel):
            state_dict = get_peft_model_state_dict(model)
        elif bottleneck.has_adapters(model):
            state_dict = trainable_state(model)
        else:
            state_dict = model.state_dict()
    unique = {(t.data_ptr(), t.nelement()): t for t in state_dict.values()
              if isinstance(t, torch.Tensor)}
    return sum(t.nelement() * t.element_size() for t in unique.values())


def write_resume(path: Path, state: dict[str, Any], shards: str | None = None) -> None:
    """Rank 0: the resume file (atomically); with FSDP shards, older shard folders go."""
    with atomic_open(path, "wb", needed=tensor_bytes(state)) as f:
        torch.save(state, f)
    if shards is not None:
        distributed.drop_other_shards(path.parent, keep=shards)


def load_resume(path: Path, model, optimizer, scheduler) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    world = state["progress"].get("world")
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if world is not None and world != ranks:  # the global batch (the data position) depends on it
        raise ConfigError(f"resume state {path} was written by a run on {world} rank(s); "
                          f"resume it on {world} (this process group has {ranks})")
    if state.get("sharded"):
        if not distributed.is_sharded(model):
            raise ConfigError(f"resume state {path} is sharded (FSDP): resume with "
                              "train.distributed.strategy=fsdp")
        distributed.load_sharded(path.parent / state["sharded"], model, optimizer)
        state["optimizer"] = None
    elif distributed.is_sharded(model):
        raise ConfigError(f"resume state {path} is not sharded: resume with "
                          "train.distributed.strategy=ddp")
    params = dict(model.named_parameters())
    missing = set(state["model"]) - set(params)
    if missing:
        raise ConfigError(f"resume state {path} does not fit this model (e.g. {sorted(missing)[0]})")
    with torch.no_grad():
        for n, v in state["model"].items():
            params[n].copy_(v.to(params[n].device))
    if state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["progress"]


def save_checkpoint(out: Path, model, manifest: dict[str, Any],
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """A budget checkpoint: peft adapter files for peft methods, adapter.safetensors for
    bottleneck adapters, θ_d and λ for SAID/DID, safetensors of the whole model otherwise."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        with disk_full_guard(out, checkpoint_bytes(model, state_dict)):
            _write_checkpoint(tmp, model, manifest, state_dict)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_checkpoint(tmp: Path, model, manifest: dict[str, Any],
                      state_dict: dict[str, torch.Tensor] | None) -> None:
    from learnforget.methods.bottleneck import model as bottleneck
    from learnforget.methods.said import model as said

    if bottleneck.has_adapters(model):
        bottleneck.save_adapter(model, tmp)
    elif said.has_intrinsic(model):
        said.save_said(model, tmp)
    else:
        # state_dict: an FSDP model's weights, gathered on rank 0
        extra = {} if state_dict is None else {"state_dict": state_dict}
        model.save_pretrained(tmp, safe_serialization=True, **extra)
        from learnforget.methods.lora_variants import convert_saved_adapter, initial_factors

        initial = initial_factors(model)
        if initial is not None:  # PiSSA / OLoRA: a LoRA adapter on the original base
            convert_saved_adapter(tmp, initial)
    atomic_write_json(tmp / MANIFEST, manifest)


def drop_resume_state(resume_path: Path) -> None:
    """Remove train/resume.pt (and FSDP's resume-shards-*/): a finished run resumes nothing."""
    resume_path.unlink(missing_ok=True)
    for shards in resume_path.parent.glob("resume-shards-*"):
        shutil.rmtree(shards, ignore_errors=True)
