"""Structure-aware alignment loss (METHOD.md §5).

For rows x_i (trained branch) and x_ref_i (frozen original branch) and anchors A:
    S = normalize(x) Âᵀ,  S_ref = normalize(x_ref) Âᵀ,  Â = normalize(anchors),
    ℓ_i = 1 − cos(S_i, S_ref_i)
with ``normalize`` = F.normalize (eps 1e-12) and ``cos`` = F.cosine_similarity (eps 1e-8:
cos = s·s0 / (max(‖s‖, eps)·max(‖s0‖, eps))). L_align is the mean of ℓ over rows.

Gradient of one row (s = Â x̂, g = ∂ℓ/∂s, n = max(‖s‖, 1e-8), c = the cosine):
    g = α·s0 + β·s,  α = −1/(n·n0),  β = c/(‖s‖·n)   (= −(ŝ0 − c·ŝ)/‖s‖ when unclamped)
    ∂ℓ/∂x̂ = Âᵀ g,   x̂·∂ℓ/∂x̂ = s·g,   ∂ℓ/∂x = (∂ℓ/∂x̂ − x̂ (s·g)) / ‖x‖.
β uses the unclamped ‖s‖ because torch clamps the cosine's norms without gradient (β = 0 at
s = 0, where torch's norm has subgradient 0); the x̂ term is dropped when ‖x‖ < 1e-12 because
F.normalize's clamp_min passes no gradient there. The gradient for x_ref swaps the roles.

Layout: PyTorch reference (the specification, row-chunked so extra memory is O(chunk·K)), the
Triton kernel, torch.library registration with its autograd formula, the public entry point.

Triton design ("gradient in forward", one launch for forward + backward):
* One program per BLOCK_N rows. It loads its rows of x and x_ref once ([BLOCK_N, D_PAD], D
  masked) and computes their norms in-kernel; normalisation is folded into the dot products
  (S = (X Âᵀ)/‖x‖), so no normalized copy of X exists anywhere.
* Pass 1 over anchor tiles (BLOCK_K): S and S_ref tiles with tl.dot (fp32 accumulate), reduced
  at once into the three per-row scalars ‖s‖², ‖s0‖², s·s0. Loss written.
* Pass 2 (only when x needs a gradient) recomputes the tiles, forms g tile by tile in fp32 and
  accumulates ∂ℓ/∂x̂ = g Â into a [BLOCK_N, D_PAD] fp32 register accumulator; then the row-local
  normalisation backward writes dx (per row, not yet scaled by the upstream gradient).
  Pass 3 does the same for x_ref when it needs a gradient.
* No N×K tensor is ever stored; HBM traffic is N·D·(b_x + b_x0 + b_dx) + K·D·b_a (each row
  block re-reads Â once per pass, from L2 in practice). FLOPs 4NKD (pass 1) + 6NKD per
  gradient pass, i.e. 10NKD for the usual x-only gradient (the recompute costs 4NKD over the
  6NKD minimum). The autograd backward is a single elementwise scale dx·grad_row (with
  grad_row = grad/N for "mean").
Forming g from the exact per-row scalars (two passes) instead of accumulating S·Â and S_ref·Â
in one pass avoids catastrophic cancellation when x ≈ x_ref, the common case early in
unlearning.

Anchors are frozen in the method: the Triton path has no anchor gradient (see
``structure_alignment_loss``); the reference path has one.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from fused._dispatch import (
    HAS_TRITON,
    check_same_device,
    check_tensor,
    compute_dtype,
    launcher,
    resolve_backend,
    triton_library_op,
)
from fused._triton_common import (
    DOT_KIND_DTYPES,
    NORMALIZE_EPS,
    check_features_and_anchors,
    dot_kind,
    next_pow2,
    normalize_backward,
)

COSINE_EPS = 1e-8  # F.cosine_similarity's default
REDUCTIONS = ("mean", "sum", "none")
REFERENCE_CHUNK_ROWS = 4096  # rows per chunk on the reference path: extra memory O(chunk·K)
TRITON_MAX_D = 1024  # the [BLOCK_N, D_PAD] fp32 gradient accumulator must fit in registers


# ----------------------------------------------------------------------------- reference


def _reference_rows(x: torch.Tensor, x_ref: torch.Tensor, a_hat: torch.Tensor) -> torch.Tensor:
    """ℓ_i = 1 − cos(S_i, S_ref_i) for one chunk of rows, exactly as the naive formula."""
    ct = a_hat.dtype
    S = F.normalize(x.to(ct), dim=1, eps=NORMALIZE_EPS) @ a_hat.T
    S_ref = F.normalize(x_ref.to(ct), dim=1, eps=NORMALIZE_EPS) @ a_hat.T
    return 1.0 - F.cosine_similarity(S, S_ref, dim=1, eps=COSINE_EPS)


def _reference_chunk_backward(x, x_ref, a_hat, grad_rows, need_x, need_ref, need_a):
    """Analytic gradients (module docstring) of Σ_i grad_rows_i·ℓ_i for one chunk of rows.

    Returns (dx, dx_ref, dÂ) with None where not needed; dÂ is this chunk's contribution.
    """
    ct = a_hat.dtype
    xf, xrf = x.to(ct), x_ref.to(ct)
    nx = torch.linalg.vector_norm(xf, dim=1)
    nxr = torch.linalg.vector_norm(xrf, dim=1)
    x_hat = xf / nx.clamp_min(NORMALIZE_EPS).unsqueeze(1)
    xr_hat = xrf / nxr.clamp_min(NORMALIZE_EPS).unsqueeze(1)
    S, S_ref = x_hat @ a_hat.T, xr_hat @ a_hat.T
    n_s = torch.linalg.vector_norm(S, dim=1)
    n_r = torch.linalg.vector_norm(S_ref, dim=1)
    nc, nrc = n_s.clamp_min(COSINE_EPS), n_r.clamp_min(COSINE_EPS)
    cos = (S * S_ref).sum(dim=1) / (nc * nrc)
    alpha = -grad_rows / (nc * nrc)
    zero = torch.zeros_like(cos)
    dx = dxr = da_hat = None
    g = g_ref = None
    if need_x or need_a:
        beta = grad_rows * torch.where(n_s > 0, cos / (torch.where(n_s > 0, n_s, 1.0) * nc), zero)
        g = alpha.unsqueeze(1) * S_ref + beta.unsqueeze(1) * S
    if need_ref or need_a:
        beta_ref = grad_rows * torch.where(n_r > 0, cos / (torch.where(n_r > 0, n_r, 1.0) * nrc), zero)
        g_ref = alpha.unsqueeze(1) * S + beta_ref.unsqueeze(1) * S_ref
    if need_x:
        dx = normalize_backward(g @ a_hat, x_hat, nx, (S * g).sum(dim=1)).to(x.dtype)
    if need_ref:
        dxr = normalize_backward(g_ref @ a_hat, xr_hat, nxr, (S_ref * g_ref).sum(dim=1)).to(x_ref.dtype)
    if need_a:
        da_hat = g.T @ x_hat + g_ref.T @ xr_hat
    return dx, dxr, da_hat


class _ReferenceAlignment(torch.autograd.Function):
    """Per-row loss, row-chunked: forward and backward never hold more than chunk_rows×K of S."""

    @staticmethod
    def forward(ctx, x, x_ref, anchors, chunk_rows: int):
        ct = compute_dtype(torch.promote_types(torch.promote_types(x.dtype, x_ref.dtype), anchors.dtype))
        a_hat = F.normalize(anchors.to(ct), dim=1, eps=NORMALIZE_EPS)
        N = x.shape[0]
        rows = [
            _reference_rows(x[i : i + chunk_rows], x_ref[i : i + chunk_rows], a_hat)
            for i in range(0, N, chunk_rows)
        ]
        ctx.save_for_backward(x, x_ref, anchors)
        ctx.chunk_rows = chunk_rows
        return torch.cat(rows) if rows else x.new_zeros((0,), dtype=ct)

    @staticmethod
    def backward(ctx, grad_rows):
        x, x_ref, anchors = ctx.saved_tensors
        need_x, need_ref, need_a = ctx.needs_input_grad[:3]
        ct = grad_rows.dtype
        na = torch.linalg.vector_norm(anchors.to(ct), dim=1)
        a_hat = anchors.to(ct) / na.clamp_min(NORMALIZE_EPS).unsqueeze(1)
        dxs, dxrs = [], []
        da_hat = torch.zeros_like(a_hat) if need_a else None
        step = ctx.chunk_rows
        for i in range(0, x.shape[0], step):
            dx, dxr, da = _reference_chunk_backward(
                x[i : i + step], x_ref[i : i + step], a_hat, grad_rows[i : i + step], need_x, need_ref, need_a
            )
            dxs.append(dx)
            dxrs.append(dxr)
            if need_a:
                da_hat = da_hat + da
        dx = torch.cat(dxs) if need_x else None
        dxr = torch.cat(dxrs) if need_ref else None
        da = None
        if need_a:
            da = normalize_backward(da_hat, a_hat, na, (a_hat * da_hat).sum(dim=1)).to(anchors.dtype)
        return dx, dxr, da, None


def structure_alignment_rows_reference(
    x: torch.Tensor, x_ref: torch.Tensor, anchors: torch.Tensor, *, chunk_rows: int = REFERENCE_CHUNK_ROWS
) -> torch.Tensor:
    """Per-row ℓ_i (fp32; fp64 for fp64 inputs) in plain PyTorch, differentiable w.r.t. all three inputs."""
    if x.shape[0] == 0:
        return _empty_rows(x, x_ref, anchors)
    return _ReferenceAlignment.apply(x, x_ref, anchors, chunk_rows)


def _empty_rows(x, x_ref, anchors):
    """N = 0: an empty per-row vector still connected to the inputs (their gradients are zeros)."""
    ct = compute_dtype(torch.promote_types(torch.promote_types(x.dtype, x_ref.dtype), anchors.dtype))
    return x.to(ct).sum(dim=1) * 0 + x_ref.to(ct).sum(dim=1) * 0 + anchors.to(ct).sum() * 0


# ----------------------------------------------------------------------------- Triton kernel

if HAS_TRITON:
    import triton
    import triton.language as tl

    from fused._triton_common import dot_operand, mma

    @triton.jit
    def _structure_tiles(x, x_ref, inv_x, inv_xr, a_ptr, k0, K, D, stride_an,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr,
                         DOT_KIND: tl.constexpr):
        """One anchor tile Â_k [BLOCK_K, D_PAD] and the matching S, S_ref tiles [BLOCK_N, BLOCK_K] (fp32)."""
        cols = k0 + tl.arange(0, BLOCK_K)
        offs_d = tl.arange(0, D_PAD)
        a = tl.load(
            a_ptr + cols.to(tl.int64)[:, None] * stride_an + offs_d[None, :],
            mask=(cols < K)[:, None] & (offs_d < D)[None, :], other=0.0,
        )
        a = dot_operand(a, DOT_KIND)
        a_t = tl.trans(a)
        zero = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        s = mma(x, a_t, zero, DOT_KIND) * inv_x[:, None]
        s_ref = mma(x_ref, a_t, zero, DOT_KIND) * inv_xr[:, None]
        return a, s, s_ref

    @triton.jit
    def _normalized_gradient(x, x_ref, inv_x, inv_xr, alpha, beta, a_ptr, K, D, stride_an,
                             FOR_REF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             D_PAD: tl.constexpr, DOT_KIND: tl.constexpr):
        """∂ℓ/∂x̂ = Σ_k g_k Â_k [BLOCK_N, D_PAD] and s·g per row, g = α·s_other + β·s_own (fp32)."""
        dxh = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
        proj = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a, s, s_ref = _structure_tiles(x, x_ref, inv_x, inv_xr, a_ptr, k0, K, D, stride_an,
                                           BLOCK_N, BLOCK_K, D_PAD, DOT_KIND)
            if FOR_REF:
                g = alpha[:, None] * s + beta[:, None] * s_ref
                proj += tl.sum(s_ref * g, axis=1)
            else:
                g = alpha[:, None] * s_ref + beta[:, None] * s
                proj += tl.sum(s * g, axis=1)
            dxh = mma(dot_operand(g, DOT_KIND), a, dxh, DOT_KIND)
        return dxh, proj

    @triton.jit
    def _structure_alignment_kernel(
        x_ptr, xr_ptr, a_ptr, loss_ptr, dx_ptr, dxr_ptr,
        N, K, D,
        stride_xn, stride_xrn, stride_an, stride_dxn, stride_dxrn,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr,
        NEED_DX: tl.constexpr, NEED_DXR: tl.constexpr,
        DOT_KIND: tl.constexpr,
        NORM_EPS: tl.constexpr, COS_EPS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rows64 = rows.to(tl.int64)  # N·D may exceed 2^31
        row_ok = rows < N
        offs_d = tl.arange(0, D_PAD)
        tile_ok = row_ok[:, None] & (offs_d < D)[None, :]

        # Rows of x and x_ref, loaded once and kept for all passes; norms in fp32.
        xf = tl.load(x_ptr + rows64[:, None] * stride_xn + offs_d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        xrf = tl.load(xr_ptr + rows64[:, None] * stride_xrn + offs_d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        nx = tl.sqrt(tl.sum(xf * xf, axis=1))
        nxr = tl.sqrt(tl.sum(xrf * xrf, axis=1))
        inv_x = 1.0 / tl.maximum(nx, NORM_EPS)
        inv_xr = 1.0 / tl.maximum(nxr, NORM_EPS)
        x = dot_operand(xf, DOT_KIND)  # exact: the operand dtype is the input dtype or fp32
        x_ref = dot_operand(xrf, DOT_KIND)

        # Pass 1: the three per-row scalars ‖s‖², ‖s0‖², s·s0.
        ss = tl.zeros((BLOCK_N,), dtype=tl.float32)
        rr = tl.zeros((BLOCK_N,), dtype=tl.float32)
        sr = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            _, s, s_ref = _structure_tiles(x, x_ref, inv_x, inv_xr, a_ptr, k0, K, D, stride_an,
                                           BLOCK_N, BLOCK_K, D_PAD, DOT_KIND)
            ss += tl.sum(s * s, axis=1)
            rr += tl.sum(s_ref * s_ref, axis=1)
            sr += tl.sum(s * s_ref, axis=1)
        n_s = tl.sqrt(ss)
        n_r = tl.sqrt(rr)
        nc = tl.maximum(n_s, COS_EPS)
        nrc = tl.maximum(n_r, COS_EPS)
        cos = sr / (nc * nrc)
        tl.store(loss_ptr + rows, 1.0 - cos, mask=row_ok)

        alpha = -1.0 / (nc * nrc)
        if NEED_DX:
            beta = tl.where(n_s > 0.0, cos / (tl.where(n_s > 0.0, n_s, 1.0) * nc), 0.0)
            dxh, proj = _normalized_gradient(x, x_ref, inv_x, inv_xr, alpha, beta, a_ptr, K, D, stride_an,
                                             False, BLOCK_N, BLOCK_K, D_PAD, DOT_KIND)
            # Row-local normalisation backward: dx = (dx̂ − x̂ (x̂·dx̂)) / ‖x‖, x̂·dx̂ = s·g.
            proj = tl.where(nx > NORM_EPS, proj, 0.0)
            # x.to(fp32) is exact (x is the input dtype or fp32): keeps only the 16-bit rows live.
            dx = (dxh - (x.to(tl.float32) * inv_x[:, None]) * proj[:, None]) * inv_x[:, None]
            tl.store(dx_ptr + rows64[:, None] * stride_dxn + offs_d[None, :],
                     dx.to(dx_ptr.dtype.element_ty), mask=tile_ok)
        if NEED_DXR:
            beta_r = tl.where(n_r > 0.0, cos / (tl.where(n_r > 0.0, n_r, 1.0) * nrc), 0.0)
            dxh, proj = _normalized_gradient(x, x_ref, inv_x, inv_xr, alpha, beta_r, a_ptr, K, D, stride_an,
                                             True, BLOCK_N, BLOCK_K, D_PAD, DOT_KIND)
            proj = tl.where(nxr > NORM_EPS, proj, 0.0)
            dxr = (dxh - (x_ref.to(tl.float32) * inv_xr[:, None]) * proj[:, None]) * inv_xr[:, None]
            tl.store(dxr_ptr + rows64[:, None] * stride_dxrn + offs_d[None, :],
                     dxr.to(dxr_ptr.dtype.element_ty), mask=tile_ok)


def _alignment_config(N: int, K: int, D: int, dot_bytes: int):
    """(BLOCK_N, BLOCK_K, D_PAD, num_warps) from the problem size.

    * D_PAD = next power of two ≥ max(D, 16): a program holds whole rows (masked beyond D).
    * BLOCK_N ≤ 16384 / D_PAD: the fp32 ∂ℓ/∂x̂ accumulator [BLOCK_N, D_PAD] stays ≤ 64 KiB of
      registers (64 a thread with 8 warps); ≥ 16 for tl.dot; ≤ 64; no larger than N needs.
    * BLOCK_K: the anchor tile [BLOCK_K, D_PAD] stays ≤ 64 KiB of shared memory; 16..64.
    """
    d_pad = max(16, next_pow2(D))
    block_n = max(16, min(64, 16384 // d_pad, next_pow2(N)))
    block_k = max(16, min(64, 65536 // (d_pad * dot_bytes), next_pow2(K)))
    num_warps = 8 if block_n * d_pad >= 16384 else 4
    return block_n, block_k, d_pad, num_warps


def _dot_config(x_dtype: torch.dtype, x_ref_dtype: torch.dtype):
    """(torch dtype of Â, DOT_KIND: 0 fp32, 1 fp16, 2 bf16) — plain ints/dtypes, so inductor can
    codegen the launch.

    x and x_ref of one 16-bit dtype: tensor cores in that dtype (Â rounded to it, fp32 accumulate).
    Otherwise fp32 with "tf32x3" (see ``fused._triton_common.dot_kind``).
    """
    kind = dot_kind(x_dtype, x_ref_dtype)
    return DOT_KIND_DTYPES[kind], kind


@triton_library_op("fused::structure_alignment_fwd", mutates_args=())
def _structure_alignment_triton(
    x: torch.Tensor, x_ref: torch.Tensor, anchors: torch.Tensor, need_dx: bool, need_dx_ref: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch: per-row loss ℓ [N] (fp32) and, when asked, ∂ℓ_i/∂x_i, ∂ℓ_i/∂x_ref_i ([N, D] in the
    inputs' dtypes; an empty [0] placeholder when not asked). Anchors are constants here."""
    N, D = x.shape
    K = anchors.shape[0]
    a_dtype, kind = _dot_config(x.dtype, x_ref.dtype)
    # Â once on the host side: K×D is small, and the kernel then needs no anchor norms.
    a_hat = F.normalize(anchors.to(torch.float32), dim=1, eps=NORMALIZE_EPS).to(a_dtype).contiguous()
    x = x.contiguous()
    x_ref = x_ref.contiguous()
    loss = torch.empty((N,), dtype=torch.float32, device=x.device)
    dx = torch.empty((N, D) if need_dx else (0,), dtype=x.dtype, device=x.device)
    dxr = torch.empty((N, D) if need_dx_ref else (0,), dtype=x_ref.dtype, device=x.device)
    if N == 0:
        return loss, dx, dxr
    block_n, block_k, d_pad, num_warps = _alignment_config(N, K, D, a_hat.element_size())
    grid = (triton.cdiv(N, block_n),)
    launcher(_structure_alignment_kernel)[grid](
        x, x_ref, a_hat, loss, dx, dxr,
        N, K, D,
        x.stride(0), x_ref.stride(0), a_hat.stride(0), dx.stride(0), dxr.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, D_PAD=d_pad,
        NEED_DX=need_dx, NEED_DXR=need_dx_ref,
        DOT_KIND=kind,
        NORM_EPS=NORMALIZE_EPS, COS_EPS=COSINE_EPS,
        num_warps=num_warps, num_stages=1,  # one anchor tile in flight: shared memory stays bounded
    )
    return loss, dx, dxr


