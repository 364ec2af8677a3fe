"""Data-parallel training when launched by torchrun / `accelerate launch` (WORLD_SIZE > 1) or as
several SLURM tasks (srun, or submitit with tasks_per_node > 1: SLURM_STEP_NUM_TASKS > 1).

The launcher's environment decides the ranks; gloo on CPU, NCCL on GPUs. Rank 0 writes the run
folder; every rank trains on its slice of each global batch. `train.distributed.strategy`
decides how: `ddp` (every rank holds the whole model) or `fsdp` (FSDP2 `fully_shard` per
decoder layer: parameters, gradients and optimizer state sharded over the ranks, for full
finetuning of 7B-class models; checkpoints are gathered into one full state dict on rank 0,
resume states are sharded with torch.distributed.checkpoint).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str:
        """cuda:<local rank> (modulo the visible GPUs, for clusters that bind one GPU per task),
        else cpu."""
        if torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return "cpu"


def env_from_slurm(environ: dict[str, str] | None = None) -> bool:
    """Inside an srun step with several tasks (a hand-written `srun learnforget train ...`, or a
    submitit job with tasks_per_node > 1) SLURM sets SLURM_PROCID etc., not torch's env://
    variables: export RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (the step's
    first node) and MASTER_PORT (from the job id, as submitit's TorchDistributedEnvironment
    does). Does nothing when WORLD_SIZE is set (torchrun) or the step has one task. True when
    it exported."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env:
        return False
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or "1")
    if ntasks <= 1:
        return False
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
    nodes = expand_nodelist(nodelist)
    job = int(env.get("SLURM_JOB_ID") or "0")
    per_node = ntasks // max(1, int(env.get("SLURM_STEP_NUM_NODES") or len(nodes) or 1))
    env.setdefault("MASTER_ADDR", nodes[0])
    env.setdefault("MASTER_PORT", str(20000 + job % 40000))
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=str(ntasks),
               LOCAL_RANK=env.get("SLURM_LOCALID", "0"), LOCAL_WORLD_SIZE=str(per_node))
    return True


