"""SalUn (METHOD.md §10): random-label cross-entropy on the forget set plus proxy retention, through
a binary saliency mask (top-q of |∇θ CE(f(x_f), y_f)|) on the gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stakes.methods.base import Batch, UnlearningMethod, register_method, topq_mask
from stakes.proxy import random_targets


class SalUn(UnlearningMethod):
    def loss_terms(self, run, batch: Batch) -> dict:
        w_f, w_a = run.loss_weights(batch)
        g = torch.Generator().manual_seed(run.cfg.seed * 100003 + run.step)
        # labels drawn for the global forget batch, this rank's rows taken (the same on any world size)
        yr = random_targets(batch.forget_y, run.num_classes, g, rows=batch.forget_rows, total=batch.n_forget)
        return {"random_label": w_f * F.cross_entropy(run.deployed(batch.forget_x), yr),
                "retention": w_a * F.cross_entropy(run.deployed(batch.proxy_x), batch.proxy_y)}

    def grad_masks(self, run) -> dict:
        """Top-q of |∇θ CE(f(x_f), y_f)| over all parameters, as a binary gradient mask (§10)."""
        params = [p for p in run.deployed.parameters() if p.requires_grad]
        run.set_train()
        loss = F.cross_entropy(run.deployed(run.fx), run.fy)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        mags = [g.abs() if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]
        return dict(zip(params, topq_mask(mags, run.cfg.importance_topq)))

    def optimizer_options(self, run) -> dict:
        # only masked weights move, so weight decay is folded into the gradient before the mask
        # (before_update) instead of being applied to every weight by the update [ours]
        return {**super().optimizer_options(run), "weight_decay": 0.0}

    def before_update(self, run) -> None:
        wd = run.cfg.weight_decay
        if wd > 0:
            for grp in run.opt.param_groups:
                with_grad = [p for p in grp["params"] if p.grad is not None]
                torch._foreach_add_([p.grad for p in with_grad], with_grad, alpha=wd)


register_method("salun", SalUn())
