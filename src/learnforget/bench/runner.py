"""`learnforget bench`: the harness's performance figures, measured side by side in one process.

    learnforget bench                      # train, memory, eval, latency on smollm2_135m
    learnforget bench train memory         # some sections only
    learnforget bench spectra [...]        # the ΔW spectra timings (learnforget.analysis.stage)
    learnforget bench --model tiny_llama --repeats 2 --json bench.json

Sections (each figure as the median over its section's repeats with its min-max spread):
- train: the harness's training loop (`train.fit`: data, logging, clipping, schedule) against a
  bare PyTorch loop (forward, backward, step, zero_grad) on the same model, data and
  optimizer, for LoRA and full finetuning; throughput ratio harness / bare (goal >= 0.95), and
  LoRA / full step time. Each repeat sets up one run that both loops then train, in
  alternating order (ABBA) so drift on a shared machine hits both; the first step of each is
  not timed, and a loop's rate is taken from its median step time. The same ratio by process
  CPU seconds per step is printed beside it: time the hypervisor steals (reported for the
  section, from /proc/stat) slows whichever loop it falls in, but is not CPU time.
  Beside them (learnforget.bench.mfu): bf16 and fp32 GEMM peaks measured first, each loop's
  model FLOP/s and MFU (by wall time and per process CPU second), the plain loop a user would
  write on the same batches (`--no-plain` skips it) and, with `--old`, the harness with
  train.speed as before 2026-12; loss curves and their largest relative difference.
  Then bf16 compute (fp32 master weights) against fp32 compute: step-time ratio and both loss
  curves on the same batches (learnforget.bench.precision).
- memory: the peak tensor memory of two real training steps (torch's MemTracker: parameters,
  gradients, optimizer state, activations, temporaries) against `learnforget params`'s
  estimate (learnforget.train.activations), for LoRA and full; LoRA / full peak ratio.
- eval: multiple-choice scoring, the harness's backend against plain lm-eval's HFLM and the
  FLOP bound on the same items (learnforget.bench.eval_speed); lm-eval requests per second on the
  offline suite's tasks (loglikelihood and
  generate_until separately), base model.
- latency: each method's inference latency relative to the base model (learnforget.bench.latency).
- loss (by name only): the LM head's loss on instructions, two paths (learnforget.bench.loss_speed)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from learnforget.bench.measure import cpu_steal_s, fmt_spread, harness_steps, run_cfg, spread
from learnforget.bench.mfu import format_train
from learnforget.errors import ConfigError

SECTIONS = ("train", "memory", "eval", "latency", "loss")
DEFAULT_SECTIONS = SECTIONS[:4]  # loss: asked for by name only


def bare_steps(s, steps: int, offset: int = 0) -> dict[str, list]:
    """A bare PyTorch loop over the run's batches `offset`..: wall seconds, process CPU
    seconds and tokens of each of steps 2..`steps` (step 1 warms up)."""
    s.model.train()
    out: dict[str, list] = {"wall": [], "cpu": [], "tokens": []}
    for i in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        n = _bare_step(s, offset + i)
        if i >= 1:
            out["wall"].append(time.perf_counter() - t0)
            out["cpu"].append(time.process_time() - c0)
            out["tokens"].append(n)
    return out


def _bare_step(s, i: int) -> int:
    """Forward, backward, optimizer step and zero_grad on the run's i-th batch; its tokens."""
    from learnforget.data.packing import collate

    b = s.cfg.train.batch_size
    n = len(s.data.train)
    batch = collate([s.data.train[(i * b + j) % n] for j in range(b)], s.tokenizer.pad_token_id)
    with s.policy.autocast(s.device):  # the run's compute precision, as train.fit runs it
        loss = s.model(**batch).loss
    loss.backward()
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return int(batch["attention_mask"].sum())


