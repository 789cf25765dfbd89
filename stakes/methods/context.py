"""What a method's hooks may use: :class:`UnlearnContext`, the public surface of one run.

Every hook of an :class:`~stakes.methods.base.UnlearningMethod` receives the run's context, and the
context gives the models and their parts, the anchors and their projection, the shared options and
the method's own, the forget and proxy sets, the progress of the run and a few shared helpers: no
more. How the run is executed (one process or many, evaluation, checkpoints) stays inside the loop.

Methods written against the run object of earlier versions (``run.cfg``, ``run.fx``, ``run.fy``,
``run.set_train()``) keep working for now: those names warn once (DeprecationWarning) and map to
``config``/``options``, ``forget_x``, ``forget_y`` and ``train_mode()``. Anything else that is not
on the context (``run.opt``, ``run.method_def``, ...) is an AttributeError that says what to use.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from stakes.config import MethodConfig, UnlearnConfig
from stakes.methods.base import Batch, ce_bounded, margin_deletion

_PUBLIC = ("deployed", "features", "head", "projector", "orig", "num_classes", "device", "anchors", "rp",
           "config", "options", "method", "forget_x", "forget_y", "proxies", "retain_size", "step", "epoch",
           "deletion", "loss_weights", "batch_gradient", "gradients", "orig_structure_input", "proxy_structure_input",
           "train_mode", "param_groups")


class UnlearnContext:
    """The run as a method sees it.

    Models: ``deployed`` (what is unlearned and deployed: images in [0, 1] → logits; h∘p∘g with a
    projector, else h∘g), ``features`` (g_ψ, trained), ``head`` (h_φ), ``projector`` (p_ω or None),
    ``orig`` (the frozen pretrained classifier, eval mode), ``num_classes``, ``device``.
    Anchors: ``anchors`` (unit rows [b, d_a], or None), ``rp`` (the fixed projection R_p,
    [d_f, d_a]), :meth:`orig_structure_input`, :meth:`proxy_structure_input` (the proxies', computed once).
    Options: ``config`` (the shared :class:`~stakes.config.UnlearnConfig`), ``options`` (the
    method's own :class:`~stakes.config.MethodConfig`), ``method`` (the method's name).
    Data: ``forget_x`` / ``forget_y`` (the whole forget set, on ``device``), ``proxies`` (the
    :class:`~stakes.proxy.ProxySet`), ``retain_size`` (|D_r| when known, else None).
    Progress: ``step`` (optimisation steps done), ``epoch``.
    Helpers: :meth:`deletion`, :meth:`loss_weights`, :meth:`batch_gradient`, :meth:`gradients`, :meth:`train_mode`,
    and :attr:`param_groups` (the optimiser's groups, once it exists: in ``before_update``).
    """

    def __init__(self, *, method: str, config: UnlearnConfig, options: MethodConfig, orig: nn.Module,
                 features: nn.Module, head: nn.Linear, projector: Optional[nn.Module], deployed: nn.Module,
                 anchors: Optional[torch.Tensor], rp: torch.Tensor, forget_x: torch.Tensor, forget_y: torch.Tensor,
                 retain_size: Optional[int], device: torch.device, strategy, frozen: Optional[nn.Module] = None):
        self.method, self.config, self.options = method, config, options
        self.orig, self.features, self.head, self.projector, self.deployed = orig, features, head, projector, deployed
        self.num_classes = head.out_features
        self.anchors, self.rp = anchors, rp
        self.forget_x, self.forget_y = forget_x, forget_y
        self.proxies = None
        self.retain_size = retain_size
        self.device = device
        self.step = 0
        self.epoch = 0
        self._strategy = strategy
        self._optimizer = None
        self._projector_left_eval = False   # a stop check left the projector in eval mode (§9a.4)
        self._proxy_v0 = None   # (the proxies' images, g_ψ0 of them): proxy_structure_input's cache
        self._frozen = frozen if frozen is not None else orig   # the original as its inference-only work runs it

    # ------------------------------------------------------------------ shared loss pieces
    def loss_weights(self, batch: Batch) -> tuple:
        """(w_f, w_a): the batch fractions n_f/(n_f+n_a), n_a/(n_f+n_a) of METHOD.md §8, or 1 and 1
        (``config.loss_weighting``); global batch sizes on several processes."""
        if self.config.loss_weighting == "equal":
            return 1.0, 1.0
        n_f, n_a = batch.n_forget, batch.n_proxy
        return n_f / (n_f + n_a), n_a / (n_f + n_a)

    def deletion(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The configured deletion loss on forget logits (``config.deletion``): −CE (ascent),
        bounded −CE or the margin loss."""
        cfg = self.config
        if cfg.deletion == "bounded":
            return -ce_bounded(logits, y, cfg.deletion_bound or (math.log(self.num_classes) + 1.0))
        if cfg.deletion == "margin":
            return margin_deletion(logits, y, cfg.deletion_margin)
        return -F.cross_entropy(logits, y)

    def orig_structure_input(self, x: torch.Tensor) -> torch.Tensor:
        """v^ori before normalisation: g_ψ0(x)·R_p (METHOD.md §4; the structure ops normalise rows),
        through the frozen original's inference copy (BatchNorm folded, ``config.fold_batchnorm``)."""
        with torch.no_grad():
            return self._frozen.features(x) @ self.rp

    def proxy_structure_input(self, batch: Batch) -> torch.Tensor:
        """:meth:`orig_structure_input` of the batch's proxies. The frozen original and the proxies
        never change, so their features g_ψ0(x̃) are computed once for the whole proxy set (at the
        first call, in chunks of 512, in the precision of that call) and each step takes its rows:
        one forward of the original per proxy a run instead of one per proxy a step (a sample's
        features do not depend on its batch; the product with R_p, whose rounding does, stays per
        batch). A batch whose rows are unknown is computed as it comes."""
        if batch.proxy_rows is None or self.proxies is None:
            return self.orig_structure_input(batch.proxy_x)
        if self._proxy_v0 is None or self._proxy_v0[0] is not self.proxies.x:
            x = self.proxies.x
            with torch.no_grad():
                feats = torch.cat([self._frozen.features(x[i:i + 512]) for i in range(0, len(x), 512)])
            self._proxy_v0 = (x, feats)
        with torch.no_grad():
            return self._proxy_v0[1][batch.proxy_rows] @ self.rp

    # ------------------------------------------------------------------ the run's machinery, as far as methods need it
    def batch_gradient(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                       params: Sequence[torch.Tensor]) -> list:
        """∇ of ``loss_fn`` over the global batch ``x``, where ``loss_fn(part)`` is the mean loss over
        ``part``; entries of unused parameters are None. One process: ``autograd.grad``. Several
        processes: each rank takes its shard of ``x`` and the gradient goes through the training
        all-reduce, so every rank gets the whole batch's gradient (before any absolute value)."""
        return self._strategy.batch_gradient(loss_fn, x, params)

    def gradients(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list:
        """∇ of ``loss`` (computed on this process) w.r.t. ``params``, entries of unused parameters
        None: ``autograd.grad``, except that under fp16 the loss is scaled for the 16-bit backward
        and the gradients divided back, so that small gradients (an importance, a saliency) are
        not flushed to zero."""
        return self._strategy.execution.gradients(loss, params)

    def train_mode(self) -> None:
        """The modes of a training step: the deployed model in training mode, the backbone's
        BatchNorm statistics frozen unless ``config.bn_train_mode``; the projector in eval mode once
        a stop check left it there (``config.projector_eval_after_check``, the authors' loop)."""
        self.deployed.train()
        if not self.config.bn_train_mode:   # backbone BatchNorm statistics stay as pretrained [ours]
            self.features.eval()
        if self._projector_left_eval and self.projector is not None:
            self.projector.eval()

    @property
    def param_groups(self) -> list:
        """The optimiser's parameter groups (dicts with "params", "lr", "lam", ...), once it exists."""
        if self._optimizer is None:   # (not an AttributeError: that would fall through to __getattr__)
            raise RuntimeError("ctx.param_groups: the optimiser does not exist yet (it is built from "
                                 "param_groups() after importance() and grad_masks(); use it from before_update)")
        return self._optimizer.param_groups

    # ------------------------------------------------------------------ earlier names
    def __getattr__(self, name: str):
        legacy = {"cfg": lambda: _LegacyConfig(self.config, self.options), "fx": lambda: self.forget_x,
                  "fy": lambda: self.forget_y, "set_train": lambda: self.train_mode}
        if name in legacy:
            new = {"cfg": "ctx.config (shared options) and ctx.options (the method's own)", "fx": "ctx.forget_x",
                   "fy": "ctx.forget_y", "set_train": "ctx.train_mode()"}[name]
            warnings.warn(f"UnlearnContext.{name} is deprecated; use {new}", DeprecationWarning, stacklevel=2)
            return legacy[name]()
        if name.startswith("__"):
            raise AttributeError(name)
        hint = " (the optimiser's groups: ctx.param_groups)" if name in ("opt", "optimizer") else ""
        raise AttributeError(f"UnlearnContext has no attribute {name!r}{hint}: a method's hooks may use "
                             f"{', '.join(_PUBLIC)} (see stakes.UnlearnContext)")

    def __repr__(self) -> str:
        return f"UnlearnContext(method={self.method!r}, step={self.step}, epoch={self.epoch})"


class _LegacyConfig:
    """``run.cfg`` of earlier versions: the shared options and the method's own, read-only."""

    def __init__(self, config: UnlearnConfig, options: MethodConfig):
        self._config, self._options = config, options

    def __getattr__(self, name: str):
        if name in type(self._options).field_names():
            return getattr(self._options, name)
        return getattr(self._config, name)
