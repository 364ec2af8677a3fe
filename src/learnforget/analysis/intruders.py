"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence").

For a linear module with base weight W_base and finetuned weight W_ft (a LoRA adapter merged:
W_base + scaling * B A; PiSSA/OLoRA adapters are first converted to a ΔW against the original
base), take the top-k left singular vectors u_1..u_k of W_ft. u_i is an intruder when its
largest |cosine| with any left singular vector of W_base (the min(out, in) columns of U_base
from the thin SVD) is below ε. This is exactly the test peft's
`peft.tuners.lora.intruders.reduce_intruder_dimension` applies (top_k=10, ε=0.5 by default);
test_intruders.py checks that both find the same intruders.

Reported per module and checkpoint (<run>/intruders/<checkpoint>.json):
    sims        the k_max similarities max_j |<u_i, U_base[:, j]>|, i = 1..k_max
    counts      intruders for every (k, ε) of the grid (k in KS, ε in EPSILONS)
    energy      the intruders' share of ΔW's energy, sum_i ||u_i^T ΔW||^2 / ||ΔW||_F^2
                (k=10, ε=0.5)
    chance      the same similarity for a uniformly random unit vector: its mean, and the
                probability that it falls below each ε (so chance_rate * k intruders are
                expected from noise alone: a number to compare the counts with)