def harness_extras_ms(s, runs_dir: Path, n: int = 20) -> dict[str, float]:
    """Milliseconds per step of the work `train.fit` does beyond a bare step, each timed
    directly (`n` calls, after one backward so every gradient exists): gradient-norm
    clipping, drawing the seeded micro-batch, the scheduler, the memory probe and one metrics
    line to disk. Noise-free where the loop ratios are not: it is the harness's own cost."""
    from learnforget.tracking import DiskLogger
    from learnforget.train.loop import peak_memory_mb
    from learnforget.train.plan import micro_batch

    t, pad = s.cfg.train, s.tokenizer.pad_token_id
    with s.policy.autocast(s.device):  # bf16 compute: frozen weights are already bf16
        s.model(**micro_batch(s.data, s.plan, t, 0, s.cfg.seed, pad)).loss.backward()
    log = DiskLogger(runs_dir / "extras" / "metrics.jsonl")
    row = {"step": 1, "epoch": 0.1, "tokens": 1024, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0,
           "tokens_per_s": 200.0, "step_time_s": 5.0, "wall_time_s": 5.0, "cpu_time_s": 9.0,
           "peak_mem_mb": 4000.0}
    parts = {"clip_grad_norm": lambda: torch.nn.utils.clip_grad_norm_(s.params, 1.0),
             "micro_batch": lambda: micro_batch(s.data, s.plan, t, 1, s.cfg.seed, pad),
             "scheduler": lambda: s.scheduler.get_last_lr(),
             "peak_memory": lambda: peak_memory_mb("cpu"),
             "metrics_line": lambda: log.log(row)}
    out = {}
    for name, fn in parts.items():
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = (time.perf_counter() - t0) / n * 1000
    s.optimizer.zero_grad(set_to_none=True)
    out["total"] = sum(out.values())
    return out


def _loop_figures(m: dict[str, list]) -> tuple[float, float, float]:
    """(tokens/s from the median step, median wall s, median process CPU s) of one loop."""
    median = statistics.median(m["wall"])
    return statistics.mean(m["tokens"]) / median, median, statistics.median(m["cpu"])


