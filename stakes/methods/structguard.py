"""StructGuard (METHOD.md §4-9): deletion, retention through the projector, structure alignment to
the frozen original against the semantic anchors, the structure-aware regulariser (importance in
the fused update) and the classifier elastic net."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

import fused
from stakes.config import MethodConfig
from stakes.methods.base import Batch, UnlearningMethod, Variant, finish_importance, register_method

IMPORTANCE_KINDS = ("dense", "topq", "inverted")
DELETION_PATHS = ("features_head", "deployed")


@dataclass
class StructGuardConfig(MethodConfig):
    """StructGuard's own options (``--set structguard.NAME=value``; the plain name works where it is unambiguous)."""

    align_weight: float = 1.0        # weight of L_align (§5)
    cr_weight: float = 0.001         # classifier elastic net weight (§8)
    deletion_path: str = "features_head"   # delete through h∘g (§7) or the deployed h∘p∘g [ours]
    importance: str = "dense"        # "dense" | "topq" (binary top-q mask) | "inverted" (L2UL-style) (§6)
    importance_topq: float = 0.5
    importance_samples: Optional[int] = None   # N_tot; None -> |D_r| = train size − k when known
    projector_lr: float = 0.009      # 0 -> the (warm-started) projector stays fixed [ours]
    warm_start: bool = False         # projector initialised so that h∘p∘g == h∘g at step 0 (§13) [ours]

    PRESETS: ClassVar[dict] = {
        "paper": {},
        # §13's fixes [ours]: the deployed-model warm start with the projector kept fixed (so the deployed
        # model is h∘g, whose backbone the structure terms protect), deletion through the deployed model
        "stable": dict(warm_start=True, projector_lr=0.0, deletion_path="deployed"),
    }

    def validate(self):
        from stakes.config import _check_bool, _check_choice, _check_number

        own = "structguard"
        for name in ("align_weight", "cr_weight", "projector_lr"):
            _check_number(own, name, getattr(self, name), allow_zero=True)
        _check_choice(own, "deletion_path", self.deletion_path, DELETION_PATHS)
        _check_choice(own, "importance", self.importance, IMPORTANCE_KINDS)
        if isinstance(self.importance_topq, bool) or not isinstance(self.importance_topq, (int, float)) \
                or not 0.0 < self.importance_topq <= 1.0:
            raise ValueError(f"structguard.importance_topq must be in (0, 1], got {self.importance_topq!r}")
        if self.importance_samples is not None:
            _check_number(own, "importance_samples", self.importance_samples, integer=True)
        _check_bool(own, "warm_start", self.warm_start)
        if not self.warm_start and self.projector_lr == 0:
            raise ValueError("structguard.projector_lr=0 needs warm_start=True: a cold projector that is never trained "
                             "stays a random map on the deployed path (set projector_lr > 0, e.g. 0.009 as in the "
                             "paper, or warm_start=True)")
        return self


