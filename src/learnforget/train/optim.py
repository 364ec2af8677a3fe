"""Optimizers and learning-rate schedules named in `train/` configs."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from omegaconf import DictConfig
from torch.optim.lr_scheduler import LambdaLR

from learnforget.errors import ConfigError


class DecoupledLionW(torch.optim.Optimizer):
    """Lion (Chen et al. 2023) with weight decay decoupled from the learning rate.

    As in MosaicML Composer's DecoupledLionW, which the paper used: the decay applied at each
    step is weight_decay * (lr / initial_lr), so it follows the schedule's shape but not the
    size of the learning rate.
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas=(0.9, 0.99),
                 weight_decay: float = 0.0):
        if lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if wd:
                    p.mul_(1 - wd * lr / group["initial_lr"])
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                update = m.mul(b1).add_(p.grad, alpha=1 - b1).sign_()
                p.add_(update, alpha=-lr)
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        return loss


def make_optimizer(params: list[torch.nn.Parameter], t: DictConfig,
                   device: str) -> tuple[torch.optim.Optimizer, list[str]]:
    """The optimizer for `train.optimizer`, with notes on any fallback taken."""
    notes: list[str] = []
    name = t.optimizer
    betas = tuple(t.betas)
    if name.startswith("paged_") and not device.startswith("cuda"):
        fallback = name.removeprefix("paged_")
        notes.append(f"train.optimizer={name} needs CUDA (paged memory); used {fallback} on {device}")
        name = fallback
    if name == "adamw":  # train.speed.optimizer_impl: fused, foreach or torch's for-loop
        from learnforget.train.speed import adamw_kwargs, settings

        impl, impl_notes = adamw_kwargs(settings(t)["optimizer_impl"], params)
        args = {"lr": t.lr, "betas": betas, "eps": t.eps, "weight_decay": t.weight_decay}
        try:
            return torch.optim.AdamW(params, **args, **impl), notes + impl_notes
        except RuntimeError as e:  # no fused kernel for this device or dtype
            if not impl.get("fused"):
                raise
            reason = str(e).splitlines()[0]
            return torch.optim.AdamW(params, **args), notes + [
                f"train.speed.optimizer_impl=fused: torch refused it ({reason}); torch's "
                "default AdamW implementation used"]
    if name == "lionw":
        return DecoupledLionW(params, lr=t.lr, betas=betas, weight_decay=t.weight_decay), notes
    import bitsandbytes as bnb

    if name == "lion":
        return bnb.optim.Lion(params, lr=t.lr, betas=betas, weight_decay=t.weight_decay), notes
    if name == "adamw8bit":
        return bnb.optim.AdamW8bit(params, lr=t.lr, betas=betas, eps=t.eps,
                                   weight_decay=t.weight_decay), notes
    if name == "paged_adamw":
        return bnb.optim.PagedAdamW(params, lr=t.lr, betas=betas, eps=t.eps,
                                    weight_decay=t.weight_decay), notes
    if name == "paged_adamw8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=t.lr, betas=betas, eps=t.eps,
                                        weight_decay=t.weight_decay), notes
    if name == "paged_lion":
        return bnb.optim.PagedLion(params, lr=t.lr, betas=betas,
                                   weight_decay=t.weight_decay), notes
    raise ConfigError(f"train.optimizer {name!r} is unknown")


def lr_factor(schedule: str, step: int, total: int, warmup: int, min_ratio: float,
              cooldown_ratio: float) -> float:
    """The learning-rate multiplier after `step` optimizer steps (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "inverse_sqrt":
        factor = math.sqrt(max(1, warmup) / max(step, max(1, warmup)))
        cooldown = int(round(cooldown_ratio * total))
        start = total - cooldown
        if cooldown > 0 and step >= start:  # linear to 0 over the last share of the run
            factor *= max(0.0, (total - step) / cooldown)
        return factor
    raise ConfigError(f"train.schedule {schedule!r} is unknown")


def make_scheduler(optimizer: torch.optim.Optimizer, t: DictConfig, total_steps: int) -> LambdaLR:
    warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_ratio * total_steps)
    return LambdaLR(optimizer, lambda s: lr_factor(t.schedule, s, total_steps, warmup,
                                                   t.min_lr_ratio, t.cooldown_ratio))