def bench_train(model: str, repeats: int, steps: int, batch_size: int, seq_len: int,
                runs_dir: Path, methods: Sequence[str] = ("lora", "full"),
                extra: Sequence[str] = (), old: bool = False, bare: bool = True,
                plain: bool = True, gemm_n: int = 2048) -> dict[str, Any]:
    """Per method and repeat, one `setup` (model, data, optimizer) that the harness and the
    bare loop then run on, `steps` steps each, in alternating order (harness first in even
    repeats); a loop's rate in a repeat is its tokens per step over its median step time
    (robust to a single slow step on a shared machine). Beside them: the plain loop a user
    would write (learnforget.bench.mfu) on the same batches, and with `old` the harness with
    train.speed set to the path before 2026-12 (mfu.OLD_SPEED). MFU against bf16 and fp32 GEMM
    peaks measured first."""
    from learnforget.bench import mfu
    from learnforget.bench.precision import _losses
    from learnforget.train.loop import setup

    if steps < 2:
        raise ConfigError(f"--steps must be at least 2 (step 1 is not timed), got {steps}")
    peaks = {"bf16": mfu.gemm_peak(torch.bfloat16, gemm_n),
             "fp32": mfu.gemm_peak(torch.float32, gemm_n)}
    res: dict[str, Any] = {"model": model, "batch_size": batch_size, "seq_len": seq_len,
                           "timed_steps": steps - 1, "cpu_model": mfu.cpu_model(),
                           "gemm_peak": peaks, "methods": {}, "convention": mfu.CONVENTION,
                           "old_path": list(mfu.OLD_SPEED) if old else None}
    gflops = {k: v["gflops"] for k, v in peaks.items()}
    gflops_cpu = {k: v["gflops_per_cpu_s"] for k, v in peaks.items()}
    loops = ["harness"] + (["bare"] if bare else []) + (["old"] if old else []) \
        + (["plain"] if plain else [])
    steal0 = cpu_steal_s()
    for method in methods:
        tps: dict[str, list[float]] = {k: [] for k in loops}
        step_s: dict[str, list[float]] = {k: [] for k in loops}
        cpu_s: dict[str, list[float]] = {k: [] for k in loops}
        all_steps: dict[str, dict[str, list[float]]] = {k: {} for k in loops}
        curves: dict[str, list[float]] = {}
        all_tokens: dict[str, list[int]] = {k: [] for k in loops}
        extras = None
        for rep in range(repeats):
            cfg = run_cfg(model, method, runs_dir, f"bench-{method}-{rep}",
                          batch_size=batch_size, seq_len=seq_len, steps=steps, extra=extra)
            s = setup(cfg)
            counts = (s.total, s.trainable)
            every_weight = s.trainable >= s.total  # full finetuning: 6N per token (mfu module doc)
            order = loops if rep % 2 == 0 else loops[::-1]
            for which in order:
                if which == "harness":
                    m = harness_steps(s, steps)
                    curves.setdefault("harness", _losses(s.out))
                elif which == "bare":
                    m = bare_steps(s, steps, offset=steps)
                elif which == "old":
                    o = setup(run_cfg(model, method, runs_dir, f"bench-old-{method}-{rep}",
                                      batch_size=batch_size, seq_len=seq_len, steps=steps,
                                      extra=[*extra, *mfu.OLD_SPEED]))
                    m = harness_steps(o, steps)
                    curves.setdefault("old", _losses(o.out))
                    del o
                else:
                    m = mfu.plain_steps(s, steps)
                    curves.setdefault("plain", m["loss"])
                rate, wall, cpu = _loop_figures(m)
                all_tokens[which].extend(m["tokens"])
                tps[which].append(rate)
                step_s[which].append(wall)
                cpu_s[which].append(cpu)
                for k in ("wall", "cpu"):
                    all_steps[which].setdefault(k, []).extend(round(x, 4) for x in m[k])
            if rep == 0 and bare:
                extras = harness_extras_ms(s, runs_dir)
            del s
        v: dict[str, Any] = {"total_params": counts[0], "trainable_params": counts[1],
                             "flops_per_token": mfu.flops_per_token(*counts, every_weight),
                             "steps": all_steps}
        for k in loops:
            v[f"{k}_tokens_per_s"] = spread(tps[k])
            v[f"{k}_step_s"] = spread(step_s[k])
            v[f"{k}_step_cpu_s"] = spread(cpu_s[k])
            v[f"{k}_cpu_over_wall"] = spread([c / w for c, w in zip(cpu_s[k], step_s[k],
                                                                    strict=True)])
            v[f"{k}_mfu"] = mfu.mfu_figures(statistics.median(tps[k]), *counts, every_weight,
                                            gflops)
            per_cpu_s = statistics.mean(all_tokens[k]) / statistics.median(cpu_s[k])
            v[f"{k}_mfu_cpu"] = mfu.mfu_figures(per_cpu_s, *counts, every_weight, gflops_cpu)
        for k in loops[1:]:
            v[f"ratio_harness_over_{k}"] = spread(
                [h / b for h, b in zip(tps["harness"], tps[k], strict=True)])
            v[f"cpu_ratio_{k}_over_harness"] = spread(
                [b / h for h, b in zip(cpu_s["harness"], cpu_s[k], strict=True)])
        for k, curve in curves.items():
            v[f"loss_{k}"] = curve
            if k != "harness":
                v[f"max_rel_loss_diff_{k}"] = max(
                    abs(a - b) / abs(b) for a, b in zip(curves["harness"], curve, strict=True))
        if bare:
            v["harness_extras_ms"] = extras
            v["harness_extras_share_of_bare_step"] = extras["total"] / 1000 \
                / statistics.median(step_s["bare"])
        res["methods"][method] = v
    if {"lora", "full"} <= set(methods):
        lo, fu = res["methods"]["lora"], res["methods"]["full"]
        res["lora_over_full_step_time"] = spread(
            [a / b for a, b in zip(lo["harness_step_s"]["values"], fu["harness_step_s"]["values"],
                                   strict=True)])
        res["lora_over_full_tokens_per_s"] = spread(
            [a / b for a, b in zip(lo["harness_tokens_per_s"]["values"],
                                   fu["harness_tokens_per_s"]["values"], strict=True)])
    steal1 = cpu_steal_s()
    res["cpu_steal_s"] = None if steal0 is None or steal1 is None else steal1 - steal0
    return res


# ------------------------------------------------------------------ memory: estimate vs measured

