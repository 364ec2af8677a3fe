"""`learnforget bench spectra`'s intruder part: the per-checkpoint time of the intruder test
(learnforget.analysis.intruders) through the full route, the partial one (the default) and
the truncated one, side by side, and how far apart their results are. Times are process CPU
seconds (time.process_time: on a loaded machine wall time measures the neighbours).

- 135M: every block weight of the real base model (SmolLM2-135M by default) with a synthetic
  finetuning update (below), or, with --run, the real checkpoints of a run; per checkpoint
  the sum over its modules of `module_row` with svd="full", "partial" and "truncated" (W_ft's
  top 20 vectors, the similarities with all of U_base, counts, energy), plus W_base's full
  SVD, the once-per-base cost the cache pays.
- 7B shapes: `per_shape` matrices per Llama-2-7B module shape, each a base with a spectrum
  like a pretrained weight's (`planted_spectrum_matrix`) plus the synthetic update, through
  the full and the partial route (the truncated one is left out: it costs more than the full
  one there), the mean time per shape scaled to the 224 modules of the model.

The synthetic update of a base weight W (out x in, top singular value s_1, by power
iteration): Gaussian noise of 1e-3 times W's root-mean-square entry, and in every third module
a planted rank-one direction 0.5 s_1 x y^T (x, y random unit vectors), which becomes one of W_ft's top vectors and is an
intruder (a random direction's largest |cosine| with the base's basis is about
sqrt(2 ln(out) / out)). Results are compared with the full route's as the largest
|difference| of the similarities and whether every count of the (k, ε) grid agrees.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learnforget.errors import ConfigError

K = 20  # the intruder test's k_max (learnforget.analysis.intruders.KS)
SPECTRUM_ALPHA = 0.2  # s_i ~ i^-alpha; fits to SmolLM2-135M's top 100 gave 0.07-0.84, mostly ~0.2


def _timed(fn, *args, **kwargs):
    """(fn's result, the process CPU seconds it took)."""
    t0 = time.process_time()
    out = fn(*args, **kwargs)
    return out, time.process_time() - t0


def _top_singular_value(w: torch.Tensor, g: torch.Generator, iters: int = 30) -> torch.Tensor:
    """s_1 of w to about 1e-3 by power iteration (30 products with w and w^T; a full SVD of a
    7B-shaped matrix only to size the planted direction took longer than the timed routes)."""
    v = torch.randn(w.shape[1], generator=g, dtype=w.dtype)
    for _ in range(iters):
        v = w.T @ (w @ v)
        v = v / v.norm()
    return (w @ v).norm()


def synthetic_update(w: torch.Tensor, plant: bool, g: torch.Generator) -> torch.Tensor:
    """A finetuning-like ΔW for w (see the module docstring)."""
    w = w.double()
    delta = torch.randn(w.shape, generator=g, dtype=torch.float64) * 1e-3 * w.pow(2).mean().sqrt()
    if plant:
        x = torch.randn(w.shape[0], generator=g, dtype=torch.float64)
        y = torch.randn(w.shape[1], generator=g, dtype=torch.float64)
        s1 = _top_singular_value(w, g)
        delta += 0.5 * s1 * torch.outer(x / x.norm(), y / y.norm())
    return delta


def compare_rows(full: dict[str, Any], trunc: dict[str, Any]) -> tuple[float, bool]:
    """(largest |similarity difference|, whether every (k, ε) count agrees)."""
    diff = float(np.max(np.abs(np.asarray(full["sims"]) - np.asarray(trunc["sims"]))))
    return diff, full["counts"] == trunc["counts"]


ROUTES = (("full_torch_threads", "full"), ("full", "full"), ("partial", "partial"),
          ("truncated", "truncated"))
CHECKED = ("partial", "truncated")


def time_modules(modules, *, base_u: dict[str, torch.Tensor] | None = None,
                 routes: Sequence[str] | None = None) -> dict[str, Any]:
    """`modules`: (name, module type, layer, W_base, W_ft) tuples of one checkpoint. Times the
    base SVD (skipped for names in `base_u`), then module_row through the full route on
    torch's threads (the behaviour before cpu_linalg_threads), the full route, the partial
    one and the truncated one (`routes`: a subset of ROUTES' labels; the full route always
    runs); compares the checked routes' rows with the full route's."""
    import os

    from learnforget.analysis.intruders import left_singular, module_row
    from learnforget.analysis.svd import LINALG_THREADS_ENV, cpu_linalg_threads

    base_u = {} if base_u is None else base_u
    labels = [label for label, _ in ROUTES]
    wanted = set(labels if routes is None else routes) | {"full"}
    if wanted - set(labels):
        raise ConfigError(f"intruder bench routes {sorted(wanted - set(labels))} are unknown "
                          f"(expected some of {labels})")
    todo = [(label, svd) for label, svd in ROUTES if label in wanted]
    checked = [c for c in CHECKED if c in wanted]
    t = {"base_svd": 0.0, **{label: 0.0 for label, _ in todo}}
    diff = {c: 0.0 for c in checked}
    same = {c: True for c in checked}
    found: dict[str, dict[str, int]] = {c: {} for c in checked}
    n, intruders = 0, 0
    for name, mtype, layer, w_base, w_ft in modules:
        if name not in base_u:
            with cpu_linalg_threads(w_base.numel()):
                (u, _), dt = _timed(left_singular, w_base)
            base_u[name] = u
            t["base_svd"] += dt
        delta = (w_ft.double() - w_base.double())
        rows = {}
        saved = os.environ.get(LINALG_THREADS_ENV)
        for label, svd in todo:
            if label == "full_torch_threads":
                os.environ[LINALG_THREADS_ENV] = str(torch.get_num_threads())
            try:
                rows[label], dt = _timed(module_row, name, mtype, layer, base_u[name], w_ft,
                                         delta, svd=svd)
            finally:
                if saved is None:
                    os.environ.pop(LINALG_THREADS_ENV, None)
                else:
                    os.environ[LINALG_THREADS_ENV] = saved
            t[label] += dt
        for c in checked:
            d, ok = compare_rows(rows["full"], rows[c])
            diff[c], same[c] = max(diff[c], d), same[c] and ok
            r = rows[c]["svd_route"]
            found[c][r] = found[c].get(r, 0) + 1
        n += 1
        intruders += rows["full"]["counts"]["10"]["0.5"]
    out = {"modules": n, "base_svd_s": t["base_svd"],
           **{f"{label}_s": t[label] for label, _ in todo},
           "intruders_k10_eps05": intruders}
    for c in checked:
        out[f"{c}_max_sim_diff"], out[f"{c}_counts_equal"] = diff[c], same[c]
        out[f"{c}_routes"] = found[c]
    return out


def base_checkpoint(base_dir: Path, seed: int = 0, max_modules: int | None = None):
    """The real base's block weights, each with a synthetic update: time_modules' tuples."""
    from learnforget.analysis.weights import (
        WeightFolder,
        block_weights,
        module_types,
        natural_key,
        parse_module,
    )

    wf = WeightFolder(base_dir)
    keys = block_weights(wf)
    names = sorted(keys, key=natural_key)[:max_modules]
    types = module_types(names)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, name in enumerate(names):
        w = wf.get(keys[name])
        w_ft = (w.double() + synthetic_update(w, i % 3 == 0, g)).float()
        out.append((name, types[name], parse_module(name)[0], w, w_ft))
    return out


def run_checkpoints(run_dir: Path, cache_dir: Path | None):
    """{checkpoint: time_modules' tuples} of a run's real checkpoints (LoRA merged)."""
    from learnforget.analysis.deltas import extract_deltas
    from learnforget.runfolder import RunFolder

    out = {}
    for ck in RunFolder(run_dir).checkpoint_dirs():
        ds = extract_deltas(run_dir, ck.name, with_weights=True, cache_dir=cache_dir)
        if ds is not None:
            out[ck.name] = [(md.name, md.module_type, md.layer, md.base, md.ft) for md in ds]
    if not out:
        raise ConfigError(f"{run_dir} has no checkpoint whose method changes weight matrices")
    return out


def planted_spectrum_matrix(m: int, n: int, g: torch.Generator,
                            alpha: float = SPECTRUM_ALPHA) -> torch.Tensor:
    """An m x n float32 matrix G1 diag(s) G2^T (G Gaussian, columns scaled to about unit
    norm), s_i = i^-alpha: a slowly decaying spectrum like a pretrained weight's, whose top
    vectors a randomised SVD must work for."""
    r = min(m, n)
    s = torch.arange(1, r + 1, dtype=torch.float32).pow(-alpha)
    g1 = torch.randn(m, r, generator=g) / math.sqrt(m)
    g2 = torch.randn(n, r, generator=g) / math.sqrt(n)
    return (g1 * s) @ g2.T


def bench_7b_shapes(modules: Sequence[tuple[str, int, int]], layers: int = 32, seed: int = 0,
                    base_svd: bool = False, per_shape: int = 2) -> dict[str, Any]:
    """Per distinct shape of `modules`, `per_shape` matrices W_base + synthetic update (the
    first with a planted intruder) through the full and the partial route (and W_base's full
    SVD with `base_svd`, once per shape); the mean time per shape scaled to layers x
    modules."""
    from learnforget.analysis.intruders import left_singular, top_left, top_left_singular
    from learnforget.analysis.svd import cpu_linalg_threads

    if per_shape < 1:
        raise ConfigError(f"matrices per shape must be >= 1, got {per_shape!r}")
    g = torch.Generator().manual_seed(seed)
    shapes: dict[tuple[int, int], dict[str, Any]] = {}
    for _, d_out, d_in in modules:
        if (d_out, d_in) in shapes:
            shapes[(d_out, d_in)]["count"] += layers
            continue
        t_full, t_part, dist, bounds, routes = [], [], 0.0, [], {}
        row: dict[str, Any] = {"count": layers}
        for i in range(per_shape):
            w_base = planted_spectrum_matrix(d_out, d_in, g)
            w = (w_base.double() + synthetic_update(w_base, i == 0, g)).float()
            with cpu_linalg_threads(w.numel()):
                u_full, dt = _timed(top_left_singular, w, K)
                t_full.append(dt)
                top, dt = _timed(top_left, w, K, "partial")
                t_part.append(dt)
                if base_svd and i == 0:
                    row["base_svd_s"] = _timed(left_singular, w_base)[1]
            # sign-aligned distance between the routes' vectors: bounds every |cosine| change
            dots = (u_full * top["u"]).sum(dim=0)
            dist = max(dist, float((u_full - top["u"] * torch.sign(dots)).norm(dim=0).max()))
            routes[top["route"]] = routes.get(top["route"], 0) + 1
            if top["bound"] is not None:
                bounds.append(top["bound"])
        row.update({"full_s": sum(t_full) / per_shape, "partial_s": sum(t_part) / per_shape,
                    "matrices": per_shape, "routes": routes,
                    "bound": max(bounds) if bounds else None, "max_vector_diff": dist})
        shapes[(d_out, d_in)] = row
    total = {key: sum(v["count"] * v[key] for v in shapes.values())
             for key in ("full_s", "partial_s", "base_svd_s") if base_svd or key != "base_svd_s"}
    return {"shapes": {f"{a}x{b}": v for (a, b), v in shapes.items()},
            "n_modules": sum(v["count"] for v in shapes.values()), "spectrum_alpha": SPECTRUM_ALPHA,
            "per_shape": per_shape,
            "per_checkpoint_full_s": total["full_s"],
            "per_checkpoint_partial_s": total["partial_s"],
            "per_base_svd_s": total.get("base_svd_s"),
            "max_vector_diff": max(v["max_vector_diff"] for v in shapes.values())}


def bench_intruders(*, model: str = "smollm2_135m", run: Path | None = None,
                    modules: Sequence[tuple[str, int, int]] = (), layers: int = 32,
                    base_svd: bool = False, seed: int = 0, per_shape: int = 2,
                    routes: Sequence[str] | None = None, verbose: bool = True
                    ) -> dict[str, Any]:
    """Both sections (see the module docstring); prints a table; returns the numbers."""
    from learnforget.assets.models import base_model_dir
    from learnforget.config import compose

    res: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "k": K,
                           "clock": "process CPU seconds"}
    if run is not None:
        res["run"] = str(run)
        res["checkpoints"] = {ck: time_modules(mods, routes=routes) for ck, mods in
                              run_checkpoints(Path(run), None).items()}
    else:
        cfg = compose([f"model={model}"])
        base = Path(base_model_dir(cfg.model, Path(str(cfg.paths.cache_dir)).expanduser()))
        res["model"] = model
        res["checkpoints"] = {"synthetic": time_modules(base_checkpoint(base, seed),
                                                        routes=routes)}
    if modules:
        res["shapes_7b"] = bench_7b_shapes(modules, layers, seed, base_svd, per_shape)
    if verbose:
        print(format_intruders(res))
    return res


