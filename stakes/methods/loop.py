"""The loop that runs every unlearning method (StructGuard, METHOD.md §4-9, the baselines of §10 and
a user's registered ones) under one API and one stopping rule.

    result = stakes.unlearn(model, (forget_x, forget_y), method="structguard", anchors=A)

The loop knows no method names: a method (:mod:`stakes.methods.base`) gives its loss terms,
importance or mask, optimiser groups and options. Every method runs the same loop: an epoch zips the proxy batches with a cycled forget loader; the
update is :class:`fused.optim.StructureSGD` (the fused masked, regularised step) for every method,
so L2UL's inverted importance, SalUn's saliency mask and StructGuard's structure importance all go
through the same kernel; the run stops at the end of the first epoch where the deployed model
misclassifies every forget image (forget accuracy 0 %), after at most ``max_epochs``.

Between logging points a step makes no host synchronisation: a non-finite loss is recorded in a
flag on the device and raised (:class:`NonFiniteError`, naming the first bad step and the terms)
at the next log point, epoch end or the end of the run.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import fused
from fused.optim import StructureSGD
from stakes import distributed as dist_
from stakes._io import atomic_torch_save
from stakes.config import UnlearnConfig, deterministic_algorithms, preset
from stakes.methods.base import Batch, UnlearningMethod, ce_bounded, get_method, margin_deletion
from stakes.metrics import accuracy, accuracy_from_logits, structure_drift
from stakes.proxy import ProxySet, calibrate_radius, generate_proxies


class NonFiniteError(RuntimeError):
    """A loss or parameter became NaN/inf; the run is stopped and nothing is written."""


# ----------------------------------------------------------------------------- model pieces


class Projector(nn.Module):
    """p_ω: Linear(d_f, d_a) → BatchNorm1d → ReLU → Linear(d_a, d_f) (METHOD.md §7).

    ``forward`` returns ``(out, z)``: the d_f-dimensional output fed to the head and the
    d_a-dimensional representation z whose anchor structure is aligned (§4). For d_f == d_a, z is
    the output; otherwise z is the first linear layer's output (the hidden layer of width d_a,
    before BatchNorm) [ours].
    """

    def __init__(self, feature_dim: int, anchor_dim: int, hidden_dim: Optional[int] = None):
        super().__init__()
        hidden_dim = anchor_dim if hidden_dim is None else hidden_dim
        self.feature_dim, self.anchor_dim, self.hidden_dim = feature_dim, anchor_dim, hidden_dim
        self.fc1 = nn.Linear(feature_dim, hidden_dim)
        self.bn = nn.BatchNorm1d(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, feature_dim)
        self.frozen_bn = False   # warm start keeps BatchNorm statistics fixed

    def forward(self, h: torch.Tensor):
        hidden = self.fc1(h)
        out = self.fc2(F.relu(self.bn(hidden)))
        z = out if self.feature_dim == self.hidden_dim else hidden
        return out, z

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_bn:
            self.bn.eval()
        return self

    @torch.no_grad()
    def warm_start(self, init_std: float = 0.01, generator: Optional[torch.Generator] = None) -> None:
        """Initialise so that ``out == h`` for every h ≥ 0 (METHOD.md §13 [ours]).

        Pooled CNN features are non-negative (they come out of a ReLU), so an identity embedding
        passes them through: fc1 = [I; W'] (the extra d_a − d_f hidden units get small random rows W'
        and zero outgoing weights, so they start silent but can learn), BatchNorm frozen as the
        identity (eval mode, zero mean, unit variance), fc2 = [I, 0]. Needs a hidden width ≥ d_f
        (the unlearner builds the projector with width max(d_a, d_f) when warm-starting).
        """
        d_f, d_a = self.feature_dim, self.hidden_dim
        if d_a < d_f:
            raise ValueError(f"warm start needs hidden width >= feature dim, got {d_a} < {d_f}")
        w1 = torch.zeros(d_a, d_f)
        w1[:d_f] = torch.eye(d_f)
        w1[d_f:] = torch.randn(d_a - d_f, d_f, generator=generator) * init_std
        self.fc1.weight.copy_(w1)
        self.fc1.bias.zero_()
        self.bn.reset_running_stats()
        self.bn.running_var.fill_(1.0 - self.bn.eps)   # (x − 0) / sqrt(1 − eps + eps) = x
        self.bn.weight.fill_(1.0)
        self.bn.bias.zero_()
        self.frozen_bn = True
        self.bn.eval()
        w2 = torch.zeros(d_f, d_a)
        w2[:, :d_f] = torch.eye(d_f)
        self.fc2.weight.copy_(w2)
        self.fc2.bias.zero_()


def _capped_eval_set(name, pair, cfg: UnlearnConfig) -> tuple:
    """``(x, y)`` of one trajectory evaluation set, checked, and subsampled to ``cfg.eval_max_samples``
    (a fixed random subset per seed) so that logging stays cheap on large data sets."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(t, torch.Tensor) for t in pair):
        raise ValueError(f"eval_sets[{name!r}] must be a pair (images, labels) of tensors")
    x, y = pair
    if y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"eval_sets[{name!r}]: {x.shape[0]} images but labels of shape {tuple(y.shape)}")
    cap = cfg.eval_max_samples
    if cap is not None and len(y) > cap:
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed + 31337))[:cap]
        x, y = x[keep.to(x.device)], y[keep.to(y.device)]
    return x, y


