"""One optimizer step: grad_accum micro-batches, one gradient reduction over the ranks, the
optimizer and schedule step.

- Gradient sync once per optimizer step (train.distributed.grad_sync=step, the default for
  DDP): DDP's `no_sync()` and FSDP2's `set_requires_gradient_sync(False)` for every
  micro-batch but the last, so the ranks reduce gradients once per step instead of once per
  micro-batch. FSDP defaults to a reduce-scatter per micro-batch (grad_sync=auto): without it
  FSDP2 keeps every layer's unsharded fp32 gradient until the last micro-batch.
- Loss normalisation (train.loss_norm=tokens): a step's loss is the sum of its token losses
  over all micro-batches and all ranks divided by the step's loss tokens over all ranks, as
  llm-foundry (`accumulate_train_batch_on_tokens`) and transformers' Trainer
  (`num_items_in_batch`) do. The count is known before the backward passes (the micro-batches
  are deterministic: train.plan.loss_tokens), and the model divides its summed loss by it
  (transformers' `num_items_in_batch`). DDP and FSDP average gradients over the ranks, so each
  rank scales its part by the world size. `micro_batch_mean` is the normalisation before
  2026-12: the mean over micro-batches (and ranks) of each micro-batch's mean, exact for packed
  CPT, but IFT tokens then weigh by how the batch is cut.
- Dropout RNG per rank: with several ranks the training RNG is reseeded at every step from
  (seed, step, rank), so ranks draw different dropout masks and a resume continues exactly
  (model and adapter init stay identical on every rank: they are seeded in setup). One
  process keeps one stream from the seed (its state is in the resume file), as before.
- The step's logged scalars (loss, tokens) are summed over the ranks in one all-reduce.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from learnforget.config import GRAD_SYNCS, LOSS_NORMS
from learnforget.errors import ConfigError
from learnforget.train.lm_loss import chunked_loss
from learnforget.train.plan import loss_tokens, micro_batch
from learnforget.train.speed import loss_chunk

# `s` below is the run's learnforget.train.loop.Setup (not imported: loop imports this module)
Setup = Any

def loss_norm(t: DictConfig) -> str:
    """train.loss_norm, checked."""
    value = t.get("loss_norm", "tokens")
    if value not in LOSS_NORMS:
        raise ConfigError(f"train.loss_norm {value!r} is unknown (expected one of: "
                          f"{', '.join(LOSS_NORMS)})")
    return str(value)


def grad_sync(t: DictConfig, strategy: str | None) -> str:
    """train.distributed.grad_sync for this strategy: step or micro_batch. auto: step for DDP
    (every rank holds whole gradients anyway), micro_batch for FSDP (gradients stay sharded;
    step would hold every unsharded fp32 gradient between micro-batches: 4 bytes per
    trainable parameter per rank, 25 GiB for a 7B model)."""
    value = (t.get("distributed") or {}).get("grad_sync", "auto")
    if value not in GRAD_SYNCS:
        raise ConfigError(f"train.distributed.grad_sync {value!r} is unknown (expected one of: "
                          f"{', '.join(GRAD_SYNCS)})")
    if value == "auto":
        return "micro_batch" if strategy == "fsdp" else "step"
    return str(value)


def prepends_virtual_tokens(model: torch.nn.Module) -> bool:
    """True for peft prompt learning that prepends virtual tokens with label -100 to the input
    (prompt tuning, p-tuning); prefix tuning feeds its prefix through the KV cache instead."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return False
    return str(getattr(config.peft_type, "value", config.peft_type)) not in ("PREFIX_TUNING",
                                                                             "CARTRIDGE")


def rank_seed(seed: int, step: int, rank: int) -> int:
    """The training RNG's seed for `rank` at optimizer step `step` (numpy's SeedSequence
    hash: distinct streams per rank and step, the same on every rerun)."""
    return int(np.random.SeedSequence([seed & (2**64 - 1), step, rank])
               .generate_state(1, dtype=np.uint64)[0])


def step_notes(cfg: DictConfig, world: int, strategy: str | None) -> list[str]:
    """What run.json's train notes say about the loss, the gradient sync and the seeds."""
    t = cfg.train
    norm = loss_norm(t)
    if norm == "tokens":
        notes = ["loss: the sum of token losses over the step's micro-batches and ranks / the "
                 "step's loss tokens (train.loss_norm=tokens, as llm-foundry and transformers' "
                 "num_items_in_batch; runs before 2026-12 averaged per-micro-batch means, "
                 "train.loss_norm=micro_batch_mean)"]
    else:
        notes = ["loss: the mean of per-micro-batch means (train.loss_norm=micro_batch_mean, the "
                 "normalisation before 2026-12): IFT tokens weigh by how the batch is cut "
                 "(train.loss_norm=tokens weighs every loss token equally)"]
    if world > 1:
        sync, asked = grad_sync(t, strategy), (t.get("distributed") or {}).get("grad_sync", "auto")
        notes.append(f"gradients reduced over the ranks once per optimizer step "
                     f"(train.distributed.grad_sync={asked})" if sync == "step" else
                     f"gradients reduced over the ranks after every micro-batch "
                     f"(train.distributed.grad_sync={asked}: {t.grad_accum} per step"
                     + (", fsdp keeps gradients sharded; step would hold them unsharded)"
                        if strategy == "fsdp" else ")"))
        if sync == "step" and strategy == "fsdp" and t.grad_accum > 1:
            notes.append("fsdp with grad_sync=step: each rank holds unsharded fp32 gradients "
                         "between micro-batches (4 bytes per trainable parameter)")
        notes.append("dropout RNG reseeded at every step per rank from (seed, step, rank); "
                     "model and adapter init identical on every rank")
    return notes


