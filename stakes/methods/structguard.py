"""StructGuard (METHOD.md §4-9): deletion, retention through the projector, structure alignment to
the frozen original against the semantic anchors, the structure-aware regulariser (importance in
the fused update) and the classifier elastic net."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fused
from stakes.methods.base import Batch, UnlearningMethod, finish_importance, register_method


class StructGuard(UnlearningMethod):
    needs_anchors = True
    paper_preset: dict = {}   # the paper's own recipe is the `paper` preset itself

    def check(self, run) -> None:
        cfg = run.cfg
        if not cfg.warm_start and cfg.projector_lr == 0:
            raise ValueError("config.projector_lr=0 needs warm_start=True for StructGuard: a cold projector that is "
                             "never trained stays a random map on the deployed path (set projector_lr > 0, e.g. "
                             "0.009 as in the paper, or warm_start=True)")

    def needs_projector(self, run) -> bool:
        """The projector, except a warm-started one that is never trained: that one is the identity
        on the features, so it is left out and the deployed model is h∘g."""
        return not (run.cfg.warm_start and run.cfg.projector_lr == 0)

    @staticmethod
    def structure_input(run, x: torch.Tensor):
        """(projector output, v^unl before normalisation).

        Paper: v^unl = z, the projector's d_a-dim representation (§4). With the deployed-model warm
        start [ours], v^unl = p(g(x))·R_p instead: the structure of what the head actually sees, read
        through the same fixed R_p as the original branch, so both structures coincide at step 0.
        """
        if run.projector is None:   # fixed warm start: the deployed representation is g(x) itself
            out = run.features(x)
            return out, out @ run.rp
        out, z = run.projector(run.features(x))
        if run.cfg.warm_start:
            z = out @ run.rp
        return out, z

    def loss_terms(self, run, batch: Batch) -> dict:
        cfg = run.cfg
        w_f, w_a = run.loss_weights(batch)
        # deletion through h∘g (no projector, §7) or the deployed model [ours]; retention and
        # alignment through the projector (§8)
        del_model = run.deployed if cfg.deletion_path == "deployed" else (lambda x: run.head(run.features(x)))
        terms = {"deletion": w_f * run.deletion(del_model(batch.forget_x), batch.forget_y)}
        out, z = self.structure_input(run, batch.proxy_x)
        terms["retention"] = w_a * F.cross_entropy(run.head(out), batch.proxy_y)
        terms["alignment"] = cfg.align_weight * fused.structure_alignment_loss(
            z, run.orig_structure_input(batch.proxy_x), run.anchors, backend=cfg.backend)
        w = run.head.weight
        terms["classifier_reg"] = cfg.cr_weight * (0.99 * w.abs().sum() + 0.5 * 0.01 * w.pow(2).sum())
        return terms

    def _importance_loss(self, run, xb: torch.Tensor) -> torch.Tensor:
        """The mean over ``xb`` of the loss whose gradient magnitude is the importance (see below)."""
        cfg = run.cfg
        _, z = self.structure_input(run, xb)
        if cfg.warm_start:
            return fused.anchor_similarity(z, run.anchors, backend=cfg.backend).pow(2).sum(1).mean()
        return fused.structure_alignment_loss(z, run.orig_structure_input(xb), run.anchors, backend=cfg.backend)

    def importance(self, run) -> dict:
        """I_p = (1/N_tot) Σ_B |B|·|∂L(B)/∂ψ_p| over proxy batches cycled to N_tot (§6).

        L is the alignment loss (the paper). With the deployed-model warm start both structures
        coincide at step 0, so the alignment loss sits at its minimum and its gradient is exactly
        zero; there L is the structure's own sensitivity, mean_i ‖S_i^unl‖² (MAS applied to the
        structure [ours]), which measures how much each parameter moves the anchor profile.
        """
        cfg = run.cfg
        params = list(run.features.parameters())
        imp = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        n_tot = max(cfg.importance_samples or run.retain_size or len(run.proxies), 1)
        seen = 0
        g = torch.Generator().manual_seed(cfg.seed + 31)
        run.set_train()
        while seen < n_tot:
            order = torch.randperm(len(run.proxies), generator=g).to(run.device)
            for i in range(0, len(order), cfg.proxy_batch_size):
                idx = order[i:i + cfg.proxy_batch_size]
                if seen >= n_tot:
                    break
                # the global batch's gradient (all-reduced over ranks in a data-parallel run), then |·|
                grads = run.batch_gradient(lambda xb: self._importance_loss(run, xb), run.proxies.x[idx], params)
                fused.accumulate_importance(imp, list(grads), weight=len(idx) / n_tot, backend=cfg.backend)
                seen += len(idx)
        if seen != n_tot:  # the last batch overshot N_tot: divide by the samples actually seen
            torch._foreach_mul_(imp, n_tot / seen)
        return finish_importance(dict(zip(params, imp)), cfg.importance, cfg.importance_topq)


register_method("structguard", StructGuard())
