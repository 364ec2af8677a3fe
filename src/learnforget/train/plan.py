"""What a run reads and when it saves: its data (in memory or token shards), the plan of
optimizer steps and checkpoints, and the micro-batch of every step (seeded, resumable)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from learnforget.config import cooldown_mode
from learnforget.data.packing import IGNORE_INDEX, TokenizedData, build_data, collate
from learnforget.data.shards import (
    accounting,
    data_format,
    ensure_corpus,
    sequence_blocks,
    shard_data,
)
from learnforget.errors import ConfigError
from learnforget.train import cooldown
from learnforget.train.distributed import Dist


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


def micro_batch_ids(data: TokenizedData, plan: Plan, t: DictConfig, index: int, seed: int,
                    rank: int = 0, world: int = 1) -> list[int]:
    """The training examples of this rank's part of micro-batch number `index` of the whole
    run: a seeded permutation per epoch, so the data position after a resume is exactly where
    the interrupted run was, and `world` ranks together see what one process with `world` x
    batch_size would."""
    if getattr(data, "streamed", False):  # token shards: blocks by position, no epoch array
        return sequence_blocks(index, t.batch_size, rank, world, len(data.train), seed)
    epoch, within = divmod(index, plan.micro_per_epoch)
    start = (within * world + rank) * t.batch_size
    return _epoch_order(len(data.train), seed, epoch)[start:start + t.batch_size].tolist()


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the n training examples in this epoch (kept: every micro-batch of the
    epoch slices it; read only)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def micro_batch(data: TokenizedData, plan: Plan, t: DictConfig, index: int, seed: int,
                pad_id: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """This rank's part of micro-batch number `index`, collated (see micro_batch_ids)."""
    ids = micro_batch_ids(data, plan, t, index, seed, rank, world)
    return collate([data.train[i] for i in ids], pad_id)


def loss_tokens(data: TokenizedData, plan: Plan, t: DictConfig, step: int, seed: int,
                world: int = 1, prepends: bool = False) -> int:
    """The tokens that optimizer step `step` computes a loss on, over all its micro-batches and
    all `world` ranks, without reading a batch: each example's labels other than -100 after
    the causal shift (transformers' ForCausalLMLoss: position j predicts label j + 1, so the
    first label is never a target), or all of them when the method `prepends` virtual tokens
    with label -100 (peft prompt tuning: the first label is then predicted from the last
    virtual token). Token shards are packed blocks whose every label is a target."""
    indices = range((step - 1) * t.grad_accum, step * t.grad_accum)
    if getattr(data, "streamed", False):
        per_block = data.train.seq_len - (0 if prepends else 1)
        return per_block * t.batch_size * world * len(indices)
    counts = _label_counts(data)
    drop = 0 if prepends else 1
    total = 0
    for index in indices:  # every rank's slice of the micro-batch: one span of the order
        epoch, within = divmod(index, plan.micro_per_epoch)
        start = within * world * t.batch_size
        ids = _epoch_order(len(data.train), seed, epoch)[start:start + world * t.batch_size]
        total += int(counts[0][ids].sum()) - drop * int(counts[1][ids].sum())
    return total


def _label_counts(data: TokenizedData) -> tuple[torch.Tensor, torch.Tensor]:
    """Per training example: its labels other than -100, and whether its first label is one
    (computed once, kept on the data object)."""
    cached = data.__dict__.get("_label_counts")
    if cached is None:
        valid = torch.tensor([sum(1 for x in ex.labels if x != IGNORE_INDEX) for ex in data.train],
                             dtype=torch.long)
        first = torch.tensor([int(bool(ex.labels) and ex.labels[0] != IGNORE_INDEX)
                              for ex in data.train], dtype=torch.long)
        cached = data.__dict__["_label_counts"] = (valid, first)
    return cached


def load_data(cfg: DictConfig, tokenizer: Any, d: Dist, cache_dir: Path) -> TokenizedData:
    """The run's data: in memory (data.format=memory), or token shards read by position
    (data.format=shards). A single process prepares missing shards itself; with several ranks
    every rank only reads them (prepared before the process group: `learnforget prepare`, or
    rank 0 in learnforget.assets.inputs.ready_before_ranks), and missing shards are an error."""
    t = cfg.train
    if data_format(cfg.data) == "shards":
        folder = ensure_corpus(cfg.data, cfg.model, tokenizer, cache_dir, prepare=d.world <= 1)
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


