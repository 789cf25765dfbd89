"""Adv (METHOD.md §10): deletion on the forget set plus cross-entropy retention on the adversarial
proxies (their target labels), weighted like StructGuard's."""

from __future__ import annotations

import torch.nn.functional as F

from stakes.methods.base import Batch, UnlearningMethod, register_method


class Adv(UnlearningMethod):
    def loss_terms(self, ctx, batch: Batch) -> dict:
        w_f, w_a = ctx.loss_weights(batch)
        return {"deletion": w_f * ctx.deletion(ctx.deployed(batch.forget_x), batch.forget_y),
                "retention": w_a * F.cross_entropy(ctx.deployed(batch.proxy_x), batch.proxy_y)}


register_method("adv", Adv())
