"""Hooks of the local HumanEval tasks: they run completions against the problem's tests in
`learnforget.eval.sandbox`, replacing lm-eval's built-in metric (HF `evaluate`'s code_eval, which is
fetched from the hub when imported).

- Greedy (one completion per problem): `process_results`, lm-eval's per-document hook, gives
  pass@1 = 1.0 or 0.0.
- Sampled (`repeats: n` completions per problem): the custom filter `build_predictions` turns
  each problem's n completions into programs (prompt + completion, as lm-eval's own humaneval
  filter "create_test"), and the metric `pass_at_k` (a `metric_list` entry with `k: [...]`, as
  lm-eval's humaneval_64.yaml) runs them and reports, per problem, the unbiased pass@k of
  Chen et al. (2021), `sandbox.pass_at_k(n, c, k)` with c passing programs. lm-eval's `mean`
  aggregation then averages over problems: `mean_pass_at_k` on the (n, c) counts. Each
  distinct program runs once (`program_results`); within `remembered_results` (one
  `learnforget.eval.lm_eval_run.evaluate` call) its result is kept for the diversity split
  (`learnforget.eval.diversity`). Before 2026-12-07 every copy ran, so a program whose result
  depends on the run (a timeout under load) could count differently across copies.

lm-eval calls hooks without any of our settings, so the opt-in to run model-written code
travels in an environment variable that `learnforget.eval.lm_eval_run.evaluate` sets for the
duration of its call. Without it the hooks refuse (ConfigError from `sandbox.require_opt_in`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

ENV_ALLOW = "LEARNFORGET_ALLOW_CODE_EXEC"  # "1": the caller opted in to code execution
ENV_TIMEOUT = "LEARNFORGET_CODE_EXEC_TIMEOUT_S"  # seconds per program (default 10)
METRIC = "pass@1"
SAMPLED_FILTER = "create_test"  # lm-eval's name for the filter that builds the programs
MAX_PARALLEL = 8  # sandboxed programs run at once (bounded by the CPU count)


def code_exec_allowed() -> bool:
    return os.environ.get(ENV_ALLOW, "") == "1"


def _timeout_s() -> float:
    return float(os.environ.get(ENV_TIMEOUT, "10"))


def process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """pass@1 of the one greedy completion in `results` (lm-eval: one string per request;
    generation stops before the task's `until` sequences, which are not included)."""
    from learnforget.eval.sandbox import check_completion, require_opt_in

    allowed = code_exec_allowed()
    require_opt_in(allowed)
    completion = results[0] if results else ""
    if "\0" in completion:  # Python refuses source with NUL bytes (and argv cannot carry them)
        return {METRIC: 0.0}
    res = check_completion(dict(doc), completion, allowed=allowed, timeout_s=_timeout_s())
    return {METRIC: 1.0 if res.passed else 0.0}


# ------------------------------------------------------------------ sampled: n per problem


def build_predictions(resps: Iterable[Sequence[str]], docs: Iterable[dict]) -> list[list[str]]:
    """lm-eval `custom` filter: each problem's n completions → n program heads (prompt +
    completion), the same as lm-eval's humaneval/utils.py build_predictions."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs, strict=True)]


def problem_pass_at_k(n: int, c: int, ks: Iterable[int]) -> dict[str, float]:
    """{"pass@k": unbiased pass@k} of one problem with `c` of `n` samples passing."""
    from learnforget.eval.sandbox import pass_at_k as estimator

    return {f"pass@{k}": estimator(n, c, k) for k in ks}


def mean_pass_at_k(counts: Sequence[tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """The task's pass@k: per-problem unbiased pass@k averaged over problems, from each
    problem's (n samples, c correct). What lm-eval's `mean` over `pass_at_k`'s values gives."""
    if not counts:
        raise ValueError("mean_pass_at_k needs at least one problem")
    ks = list(ks)
    per_problem = [problem_pass_at_k(n, c, ks) for n, c in counts]
    return {key: sum(p[key] for p in per_problem) / len(per_problem) for key in per_problem[0]}


def count_passed(programs: Sequence[str], test: str) -> int:
    """How many of the program heads pass `test` (`program_results`)."""
    return sum(program_results(programs, test))


_remembered: dict[tuple[str, float], bool] | None = None  # set by `remembered_results`


@contextmanager
def remembered_results():
    """Within the block, each program's sandbox result is kept (by its source and timeout), so
    a program run by the pass@k metric is not run again for the diversity split
    (learnforget.eval.diversity). Outside it nothing is kept."""
    global _remembered
    saved, _remembered = _remembered, {}
    try:
        yield
    finally:
        _remembered = saved


def program_results(programs: Sequence[str], test: str) -> list[bool]:
    """Whether each program head passes `test` (the task target: the problem's tests and
    `check(<entry_point>)`), run in the sandbox in parallel threads. Each distinct program runs
    once and its result counts for every copy (identical strings cannot pass and fail at once;
    a sampled problem's 50 completions are often few distinct ones)."""
    from learnforget.eval.sandbox import require_opt_in, run_in_sandbox

    allowed = code_exec_allowed()
    require_opt_in(allowed)
    timeout_s = _timeout_s()
    # = sandbox.humaneval_program(prompt, completion, test, entry_point): the target is
    # "<test>\ncheck(<entry_point>)" and the head is prompt + completion.
    sources = [head + "\n" + test + "\n" for head in programs]
    known = {} if _remembered is None else _remembered
    # Python refuses source with NUL bytes (and argv cannot carry them): failed, not run
    todo = list(dict.fromkeys(src for src in sources
                              if "\0" not in src and (src, timeout_s) not in known))
    found: dict[str, bool] = {}
    if todo:
        workers = max(1, min(len(todo), MAX_PARALLEL, os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(
                lambda src: run_in_sandbox(src, allowed=allowed, timeout_s=timeout_s), todo))
        found = {src: bool(r.passed) for src, r in zip(todo, results, strict=True)}
        if _remembered is not None:
            _remembered.update({(src, timeout_s): ok for src, ok in found.items()})
    return [False if "\0" in src else found[src] if src in found else known[(src, timeout_s)]
            for src in sources]


def pass_at_k(references: Sequence[str], predictions: Sequence[Sequence[str]],
              k: int | Sequence[int] = (1,)) -> dict[str, float]:
    """lm-eval metric hook of the sampled task (the signature of lm-eval's humaneval
    `utils.pass_at_k`): `references` the targets and `predictions` each problem's program heads
    (lm-eval passes one problem per call). Returns {"pass@k": value} for each k in `k`,
    averaged over the problems given (lm-eval's `mean` aggregation then averages over all)."""
    ks = [k] if isinstance(k, int) else list(k)
    if len(references) != len(predictions):
        raise ValueError(f"pass_at_k: {len(references)} references but {len(predictions)} "
                         "prediction lists")
    counts = []
    for test, programs in zip(references, predictions, strict=True):
        if isinstance(programs, str):  # one completion (no repeats): a list of one
            programs = [programs]
        counts.append((len(programs), count_passed(list(programs), test)))
    return mean_pass_at_k(counts, ks)
