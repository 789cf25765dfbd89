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
from stakes.execution import eager_copy
from stakes.methods.base import Batch, UnlearningMethod, Variant, finish_importance, register_method

IMPORTANCE_KINDS = ("dense", "topq", "inverted")
DELETION_PATHS = ("features_head", "deployed")
IMPORTANCE_ORDERS = ("shuffled", "loader")
IMPORTANCE_REFERENCES = ("eval", "train_copy")
IMPORTANCE_PROJECTORS = ("live", "copy")
PROJECTOR_ZS = ("hidden", "hidden_relu")


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
    # How the importance pass runs (§9a.5); stakes' choices first:
    importance_step: int = 0         # 0: before the first step; s > 0: during step s, after its forward
                                     # (the authors': 2, after one update)
    importance_order: str = "shuffled"   # proxy batches reshuffled each pass, or "loader": in index order,
                                         # the same ⌈N_s/B⌉ batches cycled (the authors' unshuffled loader)
    importance_reference: str = "eval"   # S^ori from the frozen original in eval mode, or "train_copy": a
                                         # train-mode copy of it (BatchNorm on the batch's statistics)
    importance_projector: str = "live"   # the run's projector, or "copy": a copy of it (its BatchNorm
                                         # statistics are then not updated by the pass)
    projector_z: str = "hidden"      # z for d_f ≠ d_a: the hidden layer before BatchNorm, or "hidden_relu":
                                     # after BatchNorm and ReLU, by a second pass through them (the authors'
                                     # CIFAR-100 script)

    PRESETS: ClassVar[dict] = {
        "paper": {},
        # §13's fixes [ours]: the deployed-model warm start with the projector kept fixed (so the deployed
        # model is h∘g, whose backbone the structure terms protect), deletion through the deployed model
        "stable": dict(warm_start=True, projector_lr=0.0, deletion_path="deployed"),
        # §9a.5: the importance as the authors' script computes it
        "authors": dict(importance_step=2, importance_order="loader", importance_reference="train_copy",
                        importance_projector="copy", projector_z="hidden_relu"),
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
        _check_number(own, "importance_step", self.importance_step, allow_zero=True, integer=True)
        _check_choice(own, "importance_order", self.importance_order, IMPORTANCE_ORDERS)
        _check_choice(own, "importance_reference", self.importance_reference, IMPORTANCE_REFERENCES)
        _check_choice(own, "importance_projector", self.importance_projector, IMPORTANCE_PROJECTORS)
        _check_choice(own, "projector_z", self.projector_z, PROJECTOR_ZS)
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
    # ... and the authors' script the `authors` preset, whose StructGuard attacks the model their L2UL
    # baseline unlearned first (its own options: PRESETS)
    authors_preset: dict = {"proxy_model": "l2ul"}
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
    def structure_input(ctx, x: torch.Tensor, projector=None):
        """(projector output, v^unl before normalisation); ``projector``: another projector than the
        run's (the importance pass's copy).

        Paper: v^unl = z, the projector's d_a-dim representation (§4; ``projector_z``). With the
        deployed-model warm start [ours], v^unl = p(g(x))·R_p instead: the structure of what the head
        actually sees, read through the same fixed R_p as the original branch, so both structures
        coincide at step 0.
        """
        projector = ctx.projector if projector is None else projector
        if projector is None:   # fixed warm start: the deployed representation is g(x) itself
            out = ctx.features(x)
            return out, out @ ctx.rp
        h = ctx.features(x)
        out, z = projector(h)
        if ctx.options.warm_start:
            z = out @ ctx.rp
        elif ctx.options.projector_z == "hidden_relu" and projector.feature_dim != projector.hidden_dim:
            z = F.relu(projector.bn(projector.fc1(h)))   # the authors' CIFAR-100 z: a second pass
        return out, z

    def importance_step(self, ctx) -> int:
        return ctx.options.importance_step

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

    def _importance_loss(self, ctx, xb: torch.Tensor, projector=None, reference=None) -> torch.Tensor:
        """The mean over ``xb`` of the loss whose gradient magnitude is the importance (see below);
        ``projector`` and ``reference`` (a classifier whose features give S^ori) stand in for the
        run's projector and frozen original."""
        backend = ctx.config.backend
        _, z = self.structure_input(ctx, xb, projector)
        if ctx.options.warm_start:
            return fused.anchor_similarity(z, ctx.anchors, backend=backend).pow(2).sum(1).mean()
        if reference is None:
            ref = ctx.orig_structure_input(xb)
        else:
            with torch.no_grad():
                ref = reference.features(xb) @ ctx.rp
        return fused.structure_alignment_loss(z, ref, ctx.anchors, backend=backend)

    def importance(self, ctx) -> dict:
        """I_p = (1/N_tot) Σ_B |B|·|∂L(B)/∂ψ_p| over proxy batches cycled to N_tot (§6).

        L is the alignment loss (the paper). With the deployed-model warm start both structures
        coincide at step 0, so the alignment loss sits at its minimum and its gradient is exactly
        zero; there L is the structure's own sensitivity, mean_i ‖S_i^unl‖² (MAS applied to the
        structure [ours]), which measures how much each parameter moves the anchor profile.

        The batches: reshuffled on every pass over the proxies, or (``importance_order="loader"``)
        in index order, the same ⌈N_s/B⌉ batches cycled. The backbone runs in the run's training
        mode (with ``bn_train_mode`` its BatchNorm statistics take one update a batch). With
        ``importance_projector="copy"`` a copy of the projector (in its current mode) and with
        ``importance_reference="train_copy"`` a train-mode copy of the frozen original stand in
        for them (§9a.5).
        """
        cfg, opts = ctx.config, ctx.options
        params = list(ctx.features.parameters())
        imp = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        n_tot = max(opts.importance_samples or ctx.retain_size or len(ctx.proxies), 1)
        seen = 0
        g = torch.Generator().manual_seed(cfg.seed + 31)
        projector = eager_copy(ctx.projector) if opts.importance_projector == "copy" and ctx.projector is not None \
            else None
        reference = eager_copy(ctx.orig).train() if opts.importance_reference == "train_copy" else None
        ctx.train_mode()
        if projector is not None:   # the copy keeps the mode the live projector has now
            projector.train(ctx.projector.training)
        n_s = len(ctx.proxies)
        while seen < n_tot:
            order = torch.randperm(n_s, generator=g).to(ctx.device) if opts.importance_order == "shuffled" else None
            for i in range(0, n_s, cfg.proxy_batch_size):
                if seen >= n_tot:
                    break
                rows = order[i:i + cfg.proxy_batch_size] if order is not None else slice(i, i + cfg.proxy_batch_size)
                xb = ctx.proxies.x[rows]
                # the global batch's gradient (all-reduced over ranks in a data-parallel run), then |·|
                grads = ctx.batch_gradient(lambda part: self._importance_loss(ctx, part, projector, reference), xb, params)
                fused.accumulate_importance(imp, list(grads), weight=len(xb) / n_tot, backend=cfg.backend)
                seen += len(xb)
        if seen != n_tot:  # the last batch overshot N_tot: divide by the samples actually seen
            torch._foreach_mul_(imp, n_tot / seen)
        return finish_importance(dict(zip(params, imp)), opts.importance, opts.importance_topq)


register_method("structguard", StructGuard())
