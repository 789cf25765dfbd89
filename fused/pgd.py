"""Fused L2 PGD step: gradient-normalised step, projection onto the ε-ball, clamp (METHOD.md §3).

For every sample i (first dimension = sample, any trailing shape, flattened to D values):

    x'_i  = x_i ∓ α · g_i / max(‖g_i‖₂, 1e-12)          (− targeted: descend; + untargeted: ascend)
    δ_i   = (x'_i − x0_i) · min(1, ε_i / ‖x'_i − x0_i‖₂)  (projection onto the L2 ball of radius ε_i)
    out_i = clamp(x0_i + δ_i, lo, hi)                    (valid pixel range; ``clamp=None`` skips it)

Proxy generation runs this step R·⌈k/B⌉·100 times (PERFORMANCE.md hot spot 1). Eager PyTorch
spends ~15 launches and several full-size temporaries on it; the Triton kernel is one launch with
one program per sample, both norms accumulated in fp32, and no host synchronisation.

* Samples with D ≤ ``_MAX_SINGLE_BLOCK`` keep x, x0 and g in registers: one read of each, one write.
* Larger samples loop over D in BLOCK chunks in three passes (‖g‖², then ‖δ‖², then the write),
  re-reading the inputs rather than storing an unprojected temporary, so the output is rounded once.

The step is never differentiated (PGD takes ∇_x of the model loss, then steps outside the graph),
so the op has no autograd formula. It returns a new tensor unless ``out=`` is given; ``out`` may be
``x`` itself (an in-place step): every element is read before it is written, by the same program.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from fused._dispatch import (
    HAS_TRITON,
    check_positive,
    check_same_device,
    check_tensor,
    compute_dtype,
    resolve_backend,
    triton_library_op,
)
from fused._launch import Launch, Operand, aligned16, device_target, register_options, spec_dtype, target_of
from fused._ops import KERNEL_DTYPES, OpDeclaration, SpecKey

__all__ = ["l2_pgd_step", "l2_pgd_step_reference", "plan_pgd_step", "preflight_launches"]

# ‖g‖ is clamped from below so a zero gradient gives a zero step instead of 0/0 = NaN.
GRAD_NORM_FLOOR = 1e-12
# ‖δ‖ is clamped from below so δ = 0 gives scale = min(1, ε/1e-30) = 1 and δ·1 = 0 (no NaN).
DELTA_NORM_FLOOR = 1e-30

# A sample of up to this many values lives in registers (3 fp32 tiles of 8192 over 8 warps
# = 96 registers a thread); CIFAR (3·32·32 = 3072) fits, ImageNet (3·224·224) loops.
_MAX_SINGLE_BLOCK = 8192
_MIN_SINGLE_BLOCK = 1024
_LOOP_BLOCK = 2048

EpsArg = Union[float, int, torch.Tensor]


# ----------------------------------------------------------------------------- reference


def l2_pgd_step_reference(
    x: torch.Tensor,
    x_orig: torch.Tensor,
    grad: torch.Tensor,
    *,
    step_size: float,
    eps: EpsArg,
    targeted: bool = True,
    clamp: Optional[Tuple[float, float]] = (0.0, 1.0),
) -> torch.Tensor:
    """Readable PyTorch version of :func:`l2_pgd_step` (the specification and the test oracle).

    Computes in fp32 for half inputs (fp64 stays fp64) and returns x's dtype. Does not validate.
    """
    B = x.shape[0]
    cd = compute_dtype(x.dtype)
    view = (B,) + (1,) * (x.dim() - 1)  # one value per sample, broadcast over the sample

    def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(t.reshape(B, -1), dim=1).reshape(view)

    xc, x0, g = x.to(cd), x_orig.to(cd), grad.to(cd)
    direction = -1.0 if targeted else 1.0
    x_new = xc + direction * step_size * g / per_sample_norm(g).clamp_min(GRAD_NORM_FLOOR)
    delta = x_new - x0
    eps_b = eps.to(cd).reshape(view) if isinstance(eps, torch.Tensor) else float(eps)
    scale = (eps_b / per_sample_norm(delta).clamp_min(DELTA_NORM_FLOOR)).clamp(max=1.0)
    out = x0 + delta * scale
    if clamp is not None:
        out = out.clamp(clamp[0], clamp[1])
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- Triton kernel

if HAS_TRITON:
    import triton
    import triton.language as tl

    # The direction (the sign of ``step``) and whether to clamp (``clamp`` 0/1, a uniform branch)
    # are runtime values: one compiled kernel serves the four variants of a layout.
    @triton.jit(do_not_specialize=["clamp"])
    def _l2_pgd_step_kernel(
        x_ptr, x0_ptr, g_ptr, out_ptr, eps_ptr,
        D,
        step,  # −α targeted (descend), +α untargeted (ascend)
        eps_scalar, lo, hi, clamp,
        PER_SAMPLE_EPS: tl.constexpr,
        SINGLE_BLOCK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One program per sample; the sample occupies D consecutive values at row·D.
        row = tl.program_id(0).to(tl.int64)
        base = row * D
        if PER_SAMPLE_EPS:
            eps = tl.load(eps_ptr + row).to(tl.float32)
        else:
            eps = eps_scalar
        offs = tl.arange(0, BLOCK)

        if SINGLE_BLOCK:
            # Whole sample in registers: read x, x0, g once each.
            m = offs < D
            g = tl.load(g_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            x0 = tl.load(x0_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            coef = step / tl.maximum(tl.sqrt(tl.sum(g * g, axis=0)), 1e-12)
            delta = x + coef * g - x0  # masked lanes: 0 + 0 - 0 = 0
            scale = tl.minimum(eps / tl.maximum(tl.sqrt(tl.sum(delta * delta, axis=0)), 1e-30), 1.0)
            y = x0 + delta * scale
            if clamp != 0:
                y = tl.minimum(tl.maximum(y, lo), hi)
            tl.store(out_ptr + base + offs, y.to(out_ptr.dtype.element_ty), mask=m)
        else:
            # Pass 1: ‖g‖² in fp32.
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, D, BLOCK):
                m = start + offs < D
                g = tl.load(g_ptr + base + start + offs, mask=m, other=0.0).to(tl.float32)
                acc += g * g
            coef = step / tl.maximum(tl.sqrt(tl.sum(acc, axis=0)), 1e-12)
            # Pass 2: ‖δ‖² with δ = x + coef·g − x0.
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, D, BLOCK):
                m = start + offs < D
                g = tl.load(g_ptr + base + start + offs, mask=m, other=0.0).to(tl.float32)
                x = tl.load(x_ptr + base + start + offs, mask=m, other=0.0).to(tl.float32)
                x0 = tl.load(x0_ptr + base + start + offs, mask=m, other=0.0).to(tl.float32)
                delta = x + coef * g - x0
                acc += delta * delta
            scale = tl.minimum(eps / tl.maximum(tl.sqrt(tl.sum(acc, axis=0)), 1e-30), 1.0)
            # Pass 3: recompute δ, project, clamp, write (each element read before it is written).
            for start in range(0, D, BLOCK):
                m = start + offs < D
                g = tl.load(g_ptr + base + start + offs, mask=m, other=0.0).to(tl.float32)
                x = tl.load(x_ptr + base + start + offs, mask=m, other=0.0).to(tl.float32)
                x0 = tl.load(x0_ptr + base + start + offs, mask=m, other=0.0).to(tl.float32)
                y = x0 + (x + coef * g - x0) * scale
                if clamp != 0:
                    y = tl.minimum(tl.maximum(y, lo), hi)
                tl.store(out_ptr + base + start + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def _launch_config(D: int, arch) -> Tuple[bool, int, int]:
    """(single block?, BLOCK, num_warps) for a sample of D values: 16 values a thread (a 16-byte
    vector of every operand dtype, so full tiles compile to 128-bit accesses when D is a multiple of
    16: every image size here, 8·8, 3·32·32, 3·224·224) in a single block of at least 1024 values
    (one configuration for all small samples), 8 a thread in the loop over blocks of 2048. The
    single block keeps 3 × 16-32 fp32 values a thread in registers; both fit without spills on
    every target (checked by the preflight)."""
    warp = target_of(arch).warp_size
    if D <= _MAX_SINGLE_BLOCK:
        block = max(triton.next_power_of_2(D), _MIN_SINGLE_BLOCK)
        return True, block, max(1, min(8, block // (16 * warp)))
    return False, _LOOP_BLOCK, max(1, _LOOP_BLOCK // (8 * warp))


def plan_pgd_step(x, x_orig, grad, out, eps_per_sample, step_size, eps, direction, lo, hi, use_clamp,
                  arch) -> list:
    """The launches of one step (real or ``meta`` tensors, all sample-major dense with one
    layout): one ``pgd.step`` program per sample. ``[]`` for an empty batch."""
    B = x.shape[0]
    if x.numel() == 0:
        return []
    D = x.numel() // B
    single, block, num_warps = _launch_config(D, arch)
    per_sample = eps_per_sample is not None
    return [Launch(
        name="pgd.step",
        kernel=_l2_pgd_step_kernel,
        grid=(B,),
        args=(x, x_orig, grad, out, eps_per_sample if per_sample else x, D, direction * step_size, eps, lo, hi,
              int(use_clamp)),
        constexprs=dict(PER_SAMPLE_EPS=per_sample, SINGLE_BLOCK=single, BLOCK=block),
        num_warps=num_warps, options=register_options(target_of(arch)),
        config=dict(D=D, BLOCK=block, single_block=single, per_sample_eps=per_sample, clamp=use_clamp),
        kind="bandwidth", writes=(3,),
        operands=(Operand("x", x.dtype), Operand("x_orig", x_orig.dtype), Operand("grad", grad.dtype),
                  Operand("out", out.dtype, read=False, written=True)),
        # Triton specialises D as a multiple of 16 when it is one: every sample then starts on a
        # 16-byte boundary (the bases are: torch allocates them so) and full tiles vectorise.
        tile=block, aligned=D % 16 == 0 and all(aligned16(t) for t in (x, x_orig, grad, out)),
    )]


@triton_library_op("fused::l2_pgd_step", mutates_args=("out",))
def _l2_pgd_step_triton(
    x: torch.Tensor,
    x_orig: torch.Tensor,
    grad: torch.Tensor,
    out: torch.Tensor,
    eps_per_sample: Optional[torch.Tensor],
    step_size: float,
    eps: float,
    direction: float,
    lo: float,
    hi: float,
    use_clamp: bool,
) -> None:
    """Triton path. All tensors are sample-major dense with identical strides (see _layout)."""
    for launch in plan_pgd_step(x, x_orig, grad, out, eps_per_sample, step_size, eps, direction, lo, hi,
                                use_clamp, device_target(x.device)):
        launch.run(wrap=True)


@_l2_pgd_step_triton.register_fake
def _(x, x_orig, grad, out, eps_per_sample, step_size, eps, direction, lo, hi, use_clamp) -> None:
    return None


# ----------------------------------------------------------------------------- public entry point


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """The layout the kernel runs in: x's own when it is channels-last dense, else contiguous.

    Either way every sample is D consecutive values at offset i·D, which is all the kernel needs
    (the per-sample reductions do not care about the order inside a sample), so channels-last
    inputs (PGD under channels_last + autocast) are not copied.
    """
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _check_eps(eps, batch: int, device: torch.device) -> Union[float, torch.Tensor]:
    if isinstance(eps, torch.Tensor):
        check_tensor("eps", eps)
        if eps.dim() == 0:
            eps = eps.reshape(1).expand(batch)
        if eps.dim() != 1 or eps.shape[0] != batch:
            raise ValueError(
                f"eps must be a positive float or a 1-D tensor with one radius per sample "
                f"(length {batch}), got shape {tuple(eps.shape)}"
            )
        if eps.device != device:
            raise ValueError(f"eps is on {eps.device} but x is on {device}: the radii must share x's device")
        # Checking the values needs their contents on the host: done for CPU tensors only, so a
        # CUDA call never synchronises (documented in l2_pgd_step).
        if eps.device.type == "cpu" and batch > 0 and not bool(torch.all(torch.isfinite(eps) & (eps > 0))):
            raise ValueError(f"eps must hold finite radii > 0, got {eps.tolist()}")
        return eps
    return check_positive("eps", eps)


def _check_clamp(clamp) -> Optional[Tuple[float, float]]:
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise TypeError(f"clamp must be None or a pair (lo, hi) of numbers, got {clamp!r}")
    lo, hi = clamp
    for name, v in (("clamp[0]", lo), ("clamp[1]", hi)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
        if math.isnan(v):
            raise ValueError(f"{name} must not be NaN")
    if not lo < hi:
        raise ValueError(f"clamp must be a pair (lo, hi) with lo < hi, got {clamp!r}")
    return float(lo), float(hi)


def l2_pgd_step(
    x: torch.Tensor,
    x_orig: torch.Tensor,
    grad: torch.Tensor,
    *,
    step_size: float,
    eps: EpsArg,
    targeted: bool = True,
    clamp: Optional[Tuple[float, float]] = (0.0, 1.0),
    out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """One L2 PGD step per sample: step along the normalised gradient, project, clamp.

    ``out_i = clamp(x0_i + δ_i, lo, hi)`` with ``δ_i = (x_i ∓ α g_i/‖g_i‖ − x0_i)·min(1, ε_i/‖·‖)``,
    norms taken over each sample (first dimension) and accumulated in fp32.

    Args:
        x: current iterate, shape [B, ...] (any trailing shape, e.g. [B, C, H, W]), floating.
        x_orig: the clean samples x0 the ball is centred on, same shape as ``x``.
        grad: ∇_x of the attack loss, same shape as ``x`` (its dtype may differ, e.g. fp32 under
            autocast); it is only used through its per-sample direction g/‖g‖.
        step_size: α > 0.
        eps: ball radius ε > 0, a float or a tensor of one radius per sample (shape [B], or 0-dim)
            on x's device, e.g. for radius calibration. Radii of a CPU tensor are checked to be
            finite and > 0; those of a CUDA tensor are not (that would synchronise the host).
        targeted: True descends the loss (x − α ĝ, towards a target label), False ascends it.
        clamp: ``(lo, hi)`` valid input range, ``None`` for no clamp.
        out: optional output tensor of x's shape and dtype; may be ``x`` (an in-place step), or
            any input exactly, but must not partially overlap one.
        backend: ``None`` (automatic), ``"triton"`` or ``"reference"``.

    Returns:
        The new iterate, of x's dtype and layout (``out`` when given). Not differentiable: PGD
        steps outside the autograd graph, so no backward is defined.

    A zero gradient gives a zero step and a zero δ gives δ, without NaN. B = 0 returns an empty
    tensor.
    """
    check_tensor("x", x)
    check_tensor("x_orig", x_orig)
    check_tensor("grad", grad)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (the first one indexes samples), got a 0-dim tensor")
    for name, t in (("x_orig", x_orig), ("grad", grad)):
        if t.shape != x.shape:
            raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    device = check_same_device(x=x, x_orig=x_orig, grad=grad)
    step_size = check_positive("step_size", step_size)
    eps = _check_eps(eps, x.shape[0], device)
    bounds = _check_clamp(clamp)
    if not isinstance(targeted, bool):
        raise TypeError(f"targeted must be a bool, got {type(targeted).__name__}")
    if out is not None:
        check_tensor("out", out)
        if out.shape != x.shape or out.dtype != x.dtype or out.device != device:
            raise ValueError(
                f"out must match x (shape {tuple(x.shape)}, {x.dtype}, {device}), got shape "
                f"{tuple(out.shape)}, {out.dtype}, {out.device}"
            )
    backend = resolve_backend(backend, device)
    with torch.no_grad():
        return _dispatch_step(x, x_orig, grad, out, step_size, eps, targeted, bounds, backend)


def _dispatch_step(x, x_orig, grad, out, step_size, eps, targeted, bounds, backend) -> torch.Tensor:
    if backend == "reference":
        result = l2_pgd_step_reference(x, x_orig, grad, step_size=step_size, eps=eps, targeted=targeted, clamp=bounds)
        return result if out is None else out.copy_(result)

    # Triton: bring the three inputs to one sample-major dense layout (a no-op when they share it).
    mf = _memory_format(x)
    xc, x0c, gc = (t.contiguous(memory_format=mf) for t in (x, x_orig, grad))
    direct = out is not None and out.is_contiguous(memory_format=mf)
    target = out if direct else torch.empty_like(xc, memory_format=mf)
    eps_t = eps.contiguous() if isinstance(eps, torch.Tensor) else None
    lo, hi = bounds if bounds is not None else (0.0, 0.0)
    _l2_pgd_step_triton(
        xc, x0c, gc, target, eps_t,
        step_size, 0.0 if eps_t is not None else eps,
        -1.0 if targeted else 1.0,
        lo, hi, bounds is not None,
    )
    if out is not None and not direct:
        return out.copy_(target)
    return target


# ----------------------------------------------------------------------------- for the tools


def preflight_launches(spec: dict, arch) -> list:
    """The launches of one step for a shape ``spec``, on ``meta`` tensors (for the preflight).

    Keys (DECLARATION.spec): ``B`` samples; ``D`` values per sample; ``dtype`` of x, x0 and out;
    ``grad_dtype`` [dtype]; ``per_sample_eps`` a [B] fp32 radius tensor; ``clamp``; ``targeted``.
    """
    spec = DECLARATION.complete(spec)
    B, D = int(spec["B"]), int(spec["D"])
    dtype = spec["dtype"]

    def meta(dt):
        return torch.empty((B, D), dtype=spec_dtype(dt), device="meta")

    eps_t = torch.empty(B, dtype=torch.float32, device="meta") if spec["per_sample_eps"] else None
    return plan_pgd_step(
        meta(dtype), meta(dtype), meta(spec.get("grad_dtype", dtype)), meta(dtype), eps_t,
        0.1, 0.0 if eps_t is not None else 1.0, -1.0 if spec["targeted"] else 1.0,
        0.0, 1.0, bool(spec["clamp"]), arch,
    )


# Sample sizes (values per sample) of the default preflight grid: digits 8×8, MNIST 28×28, CIFAR
# 3×32×32, 3×64×64, STL 3×96×96, ImageNet 3×224×224 (looped), Inception 3×299×299, the single-block
# limit and one past it, and sizes that are no multiple of 16 in each single-block tile (1, 3×11×13,
# 3×45×45: a sample then starts anywhere, so accesses stay narrow and are not gated).
PGD_SAMPLE_SIZES = (64, 784, 3072, 12288, 27648, 150528, 268203, _MAX_SINGLE_BLOCK, _MAX_SINGLE_BLOCK + 1,
                    1, 429, 2700, 6075)


def _preflight_cases() -> list:
    """Every sample size at the method's step (per-sample radii, clamped, targeted) in every dtype,
    with every gradient dtype in a register tile and in the loop; the other radius / clamp /
    direction variants on CIFAR and ImageNet."""
    cases = [dict(B=512, D=D, dtype=dt, grad_dtype=gdt, per_sample_eps=True, clamp=True, targeted=True)
             for D in PGD_SAMPLE_SIZES for dt in KERNEL_DTYPES for gdt in KERNEL_DTYPES
             if gdt == dt or D in (3072, 150528)]
    cases += [dict(B=B, D=D, dtype=dt, per_sample_eps=ps, clamp=cl, targeted=tg)
              for D in (3072, 150528) for dt in KERNEL_DTYPES for B in (1, 512)
              for ps in (True, False) for cl in (True, False) for tg in (True, False)]
    return cases


def _validation_cases(quick: bool) -> list:
    from fused.validate import Case, rand, randn

    def case(shape, per_sample_eps, targeted):
        def make(gen):
            x0 = rand(gen, *shape)
            x = (x0 + 0.2 * randn(gen, *shape)).clamp(0, 1)
            inp = {"x": x, "x_orig": x0, "grad": randn(gen, *shape)}
            # Radii below and above ‖x − x0‖ so that the projection binds for some samples only.
            inp["eps"] = 0.5 + 4 * rand(gen, shape[0]) if per_sample_eps else 2.0
            return inp

        def run(fn, inp, backend):
            return [fn(inp["x"], inp["x_orig"], inp["grad"], step_size=0.3, eps=inp["eps"], targeted=targeted,
                       backend=backend)]

        variant = ("per-sample eps" if per_sample_eps else "float eps") + (", targeted" if targeted else ", untargeted")
        return Case(f"l2_pgd_step[{variant}]", "x".join(map(str, shape)), make, run)

    cases = [case((6, 3, 11, 13), per_sample_eps=False, targeted=True),
             case((5, 2, 9, 7), per_sample_eps=True, targeted=False)]
    if not quick:
        cases.append(case((2, 3, 61, 53), per_sample_eps=False, targeted=True))  # D = 9699: the looped kernel
    return cases


DECLARATION = OpDeclaration(
    spec={"B": SpecKey("int", 128), "D": SpecKey("int", 3 * 32 * 32), "dtype": SpecKey("dtype", "float32"),
          "grad_dtype": SpecKey("dtype"), "per_sample_eps": SpecKey("flag", False), "clamp": SpecKey("flag", True),
          "targeted": SpecKey("flag", True)},
    launches=preflight_launches, cases=_preflight_cases, validation=_validation_cases,
)
