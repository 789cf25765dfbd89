"""stakes: structure-faithful instance unlearning ("Stake the Points", CVPR 2026) on fused ops.

Entry points:

* :func:`stakes.unlearn` — remove a forget set from a pretrained classifier (StructGuard or a
  baseline), returning an :class:`UnlearnResult` with the deployed model, metrics and trajectory.
* :func:`stakes.register_method` / :func:`stakes.available_methods` — bring your own method (an
  :class:`UnlearningMethod`), run by name like the built-ins.
* :func:`stakes.as_classifier` — the view of a timm / torchvision / Hugging Face classifier (or a
  ``(features, head)`` pair) that the methods work on.
* :class:`stakes.UnlearnConfig` — the options every run shares; :func:`stakes.preset` builds one for
  a method (``"stable"``, the default, or ``"paper"``), with the method's own options.
* :class:`stakes.UnlearnContext` — what a method's hooks may use.
* the ``stakes`` command line (``stakes --help``).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "unlearn": "stakes.methods",
    "UnlearnResult": "stakes.methods",
    "METHODS": "stakes.methods",
    "UnlearningMethod": "stakes.methods",
    "UnlearnContext": "stakes.methods",
    "Batch": "stakes.methods",
    "register_method": "stakes.methods",
    "unregister_method": "stakes.methods",
    "available_methods": "stakes.methods",
    "as_classifier": "stakes.models",
    "UnlearnConfig": "stakes.config",
    "preset": "stakes.methods",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stakes' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
