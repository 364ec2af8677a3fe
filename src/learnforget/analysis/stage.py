"""The analysis stage: every figure and the table from a runs root, and the spectra benchmark.

    learnforget analyze runs [--out DIR] [--no-spectra] [--threshold 0.9] [--with-weights]
    learnforget bench spectra [--layers 32] [--rank 256] [--no-dense] [--intruders only]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learnforget.errors import ConfigError
from learnforget.runfolder import ANALYSIS, RunFolder, find_runs


def analyze(root: Path, out: Path | None = None, *, spectra: bool = True,
            threshold: float = 0.9, with_weights: bool = False, cache_dir: Path | None = None,
            dense_method: str = "svd", suite: str | None = None, random_n: int = 1000,
            verbose: bool = True, wandb: bool | None = None,
            intruders: bool = True, intruder_svd: str = "partial") -> dict[str, Any]:
    """Collect every run under `root` into a table, compute missing ΔW spectra (unless
    spectra=False), and regenerate every figure into `out` (default <root>/_analysis); then
    log the tables and figures to one W&B analysis run in the study's group (wandb None: when
    the runs mirrored to W&B; True: always; False: never). `intruder_svd`: how the intruder
    test finds each W_ft's top vectors (learnforget.analysis.intruders.top_left).
    Returns {"out", "table", "figures", "spectra", "warnings", "n_rows", "wandb"}; prints the
    paths."""
    from learnforget.analysis import figures as F
    from learnforget.analysis.collect import collect, collect_spectra, save_table
    from learnforget.analysis.spectra import (
        compute_spectra,
        dump_json,
        load_spectra,
        random_matrix_comparison,
    )
    from learnforget.runfolder import RunFolder

    root = Path(root)
    out = Path(out) if out is not None else root / ANALYSIS
    df = collect(root, suite=suite, verbose=verbose)
    warnings: list[str] = list(df.attrs.get("warnings", []))
    table = save_table(df, out)
    figs: list[Path] = []
    tables: list[Path] = []  # the follow-up tables (matched learning, intruders): csv + md

    def attempt(what: str, fn, *args, **kwargs) -> None:
        try:
            figs.extend(fn(*args, **kwargs))
        except ConfigError as e:
            warnings.append(f"{what}: {e}")
            if verbose:
                print(f"learnforget: warning: {what}: {e}")

    if len(df):
        suites = sorted(df["suite"].dropna().unique()) or [None]
        for s in suites:
            part = df[df["suite"] == s] if s is not None else df
            tag = f"-{s}" if len(suites) > 1 else ""
            attempt("learning vs forgetting", F.plot_learning_forgetting, part, out,
                    stem=f"learning_vs_forgetting{tag}")
            if part["forgetting_score"].notna().any() and part["forgetting_ce"].notna().any():
                attempt("learning vs forgetting (CE)", F.plot_learning_forgetting, part, out,
                        y="forgetting_ce", stem=f"learning_vs_forgetting_ce{tag}")
            if "drift_kl" in part.columns and part["drift_kl"].notna().any():
                attempt("learning vs drift", F.plot_learning_forgetting, part, out,
                        y="drift_kl", stem=f"learning_vs_drift{tag}")
            for y, what in (("paired_forgetting_margin_delta", "paired margin change"),
                            ("paired_forgetting_acc_delta", "paired accuracy change")):
                if y in part.columns and part[y].notna().any():
                    attempt(f"learning vs {what}", F.plot_learning_forgetting, part, out,
                            y=y, stem=f"learning_vs_{y}{tag}")
            attempt("learning/forgetting vs tokens", F.plot_vs_tokens, part, out,
                    stem=f"learning_forgetting_vs_tokens{tag}")
            attempt("matched learning", _matched, _at_best_lr(root, part), out, tag, tables)

    try:  # the regime study's three answers (runs scored with per-unit results)
        from learnforget.analysis.regime import write_regime

        got_regime = write_regime(root, out)
        tables.extend(p for p in got_regime if p.suffix in (".md", ".csv"))
        figs.extend(p for p in got_regime if p.suffix in (".png", ".svg"))
    except ConfigError as e:
        warnings.append(f"regime: {e}")

    try:  # the transfer study's D_T fit and multiplier figure (sweeps/transfer.yaml)
        from learnforget.analysis.transfer import write_transfer

        got_transfer = write_transfer(root, out)
        tables.extend(p for p in got_transfer if p.suffix in (".md", ".csv"))
        figs.extend(p for p in got_transfer if p.suffix in (".png", ".svg"))
    except ConfigError as e:
        warnings.append(f"transfer: {e}")

    try:  # LR searches: the best LR per setting and its ratio to full finetuning's
        from learnforget.analysis.lr_scaling import write_lr_table

        got = write_lr_table(root, out)
        if got is not None:
            tables.extend(got[1])
    except ConfigError as e:
        warnings.append(f"LR scaling: {e}")

    try:  # generation diversity (paper fig. 5): runs scored with a diversity task
        from learnforget.analysis.diversity import write_diversity

        got = write_diversity(root, out, suite)
        tables.extend(p for p in got if p.suffix in (".md", ".csv"))
        figs.extend(p for p in got if p.suffix in (".png", ".svg"))
    except ConfigError as e:
        warnings.append(f"diversity: {e}")
    try:  # the capacity control: data=facts runs' recall and bits per parameter
        from learnforget.analysis.capacity_study import write_capacity

        tables.extend(p for p in write_capacity(root, out, cache_dir) if p.suffix == ".md")
    except ConfigError as e:
        warnings.append(f"capacity: {e}")

    spectra_paths: list[Path] = []
    if spectra:
        plotted: set[str] = set()
        for run_dir in find_runs(root):
            if not RunFolder(run_dir).checkpoint_dirs():
                continue
            try:
                got = compute_spectra(run_dir, threshold=threshold, with_weights=with_weights,
                                      cache_dir=cache_dir, dense_method=dense_method,
                                      verbose=verbose)
            except ConfigError as e:
                warnings.append(f"spectra of {run_dir}: {e}")
                if verbose:
                    print(f"learnforget: warning: spectra of {run_dir}: {e}")
                continue
            spectra_paths.extend(got)
            key = _seedless_key(run_dir)
            if not got or key in plotted:  # the other seeds of a setting: table rows only
                continue
            plotted.add(key)
            loaded = [load_spectra(run_dir, p.stem) for p in got]
            sdir = out / "spectra"
            attempt(f"rank heatmap of {run_dir.name}", F.plot_rank_heatmap, loaded[-1][0], sdir)
            attempt(f"spectra curves of {run_dir.name}", F.plot_spectra_curves, loaded, sdir)
        sdf = collect_spectra(root)
        if len(sdf):
            from learnforget.analysis.noise_baseline import add_gaussian_column, rank_context_table

            sdf = add_gaussian_column(sdf)  # each rank for 90% beside a Gaussian's
            tables.extend(save_table(rank_context_table(sdf), out, stem="rank_vs_gaussian")[:1])
            save_table(sdf, out, stem="spectra")
            attempt("rank vs tokens", F.plot_rank_vs_tokens, sdf, out / "spectra")
    if intruders:
        _intruders(root, out, cache_dir, figs, tables, warnings, verbose, intruder_svd)
    if random_n:
        rm = random_matrix_comparison(n=random_n)
        (out / "random_matrices.json").write_text(dump_json(rm) + "\n")
        figs.extend(F.plot_random_matrices(rm, out))
    result = {"out": out, "table": table, "figures": figs, "spectra": spectra_paths,
              "tables": tables, "warnings": warnings, "n_rows": len(df),
              "wandb": None if wandb is False else _mirror(root, out, figs, len(df), wandb)}
    if verbose:
        _print_outputs(root, out, result)
    return result


def _print_outputs(root: Path, out: Path, result: dict[str, Any]) -> None:
    """The tables and the PNG figures (each has an SVG beside it), and the W&B run."""
    shown = [p for p in result["table"] + result["tables"] + result["figures"]
             if p.suffix in (".csv", ".md", ".png")]
    print(f"learnforget: analysis of {root} ({result['n_rows']} rows) -> {out} "
          f"({len(shown)} tables and figures; SVG and parquet copies beside them)")
    for p in shown:
        print(f"  {p}")
    if result["wandb"] is not None:
        print(f"learnforget: analysis logged to W&B ({result['wandb']})")


def _mirror(root: Path, out: Path, figs: list[Path], n_rows: int, force: bool | None):
    """The analysis W&B run (learnforget.analysis.wandb_tables): its folder, or None."""
    from learnforget.analysis.wandb_tables import default_logger, log_analysis, study_logger

    logger_cfg, group = study_logger(find_runs(root), root)
    if logger_cfg is None and not force:
        return None
    return log_analysis(out, figs, logger_cfg=logger_cfg or default_logger(), group=group,
                        n_rows=n_rows)



def _intruders(root: Path, out: Path, cache_dir: Path | None, figs: list[Path],
               tables: list[Path], warnings: list[str], verbose: bool,
               svd: str = "partial") -> None:
    """Intruder dimensions of every run's checkpoints (learnforget.analysis.intruders), the summary
    table (intruders.csv / .md: mean per module by method, tokens and module type, with the
    count chance predicts) and the figures intruders_vs_rank / intruders_vs_tokens."""
    from learnforget.analysis.collect import save_table
    from learnforget.analysis.intruders import (
        collect_intruders,
        compute_intruders,
        plot_intruders,
        summary,
    )
    from learnforget.files import atomic_open
    from learnforget.runfolder import RunFolder

    for run_dir in find_runs(root):
        if not RunFolder(run_dir).checkpoint_dirs():
            continue
        try:
            compute_intruders(run_dir, cache_dir=cache_dir, verbose=verbose, svd=svd)
        except ConfigError as e:
            warnings.append(f"intruders of {run_dir}: {e}")
            if verbose:
                print(f"learnforget: warning: intruders of {run_dir}: {e}")
    df = collect_intruders(root)
    if not len(df):
        return
    s = summary(df)
    tables.extend(save_table(s, out, stem="intruders")[:1])
    md = out / "intruders.md"
    with atomic_open(md, "w") as f:
        f.write(f"# Intruder dimensions: mean per module (top k={int(df['k'].max())}, "
                f"ε={df['eps'].iloc[0]:g}); chance = the count random directions would give\n\n"
                + s.to_markdown(index=False, floatfmt=".3f") + "\n")
    tables.append(md)
    try:
        figs.extend(plot_intruders(df, out / "intruders"))
    except ConfigError as e:
        warnings.append(f"intruder figures: {e}")


def _at_best_lr(root: Path, part):
    """The rows of each setting's best-LR runs when the root holds an LR search (a setting at
    several LRs), so that matched learning compares each method at its own best LR."""
    from learnforget.analysis.lr_scaling import collect_lr_runs, lr_table

    runs = collect_lr_runs(root)
    if not len(runs) or not (runs.groupby("setting")["lr"].nunique() > 1).any():
        return part
    best = lr_table(runs)[["setting", "best_lr"]]
    keep = runs.merge(best, on="setting")
    keep = set(keep.loc[keep["lr"] == keep["best_lr"], "run"])
    return part[part["run"].isin(keep)]


def _matched(part, out: Path, tag: str, tables: list[Path]) -> list[Path]:
    """Forgetting at matched learning (and learning at matched forgetting) for every pair of
    methods: against the Pareto plot's forgetting measure and, when present, drift."""
    from learnforget.analysis import figures as F
    from learnforget.analysis.matched import write_matched

    learning = F.learning_column(part)
    paths: list[Path] = []
    ys = [F.forgetting_column(part)]
    if "drift_kl" in part.columns and part["drift_kl"].notna().any():
        ys.append("drift_kl")
    for y in ys:
        stem = f"matched_learning{'' if y == ys[0] else '_drift'}{tag}"
        got = write_matched(part, out, learning, y, stem=stem,  # arm: method + regulariser
                            group="arm" if "arm" in part.columns else "method_summary")[1]
        tables.extend(p for p in got if p.suffix in (".csv", ".md"))
        paths.extend(p for p in got if p.suffix not in (".csv", ".md"))
    return paths


