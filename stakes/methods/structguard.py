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
    importance_passes: str = "one"   # "one": each distinct batch once (the loader's repeats weighted by their
                                     # visits; one reshuffled pass); "all": every visit computed (see importance)
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
        _check_choice(own, "importance_passes", self.importance_passes, ("one", "all"))
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
            z, ctx.proxy_structure_input(batch), ctx.anchors, backend=backend)
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

        ``importance_passes="one"`` (the default) computes each distinct batch once: the loader's
        repeated batches once each, weighted by how often the estimator visits them (the same
        value, to rounding; the BatchNorm statistics of a training-mode backbone get the updates of
        every visit, in order, from each batch's statistics: the network is fixed during the pass);
        the reshuffled estimator one pass over the proxies (N_tot ≥ N_s: each pass is a random
        partition of the same proxies, so one pass has the expectation of their average; N_tot <
        N_s: unchanged). ``"all"`` computes every visit.
        """
        cfg, opts = ctx.config, ctx.options
        params = list(ctx.features.parameters())
        imp = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        n_s, size = len(ctx.proxies), cfg.proxy_batch_size
        n_tot = max(opts.importance_samples or ctx.retain_size or n_s, 1)
        projector = eager_copy(ctx.projector) if opts.importance_projector == "copy" and ctx.projector is not None \
            else None
        reference = eager_copy(ctx.orig).train() if opts.importance_reference == "train_copy" else None
        ctx.train_mode()
        if projector is not None:   # the copy keeps the mode the live projector has now
            projector.train(ctx.projector.training)
        batches, visits, seen = importance_plan(n_s, size, n_tot, opts.importance_order, opts.importance_passes,
                                                torch.Generator().manual_seed(cfg.seed + 31))
        if len(visits) > len(batches) and _train_norms(ctx.features) and ctx._strategy.dist.enabled:
            # the closed form of the repeated statistics needs this rank's batch: compute every visit
            batches, visits = [batches[v] for v in visits], list(range(len(visits)))
        stats = _RepeatedStatistics(ctx.features) if len(visits) > len(batches) else None
        counts = [visits.count(b) for b in range(len(batches))]
        for b, (rows, count) in enumerate(zip(batches, counts)):
            xb = ctx.proxies.x[rows.to(ctx.device) if isinstance(rows, torch.Tensor) else rows]
            if stats is not None:
                stats.batch = b
            # the global batch's gradient (all-reduced over ranks in a data-parallel run), then |·|
            grads = ctx.batch_gradient(lambda part: self._importance_loss(ctx, part, projector, reference), xb, params)
            fused.accumulate_importance(imp, list(grads), weight=count * len(xb) / n_tot, backend=cfg.backend)
        if stats is not None:
            stats.replay(visits)
        if seen != n_tot:  # the last batch overshot N_tot: divide by the samples actually seen
            torch._foreach_mul_(imp, n_tot / seen)
        return finish_importance(dict(zip(params, imp)), opts.importance, opts.importance_topq)


def importance_plan(n_s: int, size: int, n_tot: int, order: str, passes: str, generator: torch.Generator) -> tuple:
    """The importance pass's batches (the rows of each distinct batch: index tensors of a shuffle, or
    slices of the loader's order), the estimator's visits in order (indices into the batches) and the
    samples it sees: batches of ``size`` over ``n_s`` proxies, cycled until ``n_tot`` samples
    (``passes="all"``), or each distinct batch once (``"one"``, see :meth:`StructGuard.importance`)."""
    if order == "shuffled" and passes == "one":
        n_tot = min(n_tot, n_s)   # one pass of the reshuffled estimator (unchanged when N_tot ≤ N_s)
    batches, visits, seen = [], [], 0
    while seen < n_tot:
        perm = torch.randperm(n_s, generator=generator) if order == "shuffled" else None
        for j, i in enumerate(range(0, n_s, size)):
            if seen >= n_tot:
                break
            if perm is not None:
                batches.append(perm[i:i + size])
                visits.append(len(batches) - 1)
            else:
                if passes == "all" or len(batches) <= j:
                    batches.append(slice(i, min(i + size, n_s)))
                visits.append(j if passes == "one" else len(batches) - 1)
            seen += min(size, n_s - i)
    return batches, visits, seen


def _train_norms(module: torch.nn.Module) -> list:
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and m.training and m.track_running_stats]


class _RepeatedStatistics:
    """The running statistics a training-mode backbone's BatchNorm layers would reach if every visit
    of the importance pass ran a forward, from one forward per distinct batch: each batch's mean and
    (unbiased) variance are recorded as it passes, and the running statistics are then rewound and
    advanced through the visits in order (r ← (1 − m)·r + m·s, m the momentum, 1/n for a cumulative
    average). Exact up to rounding: the network does not change during the pass."""

    def __init__(self, module: torch.nn.Module):
        self.norms = _train_norms(module)
        self.start = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                      for m in self.norms]
        self.seen: dict = {}   # (norm, batch) → (mean, var)
        self.batch = 0
        self.hooks = [m.register_forward_pre_hook(self._record(i)) for i, m in enumerate(self.norms)]

    def _record(self, i: int):
        def hook(module, args):
            key = (i, self.batch)
            if key not in self.seen:
                x = args[0].detach().float()
                dims = [0, *range(2, x.dim())]
                self.seen[key] = (x.mean(dims), x.var(dims, unbiased=True))
        return hook

    @torch.no_grad()
    def replay(self, visits: list) -> None:
        for h in self.hooks:
            h.remove()
        for i, (m, (mean0, var0, n0)) in enumerate(zip(self.norms, self.start)):
            mean, var, n = mean0.clone(), var0.clone(), int(n0)
            for b in visits:
                n += 1
                f = m.momentum if m.momentum is not None else 1.0 / n
                bm, bv = self.seen[(i, b)]
                mean.mul_(1 - f).add_(bm.to(mean.dtype), alpha=f)
                var.mul_(1 - f).add_(bv.to(var.dtype), alpha=f)
            # through .data: the buffers' version counters stay where a training-mode forward of the
            # current step left them (the authors' importance runs between a step's forward and its
            # backward, which saves these buffers but, in training mode, reads only the batch's own
            # statistics); a forward would have updated them in place, without autograd seeing it
            m.running_mean.data.copy_(mean)
            m.running_var.data.copy_(var)
            m.num_batches_tracked.data.fill_(n)


register_method("structguard", StructGuard())
