"""The train stage, a recipe read top to bottom: setup (model, method, data, optimizer), open
the run (lock, resume, run.json, loggers), train loop (budget checkpoints), finish.

    learnforget train model=tiny_llama method=lora data=stdlib_code method.r=16 seed=1
"""

from __future__ import annotations

import random
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from learnforget.assets.inputs import ready_before_ranks
from learnforget.assets.models import load_model
from learnforget.config import (
    IDENTITY_VERSION,
    config_hash,
    cooldown_mode,
    run_dir,
    run_identity,
    run_name,
    validate,
)
from learnforget.data.budget import regime_note
from learnforget.data.packing import TokenizedData
from learnforget.errors import ConfigError
from learnforget.eval.crossentropy import mean_cross_entropy
from learnforget.files import atomic_write_text, first_line
from learnforget.methods.apply import apply_method, count_parameters
from learnforget.methods.modules import decoder_layers
from learnforget.methods.registry import (
    checkpoint_format,
    family,
    ignored_keys,
    method_of,
    method_summary,
)
from learnforget.runfolder import RunFolder, RunInfo, RunLock, RunRecord, TrainInfo, meta_info
from learnforget.tracking import Loggers, make_loggers, scrub
from learnforget.train import cooldown, distributed, precision, rank0_load, regularise, speed
from learnforget.train.activations import enable_checkpointing
from learnforget.train.callbacks import Callback, call_callbacks, load_callbacks
from learnforget.train.distributed import Dist
from learnforget.train.init_from import load_init
from learnforget.train.optim import make_optimizer, make_scheduler
from learnforget.train.plan import Plan, data_accounting, load_data, make_plan, micro_batch
from learnforget.train.run_state import drop_resume_state, load_resume, save_checkpoint
from learnforget.train.saving import STOP, ResumeSaver, heldout_every, resume_every_s
from learnforget.train.signals import StopSignals
from learnforget.train.step import legacy_note, step_notes, train_step, wrap_model


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
    why = family(method).no_activation_checkpointing
    if why:
        raise ConfigError(f"train.activation_checkpointing=true does not work with method={method} "
                          f"({why}); set it to false")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.activation_checkpointing=true: {type(base).__name__} does not "
                          "support gradient checkpointing")
    enable_checkpointing(base)


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
    callbacks: list[Callback] = field(default_factory=list)  # train.callbacks, after each step


