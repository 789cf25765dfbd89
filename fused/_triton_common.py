"""Pieces shared by the two structure ops built on S = normalize(X)·Âᵀ (fused.similarity,
fused.alignment): the tensor-core operand dtype and the ``tl.dot`` helpers of their kernels, block
sizing, the row padding of their kernels' operands, the row-normalisation backward of their references, and their common argument check.
"""

from __future__ import annotations

import torch

from fused._dispatch import HAS_TRITON, check_tensor
from fused._launch import aligned16
from fused._targets import ArchLike, target_of

NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default

# DOT_KIND (a plain int, so inductor can codegen the launch) -> the tensor-core operand dtype:
# 0 fp32 as "tf32x3" (NVIDIA), 1 fp16, 2 bf16, 3 fp32 as "ieee" (AMD: fp32 MFMA; see fused._targets).
DOT_KIND_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float32)
FP32_DOT_KINDS = {"tf32x3": 0, "ieee": 3}


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def dot_kind(a_dtype: torch.dtype, b_dtype: torch.dtype, arch: ArchLike) -> int:
    """DOT_KIND of a product of inputs of these dtypes on ``arch``: 1 fp16, 2 bf16, else fp32 in the
    target's fp32 precision (0 "tf32x3" on NVIDIA, 3 "ieee" on AMD).

    Inputs of one 16-bit dtype go to the tensor cores as they are (exact products, fp32
    accumulate). Anything else is computed in fp32: "tf32x3" (three tf32 products, ≈ fp32 accuracy
    on tensor cores; plain tf32 would lose ~3 decimal digits against torch's fp32 matmul) or, on AMD,
    which has no tf32x3, "ieee" on the fp32 MFMA instructions.
    """
    if a_dtype == b_dtype and a_dtype in (torch.float16, torch.bfloat16):
        return DOT_KIND_DTYPES.index(a_dtype)
    return FP32_DOT_KINDS[target_of(arch).fp32_dot]


# The kernels see rows of a width that is a multiple of ROW_ALIGN elements, 16-byte aligned:
# then every tile load and store vectorises (rows whose width the compiler cannot prove a
# multiple of the vector width load element by element, and the tiles' addresses then spill).
ROW_ALIGN = 16


def kernel_width(D: int) -> int:
    """The row width the kernels work on: D rounded up to a multiple of ROW_ALIGN (zero-padded)."""
    return -(-D // ROW_ALIGN) * ROW_ALIGN


def _kernel_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` [N, D] as the kernels need it: contiguous, 16-byte aligned, ``width`` columns
    (zero-padded). A no-op for the usual D (a multiple of 16) on a fresh tensor."""
    t = t.contiguous()
    if t.shape[1] == width and aligned16(t):
        return t
    out = t.new_zeros((t.shape[0], width))
    out[:, : t.shape[1]] = t
    return out


# The preflight's default grid of the structure ops (their DECLARATIONs): the full D × K product.
# What the launches depend on: D through the padded width kernel_width(D) (a multiple of 16) and
# through K > D (the Gram path's choice of operand); K through next_pow2(K), the path (K ≤ 128) and
# Triton's specialisation of K (1, a multiple of 16, other: the output row length of S); N through
# nothing (the kernels do not specialise it; it only sizes the grid). So D spans 1-4096 with widths
# below and above every K, K takes both specialisations in every power-of-two bucket up to 4096 and
# ImageNet's 1,000 and 21,843 classes; the product runs at N = 65,536, and N = 1 and the paper's 128
# cross a subset of it.
STRUCTURE_N = (65536, 1, 128)
STRUCTURE_D = (1, 3, 16, 33, 64, 100, 128, 200, 256, 384, 500, 512, 768, 1000, 1024, 1280, 1536, 2048, 3072,
               4095, 4096)
STRUCTURE_K = (1, 2, 10, 16, 17, 32, 33, 64, 65, 100, 128, 129, 256, 257, 512, 513, 1000, 1024, 1025, 2048,
               2049, 4095, 4096, 21843)
_SMALL_N_D = (1, 33, 512, 768, 4096)
_SMALL_N_K = (1, 10, 17, 100, 129, 1000, 4096, 21843)


def structure_shapes():
    """(N, D, K) of the structure ops' default preflight grid."""
    shapes = [(STRUCTURE_N[0], D, K) for D in STRUCTURE_D for K in STRUCTURE_K]
    return shapes + [(N, D, K) for N in STRUCTURE_N[1:] for D in _SMALL_N_D for K in _SMALL_N_K]


def normalize_backward(
    v: torch.Tensor, u: torch.Tensor, norm: torch.Tensor, proj: torch.Tensor
) -> torch.Tensor:
    """Backward of the row normalisation u = r / max(‖r‖, eps), row by row.

    dr = (v − u·proj·[‖r‖ > eps]) / max(‖r‖, eps), with v = ∂/∂u [R, D], ``norm`` = ‖r‖ [R] and
    ``proj`` = u·v [R]. Matches autograd of F.normalize, whose clamp_min passes no gradient below
    eps.
    """
    return (v - u * (proj * (norm > NORMALIZE_EPS)).unsqueeze(1)) / norm.clamp_min(NORMALIZE_EPS).unsqueeze(1)


def check_features_and_anchors(x: torch.Tensor, anchors: torch.Tensor) -> None:
    """x is a floating [N, D] tensor and anchors a floating [K, D] tensor with the same D."""
    check_tensor("x", x, ndim=2)
    check_tensor("anchors", anchors, ndim=2)
    if anchors.shape[1] != x.shape[1]:
        raise ValueError(
            f"anchors must have the feature dim D of x (anchors [K, D] with x [N, D]), "
            f"got x {tuple(x.shape)} and anchors {tuple(anchors.shape)}"
        )


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def dot_operand(v, DOT_KIND: tl.constexpr):
        """Cast to the tensor-core operand dtype: 1 fp16, 2 bf16, else (0, 3) fp32."""
        if DOT_KIND == 1:
            return v.to(tl.float16)
        elif DOT_KIND == 2:
            return v.to(tl.bfloat16)
        else:
            return v.to(tl.float32)

    @triton.jit
    def mma(a, b, acc, DOT_KIND: tl.constexpr):
        """acc + a·b with fp32 accumulation; fp32 operands in tf32x3 (NVIDIA tensor cores, ≈ fp32
        accuracy) or ieee (AMD fp32 MFMA)."""
        if DOT_KIND == 0:
            return tl.dot(a, b, acc, input_precision="tf32x3")
        elif DOT_KIND == 3:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)
