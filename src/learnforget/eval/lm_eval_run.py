"""Evaluating a model on a task folder with lm-eval's public API, offline where the tasks allow.

`evaluate` refuses, before any model work, kind builtin tasks when HF_HUB_OFFLINE or
HF_DATASETS_OFFLINE is set (`require_hub`). Result metric names: lm-eval reports
`"<metric>,<filter>"`; `evaluate` returns clean keys: `<metric>` for filter "none" (and
"create_test", the sampled HumanEval's), `<metric>_strict` for "strict-match",
`<metric>_flexible` for "flexible-extract", else `<metric>_<filter>` (non-alphanumerics → "_").
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from learnforget.errors import ConfigError
from learnforget.eval.task_specs import (
    BUILTIN,
    DEFAULT_BOOTSTRAP_ITERS,
    LMEVAL_PRIMARY,
    TaskSpec,
    base_kind,
    chance_level,
    clean_metric_key,
    lm_eval_version,
    primary_metric,
    require_hub,
    validate_specs,
)
from learnforget.eval.task_yaml import task_config_hash
from learnforget.eval.tasks import humaneval_utils


@contextlib.contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


@contextlib.contextmanager
def _lm_batch_size(lm: Any, batch_size: int | None) -> Iterator[None]:
    """lm-eval ignores simple_evaluate's batch_size for an already built LM: set the HFLM's."""
    if batch_size is None or not hasattr(lm, "batch_size_per_gpu"):
        yield
        return
    old = lm.batch_size_per_gpu
    lm.batch_size_per_gpu = int(batch_size)
    try:
        yield
    finally:
        lm.batch_size_per_gpu = old


def _seed(seed: int) -> None:
    """simple_evaluate's seeds: python's random, numpy's and torch's."""
    import random

    import numpy as np
    from lm_eval.utils import set_torch_seed

    random.seed(seed)
    np.random.seed(seed)
    set_torch_seed(seed)


def _load_tasks(include_path: Path, names: list[str]) -> dict:
    """lm-eval's task objects (TaskManager.load), with simple_evaluate's config defaults:
    num_fewshot 0 where a task sets none."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(include_path), include_defaults=False)
    loaded = tm.load(names)
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
    return loaded


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" where no stderr could be computed


def evaluate(
    lm: Any,
    specs: list[TaskSpec],
    include_path: Path,
    *,
    limit: int | None = None,
    batch_size: int | None = 8,
    seed: int = 1234,
    log_samples: bool = False,
    code_exec_allowed: bool = False,
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
    samples: dict[str, list[int]] | None = None,
    items: bool = False,
    task_cache: dict | None = None,
) -> dict[str, dict]:
    """Evaluate `lm` (an lm-eval LM, e.g. HFLM) on the tasks of `specs` written into
    `include_path` by write_task_dir, in one lm-eval evaluation: the steps of
    `lm_eval.simple_evaluate` (seeds, TaskManager.load, 0-shot default, fewshot seed,
    `lm_eval.evaluator.evaluate`) without its environment report.

    Returns {task name: {"metrics", "stderr" (clean metric keys; stderr None where lm-eval has
    none), "n" (documents evaluated), "primary_metric", "primary", "chance", "role", "kind",
    "num_fewshot", "config_hash", "lm_eval_version"} (+ "samples" with log_samples; a sampled
    humaneval task with `diversity` set: + "generations" and "diversity",
    learnforget.eval.diversity)}.
    `samples` ({task name: document indices}, lm-eval's own `samples=`) scores fixed subsets
    (not together with `limit`); `items` adds "items", the per-item results from lm-eval's
    per-sample log (learnforget.eval.paired.item_records), and "subset" (the indices or None).
    `batch_size` (None: the LM's own) is set on the HFLM for the call. Running model-written
    code (humaneval) needs `code_exec_allowed=True`, and builtin tasks need the Hugging Face
    hub (`require_hub`); otherwise a ConfigError is raised before anything runs.
    `task_cache`: a dict kept across calls (one eval stage: the base and every checkpoint)
    holding the loaded task objects (data, process_docs), built once per task folder and task
    configs; each call rebuilds the tasks' requests (lm-eval's build_all_requests) and reseeds,
    so the numbers are those of a fresh load."""
    import lm_eval.evaluator

    validate_specs(specs)
    for spec in specs:
        if spec.kind == BUILTIN:
            require_hub(spec.name)
    include_path = Path(include_path)
    for spec in specs:
        if not (include_path / f"{spec.name}.yaml").is_file():
            raise ConfigError(f"task {spec.name!r}: no task file in {include_path} "
                              "(write it with write_task_dir first)")
    if any(s.kind == "humaneval" for s in specs):
        from learnforget.eval.sandbox import require_opt_in

        require_opt_in(code_exec_allowed)
    hashes = {s.name: task_config_hash(include_path, s.name) for s in specs}
    names = [s.name for s in specs]
    cache_key = (str(include_path), tuple(names), tuple(hashes[n] for n in names))
    loaded = None if task_cache is None else task_cache.get(cache_key)
    keep = any(s.diversity for s in specs)  # the completions, for learnforget.eval.diversity
    with _env(humaneval_utils.ENV_ALLOW, "1" if code_exec_allowed else "0"), \
            _lm_batch_size(lm, batch_size), humaneval_utils.remembered_results():
        _seed(seed)
        if loaded is None:
            loaded = _load_tasks(include_path, names)
            if task_cache is not None:
                task_cache[cache_key] = loaded
            _seed(seed)
        for task in loaded["tasks"].values():
            task.set_fewshot_seed(seed=seed)
        out = lm_eval.evaluator.evaluate(
            lm=lm,
            task_dict=loaded,
            limit=limit,
            samples=samples or None,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples or items or keep,
            confirm_run_unsafe_code=code_exec_allowed,
        )
        if out is not None:
            diversity = {s.name: _diversity(out, s) for s in specs if s.diversity}
    if out is None:  # non-zero rank of a distributed run
        return {}
    results = {s.name: _task_result(out, s, hashes[s.name], log_samples) for s in specs}
    if items:
        for s in specs:
            results[s.name]["items"] = _items(out, s)
            results[s.name]["subset"] = (samples or {}).get(s.name)
    for name, (generations, counts) in diversity.items():
        results[name]["generations"] = generations
        results[name]["diversity"] = counts
    return results