def setup(cfg: DictConfig) -> Setup | None:
    """Load model, method, data, optimizer. None when the run already finished."""
    validate(cfg)
    callbacks = load_callbacks(cfg.train.get("callbacks"))
    out, name, chash = run_dir(cfg), run_name(cfg), config_hash(cfg)
    folder = RunFolder(out)
    if folder.finished(chash):
        print(f"learnforget: {name} is already finished ({out}); skipping")
        return None
    folder.check_same_run(chash)
    if cfg.train.num_threads:
        torch.set_num_threads(int(cfg.train.num_threads))
    ready_before_ranks(cfg)  # several ranks: rank 0 prepares missing inputs, no collective
    d = distributed.init(cfg.train.get("distributed"))
    device = d.device
    cache_dir = Path(cfg.paths.cache_dir).expanduser()
    t = cfg.train

    policy = precision.resolve(t.precision, t.get("master_weights", "fp32"), cfg.model.dtype,
                               cfg.method.name, device)
    quant = method_of(cfg.method).quantisation(cfg.method)
    if quant is not None:  # the frozen base is quantised; the rest in compute_dtype
        policy = replace(policy, frozen=quant.frozen, load=quant.compute_dtype)
    meta = rank0_load.from_rank0(cfg, d.world)  # ranks > 0 on meta, weights from rank 0
    model, tokenizer, base_path = load_model(
        cfg.model, cfg.method, cache_dir, device,
        dtype=None if quant is not None else policy.load, weights=d.main or not meta)
    init_notes = load_init(model, cfg) if d.main or not meta else []  # model.init_from
    quantisation = None
    if quant is not None:  # how far the quantised base is from the checkpoint's weights
        from learnforget.methods.quantisation import quantisation_report

        quantisation = quantisation_report(model, base_path, cfg.method)
    data = load_data(cfg, tokenizer, d, cache_dir)  # before the method: eva/corda calibrate on it
    plan = make_plan(t, data, d.world)
    # Seed after loading: adapter init, dropout and data order then never depend on whether
    # the base model came from the cache or was built just now. The same seed on every rank: one
    # model and adapter init; with several ranks, train_step reseeds dropout per rank and step.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model, notes = apply_method(model, cfg.method, model_name=cfg.model.name,
                                tokenizer_path=base_path if Path(base_path).exists() else None,
                                calibration=lambda i: micro_batch(data, plan, t, i, cfg.seed,
                                                                  tokenizer.pad_token_id))
    if meta:
        rank0_load.same_rng_as_rank0(d)
    notes += init_notes + regularise.set_attention_dropout(model, t.get("attention_dropout"))
    notes += rank0_load.note(cfg, d) + precision.apply(model, policy)
    fast = speed.settings(t)
    notes += speed.frozen_cast(model, cfg.method, policy.compute, fast["frozen_cast"])
    if t.get("activation_checkpointing", False):
        enable_activation_checkpointing(model, cfg.method.name)
    trainable, total = count_parameters(model)
    data.info["accounting"] = data_accounting(t, data, plan, d.world)
    strategy = parallel_strategy(cfg, d, notes)
    notes += step_notes(cfg, d.world, strategy)
    if (old := legacy_note(cfg)) is not None:
        notes.append(old)
        if d.main:
            print(f"learnforget: {old}")
    source = rank0_load.source_state(model, d, strategy) if meta else None
    if strategy == "fsdp":
        distributed.shard_model(model, decoder_layers(model),
                                bool(t.distributed.get("reshard_after_forward", True)),
                                compute_dtype=policy.autocast_dtype)
    if meta:
        rank0_load.fill(model, source, d, device)
    del source
    notes += speed.loss_note(t, model, d.world)
    notes += speed.compile_model(model, fast["compile"], device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, opt_notes = make_optimizer(params, t, device)
    scheduler = make_scheduler(optimizer, cooldown.plateau(t), plan.total_steps)
    return Setup(cfg, out, name, chash, device, d, model, tokenizer, base_path, notes + opt_notes,
                 trainable, total, data, plan, params, optimizer, scheduler,
                 policy.autocast_dtype, policy, strategy, quantisation=quantisation,
                 callbacks=callbacks)


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
    from learnforget.console import library_output

    folder = RunFolder(run_dir(cfg))
    with distributed.session():  # a rank that fails here ends the job soon (the watchdog)
        with library_output(folder.log, "train"):
            s = setup(cfg)
            out = folder.path if s is None else fit(s)
        if cooldown_mode(cfg.train) == "branches":
            cooldown.run_branches(cfg, out, train)
    return out


# ------------------------------------------------------------------ the recipe

def fit(s: Setup) -> Path:
    """The recipe: open the run (lock, resume, run.json, loggers), train loop with its budget
    checkpoints, finish (run.json, resume state, loggers, lock)."""
    run = open_run(s)
    if run is None:
        return s.out
    status, ended = "failed", False
    try:
        with StopSignals() as stop:
            status = train_loop(s, run, stop)
        ended = True
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        try:
            finish(s, run, status)
        except Exception as e:  # e.g. a full disk again: the first error is the one to report
            if ended:
                raise
            print(f"learnforget: warning: closing the {status} run failed too: {first_line(e)}",
                  file=sys.stderr, flush=True)
    if status == "interrupted":
        stop.pass_on()
    return s.out


@dataclass
class OpenRun:
    """A run being trained: its folder, lock, record, loggers and progress."""

    folder: RunFolder
    lock: RunLock
    record: RunRecord
    loggers: Loggers
    progress: dict[str, Any]
    resumed: bool
    saver: ResumeSaver


def claim(s: Setup, folder: RunFolder) -> RunLock | None:
    """The run's lock (rank 0 holds it), or None when another process trains or finished it."""
    d = s.dist
    lock = RunLock(folder)
    busy = 0.0 if (not d.main or lock.acquire()) else 1.0
    if distributed.all_reduce(busy, d, "max"):
        print(f"learnforget: {s.name} is being trained by another process ({s.out}); skipping")
        return None
    if distributed.all_reduce(1.0 if d.main and folder.finished(s.config_hash) else 0.0, d,
                              "max"):  # another process finished it while this one set up
        lock.release()
        print(f"learnforget: {s.name} is already finished ({s.out}); skipping")
        return None
    if lock.note:  # not flock: which lock and why (cluster file systems)
        s.notes.append(lock.note)
    return lock


def resume(s: Setup, folder: RunFolder) -> dict[str, Any] | None:
    """The progress of an interrupted run, its state loaded into model, optimizer, schedule."""
    if not folder.resume.exists():
        return None
    progress = {"world": s.dist.world,
                **load_resume(folder.resume, s.model, s.optimizer, s.scheduler)}
    s.notes.append(f"resumed from step {progress['step']}")
    print(f"learnforget: resuming {s.name} from step {progress['step']}")
    return progress


def start_record(s: Setup) -> RunRecord:
    """run.json as the run starts: what it trains and how."""
    cfg, t, plan = s.cfg, s.cfg.train, s.plan
    run = RunInfo(name=s.name, experiment=cfg.experiment_name, config_hash=s.config_hash,
                  model=cfg.model.name, base_model=s.base_path, method=cfg.method.name,
                  method_summary=method_summary(cfg.method),
                  method_settings=run_identity(cfg)["method"],
                  ignored_method_keys=ignored_keys(cfg.method), data=cfg.data.name,
                  regime=cfg.data.regime, seed=cfg.seed, identity_version=IDENTITY_VERSION)
    branches = bool(plan.branch_points)
    train_info = TrainInfo(
        trainable_params=s.trainable, total_params=s.total,
        trainable_pct=100.0 * s.trainable / s.total, device=s.device,
        precision=s.policy.compute, precision_policy=s.policy.record(),
        activation_checkpointing=bool(t.get("activation_checkpointing", False)),
        ranks=s.dist.world, distributed=s.strategy, total_steps=plan.total_steps,
        checkpoint_steps=plan.checkpoints, cooldown_mode="branches" if branches else None,
        budgets=plan.budgets if branches else None,
        branch_points=plan.branch_points if branches else None, data=s.data.info,
        notes=s.notes + [n for n in (regime_note(cfg, s.trainable),) if n],
        quantisation=s.quantisation or None)
    return RunRecord(status="running", run=run, train=train_info, meta=meta_info())


def open_run(s: Setup) -> OpenRun | None:
    """Lock the folder, resume, write config.yaml, tokenizer/ and run.json, open the loggers."""
    cfg, main = s.cfg, s.dist.main
    folder = RunFolder(s.out)
    saver = ResumeSaver(resume_every_s(cfg.train), s.dist, s.strategy == "fsdp")
    if saver.sharded and saver.every_s:
        s.notes.append("train.resume_every_min: the timed resume saves of FSDP are synchronous "
                       "(every rank writes its shards), not in the background")
    lock = claim(s, folder)
    if lock is None:
        return None
    progress = resume(s, folder)
    resumed = progress is not None
    progress = progress or {"step": 0, "tokens": 0, "wall_time_s": 0.0, "losses": [],
                            "world": s.dist.world}
    resolved = scrub(OmegaConf.to_container(cfg, resolve=True))
    record = start_record(s)
    if main:
        atomic_write_text(folder.config, OmegaConf.to_yaml(OmegaConf.create(resolved)))
        if not folder.tokenizer.exists():
            s.tokenizer.save_pretrained(folder.tokenizer)
        folder.write_record(record)
    try:
        loggers = make_loggers(cfg, run_dir=s.out, run_name=s.name, stage="train", config=resolved,
                               tags=[cfg.method.name, method_summary(cfg.method), cfg.data.name,
                                     cfg.model.name], metrics_path=folder.metrics,
                               resume_step=progress["step"] if resumed else None
                               ) if main else Loggers([])
    except BaseException:  # run.json never stays "running" after a failed setup
        record.status = "failed"
        if main:
            folder.write_record(record)
        lock.release()
        raise
    return OpenRun(folder, lock, record, loggers, progress, resumed, saver)


def log_heldout(s: Setup, run: OpenRun, step: int) -> float | None:
    t = s.cfg.train
    hl = heldout_loss(s.model, s.data, t, s.tokenizer.pad_token_id, s.device, t.heldout_batches,
                      s.policy)
    if hl is not None:
        run.loggers.log({"step": step, "tokens": run.progress["tokens"], "heldout_loss": hl})
    return hl


def save_budget(s: Setup, run: OpenRun, step: int, step_loss: float) -> None:
    """The budget checkpoint of this step (every rank joins FSDP's gather; rank 0 writes),
    then the resume state unless the run ends here."""
    cfg, plan = s.cfg, s.plan
    label = plan.checkpoints[step]
    hl = log_heldout(s, run, step)
    full = distributed.full_state_dict(s.model) if s.strategy == "fsdp" else None
    manifest = {"label": label, "step": step, "tokens": run.progress["tokens"],
                "epoch": step / plan.steps_per_epoch, "loss": step_loss, "heldout_loss": hl,
                "method": cfg.method.name, "format": checkpoint_format(cfg.method),
                "weights_dtype": s.policy.master, "base_model": s.base_path}
    if s.dist.main:
        save_checkpoint(run.folder.checkpoint(label), s.model, manifest, full)
    del full
    if s.strategy == "fsdp":  # the other ranks wait on the store, not in save_sharded's collectives
        distributed.barrier(s.dist)
    if step < plan.total_steps:  # the last checkpoint ends the run: no state to keep
        run.saver.save(run.folder.resume, s.model, s.optimizer, s.scheduler, run.progress)


def save_branch(s: Setup, run: OpenRun, step: int) -> None:
    """A budget's cooldown branch starts here: its resume state, on the plateau."""
    log_heldout(s, run, step)
    branch = run.folder.branch(s.plan.branch_points[step])
    run.saver.save(branch.resume, s.model, s.optimizer, s.scheduler, run.progress)


def train_loop(s: Setup, run: OpenRun, stop: StopSignals) -> str:
    """Steps from the resumed position to the plan's end, saving each budget's checkpoint;
    returns "finished", or "interrupted" after a stop signal (state saved)."""
    t, d, plan, progress = s.cfg.train, s.dist, s.plan, run.progress
    rank_saves = d.main or s.strategy == "fsdp"  # FSDP: every rank joins gathers and saves
    net = wrap_model(s)
    every = heldout_every(t)  # held-out losses between checkpoints too (early stopping)
    s.model.train()
    start_step = progress["step"]
    if start_step == 0 and t.heldout_batches and rank_saves:
        log_heldout(s, run, 0)  # the start's held-out loss (none logged without held-out data)
    bar = tqdm(total=plan.total_steps, initial=start_step, desc=s.name[:40],
               disable=None if d.main else True, dynamic_ncols=True)
    t_start = time.perf_counter() - progress["wall_time_s"]
    # CPU seconds of the training process (rank 0's under DDP/FSDP; not stolen time, not
    # waits), carried over resumes in the resume state as the wall time is
    cpu_start = time.process_time() - progress.get("cpu_time_s", 0.0)
    for step in range(start_step + 1, plan.total_steps + 1):
        t0 = time.perf_counter()
        lr = s.scheduler.get_last_lr()[0]
        step_loss, step_tokens, grad_norm = train_step(s, net, step)
        dt = time.perf_counter() - t0
        progress["step"], progress["tokens"] = step, progress["tokens"] + step_tokens
        # the data position: sequences read by all ranks (a resume continues at this offset)
        progress["sequences"] = step * t.grad_accum * t.batch_size * d.world
        progress["wall_time_s"] = time.perf_counter() - t_start
        progress["cpu_time_s"] = time.process_time() - cpu_start
        if step % t.log_every == 0 or step in plan.checkpoints:
            run.loggers.log({
                "step": step, "epoch": step / plan.steps_per_epoch, "tokens": progress["tokens"],
                "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": step_tokens / dt, "step_time_s": dt,
                "wall_time_s": progress["wall_time_s"],
                "cpu_time_s": progress["cpu_time_s"],
                "peak_mem_mb": peak_memory_mb(s.device)})
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}")
        if step in plan.checkpoints and rank_saves:
            save_budget(s, run, step, step_loss)
        if step in plan.branch_points and rank_saves:
            save_branch(s, run, step)
        elif every and step % every == 0 and step not in plan.checkpoints and rank_saves:
            log_heldout(s, run, step)
        if step in plan.checkpoints or step in plan.branch_points:
            distributed.barrier(d)
        call_callbacks(s.callbacks, step=step, progress=dict(progress), run_dir=s.out, rank=d.rank)
        save = run.saver.decide(stop.signal, step, plan.total_steps)  # the same on every rank
        if save and save != STOP and rank_saves:  # timed: rank 0's clock said so
            run.saver.timed(run.folder.resume, s.model, s.optimizer, s.scheduler, progress)
        if save == STOP:
            stop.signal = stop.signal or "a stop signal on another rank"
            if rank_saves:
                run.saver.save(run.folder.resume, s.model, s.optimizer, s.scheduler, progress)
            distributed.barrier(d)
            print(f"learnforget: {stop.signal} received at step {step}: state saved, "
                  "rerun the same command to resume")
            bar.close()
            return "interrupted"
    bar.close()
    return "finished"


