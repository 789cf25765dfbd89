"""Kernel launches as data: what every op's launcher runs, and what ``python -m fused preflight``
compiles for other cards.

Each op builds its launches with one *plan* function (``plan_*`` in its module) from its tensors and
the target card (:class:`fused._targets.Target`); the launcher runs them (:meth:`Launch.run`), the
preflight compiles the very same launches for any target with no GPU (:meth:`Launch.compile`, on
``meta`` tensors). So the configuration a card gets and the configuration the preflight checks
cannot drift apart.

Interface every op module keeps (the preflight, ``fused validate`` and the benchmarks read it
through the op registry, :mod:`fused._ops`):

* ``plan_<op>(..., arch) -> list[Launch]``: the launches for these (real or meta) tensors on
  ``arch`` (a Target, or anything :func:`fused._targets.target_of` takes); the op's launcher calls
  it with its real tensors and :func:`device_target`.
* ``DECLARATION``: its :class:`fused._ops.OpDeclaration` (spec keys, default preflight cases, the
  launches for a spec on meta tensors, validation cases).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from fused._dispatch import is_traced
from fused._targets import Target, device_target, target_of  # noqa: F401 - re-exported for the ops


def device_guard(device: Optional[torch.device]):
    """Make ``device`` the current CUDA device (a kernel launches on the current device, whatever
    its tensors' device); nothing to do on the CPU, for meta tensors or without a device."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def register_options(target: Target) -> Dict[str, Any]:
    """Compile options of a launch on ``target``: on NVIDIA ``maxnreg=255`` (PTX ``.maxnreg``, the
    hardware's cap), which lifts the lower register target ptxas otherwise picks for some kernels
    and then spills under (seen on sm_100 and sm_120: 32-128 registers and 8-16 bytes of stack;
    with it the registers the kernel needs and none). AMD takes no such option."""
    return {} if target.is_amd else {"maxnreg": 255}


def aligned16(t: torch.Tensor) -> bool:
    """``t``'s first element is 16-byte aligned. A traced tensor has no address: its offset into a
    storage is judged instead (allocators align storages to at least 64 bytes)."""
    if is_traced(t):
        return (t.storage_offset() * t.element_size()) % 16 == 0
    return t.data_ptr() % 16 == 0


@dataclass(frozen=True)
class Operand:
    """A tensor a streaming kernel moves element by element: its ``dtype``, whether the kernel reads
    it and whether it writes it (an operand may be both: ψ of the masked update)."""

    name: str
    dtype: torch.dtype
    read: bool = True
    written: bool = False

    @property
    def bytes(self) -> int:
        return self.dtype.itemsize


@dataclass
class Launch:
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=, num_stages=, **options)``.

    ``name`` says which kernel of the op this is (e.g. ``"alignment.scalars"``); ``config`` is the
    human-readable configuration the preflight prints (block sizes and the like).
    """

    name: str
    kernel: Any
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    constexprs: Dict[str, Any]
    num_warps: int
    num_stages: int = 1
    config: Dict[str, Any] = field(default_factory=dict)
    # "mma": a matrix kernel (the preflight expects tensor-core / MFMA instructions; wgmma on sm_90
    # for 16-bit operands); "bandwidth": a streaming kernel (128-bit accesses where ``aligned``).
    kind: str = "other"
    # Other Triton compile options of the launch (e.g. ``maxnreg`` on NVIDIA).
    options: Dict[str, Any] = field(default_factory=dict)
    # Positions in ``args`` of the tensors the kernel writes (its outputs).
    writes: Tuple[int, ...] = ()
    # A matrix kernel: the dtype of its tl.dot operands (fp32 products run in Target.fp32_dot).
    dot: Optional[torch.dtype] = None
    # A streaming kernel: the operands it moves per element, the elements a program moves in one
    # full tile, and whether those tiles are provably 16-byte aligned (then every thread must
    # move each operand in 16-byte vectors: see fused.preflight.gates).
    operands: Tuple[Operand, ...] = ()
    tile: int = 0
    aligned: bool = False

    @property
    def device(self) -> Optional[torch.device]:
        """The device of the launch's tensors (the first tensor argument's)."""
        return next((a.device for a in self.args if isinstance(a, torch.Tensor)), None)

    def run(self, wrap: bool = False) -> None:
        """Launch on the tensors' device, whichever CUDA device is current.
        ``wrap``: inside a ``torch.library.triton_op`` body."""
        kernel = self.kernel
        if wrap:
            from fused._dispatch import launcher

            kernel = launcher(kernel)
        device = self.device
        # A traced launch (torch.compile, AOTAutograd) only records the kernel: no device to enter.
        traced = device is not None and is_traced(next(a for a in self.args if isinstance(a, torch.Tensor)))
        with device_guard(None if traced else device):
            kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps,
                              num_stages=self.num_stages, **self.options)

    def compile(self):
        """Compile (no launch) for the active Triton driver's target; returns the CompiledKernel."""
        return self.kernel.warmup(*self.args, grid=self.grid, **self.constexprs,
                                  num_warps=self.num_warps, num_stages=self.num_stages, **self.options)

    def describe(self) -> str:
        parts = [f"{o.name}={dtype_name(o.dtype)}" for o in self.operands]
        parts += [f"{k}={v}" for k, v in {**self.config, **self.options}.items()]
        parts += [f"warps={self.num_warps}", f"stages={self.num_stages}"]
        return " ".join(parts)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).replace("torch.", "")


def spec_dtype(value) -> torch.dtype:
    """A dtype of a preflight spec: a torch dtype or its name ("float32", "bfloat16", "bool")."""
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {value!r} in a preflight spec")
    return dtype