@_structure_alignment_triton.register_fake
def _(x, x_ref, anchors, need_dx, need_dx_ref):
    N, D = x.shape
    loss = x.new_empty((N,), dtype=torch.float32)
    dx = x.new_empty((N, D) if need_dx else (0,))
    dxr = x_ref.new_empty((N, D) if need_dx_ref else (0,))
    return loss, dx, dxr


def _setup_context(ctx, inputs, output):
    _, _, _, need_dx, need_dx_ref = inputs
    _, dx, dxr = output
    ctx.need = (need_dx, need_dx_ref)
    ctx.save_for_backward(dx, dxr)


def _backward(ctx, grad_loss, _grad_dx, _grad_dxr):
    """∂L/∂x_i = grad_loss_i · (∂ℓ_i/∂x_i), the per-row gradient the forward already wrote."""
    dx, dxr = ctx.saved_tensors
    wanted = ctx.needs_input_grad
    if wanted[2]:
        raise RuntimeError("fused::structure_alignment_fwd has no gradient for anchors (they are frozen)")
    grads = []
    for want, have, d in ((wanted[0], ctx.need[0], dx), (wanted[1], ctx.need[1], dxr)):
        if not want:
            grads.append(None)
        elif not have:
            raise RuntimeError(
                "fused::structure_alignment_fwd was called without the per-row gradient it is now asked "
                "for; pass need_dx / need_dx_ref = True when the input requires grad"
            )
        else:
            grads.append((d.to(torch.float32) * grad_loss.unsqueeze(1)).to(d.dtype))
    return grads[0], grads[1], None, None, None


