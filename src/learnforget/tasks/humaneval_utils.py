"""`process_results` hook of the local HumanEval task: runs a completion against the problem's
tests in `learnforget.sandbox`, replacing lm-eval's built-in metric (HF `evaluate`'s code_eval,
which is fetched from the hub when imported).

lm-eval calls hooks with `(doc, results)` only, so the opt-in to run model-written code travels
in an environment variable that `learnforget.lmeval_tasks.evaluate` sets for the duration of
its call. Without it the hook refuses (ConfigError from `sandbox.require_opt_in`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

ENV_ALLOW = "LEARNFORGET_ALLOW_CODE_EXEC"  # "1": the caller opted in to code execution
ENV_TIMEOUT = "LEARNFORGET_CODE_EXEC_TIMEOUT_S"  # seconds per problem (default 10)
METRIC = "pass@1"


def code_exec_allowed() -> bool:
    return os.environ.get(ENV_ALLOW, "") == "1"


def process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """pass@1 of the one greedy completion in `results` (lm-eval: one string per request;
    generation stops before the task's `until` sequences, which are not included)."""
    from learnforget.sandbox import check_completion, require_opt_in

    allowed = code_exec_allowed()
    require_opt_in(allowed)
    completion = results[0] if results else ""
    timeout_s = float(os.environ.get(ENV_TIMEOUT, "10"))
    res = check_completion(dict(doc), completion, allowed=allowed, timeout_s=timeout_s)
    return {METRIC: 1.0 if res.passed else 0.0}
