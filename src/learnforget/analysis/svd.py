"""Singular values of dense and low-rank (B @ A) matrices, and summaries of a spectrum (rank for a
share of the variance, effective, stable and numerical rank, subspace similarity).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from learnforget.errors import ConfigError

DENSE_METHODS = ("svd", "gram")
SMALL_MATRIX = 1 << 20  # elements
LINALG_THREADS_ENV = "LEARNFORGET_LINALG_THREADS"


def linalg_threads(numel: int, *, skinny: bool = False) -> int | None:
    """Torch threads for one CPU linear-algebra call; None leaves torch's setting.

    LEARNFORGET_LINALG_THREADS overrides. Otherwise 1 for the factor route (tall-skinny QR),
    for matrices under SMALL_MATRIX elements, and for everything when torch has at most 2
    threads: measured on the shared 2-core machine, 2-thread MKL/OpenMP calls were 1-50x
    slower than 1 thread (barrier contention under load): QR + core SVD of a 11008x256 /
    256x4096 factor pair 0.03 s vs up to 5 s, svdvals of 64x256 0.5 ms vs 20-400 ms, of
    4096x4096 4.1 s vs 4.9 s, Gram route of 4096x11008 3.3 s vs 6.9 s.
    """
    env = os.environ.get(LINALG_THREADS_ENV)
    if env:
        return max(1, int(env))
    if skinny or numel < SMALL_MATRIX or torch.get_num_threads() <= 2:
        return 1
    return None


@contextmanager
def _threads(n: int | None, device: str):
    """torch's threads (and the BLAS scipy calls, through threadpoolctl) set to n meanwhile."""
    prev = torch.get_num_threads()
    if device != "cpu" or n is None:
        yield
        return
    with _blas_threads(n):
        if n == prev:
            yield
            return
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(prev)


_BLAS_CONTROLLER: list[Any] = []


@contextmanager
def _blas_threads(n: int):
    """The BLAS libraries loaded in the process (scipy's OpenBLAS) limited to n threads, by
    threadpoolctl (scikit-learn's, there through lm-eval); unchanged without it."""
    import scipy.linalg  # noqa: F401  (loads scipy's BLAS before the controller looks)

    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - an install without lm-eval's scikit-learn
        yield
        return
    if not _BLAS_CONTROLLER:
        _BLAS_CONTROLLER.append(ThreadpoolController())
    with _BLAS_CONTROLLER[0].limit(limits=n, user_api="blas"):
        yield


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _as_tensor(x: Any, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return x.detach().to(device, dtype)


def _column_major(x: torch.Tensor) -> torch.Tensor:
    """A column-major (Fortran-order) copy: LAPACK's QR of a tall row-major matrix was up to
    8x slower on this machine's MKL."""
    return x.T.contiguous().T


def lowrank_svdvals(B: Any, A: Any, scale: float = 1.0, *, dtype: torch.dtype = torch.float64,
                    device: str = "cpu") -> np.ndarray:
    """Exact singular values of scale * B @ A (B: d x r, A: r x k) without forming d x k.

    B = Q_B R_B and A^T = Q_A R_A (thin QR), so scale * B A = Q_B (scale R_B R_A^T) Q_A^T and,
    Q_B and Q_A having orthonormal columns, the singular values are those of the r x r core.
    Returns min(r, d, k) values, descending; the other singular values of ΔW are exactly 0.
    """
    B, A = _as_tensor(B, dtype, device), _as_tensor(A, dtype, device)
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"factors do not chain: B {tuple(B.shape)}, A {tuple(A.shape)}")
    with _threads(linalg_threads(B.numel() + A.numel(), skinny=True), device):
        _, rb = torch.linalg.qr(_column_major(B), mode="r")
        _, ra = torch.linalg.qr(A.T, mode="r")  # A.T of a row-major A is already column-major
        return (abs(scale) * torch.linalg.svdvals(rb @ ra.T)).cpu().numpy()


