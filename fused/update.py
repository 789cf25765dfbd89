"""Fused masked, structure-regularised SGD step over a whole list of parameters (METHOD.md §6, §9).

For every parameter tensor ψ (with gradient g, original weights ψ0, importance I, optional
gradient mask m and momentum buffer b), elementwise and in fp32 (fp64 for fp64 parameters):

    explicit:  d = m⊙g + wd·ψ + λ·I⊙(ψ − ψ0);   [b = μ·b + d;  d = b];   ψ ← ψ − lr·d
    proximal:  u = m⊙g + wd·ψ;                 [b = μ·b + u;  u = b];   ψ ← (ψ − lr·u + a⊙ψ0) / (1 + a),
               a = lr·λ·I

The explicit form is one gradient step on L + λ·½ΣI(ψ−ψ0)² (the reference implementation of the
method builds that sum with a Python loop and lets autograd differentiate it). It diverges once
lr·λ·I > 2 for some weight; the proximal form takes the quadratic term implicitly (the exact
minimiser of ½‖ψ − (ψ − lr·u)‖² + lr·λ·½ΣI(ψ−ψ0)²), which is stable for any lr·λ·I and agrees with
the explicit form to first order in a. The step returns the SR value ½·Σ I⊙(ψ − ψ0)² over all
parameters, measured *before* the update (the loss whose gradient the explicit step used).

Kernel design (PERFORMANCE.md hot spot 4): always bandwidth-bound, so the kernel reads every
operand once and writes ψ (and b) once: P·(2b_ψ + b_g + b_ψ0 + b_I) bytes, 20 B/param in fp32
(17 with a uint8 mask), + 2·b_b with momentum. It is a multi-tensor kernel (``fused._multi_tensor``):
one launch per group of tensors sharing the same dtypes, however many tensors, over a cached device
table of operand offsets from one base pointer per operand (so the full tiles of a 16-byte aligned
group compile to 128-bit loads and stores for every operand dtype; a tensor's last tile and
unaligned groups stay narrow). Launches are built by :func:`plan_masked_sgd` (``fused._launch``),
the same code ``python -m fused preflight`` compiles for each card. The SR value is one fp32
partial sum per program, added by one torch sum afterwards (deterministic, unlike float atomics). A call is thus one Triton launch per dtype group
(one in the usual single-dtype model) + one reduction, with no host synchronisation anywhere.

torch.library: the Triton path is the custom op ``fused::masked_regularized_sgd_step`` with
``mutates_args=("params", "momentum_buffers")``. It is registered as an opaque ``custom_op`` on every
device, not through ``_dispatch.triton_library_op`` (``triton_op`` on a GPU): the kernel writes
through offsets loaded from a table, which inductor's mutation analysis of user kernels cannot
see, and ``triton_op`` traces the body with fake tensors, which have no addresses.

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
    "masked_regularized_sgd_step", "masked_regularized_sgd_step_reference", "plan_masked_sgd", "preflight_launches",
]

BINARY_DTYPES = (torch.bool, torch.uint8)
# The kernel's operand slots, in order: ψ, g, ψ0, I, m, b (ψ and b are written when g is given).
OPERANDS = ("param", "grad", "ref_param", "importance", "grad_mask", "momentum")

if HAS_TRITON:
    import triton
    import triton.language as tl

    from fused._multi_tensor import load_tile, operand_pointer, program_chunk, store_tile

    @triton.jit
    def _masked_sgd_tile(
        p_base, g_base, r_base, i_base, m_base, b_base,
        row, offs, inb, lr, lam, momentum, weight_decay,
        C_T: tl.constexpr,
        HAS_GRAD: tl.constexpr, HAS_IMP: tl.constexpr, BINARY_IMP: tl.constexpr,
        HAS_MASK: tl.constexpr, BINARY_MASK: tl.constexpr, HAS_DECAY: tl.constexpr,
        HAS_MOMENTUM: tl.constexpr, PROXIMAL: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
    ):
        """The step on one tile of one tensor; returns the tile's ½ΣI(ψ−ψ0)² (fp32)."""
        p_ptr = operand_pointer(p_base, row, 0, offs, ALIGNED)
        p = load_tile(p_ptr, inb, MASKED).to(C_T)
        sr = tl.full([], 0.0, tl.float32)
        if HAS_IMP:
            ref = load_tile(operand_pointer(r_base, row, 2, offs, ALIGNED), inb, MASKED).to(C_T)
            imp = load_tile(operand_pointer(i_base, row, 3, offs, ALIGNED), inb, MASKED)
            if BINARY_IMP:
                imp = imp != 0  # bool / uint8 mask: I = 1 where nonzero
            imp = imp.to(C_T)
            diff = p - ref
            sr = tl.sum(0.5 * imp * diff * diff).to(tl.float32)
        if HAS_GRAD:
            u = load_tile(operand_pointer(g_base, row, 1, offs, ALIGNED), inb, MASKED).to(C_T)
            if HAS_MASK:
                m = load_tile(operand_pointer(m_base, row, 4, offs, ALIGNED), inb, MASKED)
                if BINARY_MASK:
                    m = m != 0
                u = u * m.to(C_T)
            if HAS_DECAY:
                u = u + weight_decay * p
            if HAS_IMP:
                if not PROXIMAL:
                    u = u + lam * imp * diff  # explicit: gradient of ½λΣI(ψ−ψ0)²
            if HAS_MOMENTUM:
                b_ptr = operand_pointer(b_base, row, 5, offs, ALIGNED)
                u = momentum * load_tile(b_ptr, inb, MASKED).to(C_T) + u
                store_tile(b_ptr, u.to(b_base.dtype.element_ty), inb, MASKED)
            new = p - lr * u
            if HAS_IMP:
                if PROXIMAL:
                    a = (lr * lam) * imp  # implicit: ψ = (ψ − lr·u + a·ψ0)/(1 + a)
                    new = (new + a * ref) / (1.0 + a)
            store_tile(p_ptr, new.to(p_base.dtype.element_ty), inb, MASKED)
        return sr

    @triton.jit
    def _masked_sgd_kernel(
        p_base, g_base, r_base, i_base, m_base, b_base,  # one base tensor per operand (element types)
        rows,  # int64 [T, 8]: element offsets of ψ, g, ψ0, I, m, b from their bases; numel; first chunk
        chunk_tensor,  # int64 [n_chunks]: the tensor each program works on
        partials,  # fp32 [n_chunks]: ½ΣI(ψ−ψ0)² of each program's chunk
        lr,
        lam,
        momentum,
        weight_decay,
        C_T: tl.constexpr,  # compute dtype: fp32 (fp64 for fp64 parameters)
        HAS_GRAD: tl.constexpr,
        HAS_IMP: tl.constexpr,
        BINARY_IMP: tl.constexpr,
        HAS_MASK: tl.constexpr,
        BINARY_MASK: tl.constexpr,
        HAS_DECAY: tl.constexpr,
        HAS_MOMENTUM: tl.constexpr,
        PROXIMAL: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
        TAIL: tl.constexpr,
    ):
        row, start, numel = program_chunk(rows, chunk_tensor, 8, BLOCK)
        if start + BLOCK <= numel:  # a full chunk: one unmasked tile (128-bit accesses)
            offs = start + tl.arange(0, BLOCK)
            sr = _masked_sgd_tile(
                p_base, g_base, r_base, i_base, m_base, b_base,
                row, offs, offs < numel, lr, lam, momentum, weight_decay, C_T,
                HAS_GRAD, HAS_IMP, BINARY_IMP, HAS_MASK, BINARY_MASK, HAS_DECAY, HAS_MOMENTUM,
                PROXIMAL, ALIGNED, False,
            )
        else:  # a tensor's last chunk: masked sub-tiles of TAIL elements (see program_chunk)
            sr = tl.full([], 0.0, tl.float32)
            for sub in range(start, numel, TAIL):
                offs = sub + tl.arange(0, TAIL)
                sr += _masked_sgd_tile(
                    p_base, g_base, r_base, i_base, m_base, b_base,
                    row, offs, offs < numel, lr, lam, momentum, weight_decay, C_T,
                    HAS_GRAD, HAS_IMP, BINARY_IMP, HAS_MASK, BINARY_MASK, HAS_DECAY, HAS_MOMENTUM,
                    PROXIMAL, ALIGNED, True,
                )
        tl.store(partials + tl.program_id(0), sr)


