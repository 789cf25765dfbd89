"""Test configuration: the Triton CPU interpreter is switched on before anything imports triton.

triton.jit decides at decoration time whether a kernel is interpreted, so the variable must be
set here, before any test module imports ``fused``. On a CUDA machine (benchmarks/gpu_check.sh)
it is left unset and the kernels compile for the card.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device():
    """The device the kernel tests run on: CUDA when present, else CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
