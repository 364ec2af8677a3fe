"""The Fastfood random projection of intrinsic-dimension finetuning (Li et al. 2018; Aghajanyan
et al. 2020), in torch: P(θ_d) = (H·G·Π·H·B · pad(θ_d))[:D] / sqrt(D · ΣG²).

- pad: θ_d (length d) zero-padded to L, the power of two >= max(D, d);
- B: a diagonal of ±1; H: the (unnormalised, ±1) Walsh-Hadamard matrix of size L;
- Π: a permutation (a gather: x[Π]); G: a diagonal of Gaussian entries;
- cut to the tensor's D entries and divided by sqrt(D · ΣG²), the normalisation of the
  reference implementation (Aghajanyan's `fastfood_torched`: divisor sqrt(L ΣG²) times
  sqrt(D / L)), so that every entry of P(θ) has variance |θ|² / D whatever D and L.

**Nothing of length L is stored per tensor.** B and Π are functions of the entry's index,
computed again in every forward and backward from keys drawn from the projection seed and the
tensor's name (`Projection`), in integer arithmetic that gives the same bits on every device:
- Π(i): a bijection of the log2(L)-bit integers (three rounds of: xor a key, multiply by an odd
  key modulo L, xor the upper half of the bits into the lower: each step is invertible, so the
  backward's Π⁻¹ is as cheap);
- B_j: one bit of a 31-bit hash of j (only j < d matter: pad(θ_d) is zero beyond d);
- G_i = D_{Π(i)}, with D one vector of N(0, 1) draws shared by every tensor of the projection
  seed (`shared_gains`: the longest L's worth, float32, on each device: 4 MiB on SmolLM2-135M,
  256 MiB at Llama-2-7B's shapes). Then Π·... = (ΠDΠᵀ)·Π, i.e. H·G·Π·H·B = H·Π·D·H·B, and since
  D is independent of Π, G is an i.i.d. Gaussian diagonal as in the reference.

**Speed.** pad(θ_d) is zero beyond d, so the first transform needs only the d' entries of
H_{d'}·B·θ_d (d' the power of two >= d): the Sylvester H_L[i, j] for j < d' depends on i only
through i mod d', so H_L·B·pad(θ_d) is H_{d'}·B·θ_d repeated L/d' times and Π·H·B·pad(θ_d) is a
gather at Π(i) mod d'. A forward is then one transform of length L per tensor (the reference
does two), the backward one more (its first transform's adjoint is a sum into d' bins). The
Walsh-Hadamard transform itself is H_L = H_{n1} ⊗ ... ⊗ H_{nk}: k batched matmuls with dense
blocks of at most 32 x 32 (about twice as fast on a CPU as log2(L) butterfly passes).

The projection is linear in θ_d, so its autograd Function saves no tensor for the backward.
"""

from __future__ import annotations

import functools
import math
import zlib

import numpy as np
import torch

BLOCK_BITS = 5  # the Walsh-Hadamard transform's dense blocks: at most 2^5 = 32 wide
ROUNDS = 3  # rounds of the integer bijections
KEY_STREAMS = {"Pi": 0, "G": 1, "B": 2}  # the numpy seeds' third word
PROJECTION = "fastfood-hash-v1"  # recorded in said_config.json: how the projections are made


