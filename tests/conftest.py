"""Test configuration: the Triton CPU interpreter is switched on before anything imports triton.

triton.jit decides at decoration time whether a kernel is interpreted, so the variable must be
set here, before any test module imports ``fused``. On a CUDA machine (benchmarks/gpu_check.sh)
it is left unset and the kernels compile for the card.

A run with the interpreter on and a pair known to break it (triton <= 3.6 with numpy >= 2.4, see
``interpreter_version_problem``) stops at collection with one message naming the versions and the
fix, instead of a hundred ``TypeError``s from inside ``triton/runtime/interpreter.py`` (the kernel
tests and the CLI tests, whose runs use the kernels, all meet it). ``STAKES_IGNORE_VERSION_CHECK=1``
runs them anyway (``.ci/versions`` does, to record what the interpreter does).
"""

import os
import re

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _release(version: str) -> tuple:
    """(major, minor, patch) of a version string such as '3.6.0', '2.5.0rc1' or '3.6.0+git1a2b'."""
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


def _installed_problem():
    try:
        import numpy
        import triton
    except ImportError:  # no triton (not Linux): the kernel tests run the reference path only
        return None
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")
    return interpreter_version_problem(getattr(triton, "__version__", None), getattr(numpy, "__version__", None),
                                       interpreting)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("STAKES_IGNORE_VERSION_CHECK", "0") not in ("", "0"):
        return
    problem = _installed_problem()
    if problem is None:
        return
    if items:
        raise pytest.UsageError(f"the tests run Triton kernels under the CPU interpreter (TRITON_INTERPRET=1), but "
                                f"{problem}")


@pytest.fixture
def device():
    """The device the kernel tests run on: CUDA when present, else CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
