"""Module forms of the fused ops (Liger-style): thin ``nn.Module`` wrappers that hold only
configuration — the anchors as a buffer (moved by ``.to()``, saved in ``state_dict``, never
trained), the ``backend`` and the reduction — so the ops drop into a user's own training loop.

    align = fused.nn.StructureAlignmentLoss(anchors)      # L_align = 1 − mean_i cos(S_i, S_ref_i)
    loss = align(z, z_ref)
    S = fused.nn.AnchorSimilarity(anchors)(x)             # normalize(x) @ normalize(A).T

The computation is the functional op's (:func:`fused.structure_alignment_loss`,
:func:`fused.anchor_similarity`), with its dispatch, dtypes and checks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["AnchorSimilarity", "StructureAlignmentLoss"]

_BACKENDS = (None, "triton", "reference")
_REDUCTIONS = ("mean", "sum", "none")


def _check_anchors(cls: str, anchors) -> torch.Tensor:
    if not isinstance(anchors, torch.Tensor) or anchors.dim() != 2 or not anchors.is_floating_point():
        got = f"a tensor of shape {tuple(anchors.shape)} and dtype {anchors.dtype}" if isinstance(
            anchors, torch.Tensor) else type(anchors).__name__
        raise ValueError(f"{cls}(anchors): anchors must be a floating tensor [K, D], got {got}")
    if anchors.shape[0] == 0 or anchors.shape[1] == 0:
        raise ValueError(f"{cls}(anchors): anchors must be non-empty, got shape {tuple(anchors.shape)}")
    return anchors.detach().clone()


def _check_backend(cls: str, backend) -> Optional[str]:
    if backend not in _BACKENDS:
        raise ValueError(f"{cls}: backend must be None, 'triton' or 'reference', got {backend!r}")
    return backend


class AnchorSimilarity(nn.Module):
    """S = normalize(x) @ normalize(anchors).T, [N, K] (the anchor structure, METHOD.md §4).

    Args:
        anchors: [K, D] anchors (stored as the buffer ``anchors``; normalised by the op).
        backend: None (automatic), "triton" or "reference" (see :func:`fused.resolve_backend`).
    """

    def __init__(self, anchors: torch.Tensor, *, backend: Optional[str] = None):
        super().__init__()
        self.register_buffer("anchors", _check_anchors("AnchorSimilarity", anchors))
        self.backend = _check_backend("AnchorSimilarity", backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from fused.similarity import anchor_similarity

        return anchor_similarity(x, self.anchors, backend=self.backend)

    def extra_repr(self) -> str:
        return f"num_anchors={self.anchors.shape[0]}, dim={self.anchors.shape[1]}, backend={self.backend!r}"


class StructureAlignmentLoss(nn.Module):
    """L_align = 1 − (1/N) Σ_i cos(S_i, S_ref_i) with S = normalize(x)·Âᵀ (METHOD.md §5), fused
    forward and backward (nothing N×K stored on the Triton path).

    Args:
        anchors: [K, D] anchors (stored as the buffer ``anchors``; normalised by the op).
        reduction: "mean" (the method's loss), "sum" or "none" (per-row ℓ_i, shape [N]).
        backend: None (automatic), "triton" or "reference".

    ``forward(x, x_ref)``: x [N, D] the trained branch's representations, x_ref [N, D] the
    frozen reference's (gradient only if it requires grad).
    """

    def __init__(self, anchors: torch.Tensor, *, reduction: str = "mean", backend: Optional[str] = None):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"StructureAlignmentLoss: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.register_buffer("anchors", _check_anchors("StructureAlignmentLoss", anchors))
        self.reduction = reduction
        self.backend = _check_backend("StructureAlignmentLoss", backend)

    def forward(self, x: torch.Tensor, x_ref: torch.Tensor) -> torch.Tensor:
        from fused.alignment import structure_alignment_loss

        return structure_alignment_loss(x, x_ref, self.anchors, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_anchors={self.anchors.shape[0]}, dim={self.anchors.shape[1]}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")
