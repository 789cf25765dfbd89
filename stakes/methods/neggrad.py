"""NegGrad (METHOD.md §10): the deletion loss on the forget set alone, no retained data, no proxies."""

from __future__ import annotations

from stakes.methods.base import Batch, UnlearningMethod, register_method


class NegGrad(UnlearningMethod):
    uses_proxies = False

    def loss_terms(self, ctx, batch: Batch) -> dict:
        return {"deletion": ctx.deletion(ctx.deployed(batch.forget_x), batch.forget_y)}


register_method("neggrad", NegGrad())
