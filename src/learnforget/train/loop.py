"""The train stage. Reads top to bottom: setup, run folder, train loop, save, finish.

    learnforget train model=tiny_llama method=lora data=stdlib_code method.r=16 seed=1
"""

from __future__ import annotations

import math
import os
import random
import resource
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from learnforget.assets.models import load_model
from learnforget.config import config_hash, cooldown_mode, run_dir, run_identity, run_name, validate
from learnforget.data.packing import TokenizedData, build_data, collate
from learnforget.data.shards import (
    accounting,
    corpus_dir,
    data_format,
    ensure_corpus,
    sequence_blocks,
    shard_data,
)
from learnforget.errors import ConfigError
from learnforget.eval.crossentropy import mean_cross_entropy
from learnforget.files import atomic_write_json, atomic_write_text, read_json
from learnforget.methods.apply import apply_method, count_parameters
from learnforget.methods.modules import decoder_layers
from learnforget.methods.registry import checkpoint_format, ignored_keys, method_summary
from learnforget.record import RunLock, check_same_run, meta_info
from learnforget.tracking import Loggers, make_loggers, scrub
from learnforget.train import cooldown, distributed, precision
from learnforget.train.activations import enable_checkpointing
from learnforget.train.distributed import Dist
from learnforget.train.optim import make_optimizer, make_scheduler
from learnforget.train.run_state import (
    drop_resume_state,
    finished_under_lock,
    load_resume,
    save_checkpoint,
    save_resume,
)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@dataclass
class Plan:
    """How long the run is and where it saves: all in optimizer steps, fixed before training."""

    micro_per_epoch: int        # micro-batches in one pass over the training set
    steps_per_epoch: float      # optimizer steps in one pass
    total_steps: int
    checkpoints: dict[int, str]  # step -> checkpoint label
    branch_points: dict[int, str] = field(default_factory=dict)  # cooldown branches: step -> budget
    budgets: dict[int, str] = field(default_factory=dict)  # cooldown branches: budget step -> label


def make_plan(t: DictConfig, data: TokenizedData, world: int = 1) -> Plan:
    n = len(data.train)
    drop_last = data.regime == "cpt"
    per_micro = t.batch_size * world  # one micro-batch across all data-parallel ranks
    micro = n // per_micro if drop_last else math.ceil(n / per_micro)
    if micro < t.grad_accum:
        raise ConfigError(
            f"data={data.info.get('name', '?')} has {n} training examples, fewer than one optimizer "
            f"step needs (train.batch_size={t.batch_size} x train.grad_accum={t.grad_accum} x "
            f"{world} ranks)")
    steps_per_epoch = (n / per_micro if getattr(data, "streamed", False) else micro) / t.grad_accum
    unit = t.checkpoints.unit
    if unit == "steps":
        steps = [int(a) for a in t.checkpoints.at]
    elif unit == "epochs":
        steps = [max(1, round(a * steps_per_epoch)) for a in t.checkpoints.at]
    else:  # tokens: CPT steps are exact (packed blocks); IFT uses the mean example length
        mean_len = data.info.get("mean_train_len") or t.seq_len
        per_step = per_micro * t.grad_accum * (t.seq_len if drop_last else mean_len)
        steps = [max(1, math.ceil(a / per_step)) for a in t.checkpoints.at]
    if len(set(steps)) != len(steps):
        raise ConfigError(
            f"train.checkpoints.at={list(t.checkpoints.at)} ({unit}) maps two budgets onto the same "
            f"optimizer step ({steps}): space the budgets further apart or use smaller batches")
    labels = {}
    for a, s in zip(t.checkpoints.at, steps, strict=True):
        a_str = f"{a:g}" if unit == "epochs" else f"{int(a):09d}" if unit == "tokens" else f"{int(a):06d}"
        labels[s] = f"{unit.rstrip('s')}-{a_str}"
    plan = Plan(micro, steps_per_epoch, max(steps), labels)
    return cooldown.branch_plan(plan, t) if cooldown_mode(t) == "branches" else plan


