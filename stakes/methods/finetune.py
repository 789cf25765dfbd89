"""Fine-tune (METHOD.md §10): cross-entropy on the proxies alone (no deletion term)."""

from __future__ import annotations

import torch.nn.functional as F

from stakes.methods.base import Batch, UnlearningMethod, register_method


class FineTune(UnlearningMethod):
    def loss_terms(self, ctx, batch: Batch) -> dict:
        return {"retention": F.cross_entropy(ctx.deployed(batch.proxy_x), batch.proxy_y)}


register_method("finetune", FineTune())
