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
The anchors enter only through their Gram matrix M = ÂᵀÂ (D×D): ‖s‖² = x̂ᵀMx̂, ‖s0‖² = x̂0ᵀMx̂0,
s·s0 = x̂ᵀMx̂0 and ∂ℓ/∂x̂ = Âᵀg = M(β·x̂ + α·x̂0), which the Gram path below uses.

Layout: PyTorch reference (the specification, row-chunked so extra memory is O(chunk·K)), the
Triton kernel, torch.library registration with its autograd formula, the public entry point.

Triton design ("gradient in forward": the backward is one elementwise scale). The kernels tile
over D GEMM-style (tiles through shared memory, tl.dot with fp32 accumulation), so any D works and
no row is ever held whole in registers. Rows are zero-padded to a multiple of 16 elements when D is
not one (``kernel_width``), so every tile load vectorises. Two paths, by the number of anchors:

* **anchors** (K ≤ ANCHOR_PATH_MAX_K = 128): one launch, one program per 64 rows. Pass 1 over D
  chunks accumulates S·‖x‖ = X Âᵀ and S_ref·‖x_ref‖ ([BLOCK_N, K_PAD] fp32, in registers) and the
  row norms; the per-row scalars ‖s‖², ‖s0‖², s·s0 give the loss. Pass 2 over D chunks forms
  ∂ℓ/∂x̂ = g Â chunk by chunk (g = α·s0 + β·s is formed exactly in fp32, then scaled by its row
  maximum before the cast to a 16-bit operand) and writes dx with the row-local normalisation
  backward. Flops 4NKD + 2NKD per gradient; HBM N·D·(2b_x + b_x0 + b_dx) + K·D·b_a.