def measured_peak(s, steps: int = 2) -> dict[str, float]:
    """Peak tensor memory (bytes, by kind) over `steps` real training steps, by MemTracker."""
    from learnforget.private_api import memory_tracker

    model, opt = s.model, s.optimizer
    model.train()
    mt = memory_tracker(model, opt)
    with mt:
        for i in range(steps):
            _bare_step(s, i)
            mt.reset_mod_stats()
    peak = mt.get_tracker_snapshot("peak")
    dev = next(iter(peak))
    return {str(getattr(k, "value", k)).lower(): float(v) for k, v in peak[dev].items()}


def bench_memory(model: str, repeats: int, batch_size: int, seq_len: int, runs_dir: Path,
                 methods: Sequence[str] = ("lora", "full"),
                 extra: Sequence[str] = ()) -> dict[str, Any]:
    from learnforget.train.loop import setup
    from learnforget.train.params import param_report

    res: dict[str, Any] = {"model": model, "batch_size": batch_size, "seq_len": seq_len,
                           "methods": {}}
    for method in methods:
        cfg = run_cfg(model, method, runs_dir, f"bench-mem-{method}", batch_size=batch_size,
                      seq_len=seq_len, steps=2, extra=extra)
        est = param_report(cfg)
        peaks, parts = [], {}
        for _ in range(repeats):
            s = setup(cfg)
            p = measured_peak(s)
            peaks.append(p["total"])
            parts = p
            del s
        res["methods"][method] = {
            "estimate_bytes": est.peak_bytes, "estimate_parts": {
                "weights": est.weights_bytes, "gradients": est.grads_bytes,
                "optimizer": est.optimizer_bytes, "activations": est.activations_bytes,
                "logits": est.logits_bytes},
            "measured_peak_bytes": spread(peaks), "measured_parts": parts,
            "estimate_over_measured": spread([est.peak_bytes / p for p in peaks])}
    if {"lora", "full"} <= set(methods):
        res["lora_over_full_peak"] = (res["methods"]["lora"]["measured_peak_bytes"]["median"]
                                      / res["methods"]["full"]["measured_peak_bytes"]["median"])
    return res


def format_memory(r: dict[str, Any]) -> str:
    mib = 2**20
    lines = [f"peak memory of a training step, {r['model']}, {r['batch_size']} x {r['seq_len']} "
             "tokens (measured: MemTracker over 2 real steps; estimate: learnforget params):",
             f"  {'method':<6} {'estimate MiB':>13} {'measured MiB':>13} {'estimate/measured':>20}"
             "   measured parts (MiB)"]
    for m, v in r["methods"].items():
        parts = ", ".join(f"{k} {b / mib:.0f}" for k, b in v["measured_parts"].items()
                          if k != "total" and b > 0)
        lines.append(f"  {m:<6} {v['estimate_bytes'] / mib:>13.0f} "
                     f"{v['measured_peak_bytes']['median'] / mib:>13.0f} "
                     f"{fmt_spread(v['estimate_over_measured']):>20}   {parts}")
    if "lora_over_full_peak" in r:
        lines.append(f"  LoRA r=8 / full measured peak: {r['lora_over_full_peak']:.3f}")
    return "\n".join(lines)


# ------------------------------------------------------------------ eval: lm-eval requests/s

def bench_eval(model: str, repeats: int, limit: int, runs_dir: Path,
               extra: Sequence[str] = ()) -> dict[str, Any]:
    """Requests per second of the offline suite's lm-eval tasks on the base model, by request
    type: the multiple-choice tasks (loglikelihood) and HumanEval (generate_until)."""
    from lm_eval.models.huggingface import HFLM

    from learnforget.assets.models import base_model_dir, load_tokenizer
    from learnforget.config import compose
    from learnforget.eval.lm_eval_run import evaluate
    from learnforget.eval.scoring import load_for_eval
    from learnforget.eval.suite import task_specs
    from learnforget.eval.task_yaml import write_task_dir

    cfg = compose([f"model={model}", "method=full", "eval=offline", f"paths.runs_dir={runs_dir}",
                   *extra])
    cache = Path(cfg.paths.cache_dir).expanduser()
    specs = task_specs(cfg.eval, cache)
    groups = {"loglikelihood": [s for s in specs if s.kind != "humaneval"],
              "generate_until": [s for s in specs if s.kind == "humaneval"]}
    include = write_task_dir(specs, runs_dir / "bench-eval-tasks")
    net = load_for_eval(cfg, None, cache, "cpu")
    tok = load_tokenizer(base_model_dir(cfg.model, cache))
    lm = HFLM(pretrained=net, tokenizer=tok, batch_size=int(cfg.eval.batch_size),
              max_gen_toks=int(cfg.eval.max_gen_toks))
    res: dict[str, Any] = {"model": model, "limit": limit, "batch_size": int(cfg.eval.batch_size),
                           "max_gen_toks": int(cfg.eval.max_gen_toks), "types": {}}
    for kind, group in groups.items():
        if not group:
            continue
        rates, n_req = [], 0
        for _ in range(repeats):
            counter = _count_requests(lm)
            t0 = time.perf_counter()
            evaluate(lm, group, include, limit=limit, batch_size=int(cfg.eval.batch_size),
                     code_exec_allowed=True)
            secs = time.perf_counter() - t0
            n_req = counter()
            rates.append(n_req / secs)
        res["types"][kind] = {"tasks": [s.name for s in group], "requests": n_req,
                              "requests_per_s": spread(rates)}
    return res


