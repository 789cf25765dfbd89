"""SalUn (METHOD.md §10): random-label cross-entropy on the forget set plus proxy retention, through
a binary saliency mask (top-q of |∇θ CE(f(x_f), y_f)|) on the gradients."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stakes.config import MethodConfig
from stakes.methods.base import Batch, UnlearningMethod, register_method, topq_mask


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

    def __init__(self):
        self._shifts = weakref.WeakKeyDictionary()   # run context → (first step, its epoch's shifts on the device)

    def loss_terms(self, ctx, batch: Batch) -> dict:
        w_f, w_a = ctx.loss_weights(batch)
        # random labels ≠ y: y + U{1..C−1} mod C, drawn for the global forget batch and this rank's rows
        # taken (the same on any world size)
        shift = self._step_shifts(ctx, batch)[:batch.n_forget][batch.forget_rows]
        yr = (batch.forget_y + shift) % ctx.num_classes
        return {"random_label": w_f * F.cross_entropy(ctx.deployed(batch.forget_x), yr),
                "retention": w_a * F.cross_entropy(ctx.deployed(batch.proxy_x), batch.proxy_y)}

    def _step_shifts(self, ctx, batch: Batch) -> torch.Tensor:
        """This step's label shifts U{1..C−1}, from a generator keyed by (seed, step). The shifts of
        the epoch's remaining steps are drawn on the host at its first step and copied to the device
        in one go: a copy a step would make the host wait for the device every step."""
        first, table = self._shifts.get(ctx, (0, None))
        if table is None or not first <= ctx.step < first + len(table):
            if ctx.num_classes < 2:
                raise ValueError(f"SalUn's random labels need num_classes >= 2, got {ctx.num_classes}")
            cfg = ctx.config
            remaining = max(1, math.ceil(len(ctx.proxies) / cfg.proxy_batch_size) - batch.index)
            width = max(batch.n_forget, min(cfg.forget_batch_size, len(ctx.forget_y)))
            # a row of the widest forget batch per step: a narrower batch takes its first values, which are
            # the values a draw of its own size gives (the CPU generator draws them in order)
            rows = [torch.randint(1, ctx.num_classes, (width,),
                                  generator=torch.Generator().manual_seed(cfg.seed * 100003 + step))
                    for step in range(ctx.step, ctx.step + remaining)]
            first, table = ctx.step, torch.stack(rows).to(ctx.device)
            self._shifts[ctx] = (first, table)
        return table[ctx.step - first]

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