* **gram** (more anchors): the loss depends on the anchors only through M = ÂᵀÂ (module
  docstring, METHOD.md §5). A scalars kernel computes the three per-row scalars through T = X Bᵀ
  tiles with B = Â (K ≤ D) or B = M (K > D, so the inner work is min(K, D)) and writes the loss
  and four gradient coefficients per row ([N, 8] fp32: O(N) extra memory); then one GEMM per
  gradient, dx = (Z M)·σ/‖x‖ − x·proj/‖x‖², with Z = (β·x̂ + α·x̂_ref)/σ formed row-locally in
  its prologue (σ = max(|α|, |β|) keeps Z's entries ≤ 2 for 16-bit operands). M (D×D) and Â are
  computed once per anchors tensor and cached.

Neither path stores an N×K matrix or a normalised copy of X. Block sizes come from a per-arch table
(``_alignment_blocks``) checked by ``python -m fused preflight``: no spills, shared memory within
every card's limit (sm_80 … sm_120, AMD gfx90a/942/950), wgmma on sm_90 for 16-bit operands, MFMA
on AMD. The launches are built by
``plan_structure_alignment``, which the launcher and the preflight share. The autograd backward is
a single elementwise scale dx·grad_row (grad_row = grad/N for "mean").
Forming g (anchor path) and Z (Gram path) from the exact per-row scalars instead of accumulating
S·Â and S_ref·Â separately avoids catastrophic cancellation when x ≈ x_ref, the common case early
in unlearning.

Anchors are frozen in the method: the Triton path has no anchor gradient (see
``structure_alignment_loss``); the reference path has one.
"""

from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from fused._dispatch import (
    HAS_TRITON,
    check_same_device,
    check_tensor,
    compute_dtype,
    is_traced,
    launcher,
    resolve_backend,
    triton_library_op,
)
from fused._launch import Launch, device_target, register_options, spec_dtype, target_of
from fused._ops import KERNEL_DTYPES, OpDeclaration, SpecKey
from fused._triton_common import (
    DOT_KIND_DTYPES,
    NORMALIZE_EPS,
    _kernel_rows,
    kernel_width,
    check_features_and_anchors,
    dot_kind,
    next_pow2,
    normalize_backward,
    structure_shapes,
)

COSINE_EPS = 1e-8  # F.cosine_similarity's default
REDUCTIONS = ("mean", "sum", "none")
REFERENCE_CHUNK_ROWS = 4096  # rows per chunk on the reference path: extra memory O(chunk·K)


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


# ----------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:
    import triton
    import triton.language as tl

    from fused._triton_common import dot_operand, mma

    @triton.jit
    def _row_tile(ptr, rows64, row_ok, stride, d0, D, BLOCK_D: tl.constexpr):
        """Rows ``rows64`` (valid where ``row_ok``) × columns d0..d0+BLOCK_D of a row-major [*, D]
        tensor: rows of x, x_ref, Â or M (masked, 0 outside)."""
        offs_d = d0 + tl.arange(0, BLOCK_D)
        return tl.load(ptr + rows64[:, None] * stride + offs_d[None, :],
                       mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)

    @triton.jit
    def _row_coefficients(ss, rr, sr, nx, nr, NORM_EPS: tl.constexpr, COS_EPS: tl.constexpr):
        """From the per-row scalars ‖s‖², ‖s0‖², s·s0 (normalised rows): the loss, α, β, β_ref and
        the projections s·g, s0·g_ref used by the normalisation backward (module docstring)."""
        n_s = tl.sqrt(ss)
        n_r = tl.sqrt(rr)
        nc = tl.maximum(n_s, COS_EPS)
        nrc = tl.maximum(n_r, COS_EPS)
        cos = sr / (nc * nrc)
        alpha = -1.0 / (nc * nrc)
        beta = tl.where(n_s > 0.0, cos / (tl.where(n_s > 0.0, n_s, 1.0) * nc), 0.0)
        beta_r = tl.where(n_r > 0.0, cos / (tl.where(n_r > 0.0, n_r, 1.0) * nrc), 0.0)
        # x̂·∂ℓ/∂x̂ = s·g = α·s·s0 + β·‖s‖²; F.normalize passes no gradient through it below eps.
        proj = tl.where(nx > NORM_EPS, alpha * sr + beta * ss, 0.0)
        proj_r = tl.where(nr > NORM_EPS, alpha * sr + beta_r * rr, 0.0)
        return 1.0 - cos, alpha, beta, beta_r, proj, proj_r

    @triton.jit
    def _anchor_gradient_pass(g, proj, inv, src_ptr, stride_src, out_ptr, stride_out, a_ptr, ks64, k_ok,
                              rows64, row_ok, D, stride_an,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_KIND: tl.constexpr):
        """dx = (g·Â − x̂·proj)/‖x‖, D chunk by D chunk, for g [BLOCK_N, K_PAD] held in registers.

        g is scaled by its row maximum before the cast to the tensor-core dtype (16-bit operands
        would overflow for rows whose structure is nearly zero, where g ~ 1/‖s‖) and scaled back.
        """
        scale = tl.maximum(tl.max(tl.abs(g), axis=1), 1e-30)
        g_op = dot_operand(g / scale[:, None], DOT_KIND)
        scale = scale * inv
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            a = _row_tile(a_ptr, ks64, k_ok, stride_an, d0, D, BLOCK_D)
            dxh = mma(g_op, dot_operand(a, DOT_KIND), tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), DOT_KIND)
            src = _row_tile(src_ptr, rows64, row_ok, stride_src, d0, D, BLOCK_D).to(tl.float32)
            dx = dxh * scale[:, None] - src * (inv * inv * proj)[:, None]
            tl.store(out_ptr + rows64[:, None] * stride_out + offs_d[None, :], dx.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (offs_d < D)[None, :])

    # One compiled kernel per tile configuration: N and K are only loop bounds and masks along rows,
    # never along the contiguous dim, so not specialising them (Triton would on N = 1, K = 1,
    # multiples of 16) changes no access width; which gradients to write is a uniform runtime branch
    # (need_dx, need_dxr: 0/1), not a constexpr that would compile four kernels. Nine times fewer
    # kernels to compile (python -m fused preflight) and to warm up on a card.
    @triton.jit(do_not_specialize=["N", "K", "need_dx", "need_dxr"])
    def _alignment_anchor_kernel(
        x_ptr, xr_ptr, a_ptr, loss_ptr, dx_ptr, dxr_ptr,
        N, K, D,
        stride_xn, stride_xrn, stride_an, stride_dxn, stride_dxrn, need_dx, need_dxr,
        BLOCK_N: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr, DOT_KIND: tl.constexpr,
        NORM_EPS: tl.constexpr, COS_EPS: tl.constexpr,
    ):
        """Few anchors (K ≤ K_PAD): forward and backward in one launch, S and S_ref in registers.

        Pass 1 over D chunks: S·‖x‖ = X Âᵀ and S_ref·‖x_ref‖ ([BLOCK_N, K_PAD], fp32, tl.dot) and
        the row norms; then the per-row scalars and the loss. Pass 2 over D chunks (per input that
        needs a gradient): ∂ℓ/∂x̂ = g Â with g = α·s_ref + β·s, then the row-local normalisation
        backward, written chunk by chunk. Nothing N×K and no normalised copy of X is stored.
        """
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rows64 = rows.to(tl.int64)  # N·D may exceed 2^31
        row_ok = rows < N
        ks = tl.arange(0, K_PAD)
        ks64 = ks.to(tl.int64)
        k_ok = ks < K

        acc_s = tl.zeros((BLOCK_N, K_PAD), dtype=tl.float32)
        acc_r = tl.zeros((BLOCK_N, K_PAD), dtype=tl.float32)
        x_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        r_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            xt = _row_tile(x_ptr, rows64, row_ok, stride_xn, d0, D, BLOCK_D)
            rt = _row_tile(xr_ptr, rows64, row_ok, stride_xrn, d0, D, BLOCK_D)
            a = _row_tile(a_ptr, ks64, k_ok, stride_an, d0, D, BLOCK_D)
            xf = xt.to(tl.float32)
            rf = rt.to(tl.float32)
            x_sq += tl.sum(xf * xf, axis=1)
            r_sq += tl.sum(rf * rf, axis=1)
            a_t = tl.trans(dot_operand(a, DOT_KIND))
            acc_s = mma(dot_operand(xt, DOT_KIND), a_t, acc_s, DOT_KIND)
            acc_r = mma(dot_operand(rt, DOT_KIND), a_t, acc_r, DOT_KIND)

        nx = tl.sqrt(x_sq)
        nr = tl.sqrt(r_sq)
        inv_x = 1.0 / tl.maximum(nx, NORM_EPS)
        inv_r = 1.0 / tl.maximum(nr, NORM_EPS)
        s = acc_s * inv_x[:, None]
        r = acc_r * inv_r[:, None]
        loss, alpha, beta, beta_r, proj, proj_r = _row_coefficients(
            tl.sum(s * s, axis=1), tl.sum(r * r, axis=1), tl.sum(s * r, axis=1), nx, nr, NORM_EPS, COS_EPS)
        tl.store(loss_ptr + rows, loss, mask=row_ok)
        if need_dx != 0:
            _anchor_gradient_pass(alpha[:, None] * r + beta[:, None] * s, proj, inv_x, x_ptr, stride_xn,
                                  dx_ptr, stride_dxn, a_ptr, ks64, k_ok, rows64, row_ok, D, stride_an,
                                  BLOCK_N, BLOCK_D, DOT_KIND)
        if need_dxr != 0:
            _anchor_gradient_pass(alpha[:, None] * s + beta_r[:, None] * r, proj_r, inv_r, xr_ptr, stride_xrn,
                                  dxr_ptr, stride_dxrn, a_ptr, ks64, k_ok, rows64, row_ok, D, stride_an,
                                  BLOCK_N, BLOCK_D, DOT_KIND)

    @triton.jit(do_not_specialize=["N", "J", "gram", "store_coef"])  # as _alignment_anchor_kernel
    def _alignment_scalars_kernel(
        x_ptr, xr_ptr, b_ptr, loss_ptr, coef_ptr,
        N, J, D,
        stride_xn, stride_xrn, stride_bn, gram, store_coef,
        BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, DOT_KIND: tl.constexpr,
        NORM_EPS: tl.constexpr, COS_EPS: tl.constexpr,
    ):
        """Many anchors: the loss and the per-row gradient coefficients, GEMM-tiled over D.

        B is Â ([K, D], gram = 0) or the Gram matrix M = ÂᵀÂ ([D, D], gram = 1, used when
        K > D so the inner work is min(K, D)). For each tile of B's rows, T = X Bᵀ and T_ref are
        accumulated over D chunks; then ‖s‖², ‖s0‖², s·s0 (×‖x‖², ‖x‖‖x_ref‖, ‖x_ref‖²) are
        Σ T², Σ T_ref², Σ T·T_ref with Â, or Σ X⊙T, Σ X_ref⊙T_ref, Σ X⊙T_ref with M (M symmetric).

        store_coef = 1: coef [N, 8] fp32 gets, for dx then for dx_ref, the coefficients of the gradient
        GEMM (see _alignment_gram_grad_kernel): c_own, c_other (scaled by 1/σ), σ/‖·‖, proj/‖·‖².
        """
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rows64 = rows.to(tl.int64)
        row_ok = rows < N

        x_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        r_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            xf = _row_tile(x_ptr, rows64, row_ok, stride_xn, d0, D, BLOCK_D).to(tl.float32)
            rf = _row_tile(xr_ptr, rows64, row_ok, stride_xrn, d0, D, BLOCK_D).to(tl.float32)
            x_sq += tl.sum(xf * xf, axis=1)
            r_sq += tl.sum(rf * rf, axis=1)

        ss = tl.zeros((BLOCK_N,), dtype=tl.float32)
        rr = tl.zeros((BLOCK_N,), dtype=tl.float32)
        sr = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for j0 in range(0, J, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J)
            cols64 = cols.to(tl.int64)
            t_s = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
            t_r = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                xt = _row_tile(x_ptr, rows64, row_ok, stride_xn, d0, D, BLOCK_D)
                rt = _row_tile(xr_ptr, rows64, row_ok, stride_xrn, d0, D, BLOCK_D)
                b = _row_tile(b_ptr, cols64, cols < J, stride_bn, d0, D, BLOCK_D)
                b_t = tl.trans(dot_operand(b, DOT_KIND))
                t_s = mma(dot_operand(xt, DOT_KIND), b_t, t_s, DOT_KIND)
                t_r = mma(dot_operand(rt, DOT_KIND), b_t, t_r, DOT_KIND)
            if gram != 0:
                xc = _row_tile(x_ptr, rows64, row_ok, stride_xn, j0, D, BLOCK_J).to(tl.float32)
                rc = _row_tile(xr_ptr, rows64, row_ok, stride_xrn, j0, D, BLOCK_J).to(tl.float32)
                ss += tl.sum(xc * t_s, axis=1)
                rr += tl.sum(rc * t_r, axis=1)
                sr += tl.sum(xc * t_r, axis=1)
            else:
                ss += tl.sum(t_s * t_s, axis=1)
                rr += tl.sum(t_r * t_r, axis=1)
                sr += tl.sum(t_s * t_r, axis=1)

        nx = tl.sqrt(x_sq)
        nr = tl.sqrt(r_sq)
        inv_x = 1.0 / tl.maximum(nx, NORM_EPS)
        inv_r = 1.0 / tl.maximum(nr, NORM_EPS)
        loss, alpha, beta, beta_r, proj, proj_r = _row_coefficients(
            ss * inv_x * inv_x, rr * inv_r * inv_r, sr * inv_x * inv_r, nx, nr, NORM_EPS, COS_EPS)
        tl.store(loss_ptr + rows, loss, mask=row_ok)
        if store_coef != 0:
            # ∂ℓ/∂x̂ = M·(β·x̂ + α·x̂_ref): Z = σ·(c_own·x + c_other·x_ref), σ = max(|α|, |β|) keeps
            # Z's entries ≤ 2 (unit rows), so a 16-bit operand cannot overflow.
            sig = tl.maximum(tl.maximum(tl.abs(alpha), tl.abs(beta)), 1e-30)
            sig_r = tl.maximum(tl.maximum(tl.abs(alpha), tl.abs(beta_r)), 1e-30)
            base = coef_ptr + rows64 * 8
            tl.store(base + 0, beta / sig * inv_x, mask=row_ok)
            tl.store(base + 1, alpha / sig * inv_r, mask=row_ok)
            tl.store(base + 2, sig * inv_x, mask=row_ok)
            tl.store(base + 3, proj * inv_x * inv_x, mask=row_ok)
            tl.store(base + 4, beta_r / sig_r * inv_r, mask=row_ok)
            tl.store(base + 5, alpha / sig_r * inv_x, mask=row_ok)
            tl.store(base + 6, sig_r * inv_r, mask=row_ok)
            tl.store(base + 7, proj_r * inv_r * inv_r, mask=row_ok)

    @triton.jit(do_not_specialize=["N"])  # as _alignment_anchor_kernel
    def _alignment_gram_grad_kernel(
        own_ptr, other_ptr, m_ptr, coef_ptr, out_ptr,
        N, D,
        stride_own, stride_other, stride_m, stride_out,
        BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, DOT_KIND: tl.constexpr,
    ):
        """dx = (∂ℓ/∂x̂ − x̂·proj)/‖x‖ with ∂ℓ/∂x̂ = Z·M, Z = β·x̂ + α·x̂_ref (row-local, formed in the
        prologue from x and x_ref), one output tile [BLOCK_N, BLOCK_E] per program, GEMM over D.

        ``coef`` points at the 4 coefficients of this gradient in the [N, 8] buffer of
        _alignment_scalars_kernel (for dx_ref, own and other swap roles).
        """
        pid_n = tl.program_id(0)
        pid_e = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows64 = rows.to(tl.int64)
        row_ok = rows < N
        cols = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        col_ok = cols < D
        base = coef_ptr + rows64 * 8
        c_own = tl.load(base + 0, mask=row_ok, other=0.0)
        c_other = tl.load(base + 1, mask=row_ok, other=0.0)
        e_scale = tl.load(base + 2, mask=row_ok, other=0.0)
        e_proj = tl.load(base + 3, mask=row_ok, other=0.0)

        acc = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            own = _row_tile(own_ptr, rows64, row_ok, stride_own, d0, D, BLOCK_D).to(tl.float32)
            other = _row_tile(other_ptr, rows64, row_ok, stride_other, d0, D, BLOCK_D).to(tl.float32)
            z = c_own[:, None] * own + c_other[:, None] * other
            m = _row_tile(m_ptr, offs_d.to(tl.int64), offs_d < D, stride_m, pid_e * BLOCK_E, D, BLOCK_E)
            acc = mma(dot_operand(z, DOT_KIND), dot_operand(m, DOT_KIND), acc, DOT_KIND)
        own_e = _row_tile(own_ptr, rows64, row_ok, stride_own, pid_e * BLOCK_E, D, BLOCK_E).to(tl.float32)
        dx = acc * e_scale[:, None] - own_e * e_proj[:, None]
        tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], dx.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------- configuration


def _dot_config(x_dtype: torch.dtype, x_ref_dtype: torch.dtype, arch) -> Tuple[torch.dtype, int]:
    """(torch dtype of Â and M, DOT_KIND) on ``arch`` — plain ints/dtypes, so inductor can codegen
    the launch.

    x and x_ref of one 16-bit dtype: tensor cores in that dtype (Â, M rounded to it, fp32
    accumulate). Otherwise fp32, in the target's fp32 precision (``fused._triton_common.dot_kind``).
    """
    kind = dot_kind(x_dtype, x_ref_dtype, arch)
    return DOT_KIND_DTYPES[kind], kind


# Anchors up to this many take the one-launch kernel (S and S_ref rows live in registers);
# more take the tiled scalars kernel and the Gram-matrix gradient GEMM.
ANCHOR_PATH_MAX_K = 128


def alignment_path(K: int) -> str:
    """"anchors" (K ≤ ANCHOR_PATH_MAX_K: one fused launch) or "gram" (tiled, any K)."""
    return "anchors" if K <= ANCHOR_PATH_MAX_K else "gram"


def _alignment_blocks(kind: int, K: int, arch) -> dict:
    """Block sizes, warps and stages of the alignment kernels for operands of DOT_KIND ``kind`` on
    ``arch`` (chosen with ``python -m fused preflight``: no spills, shared memory / LDS within
    every card's limit, wgmma on sm_90, MFMA on AMD).

    Every tile dim is a power of two ≥ 16 (tl.dot on a GPU). 16-bit operands: 64 rows a program
    (a wgmma M tile on sm_90), D chunks of 64. fp32 operands go through tf32x3 on NVIDIA (three
    products per tile, each operand split in two), which needs about twice the registers: D chunks
    of 16-32, 8 warps, and where mma.sync keeps the A operand in registers (sm_8x, sm_120) 32 rows
    a program.
    """
    target = target_of(arch)
    k_pad = max(16, next_pow2(K))
    # sm_90 / sm_100 multiply 64-row tiles from shared memory (wgmma, tcgen05); sm_8x and sm_120
    # (mma.sync) and AMD (MFMA) hold the A operand and the accumulators in registers.
    warpgroup = not target.is_amd and 90 <= target.capability < 120
    sm100 = warpgroup and target.capability >= 100
    if kind in (1, 2):
        # mma.sync: the largest anchor tile takes 32 rows (no 64-row constraint); AMD takes 16 rows
        # above 32 anchors (32 rows held 244-290 VGPRs and spilled 4-25 under triton 3.6; 16 hold
        # ~110);
        # sm_90+: 3 stages for the Gram GEMM, sm_100 also 8 warps and 3 stages for the anchor kernel
        # (otherwise ptxas keeps a few stack slots there); the scalars kernel takes 32 rows on
        # mma.sync (64 spilled 8 bytes on sm_80 under triton 3.6).
        if target.is_amd:
            anchor_rows = 64 if k_pad <= 32 else 16
        else:
            anchor_rows = 32 if (not warpgroup and k_pad > 64) else 64
        cfg = {
            "anchors": dict(BLOCK_N=anchor_rows, K_PAD=k_pad, BLOCK_D=64,
                            num_warps=8 if (k_pad > 64 or sm100) else 4, num_stages=3 if sm100 else 2),
            "scalars": dict(BLOCK_N=64 if (warpgroup or target.is_amd) else 32, BLOCK_J=64, BLOCK_D=64, num_warps=4,
                            num_stages=2),
            "gram_grad": dict(BLOCK_N=64, BLOCK_E=64, BLOCK_D=64, num_warps=4, num_stages=3 if warpgroup else 2),
        }
    else:
        # sm_100 at K_PAD = 128: 32 rows on mma.sync (triton 3.6 compiles the 64-row tcgen05 tile
        # of two fp32 accumulators into a trap)
        rows = 64 if warpgroup else 32
        cfg = {
            "anchors": dict(BLOCK_N=32 if (sm100 and k_pad > 64) else rows, K_PAD=k_pad, BLOCK_D=16, num_warps=8,
                            num_stages=2),
            "scalars": dict(BLOCK_N=rows, BLOCK_J=64, BLOCK_D=32, num_warps=8, num_stages=2),
            "gram_grad": dict(BLOCK_N=rows, BLOCK_E=64, BLOCK_D=32, num_warps=4, num_stages=2),
        }
    if target.is_amd:
        cfg = {name: dict(c, num_warps=AMD_WAVES) for name, c in cfg.items()}
    return cfg


# AMD: every alignment kernel runs 4 waves of 64 lanes, one a SIMD of the CU. Fewer give a wave a
# larger share of the tile than its 256 arch VGPRs hold (2 waves spilled 16-25 VGPRs at K ≤ 32 in
# 16-bit); 8 would put two waves on each SIMD, which caps both at 256 VGPRs (8 spilled at K = 128).
AMD_WAVES = 4


def plan_structure_alignment(x, x_ref, a_hat, gram, loss, coef, dx, dxr, need_dx: bool, need_dx_ref: bool,
                             arch, path: Optional[str] = None) -> list:
    """The launches computing ``loss`` (and ``dx`` / ``dxr`` when asked) for these tensors on ``arch``.

    ``a_hat`` [K, D] and ``gram`` [D, D] (None on the anchor path) are in the tensor-core dtype;
    ``coef`` is the [N, 8] fp32 coefficient buffer of the gram path (None on the anchor path).
    """
    N, D = x.shape
    K = a_hat.shape[0]
    path = path or alignment_path(K)
    if path == "anchors" and K > ANCHOR_PATH_MAX_K:
        raise ValueError(f"path='anchors' holds at most {ANCHOR_PATH_MAX_K} anchors in registers, got K={K}; "
                         "more take the 'gram' path")
    target = target_of(arch)
    a_dtype, kind = _dot_config(x.dtype, x_ref.dtype, target)
    if a_hat.dtype != a_dtype:
        raise ValueError(f"a_hat must be in the operand dtype {a_dtype} of {x.dtype} inputs, got {a_hat.dtype}")
    cfg = _alignment_blocks(kind, K, target)
    common = dict(DOT_KIND=kind)
    if path == "anchors":
        c = dict(cfg["anchors"])
        warps, stages = c.pop("num_warps"), c.pop("num_stages")
        return [Launch(
            "alignment.anchors", _alignment_anchor_kernel, (triton.cdiv(N, c["BLOCK_N"]),),
            # an absent gradient's placeholder gets x's row stride (never used): one specialisation
            (x, x_ref, a_hat, loss, dx, dxr, N, K, D, x.stride(0), x_ref.stride(0), a_hat.stride(0),
             dx.stride(0) if need_dx else x.stride(0), dxr.stride(0) if need_dx_ref else x.stride(0),
             int(need_dx), int(need_dx_ref)),
            dict(**c, **common, NORM_EPS=NORMALIZE_EPS, COS_EPS=COSINE_EPS),
            warps, stages, config={k.lower(): v for k, v in c.items()}, kind="mma", writes=(3, 4, 5), dot=a_dtype,
            options=register_options(target),
        )]
    use_gram = K > D
    b = gram if use_gram else a_hat
    c = dict(cfg["scalars"])
    warps, stages = c.pop("num_warps"), c.pop("num_stages")
    need_coef = need_dx or need_dx_ref
    launches = [Launch(
        "alignment.scalars", _alignment_scalars_kernel, (triton.cdiv(N, c["BLOCK_N"]),),
        (x, x_ref, b, loss, coef if need_coef else loss, N, b.shape[0], D,
         x.stride(0), x_ref.stride(0), b.stride(0), int(use_gram), int(need_coef)),
        dict(**c, **common, NORM_EPS=NORMALIZE_EPS, COS_EPS=COSINE_EPS),
        warps, stages, config=dict(**{k.lower(): v for k, v in c.items()}, via="gram" if use_gram else "anchors"),
        kind="mma", writes=(3, 4), dot=a_dtype, options=register_options(target),
    )]
    g = dict(cfg["gram_grad"])
    warps, stages = g.pop("num_warps"), g.pop("num_stages")
    grid = (triton.cdiv(N, g["BLOCK_N"]), triton.cdiv(D, g["BLOCK_E"]))
    for want, own, other, out, col in ((need_dx, x, x_ref, dx, 0), (need_dx_ref, x_ref, x, dxr, 4)):
        if want:
            launches.append(Launch(
                "alignment.gram_grad", _alignment_gram_grad_kernel, grid,
                (own, other, gram, coef[:, col:], out, N, D, own.stride(0), other.stride(0), gram.stride(0),
                 out.stride(0)),
                dict(**g, **common), warps, stages,
                config={k.lower(): v for k, v in g.items()}, kind="mma", writes=(4,), dot=a_dtype,
                options=register_options(target),
            ))
    return launches


# Â and M = ÂᵀÂ of the last anchors seen, per (device, operand dtype): anchors are frozen during
# a run, so the D×D Gram matrix is computed once, not every step. An entry is valid only for the
# very same tensor (a weak reference) at the same version counter (no in-place change since).
_ANCHOR_CACHE: dict = {}


def _anchor_operands(anchors: torch.Tensor, a_dtype: torch.dtype, need_gram: bool):
    """(Â [K, Dk] in ``a_dtype``, M = ÂᵀÂ [Dk, Dk] in ``a_dtype`` or None), Dk = kernel_width(D),
    zero-padded; cached for the same unchanged anchors."""
    key = (anchors.device, a_dtype)
    tracing = is_traced(anchors)  # a traced tensor is never cached (nor compared with the cache)
    hit = None if tracing else _ANCHOR_CACHE.get(key)
    if hit is not None and hit[0]() is anchors and hit[1] == anchors._version and (hit[3] is not None or not need_gram):
        return hit[2], hit[3]
    a32 = F.normalize(anchors.detach().to(torch.float32), dim=1, eps=NORMALIZE_EPS)
    a32 = _kernel_rows(a32, kernel_width(a32.shape[1]))  # zero columns: they add nothing
    a_hat = a32.to(a_dtype)
    gram = (a32.T @ a32).to(a_dtype) if need_gram else None
    if not tracing:
        _ANCHOR_CACHE[key] = (weakref.ref(anchors), anchors._version, a_hat, gram)
    return a_hat, gram


# Tests force a path with this (None: alignment_path(K) decides).
_FORCE_PATH: Optional[str] = None


@triton_library_op("fused::structure_alignment_fwd", mutates_args=())
def _structure_alignment_triton(
    x: torch.Tensor, x_ref: torch.Tensor, anchors: torch.Tensor, need_dx: bool, need_dx_ref: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss ℓ [N] (fp32) and, when asked, ∂ℓ_i/∂x_i, ∂ℓ_i/∂x_ref_i ([N, D] in the inputs'
    dtypes; an empty [0] placeholder when not asked). Anchors are constants here.

    One launch for K ≤ ANCHOR_PATH_MAX_K; otherwise one scalars launch + one GEMM per gradient."""
    N, D = x.shape
    K = anchors.shape[0]
    target = device_target(x.device)
    a_dtype, _ = _dot_config(x.dtype, x_ref.dtype, target)
    width = kernel_width(D)
    loss = torch.empty((N,), dtype=torch.float32, device=x.device)
    # The kernels write dx / dx_ref rows of ``width`` columns (zeros in the padding); on the
    # usual D (a multiple of 16) these are the outputs themselves, otherwise D columns are copied out.
    dx = torch.empty((N, width) if need_dx else (0,), dtype=x.dtype, device=x.device)
    dxr = torch.empty((N, width) if need_dx_ref else (0,), dtype=x_ref.dtype, device=x.device)
    if N > 0:
        path = _FORCE_PATH or alignment_path(K)
        need_gram = path == "gram" and (need_dx or need_dx_ref or K > width)
        a_hat, gram = _anchor_operands(anchors, a_dtype, need_gram)
        coef = torch.empty((N, 8), dtype=torch.float32, device=x.device) if path == "gram" else None
        for launch in plan_structure_alignment(
            _kernel_rows(x, width), _kernel_rows(x_ref, width), a_hat, gram, loss, coef, dx, dxr,
            need_dx, need_dx_ref, target, path,
        ):
            launch.run(wrap=True)
    if width != D:
        dx = dx[:, :D].contiguous() if need_dx else dx
        dxr = dxr[:, :D].contiguous() if need_dx_ref else dxr
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
        * backend=None also uses the reference for fp64 inputs; backend="triton" raises ValueError
          there. The Triton path serves any D (the kernels tile over D) and any K.
    """
    device = _check_inputs(x, x_ref, anchors, reduction)
    resolved = resolve_backend(backend, device)
    if resolved == "triton":
        why = None
        if torch.float64 in (x.dtype, x_ref.dtype, anchors.dtype):
            why = "does not support float64 inputs"
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


# ----------------------------------------------------------------------------- for the tools


def preflight_launches(spec: dict, arch) -> list:
    """Launches for a shape spec on meta tensors: N, D, K, dtype (of x and x_ref), grad ("x",
    "x_ref", "x,x_ref" or "none"), path (default: the launcher's choice, alignment_path(K))."""
    spec = DECLARATION.complete(spec)
    N, K = int(spec["N"]), int(spec["K"])
    D = kernel_width(int(spec["D"]))  # what the launcher hands the kernels
    dtype = spec_dtype(spec["dtype"])
    grad = spec["grad"]
    need_dx, need_dxr = "x" in grad.split(","), "x_ref" in grad.split(",")
    a_dtype, _ = _dot_config(dtype, dtype, arch)
    path = spec.get("path") or alignment_path(K)
    meta = dict(device="meta")
    x = torch.empty((N, D), dtype=dtype, **meta)
    x_ref = torch.empty((N, D), dtype=dtype, **meta)
    gram = torch.empty((D, D), dtype=a_dtype, **meta) if path == "gram" else None
    return plan_structure_alignment(
        x, x_ref, torch.empty((K, D), dtype=a_dtype, **meta), gram, torch.empty((N,), **meta),
        torch.empty((N, 8), **meta) if path == "gram" else None,
        torch.empty((N, D) if need_dx else (0,), dtype=dtype, **meta),
        torch.empty((N, D) if need_dxr else (0,), dtype=dtype, **meta), need_dx, need_dxr, arch, path)


GRAD_CHOICES = ("x", "x,x_ref", "x_ref", "none")


def _preflight_cases() -> list:
    """The structure product with every gradient; the Gram path also for few anchors (tests force
    it there: the same kernels, other arguments)."""
    cases = [dict(N=N, D=D, K=K, dtype=dt, grad=grad)
             for dt in KERNEL_DTYPES for grad in GRAD_CHOICES for N, D, K in structure_shapes()]
    cases += [dict(N=N, D=D, K=K, dtype=dt, grad=grad, path="gram") for dt in KERNEL_DTYPES
              for grad in GRAD_CHOICES for N in (1, 65536) for D in (33, 512) for K in (2, 10, 100, 128)]
    return cases


def _validation_cases(quick: bool) -> list:
    from fused.validate import Case, randn, unit_rows

    def case(n, d, k, reduction="mean"):
        def make(gen):
            x = randn(gen, n, d)
            # The unlearned features start near the original ones: a realistic, non-trivial loss.
            return {"x": x, "x_ref": x + 0.5 * randn(gen, n, d), "anchors": unit_rows(randn(gen, k, d))}

        def run(fn, inp, backend):
            x = inp["x"].requires_grad_(True)
            loss = fn(x, inp["x_ref"], inp["anchors"], reduction=reduction, backend=backend)
            # Per-row losses get unequal upstream weights, so a row mix-up in the backward shows.
            upstream = (torch.linspace(0.5, 1.5, n, dtype=loss.dtype, device=loss.device)
                        if reduction == "none" else None)
            (grad_x,) = torch.autograd.grad(loss, x, grad_outputs=upstream)
            return [loss.detach(), grad_x]

        return Case(f"structure_alignment_loss[{reduction}] fwd+bwd", f"N={n} D={d} K={k}", make, run)

    cases = [case(37, 77, 13)]
    if not quick:
        cases += [case(70, 129, 33, "sum"), case(70, 129, 33, "none"), case(150, 300, 75)]
    return cases


DECLARATION = OpDeclaration(
    spec={"N": SpecKey("int", 128), "D": SpecKey("int", 512), "K": SpecKey("int", 100),
          "dtype": SpecKey("dtype", "float32"), "grad": SpecKey("choice", "x", GRAD_CHOICES),
          "path": SpecKey("choice", None, ("anchors", "gram"))},
    launches=preflight_launches, cases=_preflight_cases, validation=_validation_cases, weight=6,
)
