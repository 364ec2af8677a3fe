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
