"""One copy of the base model in host RAM per job, not one per rank.

On several ranks only rank 0 reads the base weights from disk (as a single process would); the
other ranks build the same model on the meta device (no memory), apply the method to it, shard
it (FSDP) and then receive rank 0's weights, buffers included, after sharding
(learnforget.train.distributed.broadcast_from_rank0): a rank holds only what it trains with, on
its device. Every rank ends with bitwise the same weights and the same random-number state as
when every rank loaded the model itself.

    train.distributed.load_weights   rank0 (default) | every_rank (each rank reads the weights)

Kept per rank (and said in run.json's notes): QLoRA (bitsandbytes quantises a 4-bit base while
loading it; a meta model cannot take it) and the inits that read the base weights or data to
initialise (PiSSA, OLoRA, CorDA, EVA, LoftQ; prompt tuning from text), which would compute on
meta tensors.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from learnforget.errors import ConfigError
from learnforget.methods.registry import method_of
from learnforget.train.distributed import Dist, broadcast_from_rank0

LOAD_WEIGHTS = ("rank0", "every_rank")


def setting(cfg: DictConfig) -> str:
    value = str((cfg.train.get("distributed") or {}).get("load_weights", "rank0"))
    if value not in LOAD_WEIGHTS:
        raise ConfigError(f"train.distributed.load_weights {value!r} is unknown (expected one of: "
                          f"{', '.join(LOAD_WEIGHTS)})")
    return value


def per_rank_reason(cfg: DictConfig) -> str | None:
    """Why every rank must read the base weights itself for this config (None: rank 0 can
    read them for all)."""
    if setting(cfg) == "every_rank":
        return "train.distributed.load_weights=every_rank"
    return method_of(cfg.method).per_rank_reason(cfg.method)


def from_rank0(cfg: DictConfig, world: int) -> bool:
    """True when ranks > 0 build the model on meta and receive rank 0's weights."""
    reason = per_rank_reason(cfg)  # checks the setting in a single process too
    return world > 1 and reason is None


def note(cfg: DictConfig, d: Dist) -> list[str]:
    """The run.json note on how this multi-rank run got its weights."""
    if d.world <= 1:
        return []
    reason = per_rank_reason(cfg)
    if reason is None:
        return [f"weights: rank 0 read the base model; the other {d.world - 1} rank(s) built it "
                "on the meta device and received rank 0's weights after sharding (one copy in "
                "host RAM per job)"]
    return [f"weights: every rank read the base model itself ({d.world} copies in host RAM "
            f"while loading): {reason}"]


def same_rng_as_rank0(d: Dist) -> None:
    """After the method is applied: the meta ranks drew no random numbers for the adapter init
    (rank 0 did), so they take rank 0's generator states (torch CPU and this rank's GPU,
    Python's, NumPy's): the state every rank had when each initialised real weights. A
    collective."""
    states = [(torch.get_rng_state(), random.getstate(), np.random.get_state(),
               torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
              if d.main else None]
    dist.broadcast_object_list(states, src=0)
    cpu, py, npy, gpu = states[0]
    if not d.main:
        torch.set_rng_state(cpu)
        random.setstate(py)
        np.random.set_state(npy)
        if gpu is not None:
            torch.cuda.set_rng_state(gpu)


def source_state(model: torch.nn.Module, d: Dist, strategy: str | None
                 ) -> dict[str, torch.Tensor] | None:
    """FSDP: rank 0's whole state dict, taken before sharding (references, no copy), for the
    broadcast after it; None elsewhere."""
    return model.state_dict() if d.main and strategy == "fsdp" else None


def fill(model: torch.nn.Module, source: dict[str, torch.Tensor] | None, d: Dist,
         device: str) -> None:
    """After sharding: every rank gets rank 0's weights and buffers (a collective)."""
    broadcast_from_rank0(model, source, device)