def finish(s: Setup, run: OpenRun, status: str) -> None:
    """run.json with the status and totals; a finished run drops its resume state; the
    loggers close and the lock is released."""
    progress, record = run.progress, run.record
    try:  # a resume state still being written is on disk before anything below
        run.saver.close()
    except Exception as e:
        print(f"learnforget: warning: the last timed resume save failed: {e}")
    record.status = status
    record.train.steps_done = progress["step"]
    record.train.tokens_seen = progress["tokens"]
    record.train.data_position = progress.get("sequences", 0)
    record.train.wall_time_s = progress["wall_time_s"]
    record.train.cpu_time_s = progress.get("cpu_time_s")
    record.train.peak_mem_mb = peak_memory_mb(s.device)
    record.train.checkpoints = run.folder.checkpoint_labels()
    if status == "finished" and not any(n.startswith("regime:") for n in record.train.notes):
        note = regime_note(s.cfg, s.trainable, tokens=progress["tokens"])  # epoch budgets
        record.train.notes += [note] if note else []
    if s.dist.main:
        run.folder.write_record(record)
        if status == "finished":  # a finished run keeps no resume state
            drop_resume_state(run.folder.resume)
    run.loggers.summary({"status": status, "trainable_params": s.trainable,
                         "total_params": s.total, "tokens_seen": progress["tokens"]})
    run.loggers.finish(status)
    run.lock.release()
    if status == "finished" and s.dist.main:
        print(f"learnforget: {s.name} finished: {progress['step']} steps, "
              f"{progress['tokens']} tokens in {progress['wall_time_s']:.1f}s -> {s.out}")