def legacy_note(cfg: DictConfig) -> str | None:
    """For an IFT run with train.loss_norm=tokens whose folder from before 2026-12 (trained with
    micro-batch means, named without loss_norm) exists: a line saying where it is and how to
    continue it. Such folders are never reused with the new normalisation."""
    from omegaconf import OmegaConf

    from learnforget.config import run_dir

    if cfg.get("run_name") or loss_norm(cfg.train) != "tokens":
        return None
    old = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    old.train.loss_norm = "micro_batch_mean"
    folder = run_dir(old)
    if folder == run_dir(cfg) or not folder.exists():
        return None
    return (f"{folder.name} (the same run with the loss normalisation before 2026-12, "
            f"micro-batch means) is left as it is; this run normalises by loss tokens. Add "
            f"train.loss_norm=micro_batch_mean to continue that one")


def wrap_model(s: Setup) -> torch.nn.Module:
    """What the loop calls: DDP around the model on several ranks (FSDP: already sharded)."""
    if s.dist.world <= 1 or s.strategy == "fsdp":
        return s.model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(s.model, device_ids=[torch.device(s.device).index]
                                   if s.device.startswith("cuda") else None)


@contextmanager
def _gradient_sync(s: Setup, net: torch.nn.Module, sync: bool):
    """Reduce gradients over the ranks in this backward pass or only accumulate them locally."""
    if s.strategy == "fsdp":
        s.model.set_requires_gradient_sync(sync)
        yield
    elif not sync and isinstance(net, torch.nn.parallel.DistributedDataParallel):
        with net.no_sync():
            yield
    else:
        yield


def _sum_over_ranks(values: list[torch.Tensor | float], d, device: str) -> list[float]:
    """The values summed over the ranks in one all-reduce (float64)."""
    out = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values])
    if d.world > 1:
        torch.distributed.all_reduce(out)
    return out.tolist()


def train_step(s: Setup, net: torch.nn.Module, step: int) -> tuple[float, int, float]:
    """One optimizer step over grad_accum micro-batches: (the step's loss over all ranks,
    tokens of all ranks, gradient norm before clipping)."""
    t, d = s.cfg.train, s.dist
    by_tokens = loss_norm(t) == "tokens"
    once = grad_sync(t, s.strategy) == "step"
    scale: dict[str, Any] = {}
    if by_tokens:  # the model sums its token losses and divides by n / world (see module doc)
        n = loss_tokens(s.data, s.plan, t, step, s.cfg.seed, d.world,
                        prepends_virtual_tokens(s.model))
        if n == 0:
            raise ConfigError(f"optimizer step {step} has no token to compute a loss on (every "
                              "label is -100): check the data's prompt/response fields")
        scale["num_items_in_batch"] = n / d.world
    if d.world > 1:  # per-rank dropout masks (see module doc)
        torch.manual_seed(rank_seed(s.cfg.seed, step, d.rank))
    chunk = loss_chunk(t, s.model, d.world)[0]  # train.speed.loss_chunk (learnforget.train.speed)
    step_loss = torch.zeros((), dtype=torch.float64, device=s.device)
    step_tokens = 0
    for k in range(t.grad_accum):
        index = (step - 1) * t.grad_accum + k
        batch = micro_batch(s.data, s.plan, t, index, s.cfg.seed, s.tokenizer.pad_token_id,
                            d.rank, d.world)
        step_tokens += int(batch["attention_mask"].sum())
        batch = {key: v.to(s.device) for key, v in batch.items()}
        sync = not once or k == t.grad_accum - 1
        with _gradient_sync(s, net, sync) if d.world > 1 else nullcontext():
            with s.policy.autocast(s.device):
                loss = (chunked_loss(s.model, batch, chunk, **scale) if chunk
                        else net(**batch, **scale).loss)
            if not by_tokens:
                loss = loss / t.grad_accum
            loss.backward()
        step_loss += loss.detach().to(torch.float64)
    grad_norm = torch.nn.utils.clip_grad_norm_(s.params, t.grad_clip or float("inf"))
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    total_loss, total_tokens = _sum_over_ranks([step_loss, float(step_tokens)], d, s.device)
    # tokens: each rank's loss is its token-loss sum / (n / world); micro-batch means: a mean
    # over ranks
    return total_loss / d.world, int(total_tokens), float(grad_norm)