class StructGuard(UnlearningMethod):
    config_class = StructGuardConfig
    needs_anchors = True
    paper_preset: dict = {}   # the paper's own recipe is the `paper` preset itself
    ablation_names = ("warm-start", "projector")

    def ablation(self, name: str, options: StructGuardConfig) -> Variant:
        """``warm-start``: the deployed-model warm start flipped (the paper's cold projector is
        trained: it would stay random otherwise); ``projector``: the warm-started projector's
        training flipped (fixed ↔ trained at the default projector_lr)."""
        default_lr = StructGuardConfig.projector_lr
        if name == "warm-start":
            flip = {"warm_start": not options.warm_start}
            if options.warm_start and options.projector_lr == 0:
                flip["projector_lr"] = default_lr
            return Variant(f"{self.key}-cold" if options.warm_start else f"{self.key}+warm", flip)
        if name == "projector":
            if not options.warm_start:
                raise ValueError("the projector ablation needs the deployed-model warm start (a fixed cold projector "
                                 "is a fixed random map); use the stable preset or --set warm_start=true")
            fixed = options.projector_lr == 0
            return Variant(f"{self.key}-trainproj" if fixed else f"{self.key}-fixedproj",
                           {"projector_lr": default_lr if fixed else 0.0})
        return super().ablation(name, options)

    def needs_projector(self, ctx) -> bool:
        """The projector, except a warm-started one that is never trained: that one is the identity
        on the features, so it is left out and the deployed model is h∘g."""
        return not (ctx.options.warm_start and ctx.options.projector_lr == 0)

    @staticmethod
    def structure_input(ctx, x: torch.Tensor):
        """(projector output, v^unl before normalisation).

        Paper: v^unl = z, the projector's d_a-dim representation (§4). With the deployed-model warm
        start [ours], v^unl = p(g(x))·R_p instead: the structure of what the head actually sees, read
        through the same fixed R_p as the original branch, so both structures coincide at step 0.
        """
        if ctx.projector is None:   # fixed warm start: the deployed representation is g(x) itself
            out = ctx.features(x)
            return out, out @ ctx.rp
        out, z = ctx.projector(ctx.features(x))
        if ctx.options.warm_start:
            z = out @ ctx.rp
        return out, z

    def loss_terms(self, ctx, batch: Batch) -> dict:
        opts, backend = ctx.options, ctx.config.backend
        w_f, w_a = ctx.loss_weights(batch)
        # deletion through h∘g (no projector, §7) or the deployed model [ours]; retention and
        # alignment through the projector (§8)
        del_model = ctx.deployed if opts.deletion_path == "deployed" else (lambda x: ctx.head(ctx.features(x)))
        terms = {"deletion": w_f * ctx.deletion(del_model(batch.forget_x), batch.forget_y)}
        out, z = self.structure_input(ctx, batch.proxy_x)
        terms["retention"] = w_a * F.cross_entropy(ctx.head(out), batch.proxy_y)
        terms["alignment"] = opts.align_weight * fused.structure_alignment_loss(
            z, ctx.orig_structure_input(batch.proxy_x), ctx.anchors, backend=backend)
        w = ctx.head.weight
        terms["classifier_reg"] = opts.cr_weight * (0.99 * w.abs().sum() + 0.5 * 0.01 * w.pow(2).sum())
        return terms

    def _importance_loss(self, ctx, xb: torch.Tensor) -> torch.Tensor:
        """The mean over ``xb`` of the loss whose gradient magnitude is the importance (see below)."""
        backend = ctx.config.backend
        _, z = self.structure_input(ctx, xb)
        if ctx.options.warm_start:
            return fused.anchor_similarity(z, ctx.anchors, backend=backend).pow(2).sum(1).mean()
        return fused.structure_alignment_loss(z, ctx.orig_structure_input(xb), ctx.anchors, backend=backend)

    def importance(self, ctx) -> dict:
        """I_p = (1/N_tot) Σ_B |B|·|∂L(B)/∂ψ_p| over proxy batches cycled to N_tot (§6).

        L is the alignment loss (the paper). With the deployed-model warm start both structures
        coincide at step 0, so the alignment loss sits at its minimum and its gradient is exactly
        zero; there L is the structure's own sensitivity, mean_i ‖S_i^unl‖² (MAS applied to the
        structure [ours]), which measures how much each parameter moves the anchor profile.
        """
        cfg, opts = ctx.config, ctx.options
        params = list(ctx.features.parameters())
        imp = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        n_tot = max(opts.importance_samples or ctx.retain_size or len(ctx.proxies), 1)
        seen = 0
        g = torch.Generator().manual_seed(cfg.seed + 31)
        ctx.train_mode()
        while seen < n_tot:
            order = torch.randperm(len(ctx.proxies), generator=g).to(ctx.device)
            for i in range(0, len(order), cfg.proxy_batch_size):
                idx = order[i:i + cfg.proxy_batch_size]
                if seen >= n_tot:
                    break
                # the global batch's gradient (all-reduced over ranks in a data-parallel run), then |·|
                grads = ctx.batch_gradient(lambda xb: self._importance_loss(ctx, xb), ctx.proxies.x[idx], params)
                fused.accumulate_importance(imp, list(grads), weight=len(idx) / n_tot, backend=cfg.backend)
                seen += len(idx)
        if seen != n_tot:  # the last batch overshot N_tot: divide by the samples actually seen
            torch._foreach_mul_(imp, n_tot / seen)
        return finish_importance(dict(zip(params, imp)), opts.importance, opts.importance_topq)


register_method("structguard", StructGuard())
