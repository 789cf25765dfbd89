"""Anchor similarity (the method's "structure", METHOD.md §4): S = normalize(X) · normalize(A)ᵀ.

S_ij is the cosine between instance i (row of ``x``, [N, D]) and anchor j (row of ``anchors``,
[K, D]); ``normalize`` is ``torch.nn.functional.normalize`` (L2, eps 1e-12).

Layout of this file: the PyTorch reference (the specification), the Triton kernel, the
torch.library registration with its autograd formula, and the public entry point.

Triton design: one program per (BLOCK_N rows × BLOCK_K anchors) tile of S, a loop over D in
BLOCK_D chunks accumulating X_tile·A_tileᵀ with ``tl.dot`` (fp32 accumulate) together with the
row sums of squares of both operands. Normalisation is folded in at the end,
S = (x·a) / (max(‖x‖, eps)·max(‖a‖, eps)), so no normalized copy of X (or A) is ever written; the
only N×K tensor is the output itself. Bytes N·D·b_x + K·D·b_a + N·K·b_o, one launch.
The backward is the row-local formula below, evaluated with torch ops in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fused._dispatch import (
    HAS_TRITON,
    check_same_device,
    compute_dtype,
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


# ----------------------------------------------------------------------------- reference


def anchor_similarity_reference(x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """S = normalize(x) @ normalize(anchors)ᵀ in plain PyTorch (fp32 accumulation; fp64 stays fp64).

    Differentiable through autograd; the output has ``x``'s dtype.
    """
    ct = compute_dtype(torch.promote_types(x.dtype, anchors.dtype))
    x_hat = F.normalize(x.to(ct), dim=1, eps=NORMALIZE_EPS)
    a_hat = F.normalize(anchors.to(ct), dim=1, eps=NORMALIZE_EPS)
    return (x_hat @ a_hat.T).to(x.dtype)


def _similarity_backward_math(grad: torch.Tensor, x: torch.Tensor, anchors: torch.Tensor, S: torch.Tensor, need_x: bool, need_a: bool):
    """Analytic backward of S = x̂ Âᵀ in fp32 (fp64 stays fp64).

    dX̂ = G Â, and x̂·dx̂_i = Σ_k G_ik S_ik, so dX = (G Â − X̂ ⊙ rowsum(G⊙S)) / ‖x‖;
    symmetrically dA = (Gᵀ X̂ − Â ⊙ colsum(G⊙S)) / ‖a‖.
    """
    ct = compute_dtype(torch.promote_types(x.dtype, anchors.dtype))
    xf, af, G, Sf = x.to(ct), anchors.to(ct), grad.to(ct), S.to(ct)
    nx = torch.linalg.vector_norm(xf, dim=1)
    na = torch.linalg.vector_norm(af, dim=1)
    x_hat = xf / nx.clamp_min(NORMALIZE_EPS).unsqueeze(1)
    a_hat = af / na.clamp_min(NORMALIZE_EPS).unsqueeze(1)
    GS = G * Sf
    dx = da = None
    if need_x:
        dx = normalize_backward(G @ a_hat, x_hat, nx, GS.sum(dim=1)).to(x.dtype)
    if need_a:
        da = normalize_backward(G.T @ x_hat, a_hat, na, GS.sum(dim=0)).to(anchors.dtype)
    return dx, da


# ----------------------------------------------------------------------------- Triton kernel

if HAS_TRITON:
    import triton
    import triton.language as tl

    from fused._triton_common import dot_operand, mma

    # N bounds rows only (K, S's row length, stays specialised: S's stores vectorise on K % 16 == 0).
    @triton.jit(do_not_specialize=["N"])
    def _anchor_similarity_kernel(
        x_ptr, a_ptr, s_ptr,
        N, K, D,
        stride_xn, stride_an, stride_sn,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_KIND: tl.constexpr, EPS: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        row_ok = rows < N
        col_ok = cols < K
        # 64-bit offsets: N·D may exceed 2^31 for large proxy batches.
        x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
        a_row = a_ptr + cols.to(tl.int64)[:, None] * stride_an

        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        x_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        a_sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            xt = tl.load(x_row + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            at = tl.load(a_row + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            xf = xt.to(tl.float32)
            af = at.to(tl.float32)
            x_sq += tl.sum(xf * xf, axis=1)
            a_sq += tl.sum(af * af, axis=1)
            acc = mma(dot_operand(xt, DOT_KIND), tl.trans(dot_operand(at, DOT_KIND)), acc, DOT_KIND)

        # Fold both normalisations: S = (x·a) / (max(‖x‖, eps) · max(‖a‖, eps)).
        inv_x = 1.0 / tl.maximum(tl.sqrt(x_sq), EPS)
        inv_a = 1.0 / tl.maximum(tl.sqrt(a_sq), EPS)
        s = acc * inv_x[:, None] * inv_a[None, :]
        s_ptrs = s_ptr + rows.to(tl.int64)[:, None] * stride_sn + cols[None, :]
        tl.store(s_ptrs, s.to(s_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _similarity_blocks(K: int, kind: int, arch) -> dict:
    """Block sizes, warps and stages for S = normalize(X)·normalize(A)ᵀ with DOT_KIND ``kind`` on ``arch``.

    Every block dim is a power of two ≥ 16 (tl.dot on a GPU); tiles are masked. 64 rows a program
    (a wgmma M tile on sm_90) whatever N (the configuration depends on K and the dtype only).
    16-bit operands: up to 128 anchors, D chunks of 64. fp32 operands (tf32x3, twice the
    registers) take up to 64 anchors and D chunks of 32 with 8 warps.
    Chosen with ``python -m fused preflight``: no spills, shared memory within every card's limit.
    """
    target = target_of(arch)
    k_pad = max(16, next_pow2(K))
    if kind in (1, 2):
        # mma.sync (sm_8x, sm_120: accumulators and A operands in registers): 8 warps, else triton 3.6
        # spills 8 bytes a thread on sm_80 and sm_120 at K ≥ 128. AMD: 4 waves of 64 lanes.
        big = target.is_amd or 90 <= target.capability < 120
        block_k, block_d, warps = min(128, k_pad), 64, 4 if big else 8
    else:
        # AMD: as many threads as NVIDIA's warps (4 waves of 64 lanes for 8 warps of 32)
        block_k, block_d = min(64, k_pad), 32
        warps = (8 if k_pad > 16 else 4) * 32 // target.warp_size
    return dict(BLOCK_N=64, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps, num_stages=2)


def plan_anchor_similarity(x: torch.Tensor, anchors: torch.Tensor, S: torch.Tensor, arch: int) -> list:
    """The launch writing S [N, K] for these (real or meta) tensors on ``arch``."""
    N, D = x.shape
    K = anchors.shape[0]
    target = target_of(arch)
    kind = dot_kind(x.dtype, anchors.dtype, target)
    c = _similarity_blocks(K, kind, target)
    warps, stages = c.pop("num_warps"), c.pop("num_stages")
    grid = (triton.cdiv(N, c["BLOCK_N"]), triton.cdiv(K, c["BLOCK_K"]))
    return [Launch(
        "similarity.forward", _anchor_similarity_kernel, grid,
        (x, anchors, S, N, K, D, x.stride(0), anchors.stride(0), S.stride(0)),
        dict(**c, DOT_KIND=kind, EPS=NORMALIZE_EPS), warps, stages,
        config={k.lower(): v for k, v in c.items()}, kind="mma", writes=(2,), dot=DOT_KIND_DTYPES[kind],
        options=register_options(target),
    )]


@triton_library_op("fused::anchor_similarity_fwd", mutates_args=())
def _anchor_similarity_triton(x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Triton forward: S [N, K] in x's dtype (one launch)."""
    S = torch.empty((x.shape[0], anchors.shape[0]), dtype=x.dtype, device=x.device)
    if S.numel() == 0:
        return S
    # Rows zero-padded to a multiple of 16 elements when D is not one (the dot products and
    # norms are unchanged; the loads vectorise). A no-op for the usual D.
    width = kernel_width(x.shape[1])
    for launch in plan_anchor_similarity(_kernel_rows(x, width), _kernel_rows(anchors, width), S,
                                         device_target(x.device)):
        launch.run(wrap=True)
    return S