def _count_requests(lm) -> Callable[[], int]:
    """Wrap the LM's request methods to count the requests of the next evaluation."""
    n = {"n": 0}
    for name in ("loglikelihood", "generate_until"):
        orig = getattr(type(lm), name)

        def wrapped(reqs, *a, _orig=orig, **kw):
            n["n"] += len(reqs)
            return _orig(lm, reqs, *a, **kw)

        setattr(lm, name, wrapped)
    return lambda: n["n"]


def format_eval(r: dict[str, Any]) -> str:
    lines = [f"eval throughput, {r['model']}, offline suite, limit {r['limit']} documents per task,"
             f" batch {r['batch_size']}, up to {r['max_gen_toks']} generated tokens:"]
    for kind, v in r["types"].items():
        lines.append(f"  {kind:<15} {v['requests']:>5} requests  "
                     f"{fmt_spread(v['requests_per_s'], 2)} requests/s  ({', '.join(v['tasks'])})")
    return "\n".join(lines)


# ------------------------------------------------------------------ the command

def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"expected comma-separated integers, got {text!r}") from None


def _methods(text: str) -> tuple[str, ...]:
    from learnforget.bench.measure import METHODS

    names = tuple(x for x in text.split(",") if x)
    bad = [x for x in names if x not in METHODS]
    if bad or not names:
        raise ConfigError(f"--methods {text!r}: expected a comma-separated list of "
                          f"{', '.join(METHODS)}")
    return names


def _cache_dir(extra: Sequence[str]) -> Path | None:
    given = [o.split("=", 1)[1] for o in extra if o.startswith("paths.cache_dir=")]
    return Path(given[-1]).expanduser() if given else None


