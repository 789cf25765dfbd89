"""Kernel launches as data: what every op's launcher runs, and what ``python -m fused preflight``
compiles for other cards.

Each op builds its launches with one *plan* function (``plan_*`` in its module) from its tensors and
the target arch; the launcher runs them (:meth:`Launch.run`), the preflight compiles the very same
launches for any arch with no GPU (:meth:`Launch.compile`, on ``meta`` tensors). So the
configuration a card gets and the configuration the preflight checks cannot drift apart.

Interface every op module keeps (the preflight relies on it):

* ``plan_<op>(..., arch) -> list[Launch]``: the launches for these (real or meta) tensors on
  ``arch``; the op's launcher calls it with its real tensors and :func:`device_arch`.
* ``preflight_launches(spec: dict, arch: int) -> list[Launch]``: builds meta tensors from a shape
  spec (keys per op, see each module) and returns ``plan_<op>(...)`` for them.

Arch numbers are ``10·major + minor`` of the CUDA compute capability (80 A100, 86/89 RTX 30xx/40xx,
A10, L4, L40S, 90 H100/H200, 100 B200).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from fused._dispatch import is_traced

# Per-block shared-memory opt-in limit (bytes) the driver checks at load time, by arch.
SHARED_LIMIT = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448, 100: 232_448,
                103: 232_448, 120: 101_376}
DEFAULT_ARCH = 90  # the configuration used under the CPU interpreter (numerics do not depend on it)


def shared_limit(arch: int) -> int:
    """The per-block shared-memory limit of ``arch`` (the smallest known one for unknown archs)."""
    return SHARED_LIMIT.get(arch, min(SHARED_LIMIT.values()))


def device_arch(device: torch.device) -> int:
    """The arch a launch on ``device`` compiles for: the card's own, or DEFAULT_ARCH on the CPU."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return DEFAULT_ARCH


def device_guard(device: Optional[torch.device]):
    """Make ``device`` the current CUDA device (a kernel launches on the current device, whatever
    its tensors' device); nothing to do on the CPU, for meta tensors or without a device."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


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
    # "mma": a matrix kernel (the preflight expects wgmma on sm_90 for 16-bit operands);
    # "bandwidth": a streaming kernel (the preflight expects 128-bit global loads and stores).
    kind: str = "other"
    # Other Triton compile options of the launch (e.g. ``maxnreg``).
    options: Dict[str, Any] = field(default_factory=dict)
    # Positions in ``args`` of the tensors the kernel writes (its outputs).
    writes: Tuple[int, ...] = ()

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
        parts = [f"{k}={v}" for k, v in {**self.config, **self.options}.items()]
        parts += [f"warps={self.num_warps}", f"stages={self.num_stages}"]
        return " ".join(parts)


def spec_dtype(value) -> torch.dtype:
    """A dtype of a preflight spec: a torch dtype or its name ("float32", "bfloat16", "bool")."""
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {value!r} in a preflight spec")
    return dtype