@_anchor_similarity_triton.register_fake
def _(x, anchors):
    return x.new_empty((x.shape[0], anchors.shape[0]))


def _setup_context(ctx, inputs, output):
    x, anchors = inputs
    ctx.save_for_backward(x, anchors, output)


def _backward(ctx, grad):
    x, anchors, S = ctx.saved_tensors
    need_x, need_a = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    return _similarity_backward_math(grad, x, anchors, S, need_x, need_a)


_anchor_similarity_triton.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public op


def _check_inputs(x, anchors):
    check_features_and_anchors(x, anchors)
    return check_same_device(x=x, anchors=anchors)


def anchor_similarity(x: torch.Tensor, anchors: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Structure matrix S = normalize(x) · normalize(anchors)ᵀ (METHOD.md §4).

    Args:
        x: [N, D] instance features (fp32, fp16, bf16; fp64 on the reference path).
        anchors: [K, D] anchors; normalised here, so raw anchors are fine.
        backend: None (Triton on CUDA / under the interpreter, else the reference), "triton" or
            "reference".

    Returns:
        S [N, K] in ``x``'s dtype; accumulation is fp32 (fp64 for fp64 inputs). Differentiable
        w.r.t. ``x`` and ``anchors``. ``normalize`` is F.normalize (eps 1e-12), so a zero row gives
        a zero row of S.
    """
    device = _check_inputs(x, anchors)
    resolved = resolve_backend(backend, device)
    fp64 = torch.float64 in (x.dtype, anchors.dtype)
    if resolved == "triton" and fp64:
        if backend == "triton":
            raise ValueError("backend='triton' does not support float64 x or anchors; use backend='reference'")
        resolved = "reference"  # fp64 is a reference-only dtype
    if resolved == "reference":
        return anchor_similarity_reference(x, anchors)
    return _anchor_similarity_triton(x, anchors)


# ----------------------------------------------------------------------------- for the tools


def preflight_launches(spec: dict, arch) -> list:
    """Launches for a shape spec on meta tensors: N, D, K, dtype (of x and anchors)."""
    spec = DECLARATION.complete(spec)
    N, K = int(spec["N"]), int(spec["K"])
    D = kernel_width(int(spec["D"]))  # what the launcher hands the kernel
    meta = dict(dtype=spec_dtype(spec["dtype"]), device="meta")
    return plan_anchor_similarity(torch.empty((N, D), **meta), torch.empty((K, D), **meta),
                                  torch.empty((N, K), **meta), arch)


def _preflight_cases() -> list:
    return [dict(N=N, D=D, K=K, dtype=dt) for dt in KERNEL_DTYPES for N, D, K in structure_shapes()]


def _validation_cases(quick: bool) -> list:
    from fused.validate import Case, randn, unit_rows

    def case(n, d, k):
        def make(gen):
            return {"x": randn(gen, n, d), "anchors": unit_rows(randn(gen, k, d))}

        def run(fn, inp, backend):
            return [fn(inp["x"], inp["anchors"], backend=backend)]

        return Case("anchor_similarity", f"N={n} D={d} K={k}", make, run)

    # shapes that are no block multiples; the last one has several tiles along N, K and D
    return [case(37, 77, 13)] + ([] if quick else [case(70, 129, 33), case(150, 300, 75)])


DECLARATION = OpDeclaration(
    spec={"N": SpecKey("int", 128), "D": SpecKey("int", 512), "K": SpecKey("int", 100),
          "dtype": SpecKey("dtype", "float32")},
    launches=preflight_launches, cases=_preflight_cases, validation=_validation_cases, weight=2,
)
