"""fused: Triton kernels for structure-faithful unlearning, each with a PyTorch reference.

Public API (see the README and each module's docstring):

* ``anchor_similarity(x, anchors)``                       -> fused.similarity
* ``structure_alignment_loss(x, x_ref, anchors)``         -> fused.alignment
* ``accumulate_importance(importance, grads, weight)``    -> fused.importance
* ``masked_regularized_sgd_step(params, grads, ...)``     -> fused.update
* ``l2_pgd_step(x, x_orig, grad, step_size=, eps=)``      -> fused.pgd
* ``fused.optim.StructureSGD``                            -> fused.optim
* ``fused.nn.StructureAlignmentLoss``, ``fused.nn.AnchorSimilarity`` (module forms) -> fused.nn

Every op takes ``backend=None | "triton" | "reference"``; the choice is made in
``fused._dispatch.resolve_backend``. Submodules are imported lazily so that ``import fused`` stays
cheap and the Triton interpreter flag can still be set by the caller first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fused._ops import REGISTRY  # the op registry: imports no torch and no op module

__version__ = "0.1.0"


# Each op's public function from its module (the registry), and the backend choice.
_EXPORTS = {**{op.function: op.module for op in REGISTRY}, "resolve_backend": "fused._dispatch"}

__all__ = sorted([*_EXPORTS, "optim", "nn"])


def __getattr__(name: str):
    if name in ("optim", "nn"):
        return importlib.import_module(f"fused.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fused' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from fused import nn, optim  # noqa: F401
    from fused._dispatch import resolve_backend  # noqa: F401
    from fused.alignment import structure_alignment_loss  # noqa: F401
    from fused.importance import accumulate_importance  # noqa: F401
    from fused.pgd import l2_pgd_step  # noqa: F401
    from fused.similarity import anchor_similarity  # noqa: F401
    from fused.update import masked_regularized_sgd_step  # noqa: F401