def expand_nodelist(text: str) -> list[str]:
    """SLURM's compact host list as host names: 'gpu[07-08,10],cpu1' -> gpu07, gpu08, gpu10,
    cpu1 (zero padding kept). submitit's TorchDistributedEnvironment is not used: it works only
    inside a submitit job (a hand-written srun has no JobEnvironment), counts the job's tasks
    rather than the step's, and rewrites CUDA_VISIBLE_DEVICES."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", text):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    if not hosts:
        raise ValueError(f"cannot read the SLURM node list {text!r} (expected e.g. gpu[07-08])")
    return hosts


DEFAULT_TIMEOUT_MIN = 30.0   # = conf/train/default.yaml train.distributed.timeout_min
DEFAULT_WAIT_MIN = 360.0     # train.distributed.wait_min
DEFAULT_DEAD_RANK_S = 60.0   # train.distributed.dead_rank_s


@dataclass
class _Job:
    """This process's part of the job: the c10d store of the rendezvous, how long a rank waits
    for work another rank does alone, the dead-rank watchdog, the barriers passed."""

    store: Any
    wait_min: float
    watchdog: Any = None
    barriers: int = 0


_JOB: _Job | None = None
_DEPTH = 0  # how deep in session() (train() calls) this process is


def setting(settings: Any, key: str, default: float, zero_ok: bool = False) -> float:
    """A number of train.distributed (a ConfigError naming it when it is not one, or not > 0;
    with `zero_ok`, 0 means off)."""
    from learnforget.errors import ConfigError

    value = (settings or {}).get(key)
    value = default if value is None else value
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if not number >= 0 or (number == 0 and not zero_ok):
        raise ConfigError(f"train.distributed.{key}={value!r} is not valid (expected a number "
                          f"{'>= 0, 0: off' if zero_ok else '> 0'})")
    return number


def init(settings: Any = None) -> Dist:
    """Join the process group the launcher set up (WORLD_SIZE > 1), else a single process.

    `settings` (train.distributed): `timeout_min`, the process-group timeout of every
    collective (NCCL's own default is 10 minutes); `wait_min`, how long `barrier` waits for
    work one rank does alone; `dead_rank_s`, after how long without a heartbeat a rank counts
    as dead and the job ends (0: off; learnforget.train.watchdog). The rendezvous is torch's
    env:// one, done here so that the job's c10d store is at hand for `barrier` and the
    watchdog."""
    global _JOB
    from datetime import timedelta

    env_from_slurm()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    timeout = timedelta(minutes=setting(settings, "timeout_min", DEFAULT_TIMEOUT_MIN))
    wait_min = setting(settings, "wait_min", DEFAULT_WAIT_MIN)
    dead_s = setting(settings, "dead_rank_s", DEFAULT_DEAD_RANK_S, zero_ok=True)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        from torch.distributed.rendezvous import rendezvous

        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        store, rank, world = next(rendezvous("env://", timeout=timeout))
        store.set_timeout(timeout)
        # what init_process_group(init_method="env://") does, keeping the store
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                store=dist.PrefixStore("default_pg", store), rank=rank,
                                world_size=world, timeout=timeout)
        _JOB = _Job(dist.PrefixStore("learnforget", store), wait_min)
        if dead_s > 0:
            _JOB.watchdog = _start_watchdog(rank, world, dead_s)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def _start_watchdog(rank: int, world: int, dead_s: float):
    """The dead-rank watchdog on its own client of the rendezvous store (MASTER_ADDR/PORT;
    keys apart per torchrun restart)."""
    from datetime import timedelta

    from learnforget.train.watchdog import Watchdog

    def connect():
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                             world, is_master=False, timeout=timedelta(seconds=max(30, dead_s)))

    prefix = f"learnforget-watchdog/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return Watchdog(connect, rank, world, dead_s, prefix).start()


@contextmanager
def session():
    """Around a rank's training (train() calls nest for cooldown branches): when the outermost
    ends normally this rank leaves the job cleanly (the watchdog stops watching it); when it
    raises, the rank stops heartbeating so the other ranks end soon, not at the timeout."""
    global _DEPTH
    _DEPTH += 1
    try:
        yield
    except BaseException:
        if _JOB is not None and _JOB.watchdog is not None:
            _JOB.watchdog.abandon()
        raise
    else:
        if _DEPTH == 1 and _JOB is not None and _JOB.watchdog is not None:
            _JOB.watchdog.done()
    finally:
        _DEPTH -= 1


def all_reduce(value: float, d: Dist, op: str = "sum") -> float:
    """Sum or max of a number over ranks (identity in a single process)."""
    if d.world == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if torch.cuda.is_available():
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return float(t.item())


def barrier(d: Dist) -> None:
    """Every rank waits here until all have arrived, on the job's c10d store rather than with a
    collective: the usual reason to wait is work one rank does alone (rank 0 writing a
    checkpoint, copying a cooldown branch's checkpoint, building the model cache), which may
    take far longer than the process-group timeout (NCCL's watchdog would kill the job). The
    wait is bounded by train.distributed.wait_min; a dead rank ends it sooner (the watchdog)."""
    if d.world <= 1:
        return
    from datetime import timedelta

    if _JOB is None:  # a process group this module did not set up
        dist.barrier()
        return
    _JOB.barriers += 1
    key = f"barrier/{_JOB.barriers}"
    if int(_JOB.store.add(key, 1)) == d.world:
        _JOB.store.set(f"{key}/all", "1")
    try:
        _JOB.store.wait([f"{key}/all"], timedelta(minutes=_JOB.wait_min))
    except dist.DistNetworkError as e:  # rank 0, the store's host, has gone
        if _JOB.watchdog is not None:
            _JOB.watchdog.die(0, why=f"its store stopped answering: {type(e).__name__}")
        raise
    except RuntimeError as e:  # torch raises a DistStoreError (a RuntimeError) on timeout
        raise RuntimeError(f"learnforget: rank {d.rank} waited longer than "
                           f"train.distributed.wait_min={_JOB.wait_min:g} at barrier "
                           f"{_JOB.barriers} for the other ranks ({e})") from e


# ------------------------------------------------------------------ FSDP (FSDP2, fully_shard)

def shard_model(model: torch.nn.Module, layers: torch.nn.ModuleList,
                reshard_after_forward: bool = True,
                compute_dtype: torch.dtype | None = None) -> None:
    """FSDP2: each decoder layer is one shard unit (its parameters are all-gathered for its
    forward/backward and freed after), the root takes the rest (embeddings, final norm, LM
    head). In place: the parameters become DTensors, so build the optimizer afterwards.

    With a `compute_dtype` (bf16 mixed precision) the sharded parameters stay the fp32 masters
    and are all-gathered in the compute dtype (MixedPrecisionPolicy), gradients are reduced in
    fp32: the layers compute on a 16-bit copy that lives only while the layer runs."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy() if compute_dtype is None else MixedPrecisionPolicy(
        param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    fully_shard(model, reshard_after_forward=reshard_after_forward, mp_policy=mp)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer gathered, on the CPU of rank 0 (empty on the other ranks).
    A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def save_sharded(folder: Path, model: torch.nn.Module, optimizer, d: Dist) -> str:
    """Model and optimizer state, each rank writing its own shards (torch.distributed.checkpoint)
    into a new folder `resume-shards-<id>` beside the resume file; returns its name. Written
    under a temporary name and renamed when complete. A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = [f"resume-shards-{uuid.uuid4().hex[:10]}" if d.main else None]
    dist.broadcast_object_list(name, src=0)
    final = folder / name[0]
    tmp = folder / f".tmp-{name[0]}"
    if d.main:
        folder.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
    barrier(d)
    if d.main:
        os.replace(tmp, final)
    barrier(d)
    return name[0]


def drop_other_shards(folder: Path, keep: str) -> None:
    """Rank 0, after the resume file names `keep`: remove older (and half-written) shard folders."""
    for p in folder.glob("*resume-shards-*"):
        if p.is_dir() and p.name != keep:
            shutil.rmtree(p, ignore_errors=True)


def load_sharded(folder: Path, model: torch.nn.Module, optimizer) -> None:
    """Load what save_sharded wrote into this (sharded) model and its optimizer; the shards are
    redistributed if the ranks are laid out differently. A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


# ------------------------------------------------------------------ weights from rank 0

def broadcast_from_rank0(model: torch.nn.Module, full: dict[str, torch.Tensor] | None,
                         device: str) -> None:
    """Fill every rank's model with rank 0's weights and buffers. The other ranks' models are on
    the meta device (plain, or FSDP2-sharded); they get storage on `device` first (`to_empty`,
    parameters swapped in place so that tied weights stay one tensor; FSDP2 does so itself).

    Sharded: torch's set_model_state_dict(full_state_dict, broadcast_from_rank0) from `full`,
    rank 0's whole state dict taken before sharding (None elsewhere): one tensor at a time, each
    rank keeps its shards. Unsharded: each parameter and buffer broadcast in place, as DDP's
    constructor does (set_model_state_dict would hold every received tensor until it loads them:
    twice the model). Buffers left out of state dicts (non-persistent: Llama's rotary inv_freq)
    are broadcast in both cases. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank0 = dist.get_rank() == 0
    if not rank0:
        swap = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            model.to_empty(device=device)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(swap)
    if is_sharded(model):
        set_model_state_dict(model, full if rank0 else {}, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))
        in_state = set(model.state_dict())
        tensors = [b for name, b in model.named_buffers() if name not in in_state]
    else:
        tensors = [*model.parameters(), *model.buffers()]
    for t in tensors:
        dist.broadcast(t.detach(), src=0)