class DeployedModel(nn.Module):
    """The model after unlearning: h_φ ∘ p_ω ∘ g_ψ (or h ∘ g for methods without a projector)."""

    def __init__(self, features: nn.Module, head: nn.Linear, projector: Optional[Projector] = None):
        super().__init__()
        self.features, self.head, self.projector = features, head, projector

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The representation the head sees: p(g(x)), or g(x) without a projector."""
        h = self.features(x)
        return h if self.projector is None else self.projector(h)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class _StepModule(nn.Module):
    """What DistributedDataParallel wraps in a data-parallel run: the trainable modules, and a
    forward that runs a closure over them (a step's loss terms, or an importance batch's loss)."""

    def __init__(self, features: nn.Module, head: nn.Module, projector: Optional[nn.Module]):
        super().__init__()
        self.features, self.head, self.projector = features, head, projector

    def forward(self, fn: Callable):
        return fn()


def random_projection(feature_dim: int, anchor_dim: int, seed: int) -> torch.Tensor:
    """R_p ∈ R^{d_f×d_a}: Gaussian with L2-normalised columns, fixed per run; identity if d_f == d_a."""
    if feature_dim == anchor_dim:
        return torch.eye(feature_dim)
    g = torch.Generator().manual_seed(seed + 104729)
    r = torch.randn(feature_dim, anchor_dim, generator=g)
    return r / r.norm(dim=0, keepdim=True)


# ----------------------------------------------------------------------------- results


@dataclass
class UnlearnResult:
    """What :func:`unlearn` returns."""

    method: str
    model: nn.Module                  # the deployed model (the user's own type for adapted models, see model_info)
    metrics: dict                     # final forget / retain / test accuracy etc. (percent)
    history: list                     # trajectory entries (step, accuracies, losses, drift)
    config: dict
    proxies: Optional[dict] = None    # n, eps, success_rate
    steps: int = 0
    epochs: int = 0
    stopped: str = ""                 # why the run ended
    wall_time_s: float = 0.0
    timings: dict = field(default_factory=dict)
    deployed: Optional[nn.Module] = None   # stakes' view of the deployed model: images in [0, 1] → logits
    model_info: dict = field(default_factory=dict)   # what ``model`` is: type, input normalisation
    distributed: dict = field(default_factory=lambda: dist_.SINGLE.record())   # world_size, backend


def _deployed_info(run) -> dict:
    """What :attr:`UnlearnResult.model` is: the user's own type (an adapted timm / torchvision /
    Hugging Face model, inputs normalised as before), or stakes' DeployedModel."""
    adapter = getattr(run.work, "adapter", None)
    if adapter is None:
        form = "h∘p∘g" if run.projector is not None else "h∘g"
        return {"type": "stakes.methods.DeployedModel", "form": form, "input": "images in [0, 1]"}
    info = {"source": adapter.kind, "normalization": dict(adapter.normalization)}
    if run.projector is None:
        info.update(type=adapter.model_type, form="h∘g",
                    input="as the model passed in (its own normalisation, not images in [0, 1])")
    else:
        info.update(type="stakes.methods.DeployedModel", form="h∘p∘g",
                    input="images in [0, 1] (the normalisation layer is inside)",
                    note=f"a trained projector sits between the features and the head, so the deployed model "
                         f"is stakes' own module, not a {adapter.model_type}")
    return info


# ----------------------------------------------------------------------------- helpers


def _as_parts(model):
    from stakes.models import as_classifier

    if isinstance(model, (tuple, list)) and len(model) == 2:
        return as_classifier(model[0], model[1])
    return as_classifier(model)


def _check_forget_set(forget_set, num_classes: int, device):
    if not isinstance(forget_set, (tuple, list)) or len(forget_set) != 2:
        raise TypeError("forget_set must be a pair (images [k, C, H, W], labels [k])")
    x, y = forget_set
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError("forget_set images must be a floating tensor [k, C, H, W] in [0, 1]")
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32) or y.shape != (x.shape[0],):
        raise ValueError(f"forget_set labels must be an integer tensor of shape [{x.shape[0]}]")
    if x.shape[0] == 0:
        raise ValueError("forget_set is empty: nothing to unlearn")
    if not torch.isfinite(x).all():
        raise ValueError("forget_set images contain NaN or inf")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"forget_set labels must lie in [0, {num_classes}) (the model's classes), got [{lo}, {hi}]")
    return x.to(device), y.long().to(device)


# ----------------------------------------------------------------------------- proxies


def build_proxies(model: nn.Module, forget_x: torch.Tensor, forget_y: torch.Tensor,
                  cfg: UnlearnConfig, *, distributed=None) -> tuple[ProxySet, dict]:
    """The proxy set of a run with config ``cfg`` (radius calibrated when ``cfg.eps`` is None).

    Exposed so that a comparison can build it once per (k, seed) and share it between methods.
    Returns the proxies and the time spent (``calibration_s``, ``proxies_s``).

    ``distributed`` (None: the default process group if initialised; False: this process alone):
    in a group the ranks share the calibration's attacks (rank 0's radius is broadcast) and the
    pairs' (:func:`stakes.proxy.calibrate_radius`, :func:`stakes.proxy.generate_proxies`); every
    rank returns the same set.
    """
    ctx = dist_.resolve(distributed)
    device = torch.device(cfg.device)
    clf = _as_parts(model)
    if any(p.device != device for p in clf.parameters()):
        clf = copy.deepcopy(clf).to(device)   # PGD runs where the config says, never on the caller's copy
    forget_x, forget_y = forget_x.to(device), forget_y.to(device)
    n_classes = clf.head.out_features
    t0 = time.perf_counter()
    eps, calibrated = cfg.eps, None
    if eps is None:   # calibrated once, each probe's attacks split over the ranks; rank 0's result broadcast
        eps, calibrated = calibrate_radius(clf, forget_x, forget_y, num_classes=n_classes,
                                           target_success=cfg.target_success, steps=cfg.pgd_steps,
                                           step_size=cfg.pgd_step_size, batch_size=cfg.pgd_batch_size,
                                           seed=cfg.seed, backend=cfg.backend, progress=cfg.progress,
                                           distributed=ctx)
        eps, calibrated = dist_.broadcast_object((eps, calibrated), ctx)
    t1 = time.perf_counter()
    proxies = generate_proxies(clf, forget_x, forget_y, num_classes=n_classes, repetitions=cfg.repetitions,
                               steps=cfg.pgd_steps, step_size=cfg.pgd_step_size, eps=eps,
                               batch_size=cfg.pgd_batch_size, seed=cfg.seed, backend=cfg.backend,
                               progress=cfg.progress, distributed=ctx)
    timings = {"calibration_s": t1 - t0 if calibrated is not None else 0.0, "proxies_s": time.perf_counter() - t1}
    return proxies, timings


