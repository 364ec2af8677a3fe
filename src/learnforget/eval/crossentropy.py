"""Token-weighted mean cross-entropy of a causal LM on fixed examples (held-out loss)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from learnforget.data.packing import Example, collate


@torch.no_grad()
def mean_cross_entropy(model: torch.nn.Module, examples: Sequence[Example], *, batch_size: int,
                       pad_id: int, device: str | torch.device = "cpu") -> tuple[float, int]:
    """(mean CE in nats over every predicted label token, number of such tokens), the loss in
    fp32 (the model in its own dtype), in eval mode; the model's training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for b in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(list(examples[b:b + batch_size]),
                                                          pad_id).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            total += float(model(**batch).loss) * n
            count += n
    finally:
        model.train(was_training)
    return (total / count if count else float("nan")), count


@torch.no_grad()
def block_cross_entropy(model: torch.nn.Module, examples: Sequence[Example], *, pad_id: int,
                        device: str | torch.device = "cpu") -> tuple[list[float], list[int]]:
    """Per example (held-out block): its mean CE in nats over its predicted label tokens and
    that token count, one example per forward (the model's own loss, as mean_cross_entropy).
    The token-weighted mean of the blocks is mean_cross_entropy's value; per-block values let a
    comparison of two checkpoints on the same blocks be paired (bootstrap over blocks). A block
    without a label token (an IFT example whose answer was cut off) gets CE 0 with count 0, so
    it weighs nothing in any token-weighted mean."""
    ces: list[float] = []
    counts: list[int] = []
    for ex in examples:
        ce, n = mean_cross_entropy(model, [ex], batch_size=1, pad_id=pad_id, device=device)
        ces.append(ce if n else 0.0)
        counts.append(n)
    return ces, counts
