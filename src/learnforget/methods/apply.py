"""Applying a method to a model: `apply_method` asks the method's object (the Method protocol,
learnforget.methods.base); the torch helpers it uses are in learnforget.methods.wrapping."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel

from learnforget.methods.base import ApplyContext
from learnforget.methods.calibrated_init import BatchSource
from learnforget.methods.registry import method_of
from learnforget.methods.wrapping import changes_weights, count_parameters

__all__ = ["apply_method", "changes_weights", "count_parameters"]


def apply_method(
    model: PreTrainedModel,
    cfg: DictConfig,
    *,
    model_name: str = "",
    tokenizer_path: str | None = None,
    calibration: BatchSource | None = None,
) -> tuple[torch.nn.Module, list[str]]:
    """Freeze/wrap the model for the method. Returns the model to train and notes for run.json.
    `calibration` gives the training stream's micro-batches (method.init=eva, corda)."""
    method = method_of(cfg)
    method.validate(cfg)
    notes = [f"method.{k} is ignored by method={cfg.name}" for k in method.ignored(cfg)
             if k in ("r", "alpha", "targets", "top_k", "num_virtual_tokens")]
    ctx = ApplyContext(model_name, tokenizer_path, calibration, notes)
    return method.apply(model, cfg, ctx), ctx.notes