# ----------------------------------------------------------------------------- the run


class _Run:
    """State of one unlearning run; the loop lives in :meth:`fit`, one step in :meth:`train_step`.

    ``method`` is a registered name or an :class:`UnlearningMethod`; the method's hooks get this
    object (see :class:`UnlearningMethod` for what they may use)."""

    def __init__(self, model, forget_set, method, anchors, cfg: UnlearnConfig, eval_sets, proxies, callbacks,
                 checkpoint_path, retain_size, dist_ctx: dist_.DistContext = dist_.SINGLE):
        self.method_def: UnlearningMethod = method if isinstance(method, UnlearningMethod) else get_method(method)
        self.method = self.method_def.name or type(self.method_def).__name__
        self.cfg = cfg
        self.dist = dist_ctx
        self.device = torch.device(cfg.device)
        dist_.group_device_ok(dist_ctx, self.device)
        self._ddp = None          # the DistributedDataParallel step module, built at first use
        self._replicated_checked = False
        torch.manual_seed(cfg.seed)
        clf = _as_parts(model)
        self.num_classes = clf.head.out_features
        self.fx, self.fy = _check_forget_set(forget_set, self.num_classes, self.device)
        self.k = self.fx.shape[0]
        # frozen original, and the copy that is unlearned (the user's model is never modified)
        self.orig = copy.deepcopy(clf).to(self.device).eval()
        for p in self.orig.parameters():
            p.requires_grad_(False)
        work = copy.deepcopy(clf).to(self.device)
        self.work = work
        self.features, self.head = work.features, work.head
        for p in work.parameters():
            p.requires_grad_(True)
        self.feature_dim = self.head.in_features
        self.eval_sets = {name: tuple(t.to(self.device) for t in _capped_eval_set(name, pair, cfg))
                          for name, pair in (eval_sets or {}).items()}
        self.callbacks = list(callbacks or ())
        self.checkpoint_path = checkpoint_path
        self.retain_size = retain_size
        self.history: list = []
        self.timings: dict = {}
        self.step = 0
        self.epoch = 0
        self._drift_orig: Optional[torch.Tensor] = None   # g_ψ0(x_test)·R_p, fixed for the run
        # non-finite losses, kept on the device (no host sync per step): first bad step, bad terms
        self._bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self._bad_terms: dict = {}
        self._checked_step = 0

        # anchors and random projection (needed by StructGuard, and by every method for drift logging)
        if anchors is None:
            if self.method_def.needs_anchors:
                raise ValueError(f"method {self.method!r} needs anchors: pass anchors=stakes.anchors.build_anchors(...)")
        else:
            if not isinstance(anchors, torch.Tensor) or anchors.dim() != 2 or not anchors.is_floating_point():
                raise ValueError("anchors must be a floating tensor [num_classes, d_a]")
            if anchors.shape[0] != self.num_classes:
                raise ValueError(f"anchors has {anchors.shape[0]} rows but the model has {self.num_classes} classes")
            if not torch.isfinite(anchors).all():
                raise ValueError("anchors contain NaN or inf")
        self.anchors = None if anchors is None else F.normalize(anchors.detach().float(), dim=1).to(self.device)
        self.anchor_dim = self.anchors.shape[1] if self.anchors is not None else self.feature_dim
        self.rp = random_projection(self.feature_dim, self.anchor_dim, cfg.seed).to(self.device)

        self.method_def.check(self)
        self.projector = None
        if self.method_def.needs_projector(self):
            hidden = max(self.anchor_dim, self.feature_dim) if cfg.warm_start else self.anchor_dim
            self.projector = Projector(self.feature_dim, self.anchor_dim, hidden).to(self.device)
        self.deployed = DeployedModel(self.features, self.head, self.projector)

        self.proxies = None if proxies is None else self._checked_proxies(proxies)
        self.opt: Optional[StructureSGD] = None
        self._model_digest = dist_.digest(clf.state_dict()) if dist_ctx.enabled else None

    # ------------------------------------------------------------------ set-up pieces
    def make_proxies(self) -> ProxySet:
        proxies, timings = build_proxies(self.orig, self.fx, self.fy, self.cfg, distributed=self.dist)
        self.timings.update(timings)
        return proxies

    # ------------------------------------------------------------------ data parallelism
    def check_launch(self) -> None:
        """A data-parallel run: every rank has the same method, config, forget set, model, anchors
        (and given proxies), and the world size fits the pairs and the smallest proxy batch."""
        ctx = self.dist
        if not ctx.enabled:
            return
        parts = {"method": self.method, "config": dist_.digest({**self._recipe(), "retain_size": self.retain_size}),
                 "forget_set": dist_.digest([self.fx, self.fy]), "model": self._model_digest,
                 "anchors": dist_.digest(self.anchors) if self.anchors is not None else "none"}
        if self.proxies is not None:
            parts["proxies"] = dist_.digest([self.proxies.x, self.proxies.y])
        dist_.check_same_across_ranks(parts, ctx, f"{self.method} run")
        n_s = len(self.proxies) if self.proxies is not None else self.cfg.repetitions * self.k
        smallest = n_s % self.cfg.proxy_batch_size or self.cfg.proxy_batch_size   # an epoch's last batch
        if self.proxies is None or self.method_def.uses_proxies:
            dist_.world_size_check(n_s, smallest if self.method_def.uses_proxies else n_s, ctx)

    def _step_module(self):
        """The DistributedDataParallel module whose forward runs a closure over the trainable modules
        (features, head, projector): its all-reduce averages the gradients of training and importance."""
        if self._ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            self._sync_batchnorm()
            step = _StepModule(self.features, self.head, self.projector)
            ids = None
            if self.device.type == "cuda":
                ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
            # find_unused_parameters: methods use different parts of the model (importance: the backbone)
            # buffers are never broadcast at forward: the ranks' buffers are equal (or synchronised BatchNorm)
            import inspect

            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                       inspect.signature(DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False})
            self._ddp = DistributedDataParallel(step, device_ids=ids, find_unused_parameters=True, **no_sync)
        return self._ddp

    def _sync_batchnorm(self) -> None:
        """BatchNorm layers that run in training mode on proxy shards use the global batch's statistics
        (torch.nn.SyncBatchNorm on CUDA; an all-reduce version on other devices)."""
        targets = []
        if self.cfg.bn_train_mode:
            targets.append(self.features)
        if self.projector is not None and not self.projector.frozen_bn:
            targets.append(self.projector)
        for module in targets:
            dist_.convert_sync_batchnorm(module, self.device)

    def batch_gradient(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                       params: Sequence[torch.Tensor]) -> list:
        """∇ of ``loss_fn`` over the global batch ``x``, where ``loss_fn(part)`` is the mean loss over
        ``part``; entries of unused parameters are None. One process: ``autograd.grad``. Data-parallel:
        each rank takes its shard of ``x`` and the gradient goes through the training all-reduce (DDP),
        so every rank gets the whole batch's gradient (before any absolute value is taken)."""
        if not self.dist.enabled:
            return list(torch.autograd.grad(loss_fn(x), params, allow_unused=True))
        part = x[self.dist.rows(len(x))]
        scale = self.dist.world_size * len(part) / len(x)   # DDP divides the sum by the world size
        ddp = self._step_module()
        for p in ddp.parameters():
            p.grad = None
        loss = ddp(lambda: loss_fn(part) * scale)
        loss.backward()
        grads = [p.grad for p in params]
        for p in ddp.parameters():
            p.grad = None
        return grads

    def _local_loss(self, batch: Batch):
        """This rank's loss (proxy terms weighted by its share of the global batch, W× for DDP's mean),
        the terms, and each term's contribution to the global value (summed over ranks at log points)."""
        terms = self.method_def.loss_terms(self, batch)
        if not self.dist.enabled:
            return sum(terms.values()), terms, terms
        w = self.dist.world_size
        shares = self._shares(batch)
        scaled = {n: v * (w * shares[n]) if n in shares else v for n, v in terms.items()}
        contrib = {n: (v * shares[n] if n in shares else v / w) for n, v in terms.items()}
        return sum(scaled.values()), terms, contrib

    def _shares(self, batch: Batch) -> dict:
        """This rank's share of the global batch, for each term that is a mean over a sharded batch
        (the proxy batch always; the forget batch when it is split)."""
        out = {n: batch.proxy_x.shape[0] / batch.n_proxy for n in self.method_def.proxy_terms}
        if batch.forget_total is not None:
            out.update({n: batch.forget_x.shape[0] / batch.n_forget for n in self.method_def.forget_terms})
        return out

    def _check_replicated(self, terms: dict, batch: Batch) -> None:
        """At the first data-parallel step: the terms that are not means over a sharded batch must
        agree on every rank."""
        self._replicated_checked = True
        sharded = self._shares(batch)
        names = [n for n in terms if n not in sharded]
        if not names:
            return
        mine = [float(torch.as_tensor(terms[n]).detach().double().sum()) for n in names]
        every = dist_.all_gather_object(mine, self.dist)
        bad = [n for j, n in enumerate(names)
               if any(not math.isclose(v[j], every[0][j], rel_tol=1e-5, abs_tol=1e-7) for v in every)]
        if bad:
            raise ValueError(f"method {self.method!r}: loss term(s) {bad} differ between ranks at the first step "
                             f"({', '.join(f'{n}: ' + str([round(v[names.index(n)], 6) for v in every]) for n in bad)}): "
                             "they depend on the rank's shard of the batch; list them in the method's proxy_terms or "
                             "forget_terms (terms that are means over the proxy or the forget batch) so that the "
                             "data-parallel gradient is the single-process one")

    def _global_terms(self, contrib: dict) -> dict:
        """The logged value of each term over the global batch (one all-reduce, at log points only)."""
        if not self.dist.enabled or not contrib:
            return contrib
        names = list(contrib)
        vec = torch.stack([torch.as_tensor(contrib[n]).detach().float().sum() for n in names])
        dist_.all_reduce_(vec, self.dist)
        return dict(zip(names, vec.unbind()))

    def orig_structure_input(self, x: torch.Tensor) -> torch.Tensor:
        """v^ori before normalisation: g_ψ0(x)·R_p (the op normalises rows)."""
        with torch.no_grad():
            return self.orig.features(x) @ self.rp

    def new_optimizer(self) -> StructureSGD:
        return StructureSGD(self.method_def.param_groups(self), **self.method_def.optimizer_options(self))

    def build_optimizer(self) -> StructureSGD:
        """The optimizer with the method's importance (SR term) and gradient masks, timed."""
        opt = self.new_optimizer()
        t0 = time.perf_counter()
        importance = self.method_def.importance(self)
        if importance is not None:
            opt.set_importance(importance)
        masks = self.method_def.grad_masks(self)
        if masks is not None:
            opt.set_grad_masks(masks)
        self.timings["importance_s"] = time.perf_counter() - t0
        return opt

    # ------------------------------------------------------------------ shared loss pieces
    def loss_weights(self, batch: Batch) -> tuple:
        """(w_f, w_a): the batch fractions n_f/(n_f+n_a), n_a/(n_f+n_a) of METHOD.md §8, or 1 and 1."""
        if self.cfg.loss_weighting == "equal":
            return 1.0, 1.0
        n_f, n_a = batch.n_forget, batch.n_proxy
        return n_f / (n_f + n_a), n_a / (n_f + n_a)

    def deletion(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The configured deletion loss on forget logits: −CE (ascent), bounded −CE or the margin loss."""
        cfg = self.cfg
        if cfg.deletion == "bounded":
            return -ce_bounded(logits, y, cfg.deletion_bound or (math.log(self.num_classes) + 1.0))
        if cfg.deletion == "margin":
            return margin_deletion(logits, y, cfg.deletion_margin)
        return -F.cross_entropy(logits, y)

    # ------------------------------------------------------------------ modes and evaluation
    def set_train(self):
        self.deployed.train()
        if not self.cfg.bn_train_mode:   # backbone BatchNorm statistics stay as pretrained [ours]
            self.features.eval()

    @torch.no_grad()
    def log_entry(self, losses: dict) -> dict:
        """A trajectory entry (accuracies, drift, losses), appended to the history. In a data-parallel
        run every rank calls it at the same steps, evaluates its shard of each evaluation set, and
        every rank appends the same entry (rank 0 alone calls the callbacks)."""
        t0 = time.perf_counter()
        entry = {"step": self.step, "epoch": self.epoch}
        self.deployed.eval()
        entry["forget_accuracy"] = accuracy(self.deployed, self.fx, self.fy)
        drift_set = "test" if self.anchors is not None and "test" in self.eval_sets else None
        if self.dist.enabled:
            entry.update(self._sharded_evaluation(drift_set))
        for name, (x, y) in (self.eval_sets.items() if not self.dist.enabled else ()):
            if name != drift_set:
                entry[f"{name}_accuracy"] = accuracy(self.deployed, x, y)
                continue
            # one backbone pass serves the accuracy and the drift; the original side is computed once
            feats = torch.cat([self.features(x[i:i + 512]) for i in range(0, len(x), 512)])
            emb = feats if self.projector is None else self.projector(feats)[0]
            entry[f"{name}_accuracy"] = accuracy_from_logits(self.head(emb), y)
            if self._drift_orig is None:
                self._drift_orig = torch.cat([self.orig_structure_input(x[i:i + 512])
                                              for i in range(0, len(x), 512)])
            entry["structure_drift"] = structure_drift(self._drift_orig, feats @ self.rp, self.anchors)
        entry.update({k: float(v) for k, v in losses.items()})
        self.set_train()
        self.check_finite(f"trajectory log at step {self.step}")
        self.history.append(entry)
        self.timings["eval_s"] = self.timings.get("eval_s", 0.0) + time.perf_counter() - t0
        for cb in (self.callbacks if self.dist.is_main else ()):
            cb(entry)
        return entry

    @torch.no_grad()
    def _sharded_evaluation(self, drift_set: Optional[str]) -> dict:
        """Accuracy on each evaluation set and the drift, each rank on its contiguous shard of the
        rows, the counts and sums all-reduced (one collective per log point)."""
        ctx = self.dist
        names, parts = list(self.eval_sets), []
        for name in names:
            x, y = (t[ctx.rows(len(t))] for t in self.eval_sets[name])
            correct, drift_sum = 0.0, 0.0
            if len(x):
                feats = torch.cat([self.features(x[i:i + 512]) for i in range(0, len(x), 512)])
                emb = feats if self.projector is None else self.projector(feats)[0]
                correct = float(self.head(emb).argmax(1).eq(y).sum())
                if name == drift_set:
                    if self._drift_orig is None:   # this rank's rows of the original side, computed once
                        self._drift_orig = torch.cat([self.orig_structure_input(x[i:i + 512])
                                                      for i in range(0, len(x), 512)])
                    drift_sum = structure_drift(self._drift_orig, feats @ self.rp, self.anchors) * len(x)
            parts += [correct, float(len(x)), drift_sum]
        totals = dist_.all_reduce_(torch.tensor(parts, dtype=torch.float64), ctx).tolist()
        out = {}
        for j, name in enumerate(names):
            correct, n, drift_sum = totals[3 * j: 3 * j + 3]
            # the single-process formula: a float32 mean of the hits, in percent
            out[f"{name}_accuracy"] = 100.0 * float(torch.tensor(correct, dtype=torch.float32) / n) if n else float("nan")
            if name == drift_set:
                out["structure_drift"] = drift_sum / n if n else float("nan")
        return out

    def check_finite(self, where: str):
        """Raise :class:`NonFiniteError` naming the first non-finite parameter (one host sync if none)."""
        named = [(f"{name}.{pname}", p) for name, module in
                 (("features", self.features), ("head", self.head), ("projector", self.projector))
                 if module is not None for pname, p in module.named_parameters()]
        if not named:
            return
        finite = torch.stack([torch.isfinite(p).all() for _, p in named])
        if bool(finite.all()):
            return
        bad = next(n for (n, _), ok in zip(named, finite.tolist()) if not ok)
        raise NonFiniteError(f"{self.method}: parameter {bad} became non-finite at step {self.step} ({where}); "
                             "the run was stopped and no model was written")

    # ------------------------------------------------------------------ checkpoints (resume)
    def fingerprint(self) -> dict:
        """What a checkpoint must match to be resumed by this run: the forget set and the recipe."""
        return {"method": self.method, "k": self.k, "forget_shape": list(self.fx.shape),
                "forget_labels": self.fy.tolist(), "forget_sum": float(self.fx.double().sum()), "config": self._recipe()}

    def _recipe(self) -> dict:
        """The config without what may differ between runs of the same recipe (progress, device, logging)."""
        return {k: v for k, v in self.cfg.to_dict().items() if k not in ("progress", "device", "log_every")}

    def state(self) -> dict:
        return {
            "fingerprint": self.fingerprint(), "step": self.step, "epoch": self.epoch,
            "features": self.features.state_dict(), "head": self.head.state_dict(),
            "projector": None if self.projector is None else self.projector.state_dict(),
            "projector_frozen_bn": None if self.projector is None else self.projector.frozen_bn,
            "optimizer": self.opt.state_dict(), "history": self.history, "timings": self.timings,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }

    def save_checkpoint(self):
        """The resumable state, atomically; the proxy set (large, fixed) goes to a side file once."""
        if not self.checkpoint_path:
            return
        self.check_finite("before writing the checkpoint")
        if not self.dist.is_main:   # rank 0 alone writes; the state is the same on every rank
            return
        side = self.checkpoint_path + ".proxies"
        if not getattr(self, "_proxies_saved", False):
            atomic_torch_save(self.proxies, side)
            self._proxies_saved = True
        atomic_torch_save(self.state(), self.checkpoint_path)

    def remove_checkpoint(self):
        if not self.dist.is_main:
            return
        for path in (self.checkpoint_path, (self.checkpoint_path or "") + ".proxies"):
            if path and os.path.exists(path):
                os.remove(path)

    def load_checkpoint(self, state: dict):
        saved, mine = state.get("fingerprint"), self.fingerprint()
        if saved != mine:
            diff = sorted(k for k in mine if (saved or {}).get(k) != mine[k])
            raise ValueError(f"checkpoint {self.checkpoint_path!r} belongs to a different run (differs in {diff}); "
                             "delete it or pass another checkpoint path")
        self.features.load_state_dict(state["features"])
        self.head.load_state_dict(state["head"])
        if self.projector is not None:
            self.projector.load_state_dict(state["projector"])
            self.projector.frozen_bn = bool(state.get("projector_frozen_bn"))
            self.projector.train(self.projector.training)
        side = self.checkpoint_path + ".proxies"
        self.proxies = self._checked_proxies(self._read_side_proxies(side))
        self._proxies_saved = True
        self.opt = self.new_optimizer()
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.history = list(state["history"])
        self.timings = dict(state["timings"])
        torch.set_rng_state(state["rng"].cpu())
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda_rng"]])

    def _read_side_proxies(self, side: str) -> ProxySet:
        """The checkpoint's proxy set: read by rank 0, broadcast to the others."""
        ctx = self.dist
        proxies = dist_.load_on_main(side, ctx, "the proxy set of the checkpoint", required=True,
                                     map_location=self.device if not ctx.enabled else "cpu")
        if not ctx.enabled:
            return proxies
        meta = dist_.broadcast_object(None if not ctx.is_main else
                                      {"eps": proxies.eps, "success_rate": proxies.success_rate}, ctx)
        x, y, src = (dist_.broadcast_tensor(getattr(proxies, name) if ctx.is_main else None, ctx, device="cpu")
                     for name in ("x", "y", "source"))
        return ProxySet(x=x, y=y, source=src, eps=meta["eps"], success_rate=meta["success_rate"])

    def _checked_proxies(self, proxies) -> ProxySet:
        """A given proxy set must match the forget images' shape and the model's classes; moved to the device."""
        if not isinstance(proxies, ProxySet):
            raise TypeError(f"proxies must be a stakes.proxy.ProxySet, got {type(proxies).__name__}")
        if proxies.x.shape[1:] != self.fx.shape[1:] or proxies.x.shape[0] != proxies.y.shape[0] or len(proxies) == 0:
            raise ValueError(f"proxies must be non-empty images of shape [N, {', '.join(map(str, self.fx.shape[1:]))}] "
                             f"with N labels, got images {tuple(proxies.x.shape)} and labels {tuple(proxies.y.shape)}")
        if int(proxies.y.min()) < 0 or int(proxies.y.max()) >= self.num_classes:
            raise ValueError(f"proxy labels must lie in [0, {self.num_classes})")
        return ProxySet(x=proxies.x.to(self.device), y=proxies.y.to(self.device),
                        source=proxies.source.to(self.device), eps=proxies.eps, success_rate=proxies.success_rate)

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: Batch) -> tuple:
        """Loss terms, backward, the method's gradient hook, clipping and the fused update; returns
        ``(terms, loss)`` as device tensors. No host synchronisation: a non-finite loss only sets
        a device flag, raised by :meth:`check_losses` at the next log point or epoch end."""
        cfg = self.cfg
        self.opt.zero_grad(set_to_none=True)
        if self.dist.enabled:   # the loss through DDP, whose backward averages the gradients over ranks
            loss, terms, contrib = self._step_module()(lambda: self._local_loss(batch))
            if not self._replicated_checked:
                self._check_replicated(terms, batch)
        else:
            loss, terms, contrib = self._local_loss(batch)
        self._record_non_finite(terms, loss)
        loss.backward()
        self.method_def.before_update(self)
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for grp in self.opt.param_groups for p in grp["params"]],
                                           cfg.grad_clip)
        skip_sr = cfg.skip_sr_first_steps and batch.index < 2
        if skip_sr:
            saved = [grp["lam"] for grp in self.opt.param_groups]
            for grp in self.opt.param_groups:
                grp["lam"] = 0.0
        self.opt.step()
        if skip_sr:
            for grp, lam in zip(self.opt.param_groups, saved):
                grp["lam"] = lam
        return contrib, loss

    def _record_non_finite(self, terms: dict, loss: torch.Tensor) -> None:
        """Device-side bookkeeping: the first step whose loss is non-finite, and which terms were."""
        first = ~torch.isfinite(loss.detach()) & (self._bad_step < 0)   # this step is the first bad one
        self._bad_step = torch.where(first, self.step, self._bad_step)
        for name, value in terms.items():   # the terms that were non-finite at that first step
            flag = first & ~torch.isfinite(torch.as_tensor(value).detach()).all()
            prev = self._bad_terms.get(name)
            self._bad_terms[name] = flag if prev is None else prev | flag

    def check_losses(self, where: str) -> None:
        """Raise :class:`NonFiniteError` if a loss since the last check was non-finite (one host sync;
        data-parallel: one all-reduce, so that every rank stops at the same point)."""
        if self.dist.enabled:
            big = torch.iinfo(torch.long).max
            first_t = torch.where(self._bad_step >= 0, self._bad_step, torch.full_like(self._bad_step, big))
            first = int(dist_.all_reduce_(first_t.clone(), self.dist, "min"))
            first = -1 if first == big else first
        else:
            first = int(self._bad_step)
        if first >= 0:
            names = [n for n, flag in self._bad_terms.items() if bool(flag)]
            raise NonFiniteError(
                f"{self.method}: non-finite loss at step {first} (detected at the {where}, after steps "
                f"{self._checked_step}-{self.step}; non-finite at that step: {', '.join(names) or 'the sum only'}); "
                "the run was stopped and no model was written")
        self._checked_step = self.step

    # ------------------------------------------------------------------ the loop
    def fit(self) -> tuple[str, float]:
        cfg = self.cfg
        n_s = len(self.proxies)
        steps_per_epoch = max(1, math.ceil(n_s / cfg.proxy_batch_size))
        total = cfg.max_epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        ctx = self.dist
        bar = tqdm(total=total, initial=min(self.step, total),
                   desc=f"unlearn [{self.method}]" + (f" ({ctx.world_size} ranks)" if ctx.enabled else ""),
                   disable=not cfg.progress or not ctx.is_main, leave=False)
        stopped = "max_epochs"
        t0 = time.perf_counter()
        before = self.timings.get("loop_s", 0.0)   # a resumed run carries the loop time it had already spent
        self._checked_step = self.step
        self.set_train()
        if not self.history:
            self.log_entry({})
        while self.epoch < cfg.max_epochs and self.step < total:
            # one generator per epoch, so a resumed run draws exactly what an uninterrupted one would
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n_s, generator=g).to(self.device)
            f_order, f_pos = torch.randperm(self.k, generator=g).to(self.device), 0
            for i in range(0, n_s, cfg.proxy_batch_size):
                if self.step >= total:
                    break
                ia = order[i:i + cfg.proxy_batch_size]
                n_a = len(ia)
                ia = ia[ctx.rows(n_a)]   # this rank's contiguous shard of the global proxy batch
                # cycled forget loader
                nf = min(cfg.forget_batch_size, self.k)
                if f_pos + nf > self.k:
                    f_order, f_pos = torch.randperm(self.k, generator=g).to(self.device), 0
                jf = f_order[f_pos:f_pos + nf]
                f_pos += nf
                f_total, f_lo = None, 0
                if ctx.enabled and nf >= ctx.world_size:   # shard the forget batch too (else every rank has it whole)
                    mine = ctx.rows(nf)
                    jf, f_total, f_lo = jf[mine], nf, mine.start
                batch = Batch(self.fx[jf], self.fy[jf], self.proxies.x[ia], self.proxies.y[ia],
                              index=i // cfg.proxy_batch_size, proxy_total=n_a, forget_total=f_total,
                              forget_offset=f_lo)
                terms, loss = self.train_step(batch)
                self.step += 1
                bar.update(1)
                if self.step % cfg.log_every == 0:
                    self.check_losses(f"trajectory log at step {self.step}")
                    if ctx.enabled:
                        terms = self._global_terms(terms)
                        loss = sum(terms.values())
                    sr = self.opt.last_sr_loss
                    entry = self.log_entry({**terms, "loss": loss, "sr": sr if sr is not None else 0.0})
                    bar.set_postfix(forget=f"{entry['forget_accuracy']:.1f}",
                                    test=f"{entry.get('test_accuracy', float('nan')):.1f}")
            self.epoch += 1
            self.check_losses(f"end of epoch {self.epoch}")
            self.check_finite(f"end of epoch {self.epoch}")
            # stop rule: forget accuracy through the deployed model, checked after every epoch (§9)
            if self.step >= cfg.stop_warmup_steps:
                self.deployed.eval()
                acc = accuracy(self.deployed, self.fx, self.fy)
                self.set_train()
                if acc == 0.0:
                    stopped = "forget_accuracy_zero"
                    break
            self.timings["loop_s"] = before + time.perf_counter() - t0
            self.save_checkpoint()
            dist_.maybe_inject_fault("epoch_end", self.epoch, ctx)
        else:
            stopped = "max_steps" if self.step >= total and self.epoch < cfg.max_epochs else "max_epochs"
        bar.close()
        self.check_losses("end of the run")
        if not self.history or self.history[-1]["step"] != self.step:
            self.log_entry({})
        return stopped, before + time.perf_counter() - t0