def lowrank_svd(B: Any, A: Any, scale: float = 1.0, k: int | None = None, *,
                dtype: torch.dtype = torch.float64) -> tuple[np.ndarray, np.ndarray]:
    """Top-k left singular vectors (d x k) and singular values of scale * B @ A, from factors."""
    B, A = _as_tensor(B, dtype), _as_tensor(A, dtype)
    with _threads(linalg_threads(B.numel() + A.numel(), skinny=True), "cpu"):
        qb, rb = torch.linalg.qr(_column_major(B))
        _, ra = torch.linalg.qr(A.T, mode="r")
        u, s, _ = torch.linalg.svd(scale * (rb @ ra.T))
        k = s.numel() if k is None else k
        if k > s.numel():
            raise ValueError(f"k={k} exceeds the factors' rank bound {s.numel()}")
        return (qb @ u[:, :k]).numpy(), s.abs().numpy()


def dense_svdvals(M: Any, method: str = "svd", *, dtype: torch.dtype = torch.float32,
                  device: str = "cpu") -> np.ndarray:
    """All min(d, k) singular values of a dense matrix, descending.

    method="svd": torch.linalg.svdvals. method="gram": square roots of the eigenvalues of the
    smaller Gram matrix (M M^T or M^T M), several times faster on large matrices; singular
    values below about sqrt(eps) * s_max lose their relative accuracy (they are squared), which
    leaves variance-based summaries such as the rank for 90% unchanged.
    """
    if method not in DENSE_METHODS:
        raise ConfigError(f"dense method {method!r} is unknown (expected one of {DENSE_METHODS})")
    M = _as_tensor(M, dtype, device)
    with _threads(linalg_threads(M.numel()), device):
        if method == "svd":
            return torch.linalg.svdvals(M).cpu().numpy()
        gram = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
        ev = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
        return torch.flip(ev, dims=(0,)).cpu().numpy()


def dense_svd(M: Any, k: int, *, dtype: torch.dtype = torch.float32) -> tuple[np.ndarray, np.ndarray]:
    """Top-k left singular vectors and all singular values of a dense matrix."""
    M = _as_tensor(M, dtype)
    with _threads(linalg_threads(M.numel()), "cpu"):
        u, s, _ = torch.linalg.svd(M, full_matrices=False)
    return u[:, :k].numpy(), s.numpy()


# ============================================================================ top-k vectors

TOP_METHODS = ("full", "partial", "truncated")
TOP_DEFAULT = "partial"
TOP_TOL = 1e-5  # largest accepted bound on sin(angle) between a computed and an exact vector
TOP_NITER = 32  # subspace iterations of the truncated route (float64)
TOP_EXTRA = 8  # eigenpairs beyond k that the partial route computes (the check's outer gap)
KRYLOV_MIN = 1 << 22  # elements from which the partial route uses Lanczos (`krylov_top`)


def top_oversample(k: int) -> int:
    """Extra sketch columns beyond k: q = 2k + 8 (subspace iteration converges for the i-th
    vector like (s_{q+1} / s_i)^(2 niter + 1), so a wide sketch pays on slowly decaying spectra)."""
    return k + 8


@contextmanager
def cpu_linalg_threads(numel: int):
    """`linalg_threads`' thread count (1 on a <= 2-thread torch) for CPU work on a matrix of
    `numel` elements. Measured on the shared 2-core machine: the intruder test's full route on
    21 SmolLM2-135M modules took 55 s on 2 threads and 2.0 s on 1."""
    with _threads(linalg_threads(numel), "cpu"):
        yield


def residual_floor(s1: float, shape: Sequence[int]) -> float:
    """The rounding error of a residual W W^T u - s^2 u computed in float64, (m + n) eps
    s_1^2 (the usual gamma_n bound of a dot product): `ritz_bounds` takes no residual below
    it, so singular values tied to rounding level (their vectors undetermined) fail the
    check instead of passing on residuals that rounding made small."""
    return (sum(shape) * float(torch.finfo(torch.float64).eps)) * float(s1) ** 2