The base model's SVD is the same for every run: U_base of each module is cached once per base
under <cache>/base_svd/<key>/ (the key hashes the base folder's path, file sizes and times).
The test needs all of U_base (the largest |cosine| over every base direction: projecting on
the base's top-r subspace is a different test), so that full SVD stays, once per base.

W_ft's top k_max vectors (k_max = 20) are found per checkpoint by `svd` (`top_left`):
"full" is the eigendecomposition of W_ft's smaller Gram matrix (`top_left_singular`), the
reference; "partial" (default) computes the top k_max + 8 singular pairs only (below 4M
elements the top eigenpairs of the Gram matrix, `learnforget.analysis.svd.gram_top`: BLAS
syrk, LAPACK dsyevr with an index range; from 4M Lanczos, `krylov_top`: PROPACK to machine
precision) and checks each vector: a bound <= 1e-5 on its angle to the exact vector, from
residuals recomputed with W_ft (`ritz_bounds`), so each similarity moves by at most ~1.4e-5;
where it fails (singular values tied to ~1e-10) the full route gives the answer. These
solvers' residuals are ~1e-13 of ||W||^2, so the check passes on real weights (all 210
modules of a SmolLM2-135M demo checkpoint, where the truncated route's failed on 170).
"truncated" is torch.svd_lowrank on a 2k+8 column sketch with a float64 Rayleigh-Ritz step
and the same check: pretrained weights have flat tops (SmolLM2-135M: s_48 / s_20 ~ 0.9,
neighbouring top-20 values 4e-4 s_1 apart), where subspace iteration leaves residuals far
above what the check needs, so it mostly falls back and costs more (`learnforget bench
spectra` measures all three). Each row records its route ("svd_route") and bound. All linear algebra runs on
`cpu_linalg_threads` (1 thread on a 2-thread torch: 2-thread calls were up to 28x slower on
the shared machine).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from learnforget.analysis.svd import (
    TOP_DEFAULT,
    TOP_METHODS,
    TOP_TOL,
    cpu_linalg_threads,
    top_singular,
)
from learnforget.errors import ConfigError
from learnforget.files import atomic_open, atomic_write_json, read_json
from learnforget.runfolder import RunFolder, find_runs

KS = (5, 10, 20)
EPSILONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_K, DEFAULT_EPS = 10, 0.5
INTRUDERS_VERSION = 1
CHANCE_SAMPLES = 4000


# ============================================================================ the test itself

def left_singular(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, S) of the thin SVD of w in float64: U is out x min(out, in)."""
    u, s, _ = torch.linalg.svd(w.detach().double(), full_matrices=False)
    return u, s


def top_left_singular(w: torch.Tensor, k: int) -> torch.Tensor:
    """The top k left singular vectors of w (out x k, float64, signs arbitrary), from the
    eigendecomposition of the smaller Gram matrix: 2-4x faster than a full SVD on a CPU, and
    the same vectors to ~1e-12 for the leading singular values (`left_singular` gives all)."""
    w = w.detach().double()
    m, n = w.shape
    k = min(k, m, n)
    if m <= n:
        _, vecs = torch.linalg.eigh(w @ w.T)
        return vecs[:, -k:].flip(1)
    vals, vecs = torch.linalg.eigh(w.T @ w)
    s = vals[-k:].flip(0).clamp_min(0).sqrt()
    u = w @ vecs[:, -k:].flip(1)
    return u / s.clamp_min(torch.finfo(torch.float64).tiny)


def top_left(w: torch.Tensor, k: int, svd: str = TOP_DEFAULT) -> dict[str, Any]:
    """The top k left singular vectors of w (float64) by `svd`: "full" is `top_left_singular`
    (the reference); "partial" (a checked partial eigendecomposition) and "truncated" (a
    checked randomised SVD) fall back on it (`learnforget.analysis.svd.top_singular`: {"u",
    "route", "bound", ...})."""
    return top_singular(w, k, method=svd, full=lambda m, kk: (top_left_singular(m, kk), None))


def similarities(u_base: torch.Tensor, u_ft: torch.Tensor) -> np.ndarray:
    """max_j |<u_ft[:, i], u_base[:, j]>| for every column i of u_ft."""
    return (u_ft.double().T @ u_base.double()).abs().max(dim=1).values.numpy()


def count(sims: Sequence[float], k: int, eps: float) -> int:
    """Intruders among the top k: similarities below eps."""
    return int((np.asarray(sims)[:k] < eps).sum())


def energy_share(u_ft: torch.Tensor, sims: Sequence[float], delta: torch.Tensor, k: int,
                 eps: float) -> float:
    """The intruders' share of ΔW's energy: sum over intruders u_i of ||u_i^T ΔW||^2 / ||ΔW||^2."""
    idx = [i for i in range(min(k, len(sims))) if sims[i] < eps]
    total = float(delta.double().pow(2).sum())
    if not idx or total == 0:
        return 0.0
    proj = u_ft[:, idx].double().T @ delta.double()
    return float(proj.pow(2).sum()) / total


_CHANCE: dict[tuple[int, int], np.ndarray] = {}


def chance_similarities(d: int, m: int, samples: int = CHANCE_SAMPLES, seed: int = 0
                        ) -> np.ndarray:
    """Similarities of uniformly random unit vectors in R^d with m orthonormal vectors: by
    rotation invariance, the largest |coordinate| among the first m of a random unit vector."""
    key = (d, m)
    if key not in _CHANCE:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(samples, d, generator=g, dtype=torch.float64)
        x = x / x.norm(dim=1, keepdim=True)
        _CHANCE[key] = x[:, :m].abs().max(dim=1).values.numpy()
    return _CHANCE[key]


def chance_level(shape: Sequence[int], epsilons: Sequence[float] = EPSILONS) -> dict[str, Any]:
    """For a module of shape (out, in): the mean similarity of a random direction with the
    base's min(out, in) left singular vectors, and P(similarity < ε) for each ε."""
    d, m = int(shape[0]), int(min(shape))
    sims = chance_similarities(d, m)
    return {"chance_mean": float(sims.mean()),
            "chance_rate": {f"{e:g}": float((sims < e).mean()) for e in epsilons}}


# ============================================================================ base SVD cache

def base_key(base_dir: Path) -> str:
    """A key for a base folder: its resolved path and its weight files' sizes and times."""
    base_dir = Path(base_dir).resolve()
    h = hashlib.sha1(str(base_dir).encode())
    for f in sorted(base_dir.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cached_base_u(cache: Path | None, base_dir: Path | None, module: str,
                  w_base: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(U_base of one module, whether it came from the cache); computed and stored on a miss."""
    path = None
    if cache is not None and base_dir is not None:
        path = Path(cache) / "base_svd" / base_key(base_dir) / f"{module}.npy"
        if path.exists():
            u = torch.from_numpy(np.load(path)).double()
            if u.shape[0] == w_base.shape[0] and u.shape[1] == min(w_base.shape):
                return u, True
    with cpu_linalg_threads(w_base.numel()):
        u, _ = left_singular(w_base)
    if path is not None:
        with atomic_open(path, "wb") as f:
            np.save(f, u.float().numpy())
    return u, False


# ============================================================================ per checkpoint

def module_row(name: str, module_type: str, layer: int | None, u_base: torch.Tensor,
               w_ft: torch.Tensor, delta: torch.Tensor, ks: Sequence[int] = KS,
               epsilons: Sequence[float] = EPSILONS, svd: str = TOP_DEFAULT) -> dict[str, Any]:
    """One module's intruder record (see the module docstring); `svd` picks how W_ft's top
    vectors are found (`top_left`; the route taken and its accuracy bound are in the row)."""
    with cpu_linalg_threads(w_ft.numel()):
        top = top_left(w_ft, max(ks), svd)
        u_ft = top["u"]
        sims = similarities(u_base, u_ft)
        energy = energy_share(u_ft, sims, delta, DEFAULT_K, DEFAULT_EPS)
    shape = tuple(w_ft.shape)
    return {"module": name, "module_type": module_type, "layer": layer, "shape": list(shape),
            "sims": [float(x) for x in sims],
            "counts": {str(k): {f"{e:g}": count(sims, k, e) for e in epsilons} for k in ks},
            "energy": energy,
            "svd_route": top["route"], "svd_bound": top["bound"],
            **chance_level(shape, epsilons)}


def compute_intruders(run_dir: Path, checkpoint: str | None = None, *,
                      cache_dir: Path | None = None, ks: Sequence[int] = KS,
                      epsilons: Sequence[float] = EPSILONS, force: bool = False,
                      verbose: bool = True, svd: str = TOP_DEFAULT) -> list[Path]:
    """<run>/intruders/<checkpoint>.json for each checkpoint (or one); skipped when done with
    the same grid (a record made with svd="full", or before the setting existed, also serves
    a "partial" or "truncated" request: it is the reference). `svd` picks how each W_ft's top k vectors are
    found (`top_left`; W_base's full SVD is cached either way). Returns the JSON paths."""
    from learnforget.analysis.deltas import extract_deltas
    from learnforget.analysis.weights import base_model_folder
    from learnforget.runfolder import RunFolder

    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ConfigError(f"intruder k values must be positive integers, got {list(ks)!r}")
    if not epsilons or any(not 0 < e < 1 for e in epsilons):
        raise ConfigError(f"intruder thresholds ε must be in (0, 1), got {list(epsilons)!r}")
    if svd not in TOP_METHODS:
        raise ConfigError(f"intruder svd {svd!r} is unknown (expected one of {TOP_METHODS})")
    run_dir = Path(run_dir)
    ckpts = [p for p in RunFolder(run_dir).checkpoint_dirs() if checkpoint in (None, p.name)]
    if checkpoint is not None and not ckpts:
        raise ConfigError(f"checkpoint {checkpoint!r} not found in {run_dir}")
    settings = {"version": INTRUDERS_VERSION, "ks": list(ks), "epsilons": list(epsilons),
                "svd": svd}
    paths: list[Path] = []
    for ck in ckpts:
        js = RunFolder(run_dir).intruders(ck.name)
        old = read_json(js)
        if old and not force and _reusable(old.get("settings"), settings):
            paths.append(js)
            continue
        ds = extract_deltas(run_dir, ck.name, with_weights=True, cache_dir=cache_dir)
        if ds is None:
            continue
        base_dir = base_model_folder(run_dir, cache_dir)
        cache = _cache_root(run_dir, cache_dir)
        rows, hits = [], 0
        for md in ds:
            assert md.base is not None and md.ft is not None
            u_base, hit = cached_base_u(cache, base_dir, md.name, md.base)
            hits += hit
            rows.append(module_row(md.name, md.module_type, md.layer, u_base, md.ft,
                                   md.to_dense(), ks, epsilons, svd))
        record = {"run": ds.run, "checkpoint": ds.checkpoint, "step": ds.manifest.get("step"),
                  "tokens": ds.manifest.get("tokens"), "method": ds.method, "delta": ds.source,
                  "base": ds.base, "base_model": ds.base_model, "settings": settings,
                  "base_svd_cache_hits": hits, "svd": _svd_summary(rows, svd), "rows": rows}
        atomic_write_json(js, record)
        paths.append(js)
        if verbose:
            print(f"learnforget: intruders of {run_dir.name}/{ck.name}: {len(rows)} modules "
                  f"({hits} base SVDs from the cache; {_routes(record['svd'])}) -> {js}")
    return paths


def _reusable(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether a stored record's settings serve a request: the same, or the full (reference)
    route where a checked one is asked for (records before the setting: full)."""
    if not old:
        return False
    old_svd = old.get("svd", "full")
    rest = {k: v for k, v in old.items() if k != "svd"}
    return rest == {k: v for k, v in new.items() if k != "svd"} and \
        old_svd in (new["svd"], "full")


def _svd_summary(rows: list[dict[str, Any]], svd: str) -> dict[str, Any]:
    """How the top vectors were found: modules per route and the largest accepted bound."""
    routes: dict[str, int] = {}
    for r in rows:
        routes[r["svd_route"]] = routes.get(r["svd_route"], 0) + 1
    bounds = [r["svd_bound"] for r in rows if r["svd_bound"] is not None]
    return {"method": svd, "tol": None if svd == "full" else TOP_TOL, "routes": routes,
            "max_bound": max(bounds) if bounds else None}


def _routes(summary: dict[str, Any]) -> str:
    return "top vectors: " + ", ".join(f"{n} {route}" for route, n in summary["routes"].items())


def _cache_root(run_dir: Path, cache_dir: Path | None) -> Path | None:
    if cache_dir is not None:
        return Path(cache_dir)
    cfg = RunFolder(run_dir).config
    if cfg.exists():
        from omegaconf import OmegaConf

        c = OmegaConf.load(cfg)
        return Path(str(c.paths.cache_dir)).expanduser()
    return None


# ============================================================================ tables, figures

def collect_intruders(root: Path, k: int = DEFAULT_K, eps: float = DEFAULT_EPS) -> pd.DataFrame:
    """One row per run x checkpoint x module: intruders at (k, ε), the energy share and the
    count chance predicts (chance_rate(ε) * k)."""
    from learnforget.analysis.collect import _settings

    rows = []
    for run_dir in find_runs(Path(root)):
        folder = RunFolder(run_dir)
        meta = _settings(folder.read_record())
        for js in sorted(folder.intruders_dir.glob(folder.intruders("*").name)):
            rec = read_json(js) or {}
            for r in rec.get("rows", []):
                kk = min(k, len(r["sims"]))
                rows.append({**{c: meta[c] for c in ("run", "method", "method_summary", "rank",
                                                     "seed")},
                             "checkpoint": rec.get("checkpoint"), "tokens": rec.get("tokens"),
                             "module": r["module"], "module_type": r["module_type"],
                             "layer": r["layer"], "shape": "x".join(map(str, r["shape"])),
                             "k": kk, "eps": eps, "intruders": count(r["sims"], kk, eps),
                             "energy": r["energy"], "chance_mean": r["chance_mean"],
                             "chance_intruders": kk * r["chance_rate"].get(f"{eps:g}", math.nan)})
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean intruders per module by method, checkpoint and module type, with the chance count."""
    if not len(df):
        return df
    g = df.groupby(["method_summary", "tokens", "module_type"], sort=True)
    return g.agg(runs=("run", "nunique"), modules=("module", "count"),
                 intruders=("intruders", "mean"), energy=("energy", "mean"),
                 chance_intruders=("chance_intruders", "mean"),
                 chance_mean_cos=("chance_mean", "mean")).reset_index()


def plot_intruders(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """intruders_vs_rank (last checkpoint of each run; full finetuning drawn as a line) and
    intruders_vs_tokens (one line per method setting), each with the chance count dashed."""
    from learnforget.analysis.figures import _save, plt

    if not len(df):
        raise ConfigError("no intruder records under the runs root")
    k, eps = int(df["k"].max()), float(df["eps"].iloc[0])
    per_ckpt = df.groupby(["run", "method", "method_summary", "rank", "tokens"],
                          dropna=False).agg(intruders=("intruders", "mean"),
                                            chance=("chance_intruders", "mean")).reset_index()
    last = per_ckpt.sort_values("tokens").groupby("run").tail(1)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, g in last.groupby("method"):
        if g["rank"].notna().any():
            m = g.groupby("rank")["intruders"].mean()
            ax.plot(m.index.astype(float), m.values, "o-", label=method)
        else:
            ax.axhline(float(g["intruders"].mean()), color="k", label=f"{method} (no rank)")
    ax.axhline(float(last["chance"].mean()), color="gray", ls="--", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("adapter rank r")
    ax.set_ylabel(f"intruders per module (top {k}, ε = {eps:g})")
    ax.legend(fontsize=8)
    paths = _save(fig, out_dir, "intruders_vs_rank")
    fig, ax = plt.subplots(figsize=(6, 4))
    for ms, g in per_ckpt.groupby("method_summary"):
        m = g.groupby("tokens")["intruders"].mean()
        ax.plot(m.index.astype(float), m.values, "o-", label=ms)
    ax.axhline(float(per_ckpt["chance"].mean()), color="gray", ls="--", label="chance")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"intruders per module (top {k}, ε = {eps:g})")
    ax.legend(fontsize=8)
    return paths + _save(fig, out_dir, "intruders_vs_tokens")