def unlearn(model, forget_set, *, method: str = "structguard", anchors: Optional[torch.Tensor] = None,
            config: Optional[UnlearnConfig] = None, eval_sets: Optional[dict] = None,
            proxies: Optional[ProxySet] = None, retain_size: Optional[int] = None,
            callbacks: Iterable[Callable[[dict], None]] = (), checkpoint_path: Optional[str] = None,
            resume: bool = False, keep_checkpoint: bool = False, distributed=None) -> UnlearnResult:
    """Unlearn ``forget_set`` from ``model``.

    Args:
        model: anything :func:`stakes.models.as_classifier` accepts: a ``Classifier``, a
            ``(features, head)`` pair, a timm, torchvision or Hugging Face image classifier (its
            input normalisation taken from its config, see ``as_classifier``). It is not modified.
        forget_set: ``(images [k, C, H, W] in [0, 1], labels [k])``.
        method: a registered method name (:func:`stakes.available_methods`, except the retrain
            oracle) or an :class:`UnlearningMethod` instance.
        anchors: ``[num_classes, d_a]`` semantic anchors (required by StructGuard; used by every
            method for structure-drift logging when given).
        config: an :class:`UnlearnConfig`; default ``preset("stable")``.
        eval_sets: ``{"test": (x, y), "retain": (x, y), ...}`` evaluated along the trajectory
            (evaluation only: never used for training).
        proxies: a precomputed :class:`ProxySet` (shared between methods of one comparison).
        retain_size: |D_r| for the importance sample count N_tot (METHOD.md §6).
        callbacks: called with every trajectory entry (a dict).
        checkpoint_path: where to write the resumable state after every epoch (atomically).
        resume: continue from ``checkpoint_path`` if it exists (it must belong to the same forget
            set and config, else ValueError).
        keep_checkpoint: keep the checkpoint after the run finished (the CLI removes it only once
            the result file is written); by default it is removed.
        distributed: None (default) runs data-parallel over the default process group when one is
            initialised (``torchrun``, or ``torch.distributed.init_process_group``), else on this
            process; False always runs on this process alone (a grid of whole runs per rank). In a
            group every rank calls ``unlearn`` with the same arguments and its own ``config.device``
            (one device per rank); batch sizes are global, so the run matches the single-process
            one within rounding; rank 0 alone reads and writes the checkpoint and alone calls
            ``callbacks``; every rank returns the same result. See :mod:`stakes.distributed`.
    """
    method_def = method if isinstance(method, UnlearningMethod) else get_method(method)
    if getattr(method_def, "oracle", False):
        raise ValueError(f"method {method_def.name!r} is an oracle, not an unlearning run: use "
                         "stakes.methods.retrain.retrain_oracle(data, forget_idx, seed) or `stakes compare --retrain`")
    cfg = config if config is not None else preset("stable")
    if not isinstance(cfg, UnlearnConfig):
        raise TypeError(f"config must be a stakes.UnlearnConfig, got {type(cfg).__name__}")
    cfg.validate()
    with deterministic_algorithms(cfg.deterministic):
        ctx = dist_.resolve(distributed)
        start = time.perf_counter()
        run = _Run(model, forget_set, method_def, anchors, cfg, eval_sets, proxies, callbacks, checkpoint_path,
                   retain_size, ctx)
        run.check_launch()
        state = None
        if resume:
            if not checkpoint_path:
                raise ValueError("resume=True needs checkpoint_path")
            # rank 0 reads, every rank gets the state
            state = dist_.load_on_main(checkpoint_path, ctx, "checkpoint", required=False,
                                       map_location="cpu" if ctx.enabled else run.device)
            state = dist_.broadcast_object(state, ctx)
        if state is not None:
            run.load_checkpoint(state)
        else:
            if run.proxies is None:
                run.proxies = run.make_proxies()
            if run.projector is not None and cfg.warm_start:
                run.projector.warm_start(generator=torch.Generator().manual_seed(cfg.seed + 17))
            run.opt = run.build_optimizer()
        stopped, loop_s = run.fit()
        run.timings["loop_s"] = loop_s
        run.timings["step_ms"] = 1000.0 * loop_s / max(run.step, 1)
        run.check_finite("end of run")
        last = run.history[-1]
        metrics = {k: v for k, v in last.items() if k.endswith("_accuracy") or k == "structure_drift"}
        deployed = run.deployed.eval()
        model_out, info = deployed, _deployed_info(run)
        if getattr(run.work, "adapter", None) is not None and run.projector is None:
            model_out = run.work.adapter.rebuild(run.features, run.head).eval()
        result = UnlearnResult(
            method=run.method, model=model_out, metrics=metrics, history=run.history, config=cfg.to_dict(),
            proxies=run.proxies.summary(), steps=run.step, epochs=run.epoch, stopped=stopped,
            wall_time_s=time.perf_counter() - start, timings=run.timings, deployed=deployed, model_info=info,
            distributed=ctx.record(),
        )
        if not keep_checkpoint:
            run.remove_checkpoint()  # the run finished: the resumable state is no longer needed
        return result