@functools.lru_cache(maxsize=16)
def _hadamard_block(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h.to(device)


def _block_sizes(n: int) -> list[int]:
    bits = n.bit_length() - 1
    parts = max(1, -(-bits // BLOCK_BITS))
    return [1 << (bits // parts + (1 if p < bits % parts else 0)) for p in range(parts)]


def fwht(x: torch.Tensor) -> torch.Tensor:
    """The unnormalised Walsh-Hadamard transform (Sylvester order) along the last axis, a power
    of two long: H_n = H_{n1} ⊗ ... ⊗ H_{nk} applied as one batched matmul per factor."""
    n = x.shape[-1]
    if n & (n - 1) or n == 0:
        raise ValueError(f"Walsh-Hadamard transform: length {n} is not a power of two")
    y = x.reshape(-1, n)
    rows, before, after = y.shape[0], 1, n
    for size in _block_sizes(n):
        if size == 1:
            continue
        after //= size
        h = _hadamard_block(size, y.dtype, str(y.device))
        if after == 1:  # H is symmetric
            y = y.reshape(-1, size) @ h
        else:
            y = torch.matmul(h, y.reshape(rows * before, size, after))
        before *= size
    return y.reshape(x.shape)


class WalshHadamard(torch.autograd.Function):
    """y = H x along the last axis; the gradient is H g (H is symmetric)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return fwht(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return fwht(grad)


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    return WalshHadamard.apply(x)


def padded_length(numel: int, d: int) -> int:
    """L: the power of two >= max(D, d)."""
    return _pow2(max(int(numel), int(d), 1))


def _pow2(m: int) -> int:
    return 1 << (m - 1).bit_length()


def stream_keys(seed: int, name: str, stream: str, bits: int) -> list[tuple[int, int]]:
    """(xor key < 2^bits, odd multiplier < 2^31) per round of one tensor's stream, from numpy's
    PCG64 seeded with the projection seed, a hash of the tensor's name and the stream."""
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode()), KEY_STREAMS[stream]])
    xs = rng.integers(0, 1 << bits, ROUNDS, dtype=np.int64) if bits else np.zeros(ROUNDS, int)
    ms = rng.integers(0, 1 << 30, ROUNDS, dtype=np.int64) * 2 + 1
    return [(int(x), int(m)) for x, m in zip(xs, ms, strict=True)]


def mix_bits(x: torch.Tensor, bits: int, keys: list[tuple[int, int]],
             inverse: bool = False) -> torch.Tensor:
    """A bijection of the `bits`-bit integers (bits <= 31; int32, in place): per round, xor a
    key, multiply by an odd key modulo 2^bits, xor the upper half of the bits into the lower
    (its own inverse). int32 products wrap, and the low `bits` bits of a wrapped product are
    the exact ones. `inverse`: the inverse bijection (the rounds undone in reverse order)."""
    mask, shift = (1 << bits) - 1, (bits + 1) // 2
    if not inverse:
        for xor_key, mult in keys:
            x.bitwise_xor_(xor_key).mul_(mult).bitwise_and_(mask)
            x.bitwise_xor_(x >> shift)
        return x
    for xor_key, mult in reversed(keys):
        x.bitwise_xor_(x >> shift)
        x.mul_(pow(mult, -1, 1 << 31) if bits else 1).bitwise_and_(mask).bitwise_xor_(xor_key)
    return x


GAIN_BLOCK = 1 << 16
_GAINS: dict[tuple[int, str], torch.Tensor] = {}


def shared_gains(seed: int, length: int, device) -> torch.Tensor:
    """D[:length]: standard normal draws (float32) shared by every tensor of one projection
    seed, drawn on the CPU in blocks of 2^16 (numpy's PCG64 seeded with the seed and the block)
    so that a prefix never depends on how long D is; one copy per device, grown on demand."""
    if torch.device(device).type == "meta":
        return torch.empty(length, dtype=torch.float32, device="meta")
    key = (int(seed), str(torch.device(device)))
    have = _GAINS.get(key)
    if have is None or have.numel() < length:
        start = 0 if have is None else have.numel()
        blocks = [np.random.default_rng([int(seed), KEY_STREAMS["G"], b]).standard_normal(
            GAIN_BLOCK, dtype=np.float32) for b in range(start // GAIN_BLOCK,
                                                         -(-length // GAIN_BLOCK))]
        more = torch.from_numpy(np.concatenate(blocks)).to(device)
        have = more if have is None else torch.cat([have, more])
        _GAINS[key] = have
    return have[:length]


WORK_BYTES = 24  # transient bytes per entry of L while one tensor's projection runs


def projection_memory(projections: list[Projection]) -> dict[str, int]:
    """Bytes: `shared` (D, float32, the longest L), `working` (transient, one tensor at a time:
    the index, the gathered and transformed vectors), `stored_reference` (what per-tensor
    factors would hold: B int8 + Π int32 + G float32 = 9 bytes per entry of every L)."""
    longest = max((p.length for p in projections), default=0)
    return {"shared": 4 * longest, "working": WORK_BYTES * longest,
            "stored_reference": 9 * sum(p.length for p in projections)}


class Projection:
    """One tensor's Fastfood projection, defined by (D, d, projection seed, tensor name) and
    holding no tensor of its own: B and Π are recomputed on the device of θ_d at each call,
    G_i = D_{Π(i)} from the seed's shared D (`shared_gains`)."""

    def __init__(self, numel: int, d: int, seed: int, name: str):
        self.numel, self.d, self.seed, self.name = int(numel), int(d), int(seed), name
        self.length = padded_length(numel, d)
        self.bits = self.length.bit_length() - 1
        if self.bits > 31:
            raise ValueError(f"Fastfood projection of {name}: 2^{self.bits} entries (at most 2^31)")
        self.d_pad = _pow2(max(self.d, 1))
        self._keys = {"Pi": stream_keys(seed, name, "Pi", self.bits),
                      "B": stream_keys(seed, name, "B", 31)}
        self._scale: float | None = None

    def signs(self, n: int, device) -> torch.Tensor:
        """B_j, j < n: ±1, float32."""
        h = mix_bits(torch.arange(n, dtype=torch.int32, device=device), 31, self._keys["B"])
        return 1.0 - 2.0 * (h & 1).to(torch.float32)

    def permutation(self, device, inverse: bool = False) -> torch.Tensor:
        """Π (int32, length L), or its inverse."""
        return mix_bits(torch.arange(self.length, dtype=torch.int32, device=device), self.bits,
                        self._keys["Pi"], inverse)

    def scale(self, device) -> float:
        """1 / sqrt(D ΣG²) (ΣG² = Σ D[:L]², a float64 sum), computed once on a real device."""
        if self._scale is None:
            if torch.device(device).type == "meta":
                return 1.0
            g2 = shared_gains(self.seed, self.length, device).double().square().sum().item()
            self._scale = 1.0 / math.sqrt(self.numel * g2)
        return self._scale

    def factors(self, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """B (int8, length L), Π (int32), G (float32, G_i = D_{Π(i)}) in full: for checks
        against dense matrices."""
        pi = self.permutation(device)
        return (self.signs(self.length, device).to(torch.int8), pi,
                shared_gains(self.seed, self.length, device)[pi.long()])

    def __call__(self, theta: torch.Tensor, lam: torch.Tensor | None = None) -> torch.Tensor:
        """λ P(θ_d) (λ: a 0-d tensor; None: 1): float32, length D, differentiable in θ_d and λ."""
        if theta.numel() != self.d:
            raise ValueError(f"Fastfood projection of {self.name}: θ_d has {theta.numel()} "
                             f"entries, expected {self.d}")
        return _Fastfood.apply(theta, lam, self)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        device = theta.device
        x = torch.zeros(self.d_pad, dtype=torch.float32, device=device)
        x[: self.d] = theta.detach().float() * self.signs(self.d, device)
        u = fwht(x)  # H_{d'} B θ_d: H_L B pad(θ_d) is u repeated L/d' times
        v = u.repeat(self.length // self.d_pad).mul_(shared_gains(self.seed, self.length, device))
        z = torch.index_select(v, 0, self.permutation(device))  # z_i = D_Π(i) (H B θ)_Π(i)
        return fwht(z)[: self.numel].mul_(self.scale(device))

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        device = grad.device
        w = torch.zeros(self.length, dtype=torch.float32, device=device)
        w[: self.numel] = grad.float() * self.scale(device)
        w = fwht(w)
        v = torch.index_select(w, 0, self.permutation(device, inverse=True))
        v.mul_(shared_gains(self.seed, self.length, device))
        u = v.view(-1, self.d_pad).sum(0)  # the adjoint of repeating u
        return fwht(u)[: self.d] * self.signs(self.d, device)


class _Fastfood(torch.autograd.Function):
    """(θ_d, λ) -> λ P(θ_d). Only θ_d and λ are saved: with g = dL/dΔW, dθ_d = λ Pᵀg and
    dλ = <Pᵀg, θ_d> (Pᵀg recomputed from the keys), so no weight-sized tensor waits for the
    backward."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, lam: torch.Tensor | None,  # type: ignore[override]
                projection: Projection) -> torch.Tensor:
        ctx.projection = projection
        ctx.save_for_backward(theta, lam)
        out = projection.forward(theta)
        return out if lam is None else out.mul_(lam.detach().float())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        theta, lam = ctx.saved_tensors
        pt_g = ctx.projection.backward(grad)  # Pᵀ g, float32, length d
        d_lam = None
        if lam is not None and ctx.needs_input_grad[1]:
            d_lam = torch.dot(pt_g, theta.detach().float()).to(lam.dtype).reshape(lam.shape)
        d_theta = pt_g if lam is None else pt_g * lam.detach().float()
        return d_theta.to(theta.dtype), d_lam, None
