"""Fused importance accumulation I += w·|g| over a list of parameters (METHOD.md §6).

The method's importance of a parameter is I_p = (1/N_tot) Σ_batches |B|·|∂L_align(B)/∂ψ_p|
(absolute gradient, MAS-style): after each proxy batch's backward, every importance tensor gets
``weight = |B| / N_tot`` times the absolute gradient added. Parameters without a gradient (the
classifier head) are skipped and keep I = 0.

Bandwidth-bound: P·(2·b_I + b_g) bytes (12 B/param in fp32). Like the masked update
(``fused.update``), the Triton path is one multi-tensor kernel launch per (importance dtype,
gradient dtype) group over the whole list, with the offset table of
:func:`fused._multi_tensor.multi_tensor_chunk_table` (128-bit accesses in the full tiles of aligned
groups), built by :func:`plan_accumulate_importance`; it adds in fp32 (fp64 for fp64 importance) and
stores in the importance dtype. Registered as the opaque custom op ``fused::accumulate_importance``
with ``mutates_args=("importance",)`` for the reason given in ``fused.update``.

``DECLARATION`` (bottom): what ``python -m fused preflight`` and ``validate`` read.
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
from fused._launch import Launch, Operand, device_target, spec_dtype
from fused._ops import KERNEL_DTYPES, OpDeclaration, SpecKey
from fused._multi_tensor import (
    PARAM_LISTS,
    MultiTensorGroups,
    MultiTensorPlan,
    ScratchRows,
    check_layout_and_device,
    multi_tensor_chunk_table,
    tile_config,
)

__all__ = [
    "accumulate_importance", "accumulate_importance_reference", "plan_accumulate_importance", "preflight_launches",
]

if HAS_TRITON:
    import triton
    import triton.language as tl

    from fused._multi_tensor import load_tile, operand_pointer, program_chunk, store_tile

    @triton.jit
    def _accumulate_importance_tile(i_base, g_base, row, offs, inb, weight,
                                    C_T: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
        i_ptr = operand_pointer(i_base, row, 0, offs, ALIGNED)
        g = load_tile(operand_pointer(g_base, row, 1, offs, ALIGNED), inb, MASKED).to(C_T)
        imp = load_tile(i_ptr, inb, MASKED).to(C_T)
        store_tile(i_ptr, (imp + weight * tl.abs(g)).to(i_base.dtype.element_ty), inb, MASKED)

    @triton.jit
    def _accumulate_importance_kernel(
        i_base,  # the group's first importance tensor (the element type)
        g_base,  # the group's first gradient
        rows,  # int64 [T, 4]: element offsets of I and g from their bases, numel, first chunk
        chunk_tensor,  # int64 [n_chunks]: the tensor each program works on
        weight,
        C_T: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
        TAIL: tl.constexpr,
    ):
        row, start, numel = program_chunk(rows, chunk_tensor, 4, BLOCK)
        if start + BLOCK <= numel:  # a full chunk: one unmasked tile (128-bit accesses)
            offs = start + tl.arange(0, BLOCK)
            _accumulate_importance_tile(i_base, g_base, row, offs, offs < numel, weight, C_T, ALIGNED, False)
        else:  # a tensor's last chunk: masked sub-tiles of TAIL elements (see program_chunk)
            for sub in range(start, numel, TAIL):
                offs = sub + tl.arange(0, TAIL)
                _accumulate_importance_tile(i_base, g_base, row, offs, offs < numel, weight, C_T, ALIGNED, True)


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


def plan_accumulate_importance(
    importance: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]], weight: float, arch: int
) -> MultiTensorPlan:
    """The launches (real or ``meta`` tensors): one ``importance.accumulate`` launch per
    (importance dtype, gradient dtype, 16-byte aligned) group; the returned list also carries the
    groups' :meth:`~fused._multi_tensor.MultiTensorPlan.write_back`."""
    device = importance[0].device
    groups = MultiTensorGroups(written=(0,))  # operands: I, g
    for imp, g in zip(importance, grads):
        if g is not None:
            groups.add((imp, g))
    plan = MultiTensorPlan(groups=groups)
    for key in groups.groups:
        i_dt, g_dt, aligned = key
        bases, offsets, numels = groups.launch_operands(key)
        block, tail, num_warps, options = tile_config([b.element_size() for b in bases], arch)
        rows, chunk_tensor = multi_tensor_chunk_table(offsets, numels, device, block)
        if chunk_tensor.numel() == 0:
            continue
        plan.append(Launch(
            name="importance.accumulate",
            kernel=_accumulate_importance_kernel,
            grid=(chunk_tensor.numel(),),
            args=(*bases, rows, chunk_tensor, weight),
            constexprs=dict(C_T=tl.float64 if i_dt == torch.float64 else tl.float32, ALIGNED=aligned, BLOCK=block,
                            TAIL=tail),
            options=options,
            num_warps=num_warps,
            config=dict(BLOCK=block, TAIL=tail, aligned=aligned, tensors=rows.shape[0]),
            kind="bandwidth", writes=(0,),  # the importance slot (every tensor of it, through the tables)
            operands=(Operand("importance", i_dt, written=True), Operand("grad", g_dt)), tile=block, aligned=aligned,
        ))
    return plan