def bench_cli(args: Sequence[str]) -> int:
    args = list(args)
    if args and args[0] == "spectra":
        from learnforget.analysis.stage import bench_cli as spectra_cli

        return spectra_cli(args)
    p = argparse.ArgumentParser(prog="learnforget bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sections", nargs="*", default=list(DEFAULT_SECTIONS),
                   help=f"any of {', '.join(SECTIONS)} (default: all but loss); or `spectra`; KEY=VALUE "
                        "words are config overrides for every benchmark run")
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--repeats", type=int, default=4, help="repeats of the train section")
    p.add_argument("--memory-repeats", type=int, default=2, help="repeats of the memory section "
                   "(MemTracker counts tensor bytes: the same on every repeat)")
    p.add_argument("--eval-repeats", type=int, default=2)
    p.add_argument("--precision-repeats", type=int, default=2, help="repeats of the train "
                   "section's bf16-vs-fp32 part (0: skip it)")
    p.add_argument("--methods", default="lora,full", help="train: methods to time (lora, full)")
    p.add_argument("--gemm-n", type=int, default=2048, help="train: size of the n^3 matmul of "
                   "the GEMM peaks")
    p.add_argument("--old", action="store_true", help="train: also the harness with "
                   "train.speed as before 2026-12 (for-loop AdamW, no frozen cast, full logits)")
    p.add_argument("--no-bare", dest="bare", action="store_false", help="train: skip the bare "
                   "loop on the harness's objects (the overhead check)")
    p.add_argument("--no-plain", dest="plain", action="store_false", help="train: skip the "
                   "plain loop a user would write (learnforget.bench.mfu)")
    p.add_argument("--steps", type=int, default=6, help="training steps per repeat (the first "
                   "is not timed)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--loss-batch-size", type=int, default=8, help="loss: instructions per batch")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-limit", type=int, default=16, help="documents per eval task")
    p.add_argument("--eval-items", type=int, default=40, help="items per task of the "
                   "side-by-side scoring figure (HellaSwag, ARC-Challenge; harness vs lm-eval)")
    p.add_argument("--latency-repeats", type=int, default=3)
    p.add_argument("--latency-seq-lens", default="32,128",
                   help="short and long sequence lengths for the latency table")
    p.add_argument("--latency-batch-sizes", default="1,16")
    p.add_argument("--json", type=Path, default=None,
                   help="also write the numbers here (default: runs/_bench/bench-<time>.json)")
    extra = [s for s in args if "=" in s and not s.startswith("-")]
    a = p.parse_args([s for s in args if s not in extra])
    a.sections = a.sections or list(DEFAULT_SECTIONS)
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad:
        raise ConfigError(f"unknown bench section {bad[0]!r} (expected any of: "
                          f"{', '.join(SECTIONS)}, or `spectra` alone)")
    for flag in ("repeats", "memory_repeats", "eval_repeats", "latency_repeats",
                 "precision_repeats"):
        if getattr(a, flag) < (0 if flag == "precision_repeats" else 1):
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least "
                              f"{0 if flag == 'precision_repeats' else 1}, got "
                              f"{getattr(a, flag)}")
    from learnforget.files import atomic_write_json
    from learnforget.runfolder import meta_info

    result: dict[str, Any] = {"meta": meta_info().to_dict(),
                              "torch_threads": torch.get_num_threads(),
                              "args": {k: (str(v) if isinstance(v, Path) else v)
                                       for k, v in vars(a).items()}}
    out = a.json or Path("runs") / "_bench" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    with tempfile.TemporaryDirectory(prefix="learnforget-bench-") as tmp:
        runs = Path(tmp)
        for section in a.sections:
            t0 = time.perf_counter()
            if section == "train":
                from learnforget.bench.precision import bench_precision, format_precision

                r = bench_train(a.model, a.repeats, a.steps, a.batch_size, a.seq_len, runs,
                                methods=_methods(a.methods), extra=extra, old=a.old,
                                bare=a.bare, plain=a.plain, gemm_n=a.gemm_n)
                atomic_write_json(out, {**result, section: r})
                text = format_train(r)
                if a.precision_repeats:
                    r["precision"] = bench_precision(a.model, a.precision_repeats, a.steps,
                                                     a.batch_size, a.seq_len, runs, extra=extra)
                    text += "\n" + format_precision(r["precision"])
            elif section == "memory":
                r = bench_memory(a.model, a.memory_repeats, a.batch_size, a.seq_len, runs, extra=extra)
                text = format_memory(r)
            elif section == "eval":
                from learnforget.bench.eval_speed import bench_eval_compare, format_compare

                r = bench_eval(a.model, a.eval_repeats, a.eval_limit, runs, extra=extra)
                r["compare"] = bench_eval_compare(a.model, a.eval_repeats, a.eval_items, runs,
                                                  extra=extra)
                text = format_eval(r) + "\n" + format_compare(r["compare"])
            elif section == "loss":
                from learnforget.bench.loss_speed import bench_loss, format_loss

                r = bench_loss(a.model, a.steps, a.loss_batch_size, runs,
                               methods=_methods(a.methods), extra=extra)
                text = format_loss(r)
            else:
                from learnforget.bench.latency import format_latency, run_latency

                r = run_latency(a.model, repeats=a.latency_repeats,
                                batch_sizes=_ints(a.latency_batch_sizes),
                                seq_lens=_ints(a.latency_seq_lens), cache_dir=_cache_dir(extra))
                text = format_latency(r)
            r["section_wall_s"] = time.perf_counter() - t0
            result[section] = r
            atomic_write_json(out, result)  # each section's numbers as soon as they exist
            print(text, flush=True)
            print(flush=True)
    atomic_write_json(out, result)
    print(f"learnforget: bench numbers -> {out}")
    return 0
