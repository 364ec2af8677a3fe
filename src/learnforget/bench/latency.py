"""Inference latency of each finetuning method's model, relative to the base model.

    learnforget bench latency [--model smollm2_135m] [--repeats 5] [--threads N]

One process, one copy of the base weights per variant (all from the same loaded base):

    base                the base model
    lora                LoRA r=8 on every linear layer, unmerged (peft)
    lora_merged         the same LoRA merged into the weights (merge_and_unload)
    dora                DoRA r=8 on every linear layer, unmerged
    ia3                 IA3 (peft's per-architecture targets)
    adapter_houlsby     bottleneck adapters (64) after attention and MLP
    adapter_pfeiffer    bottleneck adapters (64) after the MLP only
    prefix              prefix tuning, 20 virtual tokens

each built by the harness's own `apply_method` with the method's config defaults. Every
trainable weight gets small random values (LoRA's B, the adapters' up-projection and IA3's
vectors start as no-ops), so no variant is timed as an identity. For every batch size x
sequence length: a few warm-up calls per variant, then `repeats` rounds in which every variant
runs one forward pass (torch.inference_mode, full logits), round-robin with a rotating start,
so that drift of a shared machine reaches all variants alike. Reported per variant and shape:
median, min, max and interquartile range of the times, and the ratio of the median to the base
model's median; `ratio_lo`/`ratio_hi` are the extremes of the per-round ratios (variant time
/ base time in the same round), which show the noise of the ratio itself.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

VARIANTS: dict[str, list[str]] = {  # name -> method overrides ([]: the base model)
    "base": [],
    "lora": ["method=lora", "method.r=8", "method.targets=all"],
    "lora_merged": ["method=lora", "method.r=8", "method.targets=all"],
    "dora": ["method=dora", "method.r=8", "method.targets=all"],
    "ia3": ["method=ia3", "method.targets=all"],
    "adapter_houlsby": ["method=adapter", "method.bottleneck=64", "method.placement=houlsby"],
    "adapter_pfeiffer": ["method=adapter", "method.bottleneck=64", "method.placement=pfeiffer"],
    "prefix": ["method=prefix", "method.num_virtual_tokens=20"],
}
INIT_STD = 0.02  # scale of the random values given to every trainable weight


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Small random values on every trainable weight: adapters are then not no-ops."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * INIT_STD
                p.add_(noise.to(p.dtype))


def build_variants(model_name: str, cache_dir: Path | None = None, seed: int = 0,
                   variants: Sequence[str] | None = None) -> tuple[dict[str, torch.nn.Module],
                                                                   dict[str, Any]]:
    """{variant: model in eval mode} from one loaded base model, and a description of each."""
    from learnforget.assets.models import load_model
    from learnforget.config import compose
    from learnforget.methods.apply import apply_method, count_parameters
    from learnforget.methods.registry import effective_method

    names = ["base", *(v for v in (variants or VARIANTS) if v != "base")]  # base: the reference
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        from learnforget.errors import ConfigError

        raise ConfigError(f"unknown latency variant(s) {unknown} (expected some of: "
                          f"{', '.join(VARIANTS)})")
    base_cfg = compose([f"model={model_name}", "method=full"])
    cache = Path(cache_dir if cache_dir is not None else base_cfg.paths.cache_dir).expanduser()
    base, _, base_path = load_model(base_cfg.model, base_cfg.method, cache, "cpu")
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    models: dict[str, torch.nn.Module] = {}
    info: dict[str, Any] = {}
    _, base_total = count_parameters(base)
    for i, name in enumerate(names):
        if name == "base":
            models[name], info[name] = base, {"method": "base", "extra_params": 0}
            continue
        method = compose([f"model={model_name}", *VARIANTS[name]]).method
        if name == "lora_merged" and "lora" in models:
            m = copy.deepcopy(models["lora"])  # the very weights of the unmerged variant
        else:
            torch.manual_seed(seed + i)
            m, _ = apply_method(copy.deepcopy(base), method, model_name=model_name)
            _perturb(m, seed + 1000 + i)
        trainable, total = count_parameters(m)
        settings = effective_method(method)
        if name == "lora_merged":
            m = m.merge_and_unload()
            settings = {**settings, "merged": True}
        m.eval()
        models[name] = m
        info[name] = {"method": str(method.name), "settings": settings,
                      "adapter_params": trainable,
                      "extra_params": count_parameters(m)[1] - base_total}
    info["_base_model"] = base_path
    return models, info


def _forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
    model(input_ids=ids, attention_mask=mask, use_cache=False)


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def run_latency(model: str = "smollm2_135m", batch_sizes: Sequence[int] = (1, 16),
                seq_lens: Sequence[int] = (32, 256), repeats: int = 5,
                threads: int | None = None, cache_dir: Path | str | None = None, *,
                warmup: int = 2, variants: Sequence[str] | None = None, seed: int = 0,
                verbose: bool = False) -> dict[str, Any]:
    """Forward latency of every variant for every batch size x sequence length; see the module
    docstring. Returns {"model", "threads", "repeats", "warmup", "variants", "info", "shapes",
    "rows": [{"variant", "batch", "seq", "median_ms", "min_ms", "max_ms", "q1_ms", "q3_ms",
    "times_ms", "ratio", "ratio_lo", "ratio_hi"}]}."""
    if repeats < 1 or warmup < 0:
        from learnforget.errors import ConfigError

        raise ConfigError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        models, info = build_variants(model, Path(cache_dir) if cache_dir else None, seed,
                                      variants)
        names = list(models)
        vocab = int(models["base"].config.vocab_size)
        rows: list[dict[str, Any]] = []
        shapes = [(int(b), int(s)) for b in batch_sizes for s in seq_lens]
        g = torch.Generator().manual_seed(seed)
        for b, s in shapes:
            ids = torch.randint(0, vocab, (b, s), generator=g)
            mask = torch.ones_like(ids)
            times: dict[str, list[float]] = {v: [] for v in names}
            with torch.inference_mode():
                for v in names:
                    for _ in range(warmup):
                        _forward(models[v], ids, mask)
                for r in range(repeats):
                    k = r % len(names)
                    for v in names[k:] + names[:k]:  # round-robin, rotating who goes first
                        t0 = time.perf_counter()
                        _forward(models[v], ids, mask)
                        times[v].append(time.perf_counter() - t0)
            base_t = times["base"]
            for v in names:
                ts = [t * 1e3 for t in times[v]]
                q1, q3 = _quartiles(ts)
                row = {"variant": v, "batch": b, "seq": s, "median_ms": statistics.median(ts),
                       "min_ms": min(ts), "max_ms": max(ts), "q1_ms": q1, "q3_ms": q3,
                       "times_ms": ts}
                paired = [t / tb for t, tb in zip(times[v], base_t, strict=True)]
                row.update(ratio=row["median_ms"] / (statistics.median(base_t) * 1e3),
                           ratio_lo=min(paired), ratio_hi=max(paired))
                rows.append(row)
            if verbose:
                print(f"learnforget: latency b={b} s={s}: " + ", ".join(
                    f"{r['variant']} {r['median_ms']:.1f}ms" for r in rows[-len(names):]),
                    flush=True)
        return {"model": model, "base_model": info.pop("_base_model"),
                "threads": torch.get_num_threads(), "repeats": repeats, "warmup": warmup,
                "torch": torch.__version__, "variants": names, "info": info,
                "shapes": [{"batch": b, "seq": s} for b, s in shapes], "rows": rows}
    finally:
        torch.set_num_threads(old_threads)


def format_latency(result: dict[str, Any]) -> str:
    """A table: one row per variant, per shape the ratio to base (per-round range) and the
    median time."""
    shapes = [(sh["batch"], sh["seq"]) for sh in result["shapes"]]
    by = {(r["variant"], r["batch"], r["seq"]): r for r in result["rows"]}
    head = (f"forward latency on {result['model']}: {result['threads']} threads, "
            f"{result['repeats']} interleaved repeats after {result['warmup']} warm-up calls; "
            "per shape: median time relative to base [min-max of per-round ratios], "
            "median ms")
    lines = [head, f"{'variant':<18}" + "".join(f"  {f'b={b} s={s}':>29}" for b, s in shapes)]
    for v in result["variants"]:
        cells = []
        for b, s in shapes:
            r = by[(v, b, s)]
            ratio = f"{r['ratio']:.2f}x [{r['ratio_lo']:.2f}-{r['ratio_hi']:.2f}]"
            cells.append(f"  {ratio:>18} {r['median_ms']:8.1f}ms")
        lines.append(f"{v:<18}" + "".join(cells))
    return "\n".join(lines)


def bench_latency_cli(args: Sequence[str]) -> int:
    """`learnforget bench latency [--model M] [--batch-sizes 1 16] [--seq-lens 32 256]
    [--repeats 5] [--warmup 2] [--threads N] [--json FILE]`."""
    import argparse

    p = argparse.ArgumentParser(prog="learnforget bench latency",
                                description="Forward latency of each method relative to base")
    p.add_argument("--model", default="smollm2_135m", help="a model config name (conf/model)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    a = p.parse_args(list(args))
    res = run_latency(a.model, a.batch_sizes, a.seq_lens, a.repeats, a.threads, a.cache_dir,
                      warmup=a.warmup, variants=a.variants, verbose=True)
    print(format_latency(res))
    if a.json:
        from learnforget.files import atomic_write_json

        atomic_write_json(a.json, res)
    return 0