def ritz_bounds(s: torch.Tensor, res: torch.Tensor, k: int, floor: float = 0.0) -> torch.Tensor:
    """Bounds on sin(angle) between each of the top k Ritz vectors u_i (of W W^T on the
    sketch: values s_i^2, residual norms s_i * res_i with res_i = ||W v_i - s_i u_i||) and
    W's exact i-th left singular vector; inf where no bound holds.

    For each block of the top k' Ritz vectors (k <= k' < q), Davis-Kahan bounds the angle
    between the block and the exact top-k' eigenspace by ||R||_F / (s_k'^2 - (s_{k'+1}^2 +
    rho_{k'+1})), and Saad (Numerical Methods for Large Eigenvalue Problems, thm 4.6) a
    vector's angle by that times sqrt(1 + ||R||_F^2 / gap_i^2), gap_i being the distance from
    s_i^2 (less its residual) to the block's other Ritz values; the best block is taken. It
    assumes that no exact singular value above s_{k'+1} + its residual escaped the sketch
    (subspace iteration finds the largest first; an escaped one leaves large residuals;
    a direct solver's eigenvalues are the top ones by construction). Residuals below `floor`
    (`residual_floor`) count as `floor`."""
    lam, rho = s.double() ** 2, (s.double() * res.double()).clamp_min(floor)
    best = torch.full((k,), math.inf, dtype=torch.float64)
    for kp in range(k, lam.numel() - 1):
        big_r = float(rho[:kp].norm())
        gap_out = float(lam[kp - 1] - lam[kp] - rho[kp])
        if gap_out <= 0:
            continue
        for i in range(k):
            others = torch.cat([torch.arange(i), torch.arange(i + 1, kp)])
            gap_i = float((lam[i] - lam[others]).abs().min() - rho[i]) if others.numel() \
                else math.inf
            if gap_i > 0:
                b = big_r / gap_out * math.sqrt(1 + (big_r / gap_i) ** 2)
                best[i] = min(float(best[i]), b)
    return best


