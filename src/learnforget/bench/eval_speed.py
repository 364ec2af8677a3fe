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

import json
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


# ------------------------------------------------------------------ one base per eval process

def bench_adapter_swap(run_dirs: Sequence[Path], work: Path, overrides: Sequence[str] = (),
                       repeats: int = 1) -> dict[str, Any]:
    """The eval stage of the runs' checkpoints timed two ways side by side in this process:
    eval.swap_adapters=true (one base per process, adapters swapped: learnforget.eval.swap) and
    false (a fresh base load per checkpoint). Each way scores copies of the run folders (under
    `work`, without their eval results) against one base cache scored up front, so the two
    differ by how the checkpoints are loaded only; the ways alternate order on each repeat.
    Also: one base load timed on its own, and the largest per-item log-likelihood difference
    between the two ways' results (0 where they are identical)."""
    import shutil

    from omegaconf import OmegaConf

    from learnforget.config import compose
    from learnforget.eval.base import evaluate_base
    from learnforget.eval.scoring import load_for_eval
    from learnforget.eval.stage import evaluate_runs

    runs = [Path(r).resolve() for r in run_dirs]
    run_cfg = OmegaConf.load(runs[0] / "config.yaml")
    ev = compose(list(overrides)).eval
    cache = Path(run_cfg.paths.cache_dir).expanduser()
    work = Path(work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    load_for_eval(run_cfg, None, cache, "cpu")  # also warms the page cache for both ways
    base_load_s = time.perf_counter() - t0
    warm = OmegaConf.merge(run_cfg, {"eval": ev, "paths": {"runs_dir": str(work / "base")}})
    evaluate_base(warm)
    skip = shutil.ignore_patterns("eval", "train", "wandb", "spectra", "intruders", "branches",
                                  ".lock*", "run.log")
    ways = {"swap": True, "fresh": False}
    secs: dict[str, list[float]] = {w: [] for w in ways}
    cpu: dict[str, list[float]] = {w: [] for w in ways}  # process CPU time: fairer when shared
    copies: dict[str, list[Path]] = {}
    for rep in range(repeats):
        for way in list(ways) if rep % 2 == 0 else list(ways)[::-1]:
            root = work / f"{way}-{rep}"
            shutil.copytree(work / "base" / "_base", root / "_base")
            copies[way] = [Path(shutil.copytree(r, root / r.parent.name / r.name, ignore=skip))
                           for r in runs]
            e = ev.copy()
            e.swap_adapters = ways[way]
            t0, c0 = time.perf_counter(), time.process_time()
            evaluate_runs(copies[way], e, cache_dir=cache)
            secs[way].append(time.perf_counter() - t0)
            cpu[way].append(time.process_time() - c0)
    same = compare_results(copies["swap"], copies["fresh"])
    same["load_times"] = time_loads(runs)
    out = {"runs": [r.name for r in runs], "checkpoints": same["checkpoints"], "suite": str(ev.name),
           "overrides": list(overrides), "repeats": repeats, "threads": torch.get_num_threads(),
           "base_load_s": base_load_s, "seconds": secs,
           "best_s": {w: min(v) for w, v in secs.items()}, "cpu_seconds": cpu,
           "best_cpu_s": {w: min(v) for w, v in cpu.items()}, **same}
    out["saved_s"] = out["best_s"]["fresh"] - out["best_s"]["swap"]
    out["saved_per_checkpoint_s"] = out["saved_s"] / max(same["checkpoints"], 1)
    out["speedup"] = out["best_s"]["fresh"] / out["best_s"]["swap"]
    return out


def time_loads(run_dirs: Sequence[Path], repeats: int = 3) -> dict[str, Any]:
    """Getting each checkpoint's model ready to score, alone: a fresh load (the base, then its
    adapter: eval.scoring.load_for_eval) against putting its adapter on the shared base
    (learnforget.eval.swap.SharedBase.checkpoint_model), in turn per checkpoint; seconds per
    checkpoint (median over checkpoints and repeats), and the shared base's one load."""
    import statistics

    from omegaconf import OmegaConf

    from learnforget.eval.scoring import load_for_eval
    from learnforget.eval.swap import SharedBase
    from learnforget.runfolder import RunFolder

    fresh: list[float] = []
    swap: list[float] = []
    shared, first = None, 0.0
    for run in run_dirs:
        run_cfg = OmegaConf.load(Path(run) / "config.yaml")
        cache = Path(run_cfg.paths.cache_dir).expanduser()
        if shared is None:
            shared = SharedBase(run_cfg, cache, "cpu")
            t0 = time.perf_counter()
            shared.base_model()
            first = time.perf_counter() - t0
        for _ in range(repeats):
            for ckpt in RunFolder(Path(run)).checkpoint_dirs():
                t0 = time.perf_counter()
                model = load_for_eval(run_cfg, ckpt, cache, "cpu")
                fresh.append(time.perf_counter() - t0)
                del model
                t0 = time.perf_counter()
                shared.checkpoint_model(ckpt)
                swap.append(time.perf_counter() - t0)
    return {"fresh_load_s": statistics.median(fresh), "swap_s": statistics.median(swap),
            "shared_base_load_s": first, "n": len(fresh)}


def compare_results(a_runs: Sequence[Path], b_runs: Sequence[Path]) -> dict[str, Any]:
    """Every checkpoint's eval result in run folders `a_runs` against the same checkpoint's in
    `b_runs`: whether the per-item results, cross-entropies and drift are identical, and the
    largest per-choice log-likelihood difference."""
    from learnforget.runfolder import RunFolder

    diff, n_items, n_ckpt, identical = 0.0, 0, 0, True
    for a_run, b_run in zip(a_runs, b_runs, strict=True):
        for label in RunFolder(a_run).checkpoint_labels():
            a = json.loads(RunFolder(a_run).eval_result(label).read_text())
            b = json.loads(RunFolder(b_run).eval_result(label).read_text())
            n_ckpt += 1
            for name, task in a["tasks"].items():
                la, lb = task["items"]["lls"], b["tasks"][name]["items"]["lls"]
                identical &= task["items"] == b["tasks"][name]["items"]
                n_items += len(la)
                diff = max([diff, *(abs(x - y) for ra, rb in zip(la, lb, strict=True)
                                    for x, y in zip(ra, rb, strict=True))])
            drift = [{k: v for k, v in r["drift"].items() if k != "wall_time_s"} for r in (a, b)]
            identical &= a["ppl"] == b["ppl"] and drift[0] == drift[1]
    return {"checkpoints": n_ckpt, "items_compared": n_items, "identical": bool(identical),
            "max_abs_ll_diff": diff}


def format_swap(r: dict[str, Any]) -> str:
    return "\n".join([
        f"eval of {r['checkpoints']} adapter checkpoints of {len(r['runs'])} run(s), suite "
        f"{r['suite']}, {r['threads']} threads, best of {r['repeats']} (base scores cached):",
        f"  fresh base load per checkpoint  {r['best_s']['fresh']:8.1f} s  "
        f"({r['best_cpu_s']['fresh']:.1f} s process CPU)",
        f"  one base, adapters swapped      {r['best_s']['swap']:8.1f} s  "
        f"({r['best_cpu_s']['swap']:.1f} s process CPU)",
        f"  saved {r['saved_s']:.1f} s ({r['saved_per_checkpoint_s']:.2f} s per checkpoint; one "
        f"base load alone: {r['base_load_s']:.2f} s), {r['speedup']:.2f}x",
        f"  per checkpoint, the model ready to score: fresh load "
        f"{r['load_times']['fresh_load_s']:.2f} s, adapter swapped {r['load_times']['swap_s']:.3f} s",
        f"  per-item results identical: {r['identical']} ({r['items_compared']} items, largest "
        f"log-likelihood difference {r['max_abs_ll_diff']:.1e})"])


def main(argv: Sequence[str] | None = None) -> int:
    """python -m learnforget.bench.eval_speed swap RUN [RUN ...] [--work DIR] [--repeats N]
    [--threads N] [--json FILE] [-- eval overrides, e.g. eval=demo]"""
    import argparse
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    overrides = args[args.index("--") + 1:] if "--" in args else []
    args = args[:args.index("--")] if "--" in args else args
    p = argparse.ArgumentParser(prog="python -m learnforget.bench.eval_speed")
    p.add_argument("what", choices=["swap"])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--work", type=Path, default=Path("runs/_bench_swap"))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(args)
    if a.threads:
        torch.set_num_threads(a.threads)
    r = bench_adapter_swap(a.runs, a.work, overrides or ["eval=demo"], a.repeats)
    print(format_swap(r))
    if a.json:
        from learnforget.files import atomic_write_json

        atomic_write_json(a.json, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
