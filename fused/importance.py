"""Fused importance accumulation I += w·|g| over a list of parameters (METHOD.md §6).

The method's importance of a parameter is I_p = (1/N_tot) Σ_batches |B|·|∂L_align(B)/∂ψ_p|
(absolute gradient, MAS-style): after each proxy batch's backward, every importance tensor gets
``weight = |B| / N_tot`` times the absolute gradient added. Parameters without a gradient (the
classifier head) are skipped and keep I = 0.

Bandwidth-bound: P·(2·b_I + b_g) bytes (12 B/param in fp32). Like the masked update
(``fused.update``), the Triton path is one multi-tensor kernel launch per (importance dtype,
gradient dtype) group over the whole list, with the pointer table of
:func:`fused.update.multi_tensor_chunk_table`; it adds in fp32 (fp64 for fp64 importance) and
stores in the importance dtype. Registered as the opaque custom op ``fused::accumulate_importance``
with ``mutates_args=("importance",)`` for the reason given in ``fused.update``.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence

import torch

from fused._dispatch import (
    HAS_TRITON,
    check_positive,
    check_same_device,
    check_same_shapes,
    check_tensor,
    check_tensor_list,
    compute_dtype,
    resolve_backend,
)
from fused.update import (
    BLOCK,
    NUM_WARPS,
    check_strided,
    dense_work_tensor,
    in_element_order_of,
    multi_tensor_chunk_table,
)

__all__ = ["accumulate_importance", "accumulate_importance_reference"]

if HAS_TRITON:
    import triton
    import triton.language as tl

    from fused.update import _TL_DTYPES

    @triton.jit
    def _accumulate_importance_kernel(
        rows,  # int64 [T, 4]: address of I, address of g, numel, first chunk
        chunk_tensor,  # int64 [n_chunks]: the tensor each program works on
        weight,
        I_T: tl.constexpr,
        G_T: tl.constexpr,
        C_T: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row = rows + tl.load(chunk_tensor + pid) * 4
        offs = (pid - tl.load(row + 3)) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < tl.load(row + 2)
        i_ptr = tl.load(row + 0).to(tl.pointer_type(I_T)) + offs
        g = tl.load(tl.load(row + 1).to(tl.pointer_type(G_T)) + offs, mask=inb, other=0.0).to(C_T)
        imp = tl.load(i_ptr, mask=inb, other=0.0).to(C_T)
        tl.store(i_ptr, (imp + weight * tl.abs(g)).to(I_T), mask=inb)


def accumulate_importance_reference(
    importance: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]], weight: float = 1.0
) -> None:
    """Readable per-tensor version (no checks): ``importance[i] += weight·|grads[i]|`` in fp32."""
    for imp, g in zip(importance, grads):
        if g is not None:
            cd = compute_dtype(imp.dtype)
            imp.copy_(imp.to(cd) + weight * g.to(cd).abs())


@torch.library.custom_op("fused::accumulate_importance", mutates_args=("importance",))
def _accumulate_importance_triton(
    importance: List[torch.Tensor], grads: List[Optional[torch.Tensor]], weight: float
) -> None:
    """One kernel launch per (importance dtype, gradient dtype) group."""
    device = importance[0].device
    write_back: list = []
    groups: Dict[tuple, list] = {}
    for imp, g in zip(importance, grads):
        if g is None:
            continue
        imp = dense_work_tensor(imp, write_back)
        groups.setdefault((imp.dtype, g.dtype), []).append([imp, in_element_order_of(g, imp)])
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for (i_dt, g_dt), ops in groups.items():
            rows, chunk_tensor = multi_tensor_chunk_table(ops, BLOCK, 4)
            if chunk_tensor.numel() == 0:
                continue
            _accumulate_importance_kernel[(chunk_tensor.numel(),)](
                rows,
                chunk_tensor,
                weight,
                I_T=_TL_DTYPES[i_dt],
                G_T=_TL_DTYPES[g_dt],
                C_T=tl.float64 if i_dt == torch.float64 else tl.float32,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )
    for target, work in write_back:
        target.copy_(work)


@_accumulate_importance_triton.register_fake
def _(importance, grads, weight):
    return None


def accumulate_importance(
    importance: Sequence[torch.Tensor],
    grads: Sequence[Optional[torch.Tensor]],
    weight: float = 1.0,
    *,
    backend: Optional[str] = None,
) -> None:
    """In place ``importance[i] += weight·|grads[i]|`` for every i whose gradient is not ``None``.

    Args:
        importance: floating tensors (the running importance I, usually zero-initialised).
        grads: one per importance tensor, same shape; ``None`` entries are skipped.
        weight: finite number >= 0; the method uses ``|B| / N_tot`` per proxy batch B.
        backend: ``None``, "triton" or "reference" (see ``fused._dispatch.resolve_backend``).

    Returns ``None`` (the update is in place, like ``torch._foreach_add_``). Adds in fp32 (fp64 for
    fp64 importance); one Triton launch per (importance dtype, gradient dtype) group; no host sync.
    """
    importance = check_tensor_list("importance", importance)
    if not importance:
        raise ValueError("importance must contain at least one tensor")
    for i, imp in enumerate(importance):
        check_tensor(f"importance[{i}]", imp)
    grads = check_tensor_list("grads", grads, length=len(importance), allow_none=True)
    for i, g in enumerate(grads):
        if g is not None:
            check_tensor(f"grads[{i}]", g)
    check_same_shapes("importance", importance, "grads", grads)
    check_strided("importance", importance)
    check_strided("grads", grads)
    weight = check_positive("weight", weight, allow_zero=True)
    device = check_same_device(
        **{f"importance[{i}]": t for i, t in enumerate(importance)},
        **{f"grads[{i}]": g for i, g in enumerate(grads) if g is not None},
    )
    with torch.no_grad():
        if resolve_backend(backend, device) == "reference":
            accumulate_importance_reference(importance, grads, weight)
        else:
            torch.ops.fused.accumulate_importance(importance, grads, weight)