@torch.library.custom_op("fused::accumulate_importance", mutates_args=("importance",))
def _accumulate_importance_triton(
    importance: List[torch.Tensor], grads: List[Optional[torch.Tensor]], weight: float
) -> None:
    """One kernel launch per (importance dtype, gradient dtype) group."""
    device = importance[0].device
    plan = plan_accumulate_importance(importance, grads, weight, device_target(device))
    for launch in plan:
        launch.run()
    plan.write_back()


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


# ----------------------------------------------------------------------------- for the tools


def preflight_launches(spec: dict, arch) -> List[Launch]:
    """The launches for a shape ``spec``, on ``meta`` tensors (for the preflight).

    Keys (DECLARATION.spec): ``params`` list of shapes; ``dtype`` of the importance; ``grad_dtype``
    [dtype]; ``frozen_head``: the last two tensors have no gradient (skipped).
    """
    spec = DECLARATION.complete(spec)
    dtype = spec_dtype(spec["dtype"])
    params = PARAM_LISTS[spec["params"]] if isinstance(spec["params"], str) else spec["params"]
    shapes = [tuple(s) for s in params]
    imp = [torch.empty(s, dtype=dtype, device="meta") for s in shapes]
    grads = [torch.empty(s, dtype=spec_dtype(spec.get("grad_dtype", dtype)), device="meta") for s in shapes]
    if spec.get("frozen_head", False):
        grads[-2:] = [None] * len(grads[-2:])
    return list(plan_accumulate_importance(imp, grads, 0.5, arch))


def _preflight_cases() -> list:
    """Every parameter list in every dtype; fp32 importance of 16-bit gradients; a frozen head."""
    cases = [dict(params=name, dtype=dt) for dt in KERNEL_DTYPES for name in PARAM_LISTS]
    cases += [dict(params="resnet50", dtype="float32", grad_dtype=dt) for dt in KERNEL_DTYPES if dt != "float32"]
    cases += [dict(params="resnet18", dtype=dt, grad_dtype="float32", frozen_head=True) for dt in KERNEL_DTYPES]
    return cases


def _validation_cases(quick: bool) -> list:
    from fused.validate import PARAM_SHAPES_A, PARAM_SHAPES_B, Case, rand, randn, shapes_label

    def case(shapes, weight):
        def make(gen):
            return {"importance": [rand(gen, *s) for s in shapes], "grads": [randn(gen, *s) for s in shapes]}

        def run(fn, inp, backend):
            fn(inp["importance"], inp["grads"], weight, backend=backend)
            return list(inp["importance"])

        return Case("accumulate_importance", shapes_label(shapes), make, run)

    return [case(PARAM_SHAPES_A, 0.37)] + ([] if quick else [case(PARAM_SHAPES_B, 1.0)])


DECLARATION = OpDeclaration(
    spec={"params": SpecKey("params", "resnet18"), "dtype": SpecKey("dtype", "float32"),
          "grad_dtype": SpecKey("dtype"), "frozen_head": SpecKey("flag", False)},
    launches=preflight_launches, cases=_preflight_cases, validation=_validation_cases,
)
