"""`learnforget bench eval`'s side-by-side figure: multiple-choice scoring by the harness's
backend (learnforget.eval.fast_lm, lm-eval model "lf-hf-shared") against plain lm-eval's HF backend
(HFLM) and against the model's FLOP bound on this CPU, in one process on the same items.

Both backends score the same fixed subset of HellaSwag and ARC-Challenge (the benchmarks asset)
through lm-eval's own evaluation, alternating which goes first on each repeat. Reported per
backend: items/s (and items per process CPU second: on a shared machine the fairer
ratio) and tokens/s, where tokens are those of the requests as lm-eval forms them
(context + continuation per choice: the work plain lm-eval does), so the ratio of the rates is
the speed-up; the largest
per-choice log-likelihood difference between the two; and the FLOP bound: the CPU's float32
GEMM rate (2048 x 2048 matmul, best of 5) over 2 x (weights of every linear layer, LM head
included) FLOPs per token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

TASKS = ("hellaswag", "arc_challenge")


def gemm_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 n x n matmul rate of `repeats` (FLOP/s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def flops_per_token(model: torch.nn.Module) -> float:
    """2 x the weights of every nn.Linear (a forward pass's matmuls, attention scores aside)."""
    return 2.0 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def _count_tokens(lm) -> dict[str, int]:
    """Wrap lm._loglikelihood_tokens to add up the request tokens (context + continuation)."""
    seen = {"tokens": 0, "requests": 0}
    orig = lm._loglikelihood_tokens

    def wrapped(requests, *a, **kw):
        seen["requests"] += len(requests)
        seen["tokens"] += sum(min(len(r[1]) + len(r[2]), lm.max_length + 1) - 1 for r in requests)
        return orig(requests, *a, **kw)

    lm._loglikelihood_tokens = wrapped
    return seen


def bench_eval_compare(model: str, repeats: int, n_items: int, runs_dir: Path,
                       extra: Sequence[str] = (), batch_size: int = 8) -> dict[str, Any]:
    from lm_eval.models.huggingface import HFLM

    from learnforget.assets.benchmarks import benchmark_path
    from learnforget.assets.models import base_model_dir, load_tokenizer
    from learnforget.config import compose
    from learnforget.eval.fast_lm import SharedContextLM
    from learnforget.eval.lm_eval_run import evaluate
    from learnforget.eval.paired import subset_indices
    from learnforget.eval.scoring import load_for_eval
    from learnforget.eval.task_specs import TaskSpec
    from learnforget.eval.task_yaml import write_task_dir

    cfg = compose([f"model={model}", "method=full", f"paths.runs_dir={runs_dir}", *extra])
    cache = Path(cfg.paths.cache_dir).expanduser()
    specs = [TaskSpec(t, t, benchmark_path(cache, t, fetch=False)) for t in TASKS]
    include = write_task_dir(specs, runs_dir / "bench-eval-compare")
    samples = {}
    for s in specs:
        n_docs = sum(1 for line in s.data_file.read_text().splitlines() if line.strip())
        samples[s.name] = subset_indices(n_docs, n_items, seed=0) or list(range(n_docs))
    net = load_for_eval(cfg, None, cache, "cpu")
    tok = load_tokenizer(base_model_dir(cfg.model, cache))
    lms = {"lm-eval HFLM": HFLM(pretrained=net, tokenizer=tok, batch_size=batch_size),
           "harness lf-hf-shared": SharedContextLM(pretrained=net, tokenizer=tok,
                                                   batch_size=batch_size)}
    counters = {name: _count_tokens(lm) for name, lm in lms.items()}
    secs: dict[str, list[float]] = {name: [] for name in lms}
    cpu: dict[str, list[float]] = {name: [] for name in lms}
    items: dict[str, dict] = {}
    names = list(lms)
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            before = dict(counters[name])
            t0, c0 = time.perf_counter(), time.process_time()
            items[name] = evaluate(lms[name], specs, include, samples=samples, items=True,
                                   batch_size=batch_size)
            secs[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            counters[name]["last_tokens"] = counters[name]["tokens"] - before["tokens"]
            counters[name]["last_requests"] = counters[name]["requests"] - before["requests"]
    n_total = sum(len(v) for v in samples.values())
    diff = 0.0
    for s in specs:
        a, b = (items[n][s.name]["items"]["lls"] for n in names)
        diff = max(diff, max(abs(x - y) for ra, rb in zip(a, b, strict=True)
                             for x, y in zip(ra, rb, strict=True)))
    bound = gemm_flops() / flops_per_token(net)
    out: dict[str, Any] = {"model": model, "tasks": list(TASKS), "items": n_total,
                           "repeats": repeats, "batch_size": batch_size,
                           "threads": torch.get_num_threads(), "max_abs_ll_diff": diff,
                           "flop_bound_tokens_per_s": bound, "backends": {}}
    for name in names:
        best = min(secs[name])
        tokens = counters[name]["last_tokens"]
        out["backends"][name] = {
            "seconds": secs[name], "cpu_seconds": cpu[name],
            "items_per_cpu_s": n_total / min(cpu[name]),
            "requests": counters[name]["last_requests"],
            "request_tokens": tokens, "items_per_s": n_total / best,
            "tokens_per_s": tokens / best, "share_of_flop_bound": tokens / best / bound,
            "metrics": {t: items[name][t]["metrics"] for t in TASKS}}
    hf, ours = (out["backends"][n] for n in names)
    out["speedup"] = ours["items_per_s"] / hf["items_per_s"]
    out["speedup_cpu"] = ours["items_per_cpu_s"] / hf["items_per_cpu_s"]
    return out


def format_compare(r: dict[str, Any]) -> str:
    lines = [f"eval scoring, {r['model']}, {r['items']} items of {', '.join(r['tasks'])} "
             f"(the same for both), batch {r['batch_size']}, {r['threads']} threads, best of "
             f"{r['repeats']}:"]
    for name, v in r["backends"].items():
        lines.append(f"  {name:<22} {v['items_per_s']:7.2f} items/s  {v['tokens_per_s']:8.0f} "
                     f"request tokens/s  ({v['share_of_flop_bound']:.2f} x the FLOP bound)")
    lines.append(f"  FLOP bound (fp32 GEMM rate / FLOPs per token): "
                 f"{r['flop_bound_tokens_per_s']:.0f} tokens/s")
    lines.append(f"  speed-up {r['speedup']:.2f}x by wall time, {r['speedup_cpu']:.2f}x by process "
                 f"CPU time; largest per-choice log-likelihood "
                 f"difference {r['max_abs_ll_diff']:.2e}")
    return "\n".join(lines)
