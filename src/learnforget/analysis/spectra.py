"""Spectral analysis of weight updates (paper section 4.6, fig. 6, S7, S8).

For each linear module of a checkpoint: the update ΔW (:mod:`learnforget.analysis.deltas`), its
singular values (:mod:`learnforget.analysis.svd`) and per-module summaries (rank needed for 90%
of the variance, effective and stable rank, top singular value, Frobenius norm), stored per
checkpoint and reused while the settings match:

    compute_spectra(run_dir)   ->  <run>/spectra/<checkpoint>.npz  (singular values per module)
                                   <run>/spectra/<checkpoint>.json (summary rows + provenance)
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learnforget.analysis.deltas import ModuleDelta, extract_deltas
from learnforget.analysis.svd import (
    DENSE_METHODS,
    default_device,
    dense_svd,
    dense_svdvals,
    lowrank_svd,
    lowrank_svdvals,
    rank_for_variance,
    spectrum_summary,
    subspace_similarity,
)
from learnforget.errors import ConfigError
from learnforget.files import atomic_open, atomic_write_json, read_json, read_result
from learnforget.runfolder import MANIFEST, RunFolder

SPECTRA_VERSION = 1
MATRICES = ("delta", "base", "ft")


def spectra_settings(*, with_weights: bool, dense_method: str, lora_via: str) -> dict[str, Any]:
    return {"version": SPECTRA_VERSION, "with_weights": bool(with_weights),
            "dense_method": dense_method, "lora_via": lora_via}


def _row(md: ModuleDelta, matrix: str, s: np.ndarray, threshold: float, route: str) -> dict:
    row = {"module": md.name, "layer": md.layer, "module_type": md.module_type,
           "matrix": matrix, "shape": list(md.shape), "route": route, "n_values": int(s.size),
           **spectrum_summary(s, threshold, md.shape)}
    if matrix == "delta" and md.floor is not None:  # a 16-bit checkpoint: its rounding noise
        row.update(rounding_floor_dtype=md.floor["dtype"], rounding_floor_fro=md.floor["fro"],
                   rounding_floor_top_sv=md.floor["top_sv"],
                   rank_above_rounding_floor=int((np.asarray(s) > md.floor["top_sv"]).sum()))
    return row


def spectra_of(md: ModuleDelta, *, dense_method: str = "svd", device: str = "cpu"
               ) -> dict[str, tuple[np.ndarray, str]]:
    """{matrix: (singular values, route)} for ΔW and, when present, W_base and W_ft."""
    out = {}
    if md.factors is not None:
        B, A, scale = md.factors
        out["delta"] = (lowrank_svdvals(B, A, scale, device=device), "factors (QR + r x r SVD)")
    else:
        assert md.dense is not None
        out["delta"] = (dense_svdvals(md.dense, dense_method, device=device),
                        f"dense {dense_method}")
    for matrix in ("base", "ft"):
        w = getattr(md, matrix)
        if w is not None:
            out[matrix] = (dense_svdvals(w, dense_method, device=device), f"dense {dense_method}")
    return out


def compute_spectra(run_dir: Path, checkpoint: str | Sequence[str] | None = None, *,
                    threshold: float = 0.9, with_weights: bool = False,
                    cache_dir: Path | None = None, dense_method: str = "svd",
                    lora_via: str = "factors", force: bool = False,
                    device: str | None = None, verbose: bool = True) -> list[Path]:
    """Spectra of ΔW (and of W_base, W_ft with `with_weights`) for a run's checkpoints.

    Writes spectra/<checkpoint>.npz (keys "<matrix>:<module>", singular values descending;
    factor routes store only the r possibly non-zero values) and spectra/<checkpoint>.json
    (settings, provenance, one summary row per module and matrix), each atomically. A
    checkpoint already done with the same settings is skipped; a changed threshold alone only
    re-summarises the stored values. The SVDs run on `device` (default: CUDA when available).
    Returns the JSON paths (written or already there).
    """
    if not 0 < threshold <= 1:
        raise ConfigError(f"threshold must be in (0, 1], got {threshold!r}")
    if dense_method not in DENSE_METHODS:
        raise ConfigError(f"dense_method {dense_method!r} is unknown (expected one of "
                          f"{DENSE_METHODS})")
    run_dir = Path(run_dir)
    ckpts = RunFolder(run_dir).checkpoint_dirs()
    if checkpoint is not None:
        wanted = [checkpoint] if isinstance(checkpoint, str) else list(checkpoint)
        missing = [c for c in wanted if c not in {p.name for p in ckpts}]
        if missing:
            raise ConfigError(f"checkpoint(s) {missing} not found in {run_dir} (it has "
                              f"{[p.name for p in ckpts]})")
        ckpts = [p for p in ckpts if p.name in wanted]
    settings = spectra_settings(with_weights=with_weights, dense_method=dense_method,
                                lora_via=lora_via)
    folder = RunFolder(run_dir)
    paths = []
    for ck in ckpts:
        js = folder.spectra(ck.name)
        npz = js.with_suffix(".npz")
        old = read_result(js)
        if old and not force and old.get("settings") == settings and npz.exists():
            if old.get("threshold") != threshold:
                _resummarise(js, npz, old, threshold)
            paths.append(js)
            continue
        t0 = time.perf_counter()
        ds = extract_deltas(run_dir, ck.name, with_weights=with_weights, cache_dir=cache_dir,
                            lora_via=lora_via)
        if ds is None:
            if verbose:
                method = (read_json(ck / MANIFEST) or {}).get("method", "?")
                print(f"learnforget: {run_dir.name}/{ck.name}: method={method} changes no weight "
                      "matrix of the base model (prefix/prompt tuning and bottleneck adapters "
                      "add parameters instead): ΔW is undefined, no spectra")
            continue
        rows, arrays = [], {}
        for md in ds:
            for matrix, (s, route) in spectra_of(md, dense_method=dense_method,
                                                 device=device or default_device()).items():
                arrays[f"{matrix}:{md.name}"] = s.astype(np.float64)
                rows.append(_row(md, matrix, s, threshold, route))
        record = {"run": ds.run, "checkpoint": ds.checkpoint, "step": ds.manifest.get("step"),
                  "tokens": ds.manifest.get("tokens"), "epoch": ds.manifest.get("epoch"),
                  "method": ds.method, "delta": ds.source, "base": ds.base,
                  "base_model": ds.base_model, "settings": settings, "threshold": threshold,
                  "unchanged_modules": list(ds.skipped), "n_modules": len(ds.names),
                  "wall_time_s": time.perf_counter() - t0, "rows": rows}
        with atomic_open(npz, "wb") as f:
            np.savez(f, **arrays)
        atomic_write_json(js, record)
        paths.append(js)
        if verbose:
            print(f"learnforget: spectra of {run_dir.name}/{ck.name}: {len(rows)} matrices in "
                  f"{record['wall_time_s']:.1f}s -> {js}")
    return paths


def _resummarise(js: Path, npz: Path, record: dict[str, Any], threshold: float) -> None:
    arrays = np.load(npz)
    for row in record["rows"]:
        s = arrays[f"{row['matrix']}:{row['module']}"]
        row.update(spectrum_summary(s, threshold, row["shape"]))
    record["threshold"] = threshold
    atomic_write_json(js, record)


def load_spectra(run_dir: Path, checkpoint: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(the JSON record, {"<matrix>:<module>": singular values}) of one checkpoint."""
    js = RunFolder(run_dir).spectra(checkpoint)
    record = read_json(js)
    if record is None:
        raise ConfigError(f"no spectra for {run_dir}/{checkpoint}: run compute_spectra first")
    with np.load(js.with_suffix(".npz")) as z:
        return record, {k: z[k] for k in z.files}


