"""HumanEval in the sandbox: a completion checked against its problem's tests, and pass@k.
"""

from __future__ import annotations

from learnforget.errors import ConfigError
from learnforget.eval.sandbox import SandboxResult, require_opt_in, run_in_sandbox


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program HumanEval's own harness runs."""
    return prompt + completion + "\n" + test + "\n" + f"check({entry_point})\n"


def check_completion(problem: dict, completion: str, *, allowed: bool,
                     timeout_s: float = 10.0) -> SandboxResult:
    """Run `completion` against a HumanEval problem (keys prompt, test, entry_point)."""
    require_opt_in(allowed)
    missing = [k for k in ("prompt", "test", "entry_point") if k not in problem]
    if missing:
        raise ConfigError(f"HumanEval problem lacks {', '.join(missing)} (expected the keys "
                          "prompt, test, entry_point of HumanEval's jsonl)")
    program = humaneval_program(problem["prompt"], completion, problem["test"],
                                problem["entry_point"])
    return run_in_sandbox(program, allowed=allowed, timeout_s=timeout_s)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), n samples with c correct."""
    import numpy as np

    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or int(v) != v:
            raise ValueError(f"pass_at_k: {name} must be an integer, got {v!r}")
    n, c, k = int(n), int(c), int(k)
    if n < 1 or k < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs n >= 1, k >= 1 and 0 <= c <= n, got n={n} c={c} k={k}")
    if k > n:
        raise ValueError(f"pass_at_k: k={k} is larger than the number of samples n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
