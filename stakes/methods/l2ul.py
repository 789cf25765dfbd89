"""L2UL (METHOD.md §10): Adv's losses, with the SR term weighted by the inverted, min-max
normalised importance Ω̂ of the forget set's output norm (in the same fused update)."""

from __future__ import annotations

import torch

from stakes.methods.adv import Adv
from stakes.methods.base import minmax_invert, register_method


class L2UL(Adv):
    def importance(self, ctx) -> dict:
        """Ω = |∂ mean_x ‖f(x_f)‖₂ / ∂θ| on the forget set, min-max normalised per tensor, inverted (§10)."""
        params = [p for p in ctx.deployed.parameters() if p.requires_grad]
        ctx.train_mode()
        out = ctx.deployed(ctx.forget_x).norm(dim=1).mean()
        grads = ctx.gradients(out, params)
        return {p: minmax_invert(g.abs() if g is not None else torch.zeros_like(p)) for p, g in zip(params, grads)}


register_method("l2ul", L2UL())