# ----------------------------------------------------------------------------- reference


def _as_values(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Importance / mask entries as multipliers: floating ones in ``dtype``; a bool or uint8 mask
    means 1 where nonzero and is returned as a bool tensor, which multiplies as 0/1 (this saves a
    full-size float copy)."""
    if t is None:
        return None
    if t.dtype in BINARY_DTYPES:
        return t if t.dtype == torch.bool else t != 0
    return t.to(dtype)


def masked_regularized_sgd_step_reference(
    params: Sequence[torch.Tensor],
    grads: Sequence[Optional[torch.Tensor]],
    ref_params: Sequence[Optional[torch.Tensor]],
    importance: Sequence[Optional[torch.Tensor]],
    *,
    lr: float,
    lam: float = 1.0,
    momentum: float = 0.0,
    momentum_buffers: Optional[Sequence[torch.Tensor]] = None,
    grad_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
    weight_decay: float = 0.0,
    proximal: bool = False,
) -> torch.Tensor:
    """Readable per-tensor PyTorch version of :func:`masked_regularized_sgd_step` (no checks).

    The specification of the op, its CPU fallback and the test oracle. ``ref_params``,
    ``importance`` and ``grad_masks`` are lists with ``None`` entries where absent. Temporaries
    live in two scratch rows shared by all tensors, and ψ and b are updated in place
    (see :class:`fused._multi_tensor.ScratchRows`).
    """
    n = len(params)
    grad_masks = grad_masks if grad_masks is not None else [None] * n
    scratch = ScratchRows(params, 2)
    sr = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for i, p in enumerate(params):
        cd = compute_dtype(p.dtype)
        p = p.detach()
        w = p.to(cd)  # ψ, stepped in place: the param itself when stored in cd
        row0, row1 = scratch.like(p)
        imp = _as_values(importance[i], cd)
        if imp is not None:
            ref = ref_params[i].to(cd)
            diff = torch.sub(w, ref, out=row0)  # ψ − ψ0
            pull = torch.mul(imp, diff, out=row1)  # I⊙(ψ − ψ0), the gradient of ½ΣI(ψ−ψ0)²
            sr += (0.5 * diff.mul_(pull).sum()).to(torch.float32)  # ½ΣI(ψ−ψ0)², before the step
        if grads[i] is None:  # no gradient: not updated, but its SR term counts above
            continue
        g = grads[i].to(cd)
        mask = _as_values(grad_masks[i], cd)
        # d = m⊙g + wd·ψ (+ λ·I⊙(ψ − ψ0) in the explicit form), built in row0
        d = torch.mul(g, mask, out=row0) if mask is not None else row0.copy_(g)
        if weight_decay != 0:
            d.add_(w, alpha=weight_decay)
        if imp is not None and not proximal:
            d.add_(pull, alpha=lam)
        if momentum != 0:
            b = momentum_buffers[i].to(cd)  # the buffer itself when stored in cd
            d = b.mul_(momentum).add_(d)  # b = μ·b + d (b = 0 on step 1 gives b = d)
            if b is not momentum_buffers[i]:
                momentum_buffers[i].copy_(b)
        w.add_(d, alpha=-lr)  # ψ − lr·d
        if imp is not None and proximal:
            # the exact minimiser: ψ ← (ψ − lr·u + a⊙ψ0) / (1 + a), a = lr·λ·I
            a = row1.copy_(imp).mul_(lr * lam)
            w.addcmul_(a, ref).div_(a.add_(1))
        if w is not p:
            p.copy_(w)
    return sr


# ----------------------------------------------------------------------------- Triton path


def plan_masked_sgd(
    params: Sequence[torch.Tensor],
    grads: Sequence[Optional[torch.Tensor]],
    ref_params: Sequence[Optional[torch.Tensor]],
    importance: Sequence[Optional[torch.Tensor]],
    momentum_buffers: Sequence[torch.Tensor],
    grad_masks: Sequence[Optional[torch.Tensor]],
    lr: float,
    lam: float,
    momentum: float,
    weight_decay: float,
    proximal: bool,
    arch: int,
) -> MultiTensorPlan:
    """The launches of one step (real or ``meta`` tensors): one ``update.masked_sgd`` launch per
    group of tensors sharing their operand dtypes (and 16-byte alignment). The returned list also
    holds the fp32 ``partials`` buffer (one ½ΣI(ψ−ψ0)² per program of every launch, summed by the
    caller) and the groups' :meth:`~MultiTensorPlan.write_back`."""
    device = params[0].device
    has_momentum = momentum != 0
    groups = MultiTensorGroups(written=(0, 5))  # operands: ψ, g, ψ0, I, m, b
    for i, p in enumerate(params):
        g, imp = grads[i], importance[i]
        if g is None:
            if imp is not None:  # not updated, but its SR term counts
                groups.add((p, None, ref_params[i], imp, None, None))
        else:
            groups.add((
                p, g, ref_params[i] if imp is not None else None, imp, grad_masks[i],
                momentum_buffers[i] if has_momentum else None,
            ))

    prepared = []
    for key in groups.groups:
        bases, offsets, numels = groups.launch_operands(key)
        block, tail, num_warps, options = tile_config(
            [b.element_size() for b, dt in zip(bases, key) if dt is not None], arch
        )
        rows, chunk_tensor = multi_tensor_chunk_table(offsets, numels, device, block)
        if chunk_tensor.numel():
            prepared.append((key, bases, rows, chunk_tensor, block, tail, num_warps, options))
    # One fp32 partial SR sum per program of every launch, summed by torch at the end.
    partials = torch.empty(sum(p[3].numel() for p in prepared), dtype=torch.float32, device=device)
    plan = MultiTensorPlan(groups=groups, partials=partials)
    offset = 0
    for key, bases, rows, chunk_tensor, block, tail, num_warps, options in prepared:
        n_chunks = chunk_tensor.numel()
        p_dt, g_dt, r_dt, i_dt, m_dt, b_dt, aligned = key
        flags = dict(
            HAS_GRAD=g_dt is not None,
            HAS_IMP=i_dt is not None,
            BINARY_IMP=i_dt in BINARY_DTYPES,
            HAS_MASK=m_dt is not None,
            BINARY_MASK=m_dt in BINARY_DTYPES,
            HAS_DECAY=weight_decay != 0,
            HAS_MOMENTUM=b_dt is not None,
            PROXIMAL=bool(proximal),
            ALIGNED=aligned,
        )
        plan.append(Launch(
            name="update.masked_sgd",
            kernel=_masked_sgd_kernel,
            grid=(n_chunks,),
            args=(*bases, rows, chunk_tensor, partials[offset : offset + n_chunks], lr, lam, momentum, weight_decay),
            constexprs=dict(C_T=tl.float64 if p_dt == torch.float64 else tl.float32, **flags, BLOCK=block, TAIL=tail),
            options=options,
            num_warps=num_warps,
            config=dict(
                BLOCK=block, TAIL=tail, aligned=aligned, tensors=rows.shape[0],
            ),
            # ψ and the momentum buffers (slots 0 and 5, through the tables) and the partials
            kind="bandwidth", writes=(0, 5, len(bases) + 2) if b_dt is not None else (0, len(bases) + 2),
            operands=tuple(
                Operand(name, dt, written=name in ("param", "momentum") and g_dt is not None)
                for name, dt in zip(OPERANDS, key[:-1]) if dt is not None
            ),
            tile=block, aligned=aligned,
        ))
        offset += n_chunks
    return plan


@torch.library.custom_op("fused::masked_regularized_sgd_step", mutates_args=("params", "momentum_buffers"))
def _masked_regularized_sgd_step_triton(
    params: List[torch.Tensor],
    grads: List[Optional[torch.Tensor]],
    ref_params: List[Optional[torch.Tensor]],
    importance: List[Optional[torch.Tensor]],
    momentum_buffers: List[torch.Tensor],
    grad_masks: List[Optional[torch.Tensor]],
    lr: float,
    lam: float,
    momentum: float,
    weight_decay: float,
    proximal: bool,
) -> torch.Tensor:
    """One kernel launch per group of tensors sharing their operand dtypes; returns ½ΣI(ψ−ψ0)².

    ``momentum_buffers`` is empty when ``momentum == 0``; other lists have one entry per param.
    """
    device = params[0].device
    plan = plan_masked_sgd(params, grads, ref_params, importance, momentum_buffers, grad_masks,
                           lr, lam, momentum, weight_decay, proximal, device_target(device))
    for launch in plan:
        launch.run()
    plan.write_back()
    return plan.partials.sum()


@_masked_regularized_sgd_step_triton.register_fake
def _(params, grads, ref_params, importance, momentum_buffers, grad_masks, lr, lam, momentum, weight_decay, proximal):
    return params[0].new_empty((), dtype=torch.float32)


# ----------------------------------------------------------------------------- public entry point


def _optional_list(name: str, values, n: int, *, allow_bool: bool) -> List[Optional[torch.Tensor]]:
    if values is None:
        return [None] * n
    values = check_tensor_list(name, values, length=n, allow_none=True)
    for i, v in enumerate(values):
        if v is not None:
            check_tensor(f"{name}[{i}]", v, allow_bool=allow_bool)
    return values


def check_update_hyperparameters(lr, lam, momentum, weight_decay, proximal) -> None:
    """lr > 0, lam >= 0, momentum in [0, 1), weight_decay >= 0 (all finite), proximal a bool."""
    check_positive("lr", lr)
    check_positive("lam", lam, allow_zero=True)
    momentum = check_positive("momentum", momentum, allow_zero=True)
    if momentum >= 1:
        raise ValueError(f"momentum must be a finite number in [0, 1), got {momentum}")
    check_positive("weight_decay", weight_decay, allow_zero=True)
    if not isinstance(proximal, bool):
        raise TypeError(f"proximal must be a bool, got {type(proximal).__name__}")


def masked_regularized_sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[Optional[torch.Tensor]],
    ref_params: Optional[Sequence[Optional[torch.Tensor]]],
    importance: Optional[Sequence[Optional[torch.Tensor]]],
    *,
    lr: float,
    lam: float = 1.0,
    momentum: float = 0.0,
    momentum_buffers: Optional[Sequence[torch.Tensor]] = None,
    grad_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
    weight_decay: float = 0.0,
    proximal: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """In-place masked SGD step with the structure-aware regulariser ½·λ·ΣI(ψ−ψ0)² (METHOD.md §6).

    Per parameter ψ (gradient g, original ψ0 = ``ref_params[i]``, importance I, gradient mask m):

    * explicit (default): ``d = m⊙g + weight_decay·ψ + lam·I⊙(ψ − ψ0)``; with momentum
      ``b = momentum·b + d; d = b``; then ``ψ ← ψ − lr·d``.
    * ``proximal=True``: the quadratic term is taken implicitly, stable for any lr·lam·I:
      ``u = m⊙g + weight_decay·ψ`` (momentum applies to u), ``ψ ← (ψ − lr·u + a⊙ψ0) / (1 + a)``
      with ``a = lr·lam·I``.

    Args:
        params: floating tensors (fp32/fp16/bf16/fp64), updated in place (under ``no_grad``).
        grads: one per param; ``None`` skips the param (not updated, not decayed, no momentum
            update), but its SR term still counts in the returned value.
        ref_params: the original weights ψ0, one per param (``None`` entries only where
            ``importance`` is ``None``); may be ``None`` when ``importance`` is ``None``.
        importance: I per param: a floating tensor (dense importance) or a bool/uint8 binary mask
            (I = 1 where nonzero, else 0). ``None`` (the list or an entry) = no SR term there.
        lr: step size > 0. lam: λ >= 0. momentum: μ in [0, 1). weight_decay: >= 0 (L2, added
            to the gradient as in ``torch.optim.SGD``).
        momentum_buffers: required when ``momentum > 0``: one tensor per param, updated in place.
            Zero-initialised buffers reproduce ``torch.optim.SGD`` (b = d on the first step).
        grad_masks: m per param (``None`` entries = all ones): floating, or bool/uint8 (1 where
            nonzero). Masks only g, not the decay or SR terms.
        backend: ``None`` (Triton on CUDA / under the interpreter, else reference), "triton" or
            "reference".

    Returns:
        0-dim fp32 tensor ½·Σ I⊙(ψ − ψ0)² over all params, measured before the update (without λ;
        for logging; no host synchronisation).

    Every operand is computed in fp32 (fp64 for fp64 params) and stored in its own dtype. On the
    Triton path the whole list takes one kernel launch per group of tensors with identical operand
    dtypes (and presence of grad / importance / mask), plus one torch sum of the SR partials.
    """
    params = check_tensor_list("params", params)
    n = len(params)
    if n == 0:
        raise ValueError("params must contain at least one tensor")
    for i, p in enumerate(params):
        check_tensor(f"params[{i}]", p)
    grads = _optional_list("grads", grads, n, allow_bool=False)
    importance = _optional_list("importance", importance, n, allow_bool=True)
    ref_params = _optional_list("ref_params", ref_params, n, allow_bool=False)
    grad_masks = _optional_list("grad_masks", grad_masks, n, allow_bool=True)
    for i, (imp, ref) in enumerate(zip(importance, ref_params)):
        if imp is not None and ref is None:
            raise ValueError(f"ref_params[{i}] must be a tensor because importance[{i}] is given")
    check_update_hyperparameters(lr, lam, momentum, weight_decay, proximal)
    if momentum > 0:
        if momentum_buffers is None:
            raise ValueError("momentum_buffers must be a list of tensors (one per param) when momentum > 0")
        momentum_buffers = check_tensor_list("momentum_buffers", momentum_buffers, length=n)
        for i, b in enumerate(momentum_buffers):
            check_tensor(f"momentum_buffers[{i}]", b)
    else:
        momentum_buffers = []
    named = {"grads": grads, "ref_params": ref_params, "importance": importance, "grad_masks": grad_masks}
    if momentum_buffers:
        named["momentum_buffers"] = momentum_buffers
    for name, values in named.items():
        check_same_shapes("params", params, name, values)
    device = check_layout_and_device(params=params, **named)

    with torch.no_grad():
        if resolve_backend(backend, device) == "reference":
            return masked_regularized_sgd_step_reference(
                params, grads, ref_params, importance, lr=float(lr), lam=float(lam),
                momentum=float(momentum), momentum_buffers=momentum_buffers or None,
                grad_masks=grad_masks, weight_decay=float(weight_decay), proximal=proximal,
            )
        return torch.ops.fused.masked_regularized_sgd_step(
            params, grads, ref_params, importance, momentum_buffers, grad_masks,
            float(lr), float(lam), float(momentum), float(weight_decay), proximal,
        )


# ----------------------------------------------------------------------------- for the tools


def preflight_launches(spec: dict, arch) -> List[Launch]:
    """The launches of one step for a shape ``spec``, on ``meta`` tensors (for the preflight).

    Keys (DECLARATION.spec): ``params`` list of shapes; ``dtype`` of the params; ``grad_dtype``
    [dtype]; ``ref_dtype`` of ψ0 [dtype]; ``importance`` "none" | "float" | "bool" | "uint8";
    ``importance_dtype`` of a float importance [dtype]; ``mask`` of the gradient "none" | "float" |
    "bool" | "uint8"; ``mask_dtype`` of a float mask [dtype]; ``momentum``; ``momentum_dtype`` of the
    buffers [dtype]; ``proximal``; ``weight_decay``; ``frozen_head``: the last two tensors (a
    classifier's weight and bias) have no gradient (not updated; their SR term still counts).
    """
    spec = DECLARATION.complete(spec)
    dtype = spec_dtype(spec["dtype"])
    params = PARAM_LISTS[spec["params"]] if isinstance(spec["params"], str) else spec["params"]
    shapes = [tuple(s) for s in params]

    def meta(kind_dtype):
        return [torch.empty(s, dtype=spec_dtype(kind_dtype), device="meta") for s in shapes]

    def optional(kind, float_dtype):
        if kind == "none":
            return [None] * len(shapes)
        return meta({"float": float_dtype, "bool": torch.bool, "uint8": torch.uint8}[kind])

    momentum = float(spec.get("momentum", 0.0))
    importance = optional(spec.get("importance", "float"), spec.get("importance_dtype", dtype))
    grads = meta(spec.get("grad_dtype", dtype))
    if spec.get("frozen_head", False):
        grads[-2:] = [None] * len(grads[-2:])
    return list(plan_masked_sgd(
        meta(dtype), grads,
        meta(spec.get("ref_dtype", dtype)) if importance[0] is not None else [None] * len(shapes),
        importance,
        meta(spec.get("momentum_dtype", dtype)) if momentum != 0 else [],
        optional(spec.get("mask", "none"), spec.get("mask_dtype", dtype)),
        0.1, 1.0, momentum, float(spec.get("weight_decay", 0.0)), bool(spec.get("proximal", False)), arch,
    ))


BINARY_CHOICES = ("none", "float", "bool", "uint8")


def _preflight_cases() -> list:
    """Every parameter list at the method's configuration (the kernel does not depend on the
    list, only its grid does), then every importance and every mask kind at least once more per
    dtype, with momentum, proximal, weight decay and a frozen head on and off among them; mixed
    precision: fp32 master weights with 16-bit gradients, 16-bit weights with fp32 state."""
    lists = tuple(PARAM_LISTS)
    # (importance, mask); momentum on at odd places, proximal at 2-3, weight decay at 4-5
    square = [("bool", "bool"), ("none", "float"), ("float", "none"), ("uint8", "none"), ("uint8", "float"),
              ("none", "bool")]
    cases = []
    for dt in KERNEL_DTYPES:
        for name in lists:
            cases.append(dict(params=name, dtype=dt, importance="float", mask="uint8", momentum=0.9,
                              weight_decay=5e-4))
        for i, (imp, mask) in enumerate(square):
            cases.append(dict(params=lists[i % len(lists)], dtype=dt, importance=imp, mask=mask,
                              importance_dtype="float32" if imp == "float" else None,
                              momentum=0.9 if i % 2 else 0.0, proximal=bool((i // 2) % 2),
                              weight_decay=5e-4 if (i // 4) % 2 else 0.0, frozen_head=i in (1, 2)))
        if dt != "float32":
            cases.append(dict(params="resnet50", dtype="float32", grad_dtype=dt, mask="bool", momentum=0.9))
            cases.append(dict(params="vit_s16", dtype=dt, grad_dtype="float32", ref_dtype="float32",
                              importance_dtype="float32", mask="float", mask_dtype="float32", momentum=0.9,
                              momentum_dtype="float32"))
    return [{k: v for k, v in c.items() if v is not None} for c in cases]


def _validation_cases(quick: bool) -> list:
    from fused.validate import PARAM_SHAPES_A, PARAM_SHAPES_B, Case, rand, randn, shapes_label

    def case(variant, shapes):
        momentum = 0.9 if variant == "momentum" else 0.0
        weight_decay = 1e-2 if variant in ("momentum", "mask") else 0.0

        def make(gen):
            inp = {
                "params": [randn(gen, *s) for s in shapes],
                "grads": [randn(gen, *s) for s in shapes],
                "ref_params": [],
                "importance": [rand(gen, *s) * 2 for s in shapes],
            }
            inp["ref_params"] = [p + 0.1 * randn(gen, *p.shape) for p in inp["params"]]
            if momentum:
                inp["momentum_buffers"] = [randn(gen, *s) for s in shapes]
            if variant == "mask":
                inp["grad_masks"] = [rand(gen, *s) < 0.5 for s in shapes]
            return inp

        def run(fn, inp, backend):
            sr = fn(
                inp["params"], inp["grads"], inp["ref_params"], inp["importance"],
                lr=0.1, lam=1.0, momentum=momentum, momentum_buffers=inp.get("momentum_buffers"),
                grad_masks=inp.get("grad_masks"), weight_decay=weight_decay, proximal=variant == "proximal",
                backend=backend,
            )
            return [*inp["params"], *inp.get("momentum_buffers", []), sr]

        return Case(f"masked_regularized_sgd_step[{variant}]", shapes_label(shapes), make, run,
                    keep_dtype=("grad_masks",))

    variants = ("explicit", "proximal", "momentum", "mask")
    return [case(v, PARAM_SHAPES_A) for v in variants] + ([] if quick else [case(v, PARAM_SHAPES_B) for v in variants])


DECLARATION = OpDeclaration(
    spec={"params": SpecKey("params", "resnet18"), "dtype": SpecKey("dtype", "float32"),
          "grad_dtype": SpecKey("dtype"), "importance": SpecKey("choice", "float", BINARY_CHOICES),
          "importance_dtype": SpecKey("dtype"), "mask": SpecKey("choice", "none", BINARY_CHOICES),
          "mask_dtype": SpecKey("dtype"), "momentum": SpecKey("number", 0.0), "momentum_dtype": SpecKey("dtype"),
          "proximal": SpecKey("flag", False), "weight_decay": SpecKey("number", 0.0), "ref_dtype": SpecKey("dtype"),
          "frozen_head": SpecKey("flag", False)},
    launches=preflight_launches, cases=_preflight_cases, validation=_validation_cases,
)