_structure_alignment_triton.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public op


def _check_inputs(x, x_ref, anchors, reduction):
    check_features_and_anchors(x, anchors)
    check_tensor("x_ref", x_ref, ndim=2)
    if x_ref.shape != x.shape:
        raise ValueError(
            f"x_ref must have the shape of x ([N, D], one reference row per row of x), "
            f"got x {tuple(x.shape)} and x_ref {tuple(x_ref.shape)}"
        )
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")
    return check_same_device(x=x, x_ref=x_ref, anchors=anchors)


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    # mean over N rows; for N = 0 this is 0 (not nan): an empty batch contributes no loss.
    return total / max(rows.shape[0], 1)


def structure_alignment_loss(
    x: torch.Tensor,
    x_ref: torch.Tensor,
    anchors: torch.Tensor,
    *,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Structure-aware alignment loss L_align = 1 − (1/N) Σ_i cos(S_i, S_ref_i) (METHOD.md §5).

    Args:
        x: [N, D] representations of the trained branch (v^unl before normalisation).
        x_ref: [N, D] representations of the frozen original branch (v^ori); gradient only if it
            requires grad.
        anchors: [K, D] anchors (normalised here).
        reduction: "mean" (the method's L_align), "sum", or "none" (per-row ℓ_i, shape [N]).
        backend: None, "triton" or "reference" (see fused._dispatch.resolve_backend).

    Returns:
        The loss in fp32 (fp64 when an input is fp64, reference path only); accumulation is
        always fp32 or wider, whatever the input dtype (fp32, fp16, bf16).

    Notes:
        * N = 0: "none" gives an empty vector, "sum" and "mean" give 0.0 (not nan like
          torch's mean of nothing) with zero gradients; no kernel is launched.
        * Anchors are frozen in the method. The Triton path computes no anchor gradient: with
          ``anchors.requires_grad`` under grad mode, backend=None uses the reference path (which
          differentiates w.r.t. anchors) and backend="triton" raises ValueError.
        * backend=None also uses the reference for fp64 inputs and for D > 1024 (the Triton
          kernel keeps whole rows in registers); backend="triton" raises ValueError there.
    """
    device = _check_inputs(x, x_ref, anchors, reduction)
    resolved = resolve_backend(backend, device)
    if resolved == "triton":
        why = None
        if torch.float64 in (x.dtype, x_ref.dtype, anchors.dtype):
            why = "does not support float64 inputs"
        elif x.shape[1] > TRITON_MAX_D:
            why = f"supports D <= {TRITON_MAX_D} (got D = {x.shape[1]})"
        elif anchors.requires_grad and torch.is_grad_enabled():
            why = "has no gradient for anchors (frozen in the method); pass anchors.detach()"
        if why is not None:
            if backend == "triton":
                raise ValueError(f"backend='triton' {why}; use backend='reference'")
            resolved = "reference"

    if x.shape[0] == 0:
        return _reduce(_empty_rows(x, x_ref, anchors), reduction)
    if resolved == "reference":
        return _reduce(structure_alignment_rows_reference(x, x_ref, anchors), reduction)
    grad_on = torch.is_grad_enabled()
    rows, _, _ = _structure_alignment_triton(
        x, x_ref, anchors, grad_on and x.requires_grad, grad_on and x_ref.requires_grad
    )
    return _reduce(rows, reduction)
