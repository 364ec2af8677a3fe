"""Data-driven LoRA initialisations through peft, calibrated on the run's own training data.

    method.init=eva     EVA (Paischer et al. 2024): A = the top-r principal directions of each
                        layer's input activations (peft initialize_lora_eva_weights: an
                        incremental PCA over the batches until they converge), B = 0.
                        The base is unchanged and ΔW = s B A is plain LoRA. rho is pinned to 1
                        (no rank redistribution), so every layer keeps rank r and the counts are
                        plain LoRA's.
    method.init=corda   CorDA (Yang et al. 2024), peft's default IPM mode: the SVD of W C (C the
                        covariance of the layer's inputs, peft preprocess_corda) gives B0 A0, and
                        the base becomes W_res = W - s B0 A0, as with PiSSA: checkpoints are
                        converted to rank-2r LoRA adapters on the original base
                        (learnforget.methods.lora_variants), so ΔW = W_ft - W_original.

The calibration data are the first `method.calibration_batches` micro-batches of the run's own
training stream, read as one process reads them (rank 0 of 1: the same sequences on every
rank, so every rank computes the same initial factors), i.e. the first N x train.batch_size
training sequences of the run's seeded order, the sequences its first steps train on. EVA reads
them as batches (padding and, for instruction data, prompt tokens masked: peft's
use_label_mask); CorDA runs them one sequence at a time without padding (its covariance hook
expects a batch of one). Both are deterministic given the run's data and seed; a resumed run
re-runs the initialisation on the original base and then restores B, A, so B0 A0 are the first
session's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from learnforget.errors import ConfigError

if TYPE_CHECKING:  # method validation (learnforget.methods.registry) imports this without torch
    import torch

CALIBRATED = ("eva", "corda")
DEFAULT_CALIBRATION_BATCHES = 8
# micro-batch number i (0-based) of the training stream, as one process reads it
BatchSource = Callable[[int], "dict[str, torch.Tensor]"]


def is_calibrated(init: Any) -> bool:
    return str(init) in CALIBRATED


def validate_calibration(init: Any, n: Any) -> None:
    if is_calibrated(init) and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
        raise ConfigError(f"method.calibration_batches must be a positive integer (the training "
                          f"micro-batches method.init={init} is calibrated on), got {n!r}")


def calibrated_arguments(init: Any, peft_args: dict[str, Any]) -> dict[str, Any]:
    """The sub-config of a calibrated init, completed from the LoraConfig arguments (a user's
    method.peft.eva_config / corda_config kept): EVA with rho = 1 (exact counts), CorDA in
    peft's default IPM mode unless corda_method says otherwise."""
    if str(init) == "corda":
        return {"corda_config": {"corda_method": "ipm", **(peft_args.get("corda_config") or {})}}
    if str(init) != "eva":
        return {}
    eva = dict(peft_args.get("eva_config") or {})
    if float(eva.get("rho", 1.0)) != 1.0:
        raise ConfigError(f"method.peft.eva_config.rho={eva['rho']}: method.init=eva pins rho=1 "
                          "(no rank redistribution, so every layer keeps rank method.r; "
                          "expected 1.0)")
    return {"eva_config": {**eva, "rho": 1.0}}


def calibration_batches(batch: BatchSource, n: int, device: torch.device | str
                        ) -> list[dict[str, torch.Tensor]]:
    """The first n micro-batches of the training stream, on the model's device."""
    return [{k: v.to(device) for k, v in batch(i).items()} for i in range(n)]


def prepare_corda(model: torch.nn.Module, config, batches: list[dict[str, torch.Tensor]]) -> None:
    """peft.preprocess_corda on the base model (before get_peft_model): each calibration
    sequence alone, its padding removed."""
    from peft.tuners.lora.corda import preprocess_corda

    def run_model() -> None:
        for b in batches:
            for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True):
                model(input_ids=ids[mask.bool()].unsqueeze(0))

    training = model.training
    preprocess_corda(model, config, run_model=run_model)
    model.train(training)


def initialise_eva(wrapped: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    """peft.initialize_lora_eva_weights over the calibration batches (each rank the same
    batches: no gathering across ranks)."""
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    initialize_lora_eva_weights(wrapped, dataloader=batches, gather_distributed_inputs=False,
                                show_progress_bar=False)


def calibration_note(init: Any, n: int, batch_size: int) -> str:
    return (f"method.init={init}: calibrated on the run's own training data, the first {n} "
            f"micro-batches of its stream ({n} x {batch_size} sequences, the order of rank 0 of 1)")
