"""SalUn (METHOD.md §10): random-label cross-entropy on the forget set plus proxy retention, through
a binary saliency mask (top-q of |∇θ CE(f(x_f), y_f)|) on the gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stakes.config import MethodConfig
from stakes.methods.base import Batch, UnlearningMethod, register_method, topq_mask
from stakes.proxy import random_targets


@dataclass
class SalUnConfig(MethodConfig):
    """SalUn's own options (``--set salun.saliency_q=0.3``)."""

    saliency_q: float = 0.5          # the fraction of weights the saliency mask lets move (top-q of |∇θ|)

    def validate(self):
        q = self.saliency_q
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < q <= 1.0:
            raise ValueError(f"salun.saliency_q must be in (0, 1], got {q!r}")
        return self


class SalUn(UnlearningMethod):
    config_class = SalUnConfig

    def loss_terms(self, ctx, batch: Batch) -> dict:
        w_f, w_a = ctx.loss_weights(batch)
        g = torch.Generator().manual_seed(ctx.config.seed * 100003 + ctx.step)
        # labels drawn for the global forget batch, this rank's rows taken (the same on any world size)
        yr = random_targets(batch.forget_y, ctx.num_classes, g, rows=batch.forget_rows, total=batch.n_forget)
        return {"random_label": w_f * F.cross_entropy(ctx.deployed(batch.forget_x), yr),
                "retention": w_a * F.cross_entropy(ctx.deployed(batch.proxy_x), batch.proxy_y)}

    def grad_masks(self, ctx) -> dict:
        """Top-q of |∇θ CE(f(x_f), y_f)| over all parameters, as a binary gradient mask (§10)."""
        params = [p for p in ctx.deployed.parameters() if p.requires_grad]
        ctx.train_mode()
        loss = F.cross_entropy(ctx.deployed(ctx.forget_x), ctx.forget_y)
        grads = ctx.gradients(loss, params)
        mags = [g.abs() if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]
        return dict(zip(params, topq_mask(mags, ctx.options.saliency_q)))

    def optimizer_options(self, ctx) -> dict:
        # only masked weights move, so weight decay is folded into the gradient before the mask
        # (before_update) instead of being applied to every weight by the update [ours]
        return {**super().optimizer_options(ctx), "weight_decay": 0.0}

    def before_update(self, ctx) -> None:
        wd = ctx.config.weight_decay
        if wd > 0:
            for grp in ctx.param_groups:
                with_grad = [p for p in grp["params"] if p.grad is not None]
                torch._foreach_add_([p.grad for p in with_grad], with_grad, alpha=wd)


register_method("salun", SalUn())