def gram_top(w64: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top kk left singular values (descending) and vectors of a float64 matrix, from the
    top kk eigenpairs of its smaller Gram matrix: BLAS dsyrk (half a GEMM's flops), then
    LAPACK dsyevr with an index range (tridiagonal reduction, MRRR for kk eigenpairs, kk
    vectors back-transformed: the full route's dsyevd finds and back-transforms all of them).
    For a tall w the left vectors are w v / ||w v||."""
    from scipy.linalg import eigh
    from scipy.linalg.blas import dsyrk

    a = w64.detach().numpy()
    m, n = a.shape
    # a.T is a Fortran-order view: trans=1 gives a a^T (m <= n), trans=0 a^T a (no copy)
    g = dsyrk(1.0, a.T, trans=1 if m <= n else 0, lower=0)
    size = g.shape[0]
    lam, vecs = eigh(g, lower=False, subset_by_index=[size - kk, size - 1], driver="evr",
                     overwrite_a=True, check_finite=False)
    lam, vecs = torch.from_numpy(lam[::-1].copy()), torch.from_numpy(vecs[:, ::-1].copy())
    if m > n:
        vecs = w64 @ vecs
        vecs = vecs / vecs.norm(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    return lam.clamp_min(0).sqrt(), vecs


def krylov_top(w64: torch.Tensor, kk: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The top kk singular values (descending) and left vectors of a float64 matrix by
    Lanczos bidiagonalization with full reorthogonalization (PROPACK through
    scipy.sparse.linalg.svds, tol=0: to machine precision; a seeded start vector). Raises
    scipy's LinAlgError when it does not converge within its 10 kk steps."""
    import numpy as np
    from scipy.sparse.linalg import svds

    u, s, _ = svds(w64.detach().numpy(), k=kk, tol=0, solver="propack",
                   rng=np.random.default_rng(seed))
    order = np.argsort(s)[::-1]
    return torch.from_numpy(s[order].copy()), torch.from_numpy(u[:, order].copy())


def _partial(w: torch.Tensor, k: int, tol: float, full, seed: int = 0,
             solver: str | None = None) -> dict[str, Any]:
    """top_singular's partial route: k + TOP_EXTRA vectors by `krylov_top` (matrices of
    KRYLOV_MIN elements or more, or solver="krylov") or `gram_top` (smaller ones, or
    solver="gram"), each checked; a Krylov solve that does not converge falls back too."""
    from scipy.linalg import LinAlgError

    w64 = w.detach().double()
    kk = k + TOP_EXTRA
    if solver is None:
        solver = "krylov" if w64.numel() >= KRYLOV_MIN else "gram"
    try:
        s, u = krylov_top(w64, kk, seed) if solver == "krylov" else gram_top(w64, kk)
    except LinAlgError:
        u, s = full(w, k)
        return {"u": u, "s": s, "route": "full (no convergence)", "bound": None, "attempts": 1}
    # residuals of W W^T u_i = s_i^2 u_i, recomputed from w itself (not from the Gram matrix)
    rho = (w64 @ (w64.T @ u) - u * s ** 2).norm(dim=0)
    bound = ritz_bounds(s, rho / s.clamp_min(torch.finfo(torch.float64).tiny), k,
                        residual_floor(float(s[0]), w.shape))
    if bool((bound <= tol).all()):
        return {"u": u[:, :k], "s": s[:k], "route": f"partial ({solver})",
                "bound": float(bound.max()), "attempts": 1}
    u, s = full(w, k)
    return {"u": u, "s": s, "route": "full (check failed)", "bound": None, "attempts": 1}


def top_singular(w: torch.Tensor, k: int, *, method: str = "full", tol: float = TOP_TOL,
                 full=None, seed: int = 0) -> dict[str, Any]:
    """The top k left singular vectors and values of w, in float64, and how they were found.

    method="full": `full(w, k)` (the caller's reference route), no check. method="partial":
    the top k + TOP_EXTRA eigenpairs of w's smaller Gram matrix only (`gram_top`), then the
    check below. method="truncated": torch.svd_lowrank in float64 on a q = 2k + 8 column
    sketch (seeded, TOP_NITER subspace iterations), a Rayleigh-Ritz step on its left basis (a
    q x n SVD), then the check. The check, per vector: the bound on its angle to the exact
    vector (`ritz_bounds`, from residuals recomputed with w) must be <= tol for each of the
    k; otherwise, or when k + 8 (partial) or q (truncated) >= min(m, n) (nothing to save),
    `full` gives the answer. Returns {"u": m x k, "s": k (None from `full`), "route":
    "partial" | "truncated" | "full" | "full (check failed)" | "full (small)", "bound": the
    largest bound of an accepted result (None otherwise), "attempts": tries (0 or 1)}.
    """
    if method not in TOP_METHODS:
        raise ConfigError(f"singular-vector method {method!r} is unknown (expected one of "
                          f"{TOP_METHODS})")
    if full is None:
        raise ValueError("top_singular needs the full route (`full`) to fall back on")
    m, n = w.shape
    k = min(k, m, n)
    q = k + (TOP_EXTRA if method == "partial" else top_oversample(k))
    if method == "full" or q >= min(m, n):
        u, s = full(w, k)
        return {"u": u, "s": s, "route": "full" if method == "full" else "full (small)",
                "bound": None, "attempts": 0}
    if method == "partial":
        return _partial(w, k, tol, full, seed)
    w64 = w.detach().double()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        basis, _, _ = torch.svd_lowrank(w64, q=q, niter=TOP_NITER)
    qb, _ = torch.linalg.qr(basis)
    ub, s, vh = torch.linalg.svd(qb.T @ w64, full_matrices=False)  # Rayleigh-Ritz
    u = qb @ ub
    bound = ritz_bounds(s, (w64 @ vh.T - u * s).norm(dim=0), k, residual_floor(float(s[0]),
                                                                              w.shape))
    if bool((bound <= tol).all()):
        return {"u": u[:, :k], "s": s[:k], "route": "truncated", "bound": float(bound.max()),
                "attempts": 1}
    u, s = full(w, k)
    return {"u": u, "s": s, "route": "full (check failed)", "bound": None, "attempts": 1}


# ============================================================================ summaries

def _s64(s: Any) -> np.ndarray:
    s = np.abs(np.asarray(s, dtype=np.float64).ravel())
    return np.sort(s)[::-1]


def rank_for_variance(s: Any, threshold: float = 0.9) -> int:
    """Smallest k such that the top k squared singular values hold >= threshold of the total
    (the paper's "rank needed to explain 90% of the variance"). 0 for a zero matrix."""
    if not 0 < threshold <= 1:
        raise ConfigError(f"variance threshold must be in (0, 1], got {threshold!r}")
    e = _s64(s) ** 2
    total = e.sum()
    if total == 0:
        return 0
    share = np.cumsum(e) / total
    # a relative slack of 1e-12 so that an exact share (e.g. 0.9) is not missed by rounding
    return int(min(np.searchsorted(share, threshold - 1e-12, side="left") + 1, e.size))


def effective_rank(s: Any) -> float:
    """Roy & Vetterli (2007): exp of the Shannon entropy of the normalised singular values
    p_i = s_i / sum(s). Between 1 and the number of non-zero values; 0 for a zero matrix."""
    s = _s64(s)
    total = s.sum()
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def stable_rank(s: Any) -> float:
    """||ΔW||_F^2 / ||ΔW||_2^2 = sum(s^2) / s_max^2 (0 for a zero matrix)."""
    s = _s64(s)
    if s.size == 0 or s[0] == 0:
        return 0.0
    return float((s ** 2).sum() / s[0] ** 2)


def numerical_rank(s: Any, shape: Sequence[int] | None = None, rtol: float | None = None) -> int:
    """Singular values above rtol * s_max; rtol defaults to max(shape) * float32 eps."""
    s = _s64(s)
    if s.size == 0 or s[0] == 0:
        return 0
    if rtol is None:
        rtol = max(shape or (s.size,)) * float(np.finfo(np.float32).eps)
    return int((s > rtol * s[0]).sum())


def spectrum_summary(s: Any, threshold: float = 0.9, shape: Sequence[int] | None = None
                     ) -> dict[str, Any]:
    s = _s64(s)
    return {
        "rank_for_variance": rank_for_variance(s, threshold),
        "effective_rank": effective_rank(s),
        "stable_rank": stable_rank(s),
        "numerical_rank": numerical_rank(s, shape),
        "top_sv": float(s[0]) if s.size else 0.0,
        "fro_norm": float(math.sqrt((s ** 2).sum())),
    }


# ============================================================================ subspaces

def subspace_similarity(U1: Any, U2: Any, k1: int | None = None, k2: int | None = None) -> float:
    """Hu et al. (2021): phi = ||U1[:, :k1]^T U2[:, :k2]||_F^2 / min(k1, k2), in [0, 1].

    U1, U2: matrices whose columns are orthonormal (singular directions), same row count.
    1 when one span contains the other, 0 when they are orthogonal.
    """
    U1, U2 = np.asarray(U1, dtype=np.float64), np.asarray(U2, dtype=np.float64)
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f"subspaces live in different spaces: {U1.shape} vs {U2.shape}")
    k1 = U1.shape[1] if k1 is None else k1
    k2 = U2.shape[1] if k2 is None else k2
    m = U1[:, :k1].T @ U2[:, :k2]
    return float(np.clip((m ** 2).sum() / min(k1, k2), 0.0, 1.0))