def _routes(routes: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in routes.items())


def format_intruders(r: dict[str, Any]) -> str:
    what = r.get("run") or f"{r.get('model')} base + synthetic update"
    lines = [f"intruder test per checkpoint (W_ft's top {r['k']} vectors, similarities with all "
             f"of U_base), {what}; torch threads {r['torch_threads']}; process CPU seconds:",
             f"  {'checkpoint':<14} {'modules':>7} {'full, torch threads':>20} {'full':>7} "
             f"{'partial':>8} {'truncated':>10} {'base SVD':>9}"]
    for ck, v in r["checkpoints"].items():
        cell = {key: f"{v[key]:.2f}" if key in v else "-" for key in
                ("full_torch_threads_s", "full_s", "partial_s", "truncated_s", "base_svd_s")}
        lines.append(f"  {ck:<14} {v['modules']:>7} {cell['full_torch_threads_s']:>20} "
                     f"{cell['full_s']:>7} {cell['partial_s']:>8} {cell['truncated_s']:>10} "
                     f"{cell['base_svd_s']:>9}")
        for c in [c for c in CHECKED if f"{c}_routes" in v]:
            lines.append(f"    {c} against full: max |Δsim| {v[f'{c}_max_sim_diff']:.1e}, counts "
                         f"{'same' if v[f'{c}_counts_equal'] else 'DIFFER'}; routes "
                         f"{_routes(v[f'{c}_routes'])}")
    s7 = r.get("shapes_7b")
    if s7:
        lines.append(f"Llama-2-7B shapes ({s7['n_modules']} modules; {s7['per_shape']} matrices "
                     f"per shape, s_i ~ i^-{s7['spectrum_alpha']} plus the synthetic update; "
                     "mean CPU s per matrix, scaled):")
        for shape, v in s7["shapes"].items():
            base = f", base SVD {v['base_svd_s']:.1f} s" if "base_svd_s" in v else ""
            lines.append(f"  {shape:<12} x{v['count']:<4} full {v['full_s']:7.2f} s  partial "
                         f"{v['partial_s']:6.2f} s ({_routes(v['routes'])}; vectors differ by "
                         f"{v['max_vector_diff']:.1e}){base}")
        per_base = s7["per_base_svd_s"]
        lines.append(f"  per checkpoint: full {s7['per_checkpoint_full_s'] / 60:.1f} min, "
                     f"partial {s7['per_checkpoint_partial_s'] / 60:.1f} min"
                     + (f"; W_base's full SVD, once per base: {per_base / 60:.1f} min"
                        if per_base is not None else ""))
    return "\n".join(lines)
