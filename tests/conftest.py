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


from fused._dispatch import installed_interpreter_problem as _installed_problem  # noqa: E402
from fused._dispatch import interpreter_version_problem  # noqa: E402,F401  (tests/test_versions.py)


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