def micro_batch(data: TokenizedData, plan: Plan, t: DictConfig, index: int, seed: int,
                pad_id: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """This rank's part of micro-batch number `index` of the whole run: a seeded permutation
    per epoch, so the data position after a resume is exactly where the interrupted run was,
    and `world` ranks together see what one process with `world` x batch_size would."""
    if getattr(data, "streamed", False):  # token shards: blocks by position, no epoch array
        ids = sequence_blocks(index, t.batch_size, rank, world, len(data.train), seed)
        return collate([data.train[i] for i in ids], pad_id)
    epoch, within = divmod(index, plan.micro_per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(data.train), generator=g)
    start = (within * world + rank) * t.batch_size
    ids = order[start:start + t.batch_size].tolist()
    return collate([data.train[i] for i in ids], pad_id)


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def heldout_loss(model, data: TokenizedData, t: DictConfig, pad_id: int, device: str,
                 max_batches: int, policy: precision.PrecisionPolicy | None = None) -> float | None:
    """Token-weighted mean cross-entropy on the first batches of the held-out split, in the
    run's compute precision."""
    if max_batches <= 0 or not data.heldout:
        return None
    examples = data.heldout[:max_batches * t.batch_size]
    with policy.autocast(device) if policy else nullcontext():
        return mean_cross_entropy(model, examples, batch_size=t.batch_size, pad_id=pad_id,
                                  device=device)[0]


def enable_activation_checkpointing(model: torch.nn.Module, method: str) -> None:
    """Recompute each decoder layer's activations in the backward pass (transformers' own
    gradient checkpointing, non-reentrant: works with frozen embeddings, DDP and FSDP)."""
    if method == "prefix":
        raise ConfigError("train.activation_checkpointing=true does not work with method=prefix "
                          "(prefix tuning feeds its prefix through the KV cache, which gradient "
                          "checkpointing turns off); set it to false")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.activation_checkpointing=true: {type(base).__name__} does not "
                          "support gradient checkpointing")
    enable_checkpointing(base)


def pass_on_signals(received: list[int], previous: dict[int, Any]) -> None:
    """After an interrupted run is saved, give each stop signal to the handler that was installed
    before train() took it over: a job framework's handler (submitit's USR2 handler checkpoints
    the job, requeues it with `scontrol requeue` and exits, so the requeued job resumes this run).
    Default and ignored dispositions are left alone: a plain run just returns "interrupted"."""
    for signum in received:
        handler = previous.get(signum)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signum, None)


# ------------------------------------------------------------------ the stage

@dataclass
class Setup:
    """Everything a run needs, built and checked before its folder is touched."""

    cfg: DictConfig
    out: Path
    name: str
    config_hash: str
    device: str
    dist: Dist
    model: torch.nn.Module
    tokenizer: Any
    base_path: str
    notes: list[str]
    trainable: int
    total: int
    data: TokenizedData
    plan: Plan
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    autocast_dtype: torch.dtype | None
    policy: precision.PrecisionPolicy
    strategy: str | None = None   # how the ranks share the work: ddp | fsdp (None: one process)
    quantisation: dict[str, Any] | None = None  # qlora: error of the quantised base weights


