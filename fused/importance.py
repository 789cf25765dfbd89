"""Fused importance accumulation I += w·|g| over a list of parameters (METHOD.md §6).

The method's importance of a parameter is I_p = (1/N_tot) Σ_batches |B|·|∂L_align(B)/∂ψ_p|
(absolute gradient, MAS-style): after each proxy batch's backward, every importance tensor gets
``weight = |B| / N_tot`` times the absolute gradient added. Parameters without a gradient (the
classifier head) are skipped and keep I = 0.

Bandwidth-bound: P·(2·b_I + b_g) bytes (12 B/param in fp32). Like the masked update
(``fused.update``), the Triton path is one multi-tensor kernel launch per (importance dtype,
gradient dtype) group over the whole list, with the pointer table of
:func:`fused._multi_tensor.multi_tensor_chunk_table`; it adds in fp32 (fp64 for fp64 importance) and
stores in the importance dtype. Registered as the opaque custom op ``fused::accumulate_importance``
with ``mutates_args=("importance",)`` for the reason given in ``fused.update``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from fused._dispatch import (
    HAS_TRITON,
    check_positive,
    check_same_shapes,
    check_tensor,
    check_tensor_list,
    compute_dtype,
    resolve_backend,
)
from fused._multi_tensor import (
    BLOCK,
    NUM_WARPS,
    MultiTensorGroups,
    ScratchRows,
    check_layout_and_device,
    device_guard,
    multi_tensor_chunk_table,
)

__all__ = ["accumulate_importance", "accumulate_importance_reference"]

if HAS_TRITON:
    import triton
    import triton.language as tl

    from fused._multi_tensor import TL_DTYPES, load_tile, operand_pointer, program_chunk, store_tile

    @triton.jit
    def _accumulate_importance_tile(row, offs, inb, weight, I_T: tl.constexpr, G_T: tl.constexpr,
                                    C_T: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
        i_ptr = operand_pointer(row, 0, I_T, ALIGNED) + offs
        g = load_tile(operand_pointer(row, 1, G_T, ALIGNED) + offs, inb, MASKED).to(C_T)
        imp = load_tile(i_ptr, inb, MASKED).to(C_T)
        store_tile(i_ptr, (imp + weight * tl.abs(g)).to(I_T), inb, MASKED)

    @triton.jit
    def _accumulate_importance_kernel(
        rows,  # int64 [T, 4]: address of I, address of g, numel, first chunk
        chunk_tensor,  # int64 [n_chunks]: the tensor each program works on
        weight,
        I_T: tl.constexpr,
        G_T: tl.constexpr,
        C_T: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row, offs, inb, full = program_chunk(rows, chunk_tensor, 4, BLOCK)
        if full:  # only a tensor's last tile needs the bounds mask (see program_chunk)
            _accumulate_importance_tile(row, offs, inb, weight, I_T, G_T, C_T, ALIGNED, False)
        else:
            _accumulate_importance_tile(row, offs, inb, weight, I_T, G_T, C_T, ALIGNED, True)


def accumulate_importance_reference(
    importance: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]], weight: float = 1.0
) -> None:
    """Readable per-tensor version (no checks): ``importance[i] += weight·|grads[i]|`` in fp32
    (fp64 for fp64 importance), rounded once to the importance dtype. Temporaries live in scratch
    rows shared by all tensors (see :class:`fused._multi_tensor.ScratchRows`)."""
    pairs = [(imp, g) for imp, g in zip(importance, grads) if g is not None]
    scratch = ScratchRows([imp for imp, _ in pairs], 2)
    for imp, g in pairs:
        magnitude, row = scratch.like(imp)
        acc = imp if imp.dtype == compute_dtype(imp.dtype) else row.copy_(imp)  # I in fp32 / fp64
        acc.add_(magnitude.copy_(g).abs_(), alpha=weight)  # |g| in fp32 / fp64
        if acc is not imp:
            imp.copy_(acc)


@torch.library.custom_op("fused::accumulate_importance", mutates_args=("importance",))
def _accumulate_importance_triton(
    importance: List[torch.Tensor], grads: List[Optional[torch.Tensor]], weight: float
) -> None:
    """One kernel launch per (importance dtype, gradient dtype) group."""
    device = importance[0].device
    groups = MultiTensorGroups(written=(0,))  # operands: I, g
    for imp, g in zip(importance, grads):
        if g is not None:
            groups.add((imp, g))
    with device_guard(device):
        for (i_dt, g_dt, aligned), (addresses, numels) in groups.groups.items():
            rows, chunk_tensor = multi_tensor_chunk_table(addresses, numels, device, BLOCK)
            if chunk_tensor.numel() == 0:
                continue
            _accumulate_importance_kernel[(chunk_tensor.numel(),)](
                rows,
                chunk_tensor,
                weight,
                I_T=TL_DTYPES[i_dt],
                G_T=TL_DTYPES[g_dt],
                C_T=tl.float64 if i_dt == torch.float64 else tl.float32,
                ALIGNED=aligned,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )
    groups.write_back()


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
    weight = check_positive("weight", weight, allow_zero=True)
    device = check_layout_and_device(importance=importance, grads=grads)
    with torch.no_grad():
        if resolve_backend(backend, device) == "reference":
            accumulate_importance_reference(importance, grads, weight)
        else:
            torch.ops.fused.accumulate_importance(importance, grads, weight)
