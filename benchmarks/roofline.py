"""Byte and FLOP counts of each op (PERFORMANCE.md "Roofline") and the roofline fraction.

The counts are the op's minimum traffic — what a single fused pass must read and write — not what a
given provider moves, so the same numbers divide every provider's time: ``gbps`` is the effective
bandwidth (minimum bytes / time) and ``roofline_frac`` = T_roof / T_measured with

    T_roof = max(bytes / copy_bandwidth, flops / matmul_rate)

where both ceilings are measured on the same machine in the same run (a large device-local copy and
a large dense matmul of the row's dtype), so the fraction is against an achievable, not a datasheet,
peak. Notation: N rows, D feature dim, K anchors, P parameters, M PGD elements, b = bytes/element.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Cost:
    """Minimum bytes moved, FLOPs, and the minimum extra memory the op itself must allocate."""

    bytes: float
    flops: float
    min_mem_bytes: float


def anchor_similarity(N: int, D: int, K: int, dtype: torch.dtype) -> Cost:
    """S = normalize(X)·Âᵀ: read X (N·D) and Â (K·D), write S (N·K); 2NKD FLOPs; S is the output."""
    b = nbytes(dtype)
    return Cost(bytes=N * D * b + K * D * b + N * K * b, flops=2 * N * K * D, min_mem_bytes=N * K * b)


def alignment_loss(N: int, D: int, K: int, dtype: torch.dtype, pass_: str) -> Cost:
    """L = 1 − mean_i cos(S_i, S0_i) with S = X̂Âᵀ, S0 = X̂0Âᵀ.

    * fwd: read X, X0, Â; two similarity products: 4NKD FLOPs.
    * fwd+bwd (fused, dX written during the forward, nothing N×K stored): read X, X0, Â, write dX;
      4NKD forward + 2NKD for dX̂ = ∂ℓ/∂S·Â: 6NKD FLOPs.
    * bwd alone: counted as a standalone backward that recomputes from X and X0 (same traffic and
      FLOPs as fwd+bwd), the bound for an implementation that stores only O(N) row scalars.
    The op must allocate dX (N·D) for any pass that produces a gradient, plus O(N) row scalars.
    """
    b = nbytes(dtype)
    scalars = 3 * N * 4  # ‖s‖, ‖s0‖, s·s0 per row in fp32
    if pass_ == "fwd":
        return Cost(bytes=2 * N * D * b + K * D * b, flops=4 * N * K * D, min_mem_bytes=scalars)
    return Cost(bytes=3 * N * D * b + K * D * b, flops=6 * N * K * D, min_mem_bytes=N * D * b + scalars)


def masked_sgd_step(P: int, dtype: torch.dtype, *, momentum: bool = False, mask_bytes: int = 0) -> Cost:
    """w ← w − lr·(g + λ·I⊙(w − w0)): P·(2b_w + b_g + b_w0 + b_I) bytes (20 B/param in fp32).

    Momentum reads and writes a buffer (+2·b per param); a grad mask adds its own bytes; ~5 FLOPs/param.
    In place, so no extra memory beyond the 0-dim SR value.
    """
    b = nbytes(dtype)
    per_param = 5 * b + (2 * b if momentum else 0) + mask_bytes
    return Cost(bytes=P * per_param, flops=5 * P, min_mem_bytes=4)


def importance_accumulate(P: int, dtype: torch.dtype) -> Cost:
    """I += c·|g|: P·(2b_I + b_g) bytes, 2 FLOPs/param, in place."""
    b = nbytes(dtype)
    return Cost(bytes=3 * P * b, flops=2 * P, min_mem_bytes=0)


def pgd_step(M: int, dtype: torch.dtype) -> Cost:
    """x' = clamp(x0 + Π_ε(x − α·g/‖g‖ − x0)): read x, x0, g, write x' (M elements); ~10 FLOPs each.

    Returns a new tensor, so the output (M·b) is its extra memory.
    """
    b = nbytes(dtype)
    return Cost(bytes=4 * M * b, flops=10 * M, min_mem_bytes=M * b)


def roofline_ms(cost: Cost, copy_gbps: float, matmul_tflops: Optional[float]) -> float:
    """T_roof = max(bytes / bandwidth, flops / matmul rate) in milliseconds."""
    t_mem = cost.bytes / (copy_gbps * 1e9)
    t_flop = cost.flops / (matmul_tflops * 1e12) if matmul_tflops else 0.0
    return max(t_mem, t_flop) * 1e3


def bound(cost: Cost, copy_gbps: float, matmul_tflops: Optional[float]) -> str:
    """``memory`` or ``compute``: which ceiling sets T_roof."""
    t_mem = cost.bytes / (copy_gbps * 1e9)
    t_flop = cost.flops / (matmul_tflops * 1e12) if matmul_tflops else 0.0
    return "compute" if t_flop > t_mem else "memory"
