"""The one place that uses private library APIs; test_private_api.py checks each still works.

- submitit has no public way to get the sbatch script of a submission without submitting it,
  which the pre-flight check (`sbatch --test-only`) needs so that SLURM judges exactly what
  submitit would send.
- nor to name the signal its SLURM handler requeues a job on (`JobEnvironment._usr_sig`),
  which a job that caught that signal itself re-raises after saving its state.
- torch's MemTracker (`torch.distributed._tools`, the only tracker of peak memory by kind on
  CPU) hooks every parameter's gradient and refuses frozen ones, which must be marked as
  done through its private hook table (`learnforget bench memory`).
- peft's LoftQ runs only on CUDA through its public `LoftQConfig`; the CPU path
  (`methods/loftq.py`) reuses its two building blocks from `peft.utils.loftq_utils`: the SVD
  step (`_low_rank_decomposition`) and the reader of base weights by module name
  (`_SafetensorLoader`).
"""

from __future__ import annotations

from typing import Any


def submission_script(executor: Any, n_jobs: int) -> str:
    """The sbatch script a submitit SLURM AutoExecutor would submit for `n_jobs` jobs (one job
    array when n_jobs > 1)."""
    slurm = executor._executor  # AutoExecutor -> its SlurmExecutor
    if n_jobs > 1:  # submitit submits several jobs as one array
        slurm.parameters["map_count"] = n_jobs
    return slurm._make_submission_file_text("true", "preflight")


def requeue_signal() -> int:
    """The signal submitit's SLURM job handler requeues (and resumes) a job on."""
    from submitit import JobEnvironment

    return int(JobEnvironment._usr_sig())


class _NoHook:
    def remove(self) -> None:
        pass


def memory_tracker(model: Any, optimizer: Any) -> Any:
    """A torch MemTracker following `model` and `optimizer`, frozen parameters included."""
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    mt.track_external(model, optimizer)
    for param in model.parameters():  # MemTracker hooks every parameter's gradient, and torch
        if not param.requires_grad:   # refuses hooks on frozen ones: mark those as done
            mt._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
    return mt


def low_rank_decomposition(w: Any, rank: int) -> tuple[Any, Any]:
    """peft's LoftQ SVD step: (L, R), out x rank and rank x in, with L @ R the best rank-`rank`
    approximation of w (the singular values split as their square roots between the two)."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    out = _low_rank_decomposition(w, reduced_rank=rank)
    return out["L"], out["R"]


def safetensor_loader(model: Any, folder: str) -> Any:
    """peft's LoftQ reader of a peft `model`'s base weights from the safetensors in `folder`:
    `.get_tensor("model.layers.0.self_attn.q_proj.weight")`."""
    from peft.utils.loftq_utils import _SafetensorLoader

    return _SafetensorLoader(model, folder)
