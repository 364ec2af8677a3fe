"""Does a job fit its GPUs? The per-GPU peak of a training step under the job's strategy,
against the GPU memory of its cluster profile, with the change that would make it fit.

Per GPU (one rank per GPU; `learnforget params` gives the parts, learnforget.train.activations the
activations of one rank's micro-batch):

- one process or DDP: weights + optimizer + max(activations + max(2 x logits, recompute +
  the method's backward workspace), gradients); DDP adds its gradient buckets (one more copy of the trainable gradients);
- FSDP (full-weight methods): weights, gradients and optimizer state / ranks, plus what is
  all-gathered at a time: the root unit (embeddings, final norm, LM head) and two decoder
  layers (the running one and the prefetched next) in the compute dtype, and one layer's
  unsharded fp32 gradients before their reduce-scatter (all layers' with grad_accum > 1 and
  train.distributed.grad_sync=step, not FSDP's default: FSDP2 then keeps them unsharded until
  the last micro-batch);
  plus the activations.

This is an estimate for planning: CUDA's allocator cache, NCCL buffers and fragmentation come
on top, so a job is said to fit only below `headroom` (90%) of the GPU's memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from learnforget.methods.registry import checkpoint_format, quantised_base
from learnforget.train.activations import step_activations

HEADROOM = 0.90
GIB = 2**30


@dataclass(frozen=True)
class GpuPlan:
    """What a cluster profile gives one job."""

    ranks: int                 # one rank per GPU: nodes x tasks_per_node
    gpu_mem_gib: float | None  # memory of one GPU (profile key gpu_mem_gb), None: unknown
    per_node: int = 1          # ranks on one node (tasks_per_node)
    host_mem_gib: float | None = None  # host memory of one node (profile key mem_gb)


def gpu_plan(profile: dict[str, Any]) -> GpuPlan:
    tasks = int(profile.get("tasks_per_node") or 1)
    nodes = int(profile.get("nodes") or 1)
    mem, host = profile.get("gpu_mem_gb"), profile.get("mem_gb")
    return GpuPlan(max(1, tasks * nodes), None if mem is None else float(mem), max(1, tasks),
                   None if host is None else float(host))


def host_ram(cfg: DictConfig, plan: GpuPlan, rep: Any) -> dict[str, Any]:
    """Host RAM of the base weights on a job's busiest node while it loads them: one copy per
    rank on the node when every rank reads them (the behaviour before
    learnforget.train.rank0_load; still QLoRA's and the weight- or data-driven inits'), one
    copy (rank 0's) when only rank 0 does. A copy is the base model's parameters in the dtype
    they load in (fp32 masters for full finetuning); QLoRA's, its quantised weights (loaded per
    rank). The mapped checkpoint file (page cache, shared by the node's ranks) and each
    process's own memory come on top."""
    from learnforget.train.precision import dtype_bytes
    from learnforget.train.rank0_load import from_rank0, per_rank_reason

    per_node = min(plan.per_node, plan.ranks)
    copy = (rep.weights_bytes - rep.trainable * dtype_bytes(rep.master)  # the adapters: on GPU
            if quantised_base(cfg.method) else rep.base_total * dtype_bytes(rep.frozen))
    every = per_node * copy
    now = copy if from_rank0(cfg, plan.ranks) else every
    return {"host_copy_gib": copy / GIB, "host_every_rank_gib": every / GIB,
            "host_gib": now / GIB, "host_per_node": per_node, "host_mem_gib": plan.host_mem_gib,
            "host_fits": None if plan.host_mem_gib is None else now <= plan.host_mem_gib * GIB,
            "host_why": None if plan.ranks <= 1 else per_rank_reason(cfg)}


def strategy(cfg: DictConfig, ranks: int) -> str:
    """single | ddp | fsdp, as train.setup would choose it on `ranks` ranks."""
    if ranks <= 1:
        return "single"
    wanted = str((cfg.train.get("distributed") or {}).get("strategy", "ddp"))
    if wanted == "fsdp" and checkpoint_format(cfg.method) == "safetensors":
        return "fsdp"
    return "ddp"


def per_gpu_bytes(rep: Any, how: str, ranks: int, accumulates: bool = False) -> float:
    """The per-GPU peak of a training step (see the module docstring); `rep` a ParamReport with
    activations traced; `accumulates`: FSDP holds every unsharded gradient between micro-batches
    (see accumulates_unsharded)."""
    act = step_activations(rep.activations_bytes or 0.0, rep.logits_bytes or 0.0,
                           rep.recompute_bytes, rep.workspace_bytes)
    if how != "fsdp":
        return rep.peak_bytes + (rep.grads_bytes if how == "ddp" else 0.0)
    compute_b = 2 if rep.compute == "bf16" else 4
    gathered = (rep.root_params + 2 * rep.layer_params) * compute_b + (
        rep.grads_bytes if accumulates else rep.layer_params * 4)
    states = (rep.weights_bytes + rep.grads_bytes + rep.optimizer_bytes) / ranks
    return states + gathered + act


def accumulates_unsharded(cfg: DictConfig) -> bool:
    """FSDP gradients reduced once per step over several micro-batches (learnforget.train.step:
    only with train.distributed.grad_sync=step; auto reduce-scatters every micro-batch)."""
    t = cfg.train
    return int(t.grad_accum) > 1 and (t.get("distributed") or {}).get("grad_sync") == "step"


def report(cfg: DictConfig):
    """`learnforget params` with activations, as the run would train on a GPU (cached per
    setting: learnforget.train.params.cached_param_report)."""
    from learnforget.train.params import cached_param_report

    return cached_param_report(cfg, activations=True, device="cuda")


def check(cfg: DictConfig, plan: GpuPlan) -> dict[str, Any]:
    """Per-GPU estimate of one job on `plan`, whether it fits, and if not the first change of
    a short list that makes it fit (each re-estimated)."""
    rep = report(cfg)
    how = strategy(cfg, plan.ranks)
    need = per_gpu_bytes(rep, how, plan.ranks, accumulates_unsharded(cfg))
    t = cfg.train
    row = {"strategy": how, "ranks": plan.ranks, "per_gpu_gib": need / GIB,
           "gpu_mem_gib": plan.gpu_mem_gib,
           "global_batch": int(t.batch_size) * int(t.grad_accum) * plan.ranks,
           "checkpointing": bool(t.get("activation_checkpointing", False)),
           "precision": f"{rep.compute}/{rep.master.replace('float', 'fp').replace('bfloat', 'bf')}",
           "fits": None,
           "advice": None,
           **host_ram(cfg, plan, rep)}
    if rep.activations_bytes is None:
        row["advice"] = f"activations not estimated ({rep.activations_note})"
        return row
    if plan.gpu_mem_gib is None:
        row["advice"] = "the cluster profile has no gpu_mem_gb: fit not checked"
        return row
    limit = HEADROOM * plan.gpu_mem_gib * GIB
    row["fits"] = need <= limit
    if not row["fits"]:
        row["advice"] = _advice(cfg, plan, limit)
    return row


def _variant(cfg: DictConfig, **train: Any) -> DictConfig:
    c = cfg.copy()
    for key, value in train.items():
        OmegaConf.update(c, f"train.{key}", value, force_add=True)
    return c


def _advice(cfg: DictConfig, plan: GpuPlan, limit: float) -> str:
    """The first change, in order of cost, whose re-estimate fits: activation checkpointing;
    FSDP on 8 GPUs (full-weight methods), then with checkpointing too; micro-batch 1 with
    checkpointing (the global batch kept by grad_accum)."""
    t = cfg.train
    ckpt_on = bool(t.get("activation_checkpointing", False))
    tries: list[tuple[str, DictConfig, GpuPlan]] = []
    if not ckpt_on:
        tries.append(("train.activation_checkpointing=true",
                      _variant(cfg, activation_checkpointing=True), plan))
    if checkpoint_format(cfg.method) == "safetensors":
        fsdp_plan = GpuPlan(max(plan.ranks, 8), plan.gpu_mem_gib)
        text = (f"FSDP on {fsdp_plan.ranks} GPUs (--cluster llama7b_full_fsdp "
                "train.distributed.strategy=fsdp, grad_accum divided by the ranks)")
        for ck in ([False, True] if not ckpt_on else [True]):
            c = _variant(cfg, activation_checkpointing=ck)
            OmegaConf.update(c, "train.distributed.strategy", "fsdp", force_add=True)
            tries.append((text + (" and train.activation_checkpointing=true" if ck and not ckpt_on
                                  else ""), c, fsdp_plan))
    if int(t.batch_size) > 1:
        accum = int(t.batch_size) * int(t.grad_accum)
        tries.append((f"train.batch_size=1 train.grad_accum={accum}"
                       + ("" if ckpt_on else " train.activation_checkpointing=true"),
                       _variant(cfg, batch_size=1, grad_accum=accum,
                                activation_checkpointing=True), plan))
    for text, c, p in tries:
        need = per_gpu_bytes(report(c), strategy(c, p.ranks), p.ranks, accumulates_unsharded(c))
        if need <= limit:
            return f"fits with {text}: {need / GIB:.1f} GiB per GPU"
    return "no single change fits it: more GPUs (FSDP) or a shorter train.seq_len"


def format_rows(rows: list[dict[str, Any]], methods: list[str]) -> str:
    """The dry run's fit table: one line per job."""
    lines = ["\nfit per GPU: est. peak of one training step on one GPU (weights, gradients, "
             "optimizer state as the strategy shards them, + one micro-batch's activations; "
             f"fits = below {HEADROOM:.0%} of the profile's gpu_mem_gb)",
             f"{'#':>3}  {'method':<22} {'strategy':<8} {'ranks':>5} {'global batch':>12} "
             f"{'compute/master':>14} {'ckpt':>5} {'est. GiB/GPU':>12} {'GPU GiB':>8}  fits"]
    for (i, r), m in zip(enumerate(rows, 1), methods, strict=True):
        mem = "-" if r["gpu_mem_gib"] is None else f"{r['gpu_mem_gib']:.0f}"
        fits = {True: "yes", False: "NO", None: "?"}[r["fits"]]
        lines.append(f"{i:>3}  {m:<22} {r['strategy']:<8} {r['ranks']:>5} {r['global_batch']:>12} "
                     f"{r['precision']:>14} "
                     f"{'on' if r['checkpointing'] else 'off':>5} {r['per_gpu_gib']:>12.1f} "
                     f"{mem:>8}  {fits}" + (f"  ({r['advice']})" if r["advice"] else ""))
    return "\n".join(lines)


def format_host_rows(rows: list[dict[str, Any]], methods: list[str]) -> str:
    """The dry run's host-RAM lines: one per distinct setting, with the jobs it covers; a
    WARNING where it exceeds the profile's mem_gb."""
    groups: dict[tuple, list[int]] = {}
    for (i, r), m in zip(enumerate(rows, 1), methods, strict=True):
        key = (m.split("_")[0], r["strategy"], r["host_per_node"],
               round(r["host_copy_gib"], 1), round(r["host_gib"], 1),
               round(r["host_every_rank_gib"], 1), r["host_why"], r["host_mem_gib"], r["host_fits"])
        groups.setdefault(key, []).append(i)
    mem = rows[0]["host_mem_gib"] if rows else None
    lines = ["\nhost RAM per node: the base weights in host memory while a job loads them, on its "
             "busiest node (the mapped checkpoint file and each process's own memory come on "
             "top), against the profile's mem_gb"
             + (f" ({mem:g} GB)" if mem is not None else " (not set: not checked)")]
    for (m, how, per_node, copy, now, every, why, _, fits), jobs in groups.items():
        label = f"job {jobs[0]}" if len(jobs) == 1 else f"jobs {_ranges(jobs)}"
        if per_node <= 1:
            text = f"{now:.1f} GiB (one rank per node)"
        elif why is None:
            text = (f"{now:.1f} GiB: rank 0 reads the weights, the node's other {per_node - 1} "
                    f"ranks receive theirs on their GPUs (before: every rank read them, "
                    f"{per_node} x {copy:.1f} = {every:.1f} GiB)")
        else:
            text = f"{now:.1f} GiB: every rank reads the weights, {per_node} x {copy:.1f} GiB ({why})"
        lines.append(f"  {label:<10} {m:<8} {how:<6} {text}"
                     + ("  WARNING: exceeds mem_gb" if fits is False else ""))
    n_bad = sum(r["host_fits"] is False for r in rows)
    if n_bad:
        lines.append(f"WARNING: {n_bad} job(s) need more host RAM than the profile's mem_gb "
                     f"({mem:g} GB) while loading: raise mem_gb or use "
                     "train.distributed.load_weights=rank0 where it applies")
    return "\n".join(lines)


def _ranges(jobs: list[int]) -> str:
    out, start = [], jobs[0]
    for a, b in zip(jobs, [*jobs[1:], None], strict=True):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)