# ============================================================================ LoRA vs full

def compare_subspaces(lora_run: Path, full_run: Path, lora_checkpoint: str | None = None,
                      full_checkpoint: str | None = None, k: int | None = None, *,
                      modules: Sequence[str] | None = None, cache_dir: Path | None = None
                      ) -> list[dict[str, Any]]:
    """phi between the top-k left singular directions of a LoRA ΔW and a full-finetuning ΔW of
    the same module (default: each run's last checkpoint, k = the LoRA rank)."""
    def last(run: Path, label: str | None) -> str:
        if label:
            return label
        cks = RunFolder(run).checkpoint_dirs()
        if not cks:
            raise ConfigError(f"run {run} has no checkpoints")
        return cks[-1].name

    lora = extract_deltas(Path(lora_run), last(Path(lora_run), lora_checkpoint),
                          cache_dir=cache_dir)
    full = extract_deltas(Path(full_run), last(Path(full_run), full_checkpoint),
                          cache_dir=cache_dir)
    if lora is None or full is None:
        raise ConfigError("compare_subspaces needs two runs whose methods change weight matrices")
    full_by_name = {md.name: md for md in full}
    rows = []
    for md in lora:
        if (modules and md.name not in modules and md.module_type not in modules) \
                or md.name not in full_by_name:
            continue
        kk = k or md.rank_bound
        if md.factors is not None:
            u1, _ = lowrank_svd(*md.factors, k=kk)
        else:
            u1, _ = dense_svd(md.to_dense(), kk)
        u2, _ = dense_svd(full_by_name[md.name].to_dense(), kk)
        rows.append({"module": md.name, "layer": md.layer, "module_type": md.module_type,
                     "k": kk, "phi": subspace_similarity(u1, u2, kk, kk)})
    return rows


# ============================================================================ fig. S8

def random_matrix_comparison(n: int = 1000, c: float = 0.1, cs: Sequence[float] | None = None,
                             seed: int = 0) -> dict[str, Any]:
    """Paper fig. S8: i.i.d. N(0, 1) matrices A and B (n x n): the spectra of A, A + cB and cB
    at c, and the mean absolute difference between the spectra of A + cB and A for each c in
    `cs` (default: 13 values from 1e-3 to 10, log-spaced)."""
    cs = list(np.logspace(-3, 1, 13) if cs is None else cs)
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    def sv(m: torch.Tensor) -> np.ndarray:
        return dense_svdvals(m, dtype=torch.float64)

    s_a, s_b, s_sum = sv(A), sv(B), sv(A + c * B)
    diffs = [float(np.abs(sv(A + ci * B) - s_a).mean()) for ci in cs]
    return {"n": n, "seed": seed, "c": c, "s_A": s_a, "s_A_plus_cB": s_sum, "s_cB": c * s_b,
            "cs": np.asarray(cs, dtype=float), "mean_abs_diff": np.asarray(diffs),
            "mean_abs_diff_rel": np.asarray(diffs) / float(s_a.mean()),
            "rank_for_variance": {"A": rank_for_variance(s_a), "A_plus_cB": rank_for_variance(s_sum),
                                  "cB": rank_for_variance(s_b)}}


def dump_json(obj: Any) -> str:
    """JSON with numpy arrays as lists (for the random-matrix results)."""
    return json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
