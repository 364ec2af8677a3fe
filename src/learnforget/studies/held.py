"""The dry run's job layout and GPU-hours as held: which jobs a launch submits (preparation on
a CPU, training with the profile's GPUs, eval/spectra on one GPU each), what they hold, and
whether the eval batch fits one GPU.

GPU-hours held per job = training wall-hours x GPUs of the training profile (= tokens at
tokens_per_gpu_s per GPU) + evaluation hours x 1 GPU (on SLURM eval and spectra run as their
own 1-GPU jobs; with basic/submitit_local everything runs in one process on one device).

Eval batch memory on one GPU (an estimate, bytes; B = eval.batch_size, L = the model's
max_position_embeddings (lm-eval's max_length), b = bytes of the scoring dtype (eval.precision;
`model`: model.dtype), P parameters, V vocabulary, H hidden size, I intermediate size, N layers):

    P x b  +  B x L x V x 4 x 2      (fp32 logits and their log-softmax)
           +  B x L x N x 2 x H x b  (the KV cache of the forward / generation)
           +  B x L x (4H + 2I) x b  (one layer's transient activations; sdpa attention, no L x L)

It fits below HEADROOM (90%) of the profile's gpu_mem_gb.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from learnforget.studies.cost import split_hours
from learnforget.studies.plan import Plan, shown_path

HEADROOM = 0.90
GIB = 2**30
EVAL_STAGES = ("eval", "spectra")
BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2}


def profile_gpus(profile: dict[str, Any]) -> int:
    """GPUs one training job holds: nodes x gpus_per_node (1 where the profile names none)."""
    gpus = profile.get("gpus_per_node")
    return int(profile.get("nodes") or 1) * (int(gpus) if isinstance(gpus, int) and gpus > 0 else 1)


def _param_count(model_cfg: DictConfig) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from learnforget.assets.models import build_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_config(model_cfg))
    return sum(p.numel() for p in model.parameters())


def eval_batch_bytes(cfg: DictConfig, batch: int, params: int) -> tuple[float, float, int]:
    """(fixed bytes, bytes per item of the batch, L) of scoring on one GPU (module docstring)."""
    arch = cfg.model.arch
    prec = str(cfg.eval.get("precision", "model"))
    b = BYTES.get(str(cfg.model.dtype) if prec == "model" else prec, 4)
    length = int(arch.get("max_position_embeddings") or 2048)
    h, inter = int(arch.hidden_size), int(arch.get("intermediate_size") or 4 * arch.hidden_size)
    per_item = length * (int(arch.vocab_size) * 4 * 2 + int(arch.num_hidden_layers) * 2 * h * b
                         + (4 * h + 2 * inter) * b)
    return params * b, per_item, length


def eval_fit_lines(plan: Plan, gpu_mem_gb: float | None) -> list[str]:
    """One line per distinct (model, eval.batch_size, precision): the estimate against one GPU."""
    lines, seen = [], set()
    for job in plan.jobs:
        c = job.cfg
        key = (str(c.model.name), int(c.eval.batch_size), str(c.eval.get("precision", "model")))
        if key in seen or not c.model.get("arch"):
            continue
        seen.add(key)
        fixed, per_item, length = eval_batch_bytes(c, key[1], _param_count(c.model))
        need = fixed + key[1] * per_item
        what = (f"eval batch: model={key[0]} eval.batch_size={key[1]} (precision {key[2]}, L={length}):"
                f" ~{need / GIB:.1f} GiB on one GPU")
        if gpu_mem_gb is None:
            lines.append(f"{what}; the profile has no gpu_mem_gb: not checked")
            continue
        limit = HEADROOM * gpu_mem_gb * GIB
        most = max(0, math.floor((limit - fixed) / per_item))
        verdict = "fits" if need <= limit else "does NOT fit"
        lines.append(f"{what} -> {verdict} below {HEADROOM:.0%} of {gpu_mem_gb:g} GB "
                     f"(largest batch that fits: {most})")
    if lines:
        lines.append("  (estimate, bytes: P x b + B x L x (V x 4 x 2 + N x 2 x H x b + (4H + 2I) x b):"
                     " weights in the scoring dtype b, fp32 logits and log-softmax, the KV cache, "
                     "one layer's activations; B eval.batch_size, L max_position_embeddings)")
    return lines


def print_held(plan: Plan, launcher: str, cluster: str | None) -> None:
    """The jobs a launch submits and the GPU-hours they hold (module docstring)."""
    from learnforget.studies.cluster import load_cluster_profile, stage_profile
    from learnforget.studies.job import job_stages
    from learnforget.studies.prepare import distinct_inputs

    todo = plan.todo()
    jobs = todo or plan.jobs
    if not jobs:
        return
    from learnforget.assets.inputs import is_ready

    inputs = distinct_inputs([j.cfg for j in jobs])
    state = ", ".join(f"{i.label} [{'ready' if is_ready(i) else 'to prepare'}]" for i in inputs)
    stages = [job_stages(j.cfg) for j in jobs]
    has_eval = any(set(s) & set(EVAL_STAGES) for s in stages)
    print("\njobs of the launch (" + ("the jobs not done" if todo else "all jobs; none to do")
          + "):")
    slurm = launcher == "submitit_slurm" and cluster is not None
    if slurm:
        profile = load_cluster_profile(cluster)
        gpus = profile_gpus(profile)
        ev = stage_profile(cluster, "eval")
        pr = stage_profile(cluster, "prepare")
        print(f"  1. preparation: 1 CPU job, no GPU (mem_gb={pr.get('mem_gb')}, cpus_per_task="
              f"{pr.get('cpus_per_task')}): {state}; only when something is to prepare")
        n_train = sum(j.next_stage == "train" for j in jobs) if todo else len(jobs)
        print(f"  2. training: an array of {n_train} task(s), each {int(profile.get('nodes') or 1)} "
              f"node(s) x {gpus} GPU(s) ({shown_path(Path(cluster))}), stages=[train]; "
              "--dependency=afterok:<preparation>")
        if has_eval:
            print(f"  3. eval/spectra: an array of {len(jobs)} task(s), each 1 node x "
                  f"{1 if ev.get('gpus_per_node') else 0} GPU (mem_gb={ev.get('mem_gb')}), "
                  f"stages=[{','.join(s for s in EVAL_STAGES if any(s in st for st in stages))}]; "
                  "--dependency=aftercorr:<training array> (task i after training task i)")
    else:
        gpus, ev = 1, {"gpu_mem_gb": None}
        print(f"  preparation in this process first ({state}), then every job's stages in one "
              f"process each ({launcher}), on one device")
    cost = plan.study.cost
    if cost is None:
        print("GPU-hours held: no estimate in the study")
    else:
        train_h = eval_h = 0.0
        for j in jobs:
            t, e = split_hours(cost, j.cfg)
            train_h += t
            eval_h += e
        print(f"GPU-hours held ({len(jobs)} job(s)): training {train_h:,.1f} (the jobs' "
              f"{train_h / gpus:,.1f} wall-hours x {gpus} GPU(s) each) + eval/spectra "
              f"{eval_h:,.1f} (x 1 GPU) = {train_h + eval_h:,.1f}")
        if slurm and gpus > 1 and eval_h:
            print(f"  (eval inside the {gpus}-GPU training job would hold {gpus} x {eval_h:,.1f} = "
                  f"{gpus * eval_h:,.1f} GPU-hours for it, {gpus - 1} GPU(s) idle)")
    if has_eval:
        for line in eval_fit_lines(plan, ev.get("gpu_mem_gb")):
            print(line)