def setup(cfg: DictConfig) -> Setup | None:
    """Load model, method, data, optimizer. None when the run already finished."""
    validate(cfg)
    out, name, chash = run_dir(cfg), run_name(cfg), config_hash(cfg)
    info = read_json(out / "run.json")
    if info and info.get("status") == "finished" and info.get("config_hash") == chash:
        print(f"learnforget: {name} is already finished ({out}); skipping")
        return None
    check_same_run(out, chash)
    if cfg.train.num_threads:
        torch.set_num_threads(int(cfg.train.num_threads))
    d = distributed.init()
    device = d.device
    cache_dir = Path(cfg.paths.cache_dir).expanduser()
    t = cfg.train

    policy = precision.resolve(t.precision, t.get("master_weights", "fp32"), cfg.model.dtype,
                               cfg.method.name, device)
    if cfg.method.name == "qlora":  # the frozen base is quantised; the rest in compute_dtype
        policy = replace(policy, frozen=f"{cfg.method.quant_type} (rest {cfg.method.compute_dtype})",
                         load=str(cfg.method.compute_dtype))
    if not d.main:  # rank 0 builds or converts the base model into the cache first
        distributed.barrier(d)
    model, tokenizer, base_path = load_model(
        cfg.model, cfg.method, cache_dir, device,
        dtype=None if cfg.method.name == "qlora" else policy.load)
    if d.main:
        distributed.barrier(d)
    quantisation = None
    if cfg.method.name == "qlora":  # how far the quantised base is from the checkpoint's weights
        from learnforget.methods.quantisation import quantisation_report

        quantisation = quantisation_report(model, base_path, cfg.method)
    # Seed after loading: adapter init, dropout and data order then never depend on whether
    # the base model came from the cache or was built just now.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model, notes = apply_method(model, cfg.method, model_name=cfg.model.name,
                                tokenizer_path=base_path if Path(base_path).exists() else None)
    notes += precision.apply(model, policy)
    if t.get("activation_checkpointing", False):
        enable_activation_checkpointing(model, cfg.method.name)
    trainable, total = count_parameters(model)
    data = load_data(cfg, tokenizer, d, cache_dir)
    plan = make_plan(t, data, d.world)
    data.info["accounting"] = data_accounting(t, data, plan, d.world)
    strategy = parallel_strategy(cfg, d, notes)
    if strategy == "fsdp":
        distributed.shard_model(model, decoder_layers(model),
                                bool(t.distributed.get("reshard_after_forward", True)),
                                compute_dtype=policy.autocast_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, opt_notes = make_optimizer(params, t, device)
    scheduler = make_scheduler(optimizer, cooldown.plateau(t), plan.total_steps)
    return Setup(cfg, out, name, chash, device, d, model, tokenizer, base_path, notes + opt_notes,
                 trainable, total, data, plan, params, optimizer, scheduler,
                 policy.autocast_dtype, policy, strategy, quantisation=quantisation)


def load_data(cfg: DictConfig, tokenizer: Any, d: Dist, cache_dir: Path) -> TokenizedData:
    """The run's data: in memory (data.format=memory), or token shards read by position
    (data.format=shards; rank 0 prepares them first when they are missing or partial)."""
    t = cfg.train
    if data_format(cfg.data) == "shards":
        if not d.main:  # rank 0 tokenizes the corpus into the cache first
            distributed.barrier(d)
        folder = ensure_corpus(cfg.data, cfg.model, tokenizer, cache_dir) if d.main else \
            corpus_dir(cache_dir, cfg.data, cfg.model)
        if d.main:
            distributed.barrier(d)
        data = shard_data(cfg.data, folder, t.seq_len, seed=cfg.seed)
    else:
        data = build_data(cfg.data, tokenizer, t.seq_len, seed=cfg.seed, cache_dir=cache_dir)
    data.info.setdefault("name", cfg.data.name)
    data.info.setdefault("format", "memory")
    max_docs = cfg.data.get("max_docs")
    data.info.setdefault("max_docs", max_docs)
    n_docs = data.info.get("n_docs_train", 0) + data.info.get("n_docs_heldout", 0)
    data.info["max_docs_reached"] = max_docs is not None and n_docs >= max_docs  # source cut
    return data


def data_accounting(t: DictConfig, data: TokenizedData, plan: Plan, world: int) -> dict[str, Any]:
    """Unique and repeated tokens of the whole run (all ranks, to the last budget; with
    cooldown branches, to the end of the last budget's branch)."""
    steps = max(plan.budgets) if plan.budgets else plan.total_steps
    sequences = steps * t.grad_accum * t.batch_size * world
    n = len(data.train)
    if not getattr(data, "streamed", False) and data.regime == "cpt":
        n = plan.micro_per_epoch * t.batch_size * world  # the rest of an epoch is dropped
    per_seq = t.seq_len if data.regime == "cpt" else data.info["n_train_tokens"] / len(data.train)
    return accounting(n, sequences, per_seq)


def parallel_strategy(cfg: DictConfig, d: Dist, notes: list[str]) -> str | None:
    """train.distributed.strategy for this launch: None in a single process; fsdp only for
    methods that train (part of) the model's own weights and save them whole (full, bitfit,
    topk); adapter methods keep DDP (their trainable part is small) and the run notes it."""
    if d.world <= 1:
        return None
    dcfg = cfg.train.get("distributed") or {}
    strategy = str(dcfg.get("strategy", "ddp"))
    if strategy == "fsdp" and checkpoint_format(cfg.method) != "safetensors":
        notes.append(f"train.distributed.strategy=fsdp shards full-weight methods only; "
                     f"method={cfg.method.name} trains with ddp")
        return "ddp"
    if strategy == "fsdp" and cfg.train.optimizer not in ("adamw", "lionw"):
        raise ConfigError(f"train.distributed.strategy=fsdp needs a torch optimizer on sharded "
                          f"parameters (train.optimizer=adamw or lionw), not "
                          f"{cfg.train.optimizer!r} (bitsandbytes)")
    return strategy


def train(cfg: DictConfig) -> Path:
    """Train one run to the end of its checkpoint schedule (and, with cooldown branches, each
    budget's cooldown from the plateau); returns the run folder. What the libraries log goes to
    <run>/run.log (learnforget.console)."""
    from learnforget.console import LOG_NAME, library_output

    with library_output(run_dir(cfg) / LOG_NAME, "train"):
        s = setup(cfg)
        out = run_dir(cfg) if s is None else fit(s)
    if cooldown_mode(cfg.train) == "branches":
        cooldown.run_branches(cfg, out)
    return out


def fit(s: Setup) -> Path:
    """The training loop, with checkpoints at every budget; resumes from a saved state."""
    cfg, t, out, name, chash = s.cfg, s.cfg.train, s.out, s.name, s.config_hash
    model, tokenizer, base_path, notes = s.model, s.tokenizer, s.base_path, s.notes
    data, plan, params, optimizer, scheduler = s.data, s.plan, s.params, s.optimizer, s.scheduler
    device, trainable, total = s.device, s.trainable, s.total
    d = s.dist
    sharded = s.strategy == "fsdp"  # collectives in heldout loss and saves: every rank joins
    pad_id = tokenizer.pad_token_id
    device_type = "cuda" if device.startswith("cuda") else "cpu"

    # -- run folder: one process at a time (rank 0 writes it); resume from a saved state
    lock = RunLock(out)
    busy = 0.0 if (not d.main or lock.acquire()) else 1.0
    if distributed.all_reduce(busy, d, "max"):
        print(f"learnforget: {name} is being trained by another process ({out}); skipping")
        return out
    resume_path = out / "train" / "resume.pt"
    if distributed.all_reduce(1.0 if d.main and finished_under_lock(out, chash) else 0.0, d,
                              "max"):  # another process finished it while this one set up
        lock.release()
        print(f"learnforget: {name} is already finished ({out}); skipping")
        return out
    progress = {"step": 0, "tokens": 0, "wall_time_s": 0.0, "losses": [], "world": d.world}
    if resume_path.exists():
        progress = {"world": d.world, **load_resume(resume_path, model, optimizer, scheduler)}
        notes.append(f"resumed from step {progress['step']}")
        print(f"learnforget: resuming {name} from step {progress['step']}")
    resolved = scrub(OmegaConf.to_container(cfg, resolve=True))
    if d.main:
        atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
        if not (out / "tokenizer").exists():
            tokenizer.save_pretrained(out / "tokenizer")
    record: dict[str, Any] = {
        "status": "running",
        "run": {"name": name, "experiment": cfg.experiment_name, "config_hash": chash,
                "model": cfg.model.name, "base_model": base_path, "method": cfg.method.name,
                "method_summary": method_summary(cfg.method),
                "method_settings": run_identity(cfg)["method"],
                "ignored_method_keys": ignored_keys(cfg.method), "data": cfg.data.name,
                "regime": cfg.data.regime, "seed": cfg.seed},
        "config_hash": chash,
        "train": {"trainable_params": trainable, "total_params": total,
                  "trainable_pct": 100.0 * trainable / total, "device": device,
                  "precision": s.policy.compute, "precision_policy": s.policy.record(),
                  "activation_checkpointing": bool(t.get("activation_checkpointing", False)),
                  "ranks": d.world,
                  "distributed": s.strategy,
                  "total_steps": plan.total_steps, "checkpoint_steps": plan.checkpoints,
                  **({"cooldown_mode": "branches", "budgets": plan.budgets,
                      "branch_points": plan.branch_points} if plan.branch_points else {}),
                  "data": data.info, "notes": notes,
                  **({"quantisation": s.quantisation} if s.quantisation else {})},
        "meta": meta_info(),
    }
    if d.main:
        atomic_write_json(out / "run.json", record)
    try:
        loggers = make_loggers(cfg, run_dir=out, run_name=name, stage="train", config=resolved,
                               tags=[cfg.method.name, method_summary(cfg.method), cfg.data.name,
                                     cfg.model.name], metrics_path=out / "train" / "metrics.jsonl",
                               resume_step=progress["step"] if resume_path.exists() else None
                               ) if d.main else Loggers([])
    except BaseException:  # run.json never stays "running" after a failed setup
        record["status"] = "failed"
        if d.main:
            atomic_write_json(out / "run.json", record)
        lock.release()
        raise
    net = model
    if d.world > 1 and not sharded:  # FSDP: the model is already sharded (setup)
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[torch.device(device).index]
                                      if device_type == "cuda" else None)

    stop: dict[str, Any] = {"signal": None, "received": []}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name
        if signum not in stop["received"]:
            stop["received"].append(signum)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS} if in_main else {}
    status = "failed"
    try:
        # -- train loop
        model.train()
        start_step = progress["step"]
        if start_step == 0 and t.heldout_batches and (d.main or sharded):
            base_loss = heldout_loss(model, data, t, pad_id, device, t.heldout_batches, s.policy)
            loggers.log({"step": 0, "tokens": 0, "heldout_loss": base_loss})
        bar = tqdm(total=plan.total_steps, initial=start_step, desc=name[:40],
                   disable=None if d.main else True, dynamic_ncols=True)
        t_start = time.perf_counter() - progress["wall_time_s"]
        cpu_start = time.process_time()  # this process's CPU seconds (not stolen time, not waits)
        for step in range(start_step + 1, plan.total_steps + 1):
            t0 = time.perf_counter()
            step_loss, step_tokens = 0.0, 0
            for k in range(t.grad_accum):
                index = (step - 1) * t.grad_accum + k
                batch = micro_batch(data, plan, t, index, cfg.seed, pad_id, d.rank, d.world)
                batch = {key: v.to(device) for key, v in batch.items()}
                with s.policy.autocast(device):
                    loss = net(**batch).loss / t.grad_accum
                loss.backward()
                step_loss += float(loss.detach())
                step_tokens += int(batch["attention_mask"].sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip or float("inf"))
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = distributed.all_reduce(step_loss, d) / d.world
            step_tokens = int(distributed.all_reduce(step_tokens, d))
            dt = time.perf_counter() - t0
            progress["step"], progress["tokens"] = step, progress["tokens"] + step_tokens
            # the data position: sequences read by all ranks (a resume continues at this offset)
            progress["sequences"] = step * t.grad_accum * t.batch_size * d.world
            progress["wall_time_s"] = time.perf_counter() - t_start
            row = {"step": step, "epoch": step / plan.steps_per_epoch, "tokens": progress["tokens"],
                   "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
                   "tokens_per_s": step_tokens / dt, "step_time_s": dt,
                   "wall_time_s": progress["wall_time_s"],
                   "cpu_time_s": time.process_time() - cpu_start,
                   "peak_mem_mb": peak_memory_mb(device)}
            if step % t.log_every == 0 or step in plan.checkpoints:
                loggers.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")

            if step in plan.checkpoints and (d.main or sharded):
                label = plan.checkpoints[step]
                hl = heldout_loss(model, data, t, pad_id, device, t.heldout_batches, s.policy)
                full = distributed.full_state_dict(model) if sharded else None
                manifest = {"label": label, "step": step, "tokens": progress["tokens"],
                            "epoch": step / plan.steps_per_epoch, "loss": step_loss,
                            "heldout_loss": hl, "method": cfg.method.name,
                            "format": checkpoint_format(cfg.method),
                            "weights_dtype": s.policy.master,
                            "base_model": base_path}
                if d.main:
                    save_checkpoint(out / "checkpoints" / label, model, manifest, full)
                if hl is not None:
                    loggers.log({"step": step, "tokens": progress["tokens"], "heldout_loss": hl})
                del full
                if step < plan.total_steps:  # the last checkpoint ends the run: no state to keep
                    save_resume(resume_path, model, optimizer, scheduler, progress, d)
            if step in plan.branch_points and (d.main or sharded):  # a budget's cooldown branch
                hl = heldout_loss(model, data, t, pad_id, device, t.heldout_batches, s.policy)
                if hl is not None:  # on the plateau, before the branch's cooldown
                    loggers.log({"step": step, "tokens": progress["tokens"], "heldout_loss": hl})
                save_resume(cooldown.branch_dir(out, plan.branch_points[step]) / "train" /
                            "resume.pt", model, optimizer, scheduler, progress, d)
            if step in plan.checkpoints or step in plan.branch_points:
                distributed.barrier(d)
            if t.crash_at_step is not None and step == t.crash_at_step:
                os._exit(137)  # testing: die like a killed process, with no clean-up at all
            if distributed.all_reduce(1.0 if stop["signal"] else 0.0, d, "max"):
                stop["signal"] = stop["signal"] or "a stop signal on another rank"
                if d.main or sharded:
                    save_resume(resume_path, model, optimizer, scheduler, progress, d)
                distributed.barrier(d)
                status = "interrupted"
                print(f"learnforget: {stop['signal']} received at step {step}: state saved, "
                      "rerun the same command to resume")
                break
        bar.close()
        if status != "interrupted":
            status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        record["status"] = status
        record["train"].update({
            "steps_done": progress["step"], "tokens_seen": progress["tokens"],
            "data_position": progress.get("sequences", 0),
            "wall_time_s": progress["wall_time_s"], "peak_mem_mb": peak_memory_mb(device),
            "checkpoints": sorted(p.name for p in (out / "checkpoints").glob("*-*")
                                  if not p.name.startswith(".")),
        })
        if d.main:
            atomic_write_json(out / "run.json", record)
            if status == "finished":  # a finished run keeps no resume state
                drop_resume_state(resume_path)
        loggers.summary({"status": status, "trainable_params": trainable, "total_params": total,
                         "tokens_seen": progress["tokens"]})
        loggers.finish(status)
        lock.release()
    if status == "interrupted":
        pass_on_signals(stop["received"], previous)
    if status == "finished" and d.main:
        print(f"learnforget: {name} finished: {progress['step']} steps, "
              f"{progress['tokens']} tokens in {progress['wall_time_s']:.1f}s -> {out}")
    return out
