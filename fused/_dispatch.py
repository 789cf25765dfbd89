"""Backend choice and argument checks shared by every op.

Dispatch is explicit and lives here only:

* ``backend=None``: Triton for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1``
  (the Triton CPU interpreter, a correctness tool); otherwise the PyTorch reference.
* ``backend="triton"`` / ``"reference"``: force one; an impossible choice is a ``ValueError``.

The checks raise ``TypeError`` / ``ValueError`` whose message names the argument and the
expected form, so a bad call never reaches a kernel.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Optional, Sequence

import torch

BACKENDS = ("triton", "reference")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

try:  # Triton is a Linux-only dependency; the reference path works without it.
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    HAS_TRITON = False


def is_traced(t: torch.Tensor) -> bool:
    """True when ``t`` has no data here: a tensor traced by torch.compile or AOTAutograd (a Fake or
    Functional tensor; AOTAutograd traces an op's body with them while
    ``torch.compiler.is_compiling()`` is still False) or a ``meta`` tensor. Such a tensor has no
    data pointer, and nothing derived from it may be cached."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or t.device.type == "meta" or is_fake(t)


def _release(version: str) -> tuple:
    """(major, minor, patch) of a version string such as '3.6.0', '2.5.0rc1' or '3.6.0+git1a2b'."""
    import re

    parts = [int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def interpreter_version_problem(triton_version, numpy_version, interpreting: bool):
    """Why the installed triton's CPU interpreter cannot run our kernels with this numpy, or None.

    triton's interpreter up to 3.6 turns a scalar kernel argument into a Python int with
    ``int(handle.data)`` on a 1-element array (``__index__``, reached by ``range(0, D, BLOCK_D)``);
    numpy 2.4 refuses that conversion ("only 0-dimensional arrays can be converted to Python
    scalars"; a DeprecationWarning since numpy 1.25). triton 3.7 squeezes the array first.
    Measured by .ci/versions (benchmarks/results/versions/).
    """
    if not interpreting or triton_version is None or numpy_version is None:
        return None
    if _release(triton_version) < (3, 7, 0) and _release(numpy_version) >= (2, 4, 0):
        return (f"the CPU interpreter of triton {triton_version} cannot run with numpy {numpy_version} "
                f"(triton <= 3.6 converts 1-element arrays to Python ints, which numpy >= 2.4 refuses). "
                f"Fix: pip install 'numpy<2.4' (or triton >= 3.7 with its torch). "
                f"The framework tests on the reference path, without the interpreter: "
                f"TRITON_INTERPRET=0 python -m pytest tests/stakes; "
                f"the kernel tests anyway: STAKES_IGNORE_VERSION_CHECK=1")
    return None


def installed_interpreter_problem():
    """:func:`interpreter_version_problem` of the installed triton and numpy, with the interpreter as set now."""
    if not HAS_TRITON:
        return None
    import numpy

    return interpreter_version_problem(getattr(triton, "__version__", None), getattr(numpy, "__version__", None),
                                       interpreter_enabled())


def interpreter_enabled() -> bool:
    """True when the Triton CPU interpreter is switched on (must be set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def triton_available_for(device: torch.device) -> bool:
    """Whether the Triton path can run on tensors of ``device``."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """Map the user's ``backend`` argument to ``"triton"`` or ``"reference"`` for ``device``."""
    if backend is None:
        return "triton" if triton_available_for(device) else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None, 'triton' or 'reference', got {backend!r}")
    if backend == "triton" and not triton_available_for(device):
        if not HAS_TRITON:
            why = "triton is not installed"
        elif device.type == "cpu":
            why = "CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before importing fused)"
        else:
            why = f"Triton does not support device type {device.type!r}"
        raise ValueError(f"backend='triton' is not available for tensors on {device}: {why}")
    return backend


# ----------------------------------------------------------------------------- argument checks


def check_tensor(
    name: str,
    value,
    *,
    ndim: Optional[int] = None,
    floating: bool = True,
    allow_bool: bool = False,
) -> torch.Tensor:
    """``value`` must be a tensor (of ``ndim`` dims, of a floating dtype unless told otherwise)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if floating:
        ok = value.dtype in FLOAT_DTYPES or (allow_bool and value.dtype in (torch.bool, torch.uint8))
        if not ok:
            expected = "a floating dtype (float32, float16, bfloat16 or float64)"
            if allow_bool:
                expected += ", bool or uint8"
            raise TypeError(f"{name} must have {expected}, got {value.dtype}")
    return value


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    """All given tensors live on one device; returns it."""
    device = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}: all tensors must share one device")
    if device is None:
        raise ValueError("no tensor given")
    return device


def check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    """A finite real number > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return value


def check_tensor_list(name: str, values, *, length: Optional[int] = None, allow_none: bool = False) -> list:
    """A list/tuple of tensors (``None`` entries allowed with ``allow_none``) of a given length."""
    if isinstance(values, torch.Tensor) or not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(values).__name__}")
    values = list(values)
    if length is not None and len(values) != length:
        raise ValueError(f"{name} must have {length} entries (one per parameter), got {len(values)}")
    for i, v in enumerate(values):
        if v is None and allow_none:
            continue
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(v).__name__}")
    return values


def check_same_shapes(ref_name: str, refs: Sequence[torch.Tensor], name: str, others: Iterable) -> None:
    """``others[i]`` has the shape of ``refs[i]`` wherever it is not ``None``."""
    for i, (r, o) in enumerate(zip(refs, others)):
        if o is not None and o.shape != r.shape:
            raise ValueError(
                f"{name}[{i}] has shape {tuple(o.shape)} but {ref_name}[{i}] has shape {tuple(r.shape)}"
            )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- torch.library glue


def triton_library_op(name: str, *, mutates_args):
    """Register the Triton path of an op with ``torch.library`` so torch.compile traces it.

    On a GPU this is ``torch.library.triton_op``: inductor sees the user-defined kernels and can
    schedule around them. Under the CPU interpreter inductor cannot inline interpreted kernels
    (it dereferences fake storages), so the op is an opaque ``torch.library.custom_op`` there; the
    op's schema, fake implementation and autograd formula are the same either way.
    Kernels inside the op are launched through :func:`launcher`.
    """

    def decorate(fn):
        if interpreter_enabled() or not HAS_TRITON:
            return torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        return torch.library.triton_op(name, mutates_args=mutates_args)(fn)

    return decorate


def launcher(kernel):
    """``kernel`` wrapped for launching inside a :func:`triton_library_op` body."""
    if interpreter_enabled():
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)
