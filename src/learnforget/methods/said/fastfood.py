"""The Fastfood random projection of intrinsic-dimension finetuning (Li et al. 2018; Aghajanyan
et al. 2020), in torch: P(θ_d) = (H·G·Π·H·B · pad(θ_d))[:D] / sqrt(D · ΣG²).

- pad: θ_d (length d) zero-padded to L, the power of two >= max(D, d);
- B: a diagonal of ±1; H: the (unnormalised, ±1) Walsh-Hadamard matrix of size L;
- Π: a permutation (a gather: x[Π]); G: a diagonal of N(0, 1) entries;
- cut to the tensor's D entries and divided by sqrt(D · ΣG²), the normalisation of the
  reference implementation (Aghajanyan's `fastfood_torched`: divisor sqrt(L ΣG²) times
  sqrt(D / L)), so that every entry of P(θ) has variance |θ|² / D whatever D and L.

The Walsh-Hadamard transform is an autograd Function whose backward is the same transform
(H is symmetric), so autograd keeps no log2(L) intermediate copies.

The random factors of one tensor are drawn from a numpy generator seeded by the projection
seed and the tensor's name (not its position), and stored compactly: B int8, Π int32, G
float32 (9 bytes per entry of L; the reference keeps 16).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """The unnormalised Walsh-Hadamard transform along the last axis (a power of two long): log2(n)
    butterflies, each pairing the two contiguous halves and interleaving a+b, a-b (after log2(n)
    of them the index bits are back in order)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Walsh-Hadamard transform: length {n} is not a power of two")
    y = x.reshape(-1, n)
    rows = y.shape[0]
    for _ in range(n.bit_length() - 1):
        halves = y.view(rows, 2, n // 2)
        out = torch.empty(rows, n // 2, 2, dtype=y.dtype, device=y.device)
        torch.add(halves[:, 0], halves[:, 1], out=out[:, :, 0])
        torch.sub(halves[:, 0], halves[:, 1], out=out[:, :, 1])
        y = out.view(rows, n)
    return y.reshape(x.shape)


class WalshHadamard(torch.autograd.Function):
    """y = H x along the last axis; the gradient is H g (H is symmetric)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _fwht(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _fwht(grad)


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    return WalshHadamard.apply(x)


def padded_length(numel: int, d: int) -> int:
    """L: the power of two >= max(D, d)."""
    m = max(int(numel), int(d), 1)
    return 1 << (m - 1).bit_length()


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """The generator of one tensor's projection: numpy's PCG64 seeded with the projection seed
    and a hash of the tensor's name (torch's CPU generator keeps only 32 bits of a seed)."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


@dataclass
class FastfoodFactors:
    """B (int8 ±1), Π (int32 permutation), G (float32 Gaussian) and the scale 1/sqrt(D ΣG²)."""

    B: torch.Tensor
    Pi: torch.Tensor
    G: torch.Tensor
    scale: float
    numel: int

    @property
    def length(self) -> int:
        return int(self.B.numel())


def draw_factors(numel: int, d: int, seed: int, name: str,
                 device: torch.device | str = "cpu") -> FastfoodFactors:
    """One tensor's Fastfood factors, drawn on the CPU from its own generator (the same on every
    machine), then moved to `device`. On the meta device: meta tensors (no values)."""
    L = padded_length(numel, d)
    if torch.device(device).type == "meta":
        meta = torch.device("meta")
        return FastfoodFactors(torch.empty(L, dtype=torch.int8, device=meta),
                               torch.empty(L, dtype=torch.int32, device=meta),
                               torch.empty(L, dtype=torch.float32, device=meta), 1.0, numel)
    rng = tensor_rng(seed, name)
    B = torch.from_numpy(rng.integers(0, 2, L, dtype=np.int8) * np.int8(2) - np.int8(1))
    Pi = torch.from_numpy(rng.permutation(L).astype(np.int32))
    G = torch.from_numpy(rng.standard_normal(L, dtype=np.float32))
    scale = float(1.0 / torch.sqrt(numel * torch.sum(G.double() ** 2)))
    return FastfoodFactors(B.to(device), Pi.to(device), G.to(device), scale, numel)


def fastfood(theta: torch.Tensor, B: torch.Tensor, Pi: torch.Tensor, G: torch.Tensor,
             scale: float, numel: int) -> torch.Tensor:
    """P(θ): the D = `numel` entries of H G Π H B pad(θ), times `scale` (float32, differentiable
    in θ)."""
    L = B.numel()
    x = torch.nn.functional.pad(theta.float(), (0, L - theta.numel()))
    x = walsh_hadamard(x * B)
    x = torch.index_select(x, 0, Pi) * G
    return walsh_hadamard(x)[:numel] * scale