def _diversity(out: dict, spec: TaskSpec) -> tuple[list[dict], dict]:
    """A sampled humaneval task's stored completions and their diversity counts
    (learnforget.eval.diversity), each distinct program's result as the pass@k metric found it."""
    from learnforget.eval.diversity import from_logged_samples

    logged = [x for x in out.get("samples", {}).get(spec.name, [])
              if x.get("filter") == humaneval_utils.SAMPLED_FILTER]
    return from_logged_samples(logged, str(spec.diversity), humaneval_utils.program_results)


def _items(out: dict, spec: TaskSpec) -> dict[str, list]:
    """Per-item results of the primary metric (learnforget.eval.paired.item_records)."""
    from learnforget.eval.paired import item_records

    key = LMEVAL_PRIMARY[base_kind(spec)]
    metric, _, filt = key.partition(",")
    logged = [x for x in out.get("samples", {}).get(spec.name, [])
              if x.get("filter") in (filt, humaneval_utils.SAMPLED_FILTER)]
    return item_records(logged, metric, normalised=metric == "acc_norm")


def _task_result(out: dict, spec: TaskSpec, config_hash: str, log_samples: bool) -> dict:
    raw = out["results"][spec.name]
    metrics: dict[str, float] = {}
    stderr: dict[str, float | None] = {}
    for key, value in raw.items():
        if "," not in key:  # "alias" and the like
            continue
        metric, _, filt = key.partition(",")
        if metric.endswith("_stderr"):
            stderr[clean_metric_key(f"{metric[: -len('_stderr')]},{filt}")] = _num(value)
        elif _num(value) is not None:
            metrics[clean_metric_key(key)] = float(value)
    n_samples = out.get("n-samples", {}).get(spec.name, {})
    n = n_samples.get("effective", n_samples.get("original"))
    primary = primary_metric(spec.kind, spec.name)
    res = {
        "metrics": metrics,
        "stderr": stderr,
        "n": None if n is None else int(n),
        "primary_metric": primary,
        "primary": metrics.get(primary),
        "chance": chance_level(spec),
        "role": spec.role,
        "kind": spec.kind,
        "num_fewshot": out.get("n-shot", {}).get(spec.name),
        "config_hash": config_hash,
        "lm_eval_version": lm_eval_version(),
    }
    if log_samples:
        res["samples"] = out.get("samples", {}).get(spec.name, [])
    return res
