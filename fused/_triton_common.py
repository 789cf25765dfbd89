"""Pieces shared by the two structure ops built on S = normalize(X)·Âᵀ (fused.similarity,
fused.alignment): the tensor-core operand dtype and the ``tl.dot`` helpers of their kernels, block
sizing, the row padding of their kernels' operands, the row-normalisation backward of their references, and their common argument check.
"""

from __future__ import annotations

import torch

from fused._dispatch import HAS_TRITON, check_tensor, is_traced

NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default

# DOT_KIND (a plain int, so inductor can codegen the launch) -> the tensor-core operand dtype.
DOT_KIND_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def dot_kind(a_dtype: torch.dtype, b_dtype: torch.dtype) -> int:
    """Tensor-core operand dtype of a product of inputs of these dtypes: 0 fp32, 1 fp16, 2 bf16.

    Inputs of one 16-bit dtype go to the tensor cores as they are (exact products, fp32
    accumulate). Anything else is computed in fp32 with "tf32x3" (three tf32 products, ≈ fp32
    accuracy on tensor cores; plain tf32 would lose ~3 decimal digits against torch's fp32 matmul).
    """
    if a_dtype == b_dtype and a_dtype in (torch.float16, torch.bfloat16):
        return DOT_KIND_DTYPES.index(a_dtype)
    return 0


# The kernels see rows of a width that is a multiple of ROW_ALIGN elements, 16-byte aligned:
# then every tile load and store vectorises (rows whose width the compiler cannot prove a
# multiple of the vector width load element by element, and the tiles' addresses then spill).
ROW_ALIGN = 16


def kernel_width(D: int) -> int:
    """The row width the kernels work on: D rounded up to a multiple of ROW_ALIGN (zero-padded)."""
    return -(-D // ROW_ALIGN) * ROW_ALIGN


def _is_aligned(t: torch.Tensor) -> bool:
    """``t``'s first element is 16-byte aligned. A traced tensor has no address: its offset into a
    storage is judged instead (allocators align storages to at least 64 bytes)."""
    if is_traced(t):
        return (t.storage_offset() * t.element_size()) % 16 == 0
    return t.data_ptr() % 16 == 0


def _kernel_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` [N, D] as the kernels need it: contiguous, 16-byte aligned, ``width`` columns
    (zero-padded). A no-op for the usual D (a multiple of 16) on a fresh tensor."""
    t = t.contiguous()
    if t.shape[1] == width and _is_aligned(t):
        return t
    out = t.new_zeros((t.shape[0], width))
    out[:, : t.shape[1]] = t
    return out


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
        """Cast to the tensor-core operand dtype: 0 fp32, 1 fp16, 2 bf16."""
        if DOT_KIND == 1:
            return v.to(tl.float16)
        elif DOT_KIND == 2:
            return v.to(tl.bfloat16)
        else:
            return v.to(tl.float32)

    @triton.jit
    def mma(a, b, acc, DOT_KIND: tl.constexpr):
        """acc + a·b with fp32 accumulation; fp32 operands use tf32x3 (≈ fp32 accuracy, tensor cores)."""
        if DOT_KIND == 0:
            return tl.dot(a, b, acc, input_precision="tf32x3")
        else:
            return tl.dot(a, b, acc)