def _seedless_key(run_dir: Path) -> str:
    """A run's resolved config without its seed: runs that differ only by seed share it."""
    import yaml

    path = RunFolder(run_dir).config
    cfg = (yaml.safe_load(path.read_text()) if path.exists() else None) or {"run": str(run_dir)}
    for key in ("seed", "run_name"):
        cfg.pop(key, None)
    return json.dumps(cfg, sort_keys=True, default=str)


# ============================================================================ benchmark

LLAMA2_7B_MODULES = (("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096),
                     ("o_proj", 4096, 4096), ("gate_proj", 11008, 4096),
                     ("up_proj", 11008, 4096), ("down_proj", 4096, 11008))


def bench_spectra(*, layers: int = 32, rank: int = 256, modules=LLAMA2_7B_MODULES,
                  dense: bool = True, seed: int = 0, threads: int | None = None,
                  verbose: bool = True) -> dict[str, Any]:
    """Time the ΔW spectra of a Llama-2-7B-shaped model (layers x q,k,v,o,gate,up,down) with
    LoRA factors of rank `rank` through the factor route, in float64 (the default) and float32
    (random factors; their generation is not timed); then one dense square and one dense
    rectangular ΔW through svdvals and through the Gram route, the square one being B @ A of
    the first module so that the factor route is checked against the dense SVD. `threads` sets
    LEARNFORGET_LINALG_THREADS for the run. Prints a table and returns the numbers."""
    import os

    from learnforget.analysis.svd import (
        LINALG_THREADS_ENV,
        dense_svdvals,
        linalg_threads,
        lowrank_svdvals,
        rank_for_variance,
    )

    saved = os.environ.get(LINALG_THREADS_ENV)
    if threads is not None:
        os.environ[LINALG_THREADS_ENV] = str(threads)
    try:
        g = torch.Generator().manual_seed(seed)
        t64 = t32 = 0.0
        n_mod = 0
        first = None
        for _layer in range(layers):
            for name, d, k in modules:
                B = torch.randn(d, rank, generator=g) / rank ** 0.5
                A = torch.randn(rank, k, generator=g) / k ** 0.5
                t0 = time.perf_counter()
                s = lowrank_svdvals(B, A, 2.0)
                t64 += time.perf_counter() - t0
                t0 = time.perf_counter()
                lowrank_svdvals(B, A, 2.0, dtype=torch.float32)
                t32 += time.perf_counter() - t0
                n_mod += 1
                if first is None:
                    first = (name, B, A, s)
        big = max(d * k for _, d, k in modules)
        res: dict[str, Any] = {
            "torch_threads": torch.get_num_threads(),
            "factor_threads": linalg_threads(big, skinny=True) or torch.get_num_threads(),
            "dense_threads": linalg_threads(big) or torch.get_num_threads(),
            "layers": layers, "rank": rank, "n_modules": n_mod,
            "factor_route_total_s": t64, "factor_route_per_module_s": t64 / n_mod,
            "factor_route_float32_total_s": t32}
        rows = [(f"factor route float64, {n_mod} modules (r={rank})", t64),
                (f"factor route float32, {n_mod} modules (r={rank})", t32)]
        if dense:
            rows += _bench_dense(res, first, modules, g, dense_svdvals, rank_for_variance,
                                 rank, layers, n_mod)
    finally:
        if threads is not None:
            if saved is None:
                os.environ.pop(LINALG_THREADS_ENV, None)
            else:
                os.environ[LINALG_THREADS_ENV] = saved
    if verbose:
        print(f"ΔW spectra benchmark: torch threads {res['torch_threads']}, factor route on "
              f"{res['factor_threads']} thread(s), dense on {res['dense_threads']}; inputs float32")
        print(f"{'what':<58} {'seconds':>10}")
        for what, t in rows:
            print(f"{what:<58} {t:>10.2f}")
        if dense:
            print(f"factor route vs dense SVD, max |Δs| / s_max: "
                  f"{res['fast_vs_dense_max_rel_diff']:.2e} (dense tail beyond r: "
                  f"{res['dense_tail_over_top']:.1e} of s_max)")
            print(f"rank for 90%: factor {res['rank90_fast_dense_gram'][0]}, dense "
                  f"{res['rank90_fast_dense_gram'][1]}, Gram {res['rank90_fast_dense_gram'][2]};"
                  f" {res['rect_shape'][0]}x{res['rect_shape'][1]} svd "
                  f"{res['rect_rank90_svd_gram'][0]} vs Gram {res['rect_rank90_svd_gram'][1]}")
    return res


def _timed(fn, *args):
    """(fn(*args), seconds it took)."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _bench_dense(res, first, modules, g, dense_svdvals, rank_for_variance, rank, layers, n_mod):
    name, B, A, s_fast = first
    m = 2.0 * (B @ A)
    s_dense, t_sq = _timed(dense_svdvals, m, "svd")
    s_gram, t_sq_gram = _timed(dense_svdvals, m, "gram")
    rr = min(rank, s_dense.size)
    res.update({
        "dense_shape": list(m.shape), "dense_svdvals_s": t_sq, "dense_gram_s": t_sq_gram,
        "fast_vs_dense_max_rel_diff": float(np.max(np.abs(s_fast[:rr] - s_dense[:rr]))
                                            / s_dense[0]),
        "dense_tail_over_top": float(s_dense[rr:].max() / s_dense[0]) if s_dense.size > rr else 0.0,
        "rank90_fast_dense_gram": [rank_for_variance(s_fast), rank_for_variance(s_dense),
                                   rank_for_variance(s_gram)],
    })
    rows = [(f"dense svdvals {m.shape[0]}x{m.shape[1]} ({name})", t_sq),
            (f"dense Gram eigvalsh {m.shape[0]}x{m.shape[1]}", t_sq_gram)]
    d, k = max(((dd, kk) for _, dd, kk in modules), key=lambda t: (t[0] != t[1], t[0] * t[1]))
    rect = torch.randn(min(d, k), max(d, k), generator=g)
    s_rect, t_rect = _timed(dense_svdvals, rect, "svd")
    s_rect_gram, t_rect_gram = _timed(dense_svdvals, rect, "gram")
    n_square = sum(1 for _, dd, kk in modules if dd == kk) * layers
    per_model = n_square * t_sq + (n_mod - n_square) * t_rect
    per_model_gram = n_square * t_sq_gram + (n_mod - n_square) * t_rect_gram
    res.update({"rect_shape": list(rect.shape), "rect_svdvals_s": t_rect,
                "rect_gram_s": t_rect_gram,
                "rect_rank90_svd_gram": [rank_for_variance(s_rect), rank_for_variance(s_rect_gram)],
                "rect_gram_max_rel_diff": float(np.max(np.abs(s_rect - s_rect_gram)) / s_rect[0]),
                "dense_model_estimate_s": per_model, "gram_model_estimate_s": per_model_gram})
    return rows + [(f"dense svdvals {rect.shape[0]}x{rect.shape[1]} (Gaussian)", t_rect),
                   (f"dense Gram eigvalsh {rect.shape[0]}x{rect.shape[1]}", t_rect_gram),
                   (f"estimate: all {n_mod} dense ΔW via svdvals", per_model),
                   (f"estimate: all {n_mod} dense ΔW via Gram", per_model_gram)]


# ============================================================================ CLI entry points

def analyze_cli(args: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="learnforget analyze",
                                description="Table, figures and ΔW spectra of every run under "
                                            "a runs root.")
    p.add_argument("root", type=Path, help="runs root (e.g. runs/)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default ROOT/_analysis)")
    p.add_argument("--no-spectra", action="store_true", help="skip the ΔW spectra")
    p.add_argument("--threshold", type=float, default=0.9, help="variance share for the rank")
    p.add_argument("--with-weights", action="store_true",
                   help="also the spectra of W_base and W_ft (dense, slow on 7B)")
    p.add_argument("--gram", action="store_true",
                   help="dense spectra through the Gram matrix (faster, same rank-for-90%%)")
    p.add_argument("--suite", default=None, help="eval suite to use (default: every suite)")
    p.add_argument("--cache-dir", type=Path, default=None, help="where base models are cached")
    p.add_argument("--no-intruders", action="store_true",
                   help="skip the intruder dimensions (W_ft's top 20 vectors per module and "
                        "checkpoint, W_base's full SVD once per base)")
    p.add_argument("--intruder-svd", choices=("partial", "full", "truncated"),
                   default="partial",
                   help="W_ft's top vectors by a checked partial eigendecomposition (default), "
                        "the full one (the reference, and the fallback of the checked routes) "
                        "or a checked randomised SVD")
    p.add_argument("--random-n", type=int, default=1000,
                   help="size of the fig. S8 random matrices (0: skip)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--wandb", dest="wandb", action="store_true", default=None,
                   help="log the analysis to W&B even when the runs did not (default: when "
                        "they did)")
    w.add_argument("--no-wandb", dest="wandb", action="store_false",
                   help="do not log the analysis to W&B")
    a = p.parse_args(list(args))
    analyze(a.root, a.out, spectra=not a.no_spectra, threshold=a.threshold,
            with_weights=a.with_weights, cache_dir=a.cache_dir,
            dense_method="gram" if a.gram else "svd", suite=a.suite, random_n=a.random_n,
            wandb=a.wandb, intruders=not a.no_intruders, intruder_svd=a.intruder_svd)
    return 0


def bench_cli(args: Sequence[str]) -> int:
    args = list(args)
    if not args or args[0] != "spectra":
        raise ConfigError("usage: learnforget bench spectra [--layers N] [--rank R] [--no-dense]")
    p = argparse.ArgumentParser(prog="learnforget bench spectra")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--no-dense", action="store_true", help="skip the dense SVD timings")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for every SVD (default: 1 for the factor route and small "
                        "matrices, torch's setting for large dense ones)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--intruders", choices=("yes", "no", "only"), default="yes",
                   help="also time the intruder test, full vs partial (vs truncated at 135M) "
                        "SVD, per checkpoint at 135M and at Llama-2-7B shapes "
                        "(learnforget.bench.intruders)")
    p.add_argument("--model", default="smollm2_135m", help="the intruder part's real base")
    p.add_argument("--run", type=Path, default=None,
                   help="time the intruder test on this run's checkpoints instead")
    p.add_argument("--base-svd", action="store_true",
                   help="also time W_base's full SVD at 7B shapes (once per base; minutes)")
    p.add_argument("--per-shape", type=int, default=2,
                   help="matrices timed per Llama-2-7B shape in the intruder part (mean scaled)")
    p.add_argument("--intruder-routes", default=None,
                   help="comma-separated subset of full_torch_threads,full,partial,truncated "
                        "to time at 135M (default all; full always runs)")
    a = p.parse_args(args[1:])
    res: dict[str, Any] = {}
    if a.intruders != "only":
        res = bench_spectra(layers=a.layers, rank=a.rank, dense=not a.no_dense, threads=a.threads)
    if a.intruders != "no":
        from learnforget.bench.intruders import bench_intruders

        res["intruders"] = bench_intruders(model=a.model, run=a.run, modules=LLAMA2_7B_MODULES,
                                           layers=a.layers, base_svd=a.base_svd,
                                           per_shape=a.per_shape,
                                           routes=a.intruder_routes.split(",")
                                           if a.intruder_routes else None)
    if a.json:
        from learnforget.files import atomic_write_json

        atomic_write_json(a.json, res)
    return 0
