"""The unlearner: StructGuard (METHOD.md §4-9) and the baselines of §10, under one API and one
stopping rule.

    result = stakes.unlearn(model, (forget_x, forget_y), method="structguard", anchors=A)

Every method runs the same loop: an epoch zips the proxy batches with a cycled forget loader; the
update is :class:`fused.optim.StructureSGD` (the fused masked, regularised step) for every method,
so L2UL's inverted importance, SalUn's saliency mask and StructGuard's structure importance all go
through the same kernel; the run stops at the end of the first epoch where the deployed model
misclassifies every forget image (forget accuracy 0 %), after at most ``max_epochs``.
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
from stakes._io import atomic_torch_save
from stakes.config import UnlearnConfig, preset
from stakes.metrics import accuracy, accuracy_from_logits, structure_drift
from stakes.proxy import ProxySet, calibrate_radius, generate_proxies, random_targets

METHODS = ("structguard", "neggrad", "adv", "l2ul", "salun", "finetune", "retrain")


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
    model: nn.Module                  # the deployed model
    metrics: dict                     # final forget / retain / test accuracy etc. (percent)
    history: list                     # trajectory entries (step, accuracies, losses, drift)
    config: dict
    proxies: Optional[dict] = None    # n, eps, success_rate
    steps: int = 0
    epochs: int = 0
    stopped: str = ""                 # why the run ended
    wall_time_s: float = 0.0
    timings: dict = field(default_factory=dict)


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


def _ce_bounded(logits: torch.Tensor, y: torch.Tensor, bound: float) -> torch.Tensor:
    """mean_i min(CE_i, B): a sample with CE > ln C is already misclassified, so stop pushing it (§12)."""
    return F.cross_entropy(logits, y, reduction="none").clamp(max=bound).mean()


def _margin_deletion(logits: torch.Tensor, y: torch.Tensor, margin: float) -> torch.Tensor:
    """mean_i relu(z_{y_i} − max_{j≠y_i} z_j + m) [ours]: the smallest push that misclassifies.

    A forget sample stops contributing once another class beats its true class by ``margin``;
    unlike −CE its gradient does not vanish on a saturated model, and unlike ascent it never
    pushes a sample further than needed.
    """
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return F.relu(true - others + margin).mean()


def _minmax_invert(t: torch.Tensor) -> torch.Tensor:
    """L2UL's Ω̂ = 1 − (Ω − min)/(max − min), per tensor (a constant tensor gets Ω̂ = 1)."""
    lo, hi = t.min(), t.max()
    span = hi - lo
    return torch.where(span > 0, 1.0 - (t - lo) / span.clamp_min(1e-30), torch.ones_like(t))


def _topq_mask(tensors: Sequence[torch.Tensor], q: float) -> list:
    """Binary mask of the global top-q fraction of the entries of ``tensors`` (SalUn-style)."""
    flat = torch.cat([t.flatten().float() for t in tensors])
    if flat.numel() == 0:
        return [torch.zeros_like(t, dtype=torch.bool) for t in tensors]
    n_keep = max(1, int(round(q * flat.numel())))
    threshold = torch.topk(flat, n_keep, sorted=False).values.min()
    return [t >= threshold for t in tensors]


# ----------------------------------------------------------------------------- proxies


def build_proxies(model: nn.Module, forget_x: torch.Tensor, forget_y: torch.Tensor,
                  cfg: UnlearnConfig) -> tuple[ProxySet, dict]:
    """The proxy set of a run with config ``cfg`` (radius calibrated when ``cfg.eps`` is None).

    Exposed so that a comparison can build it once per (k, seed) and share it between methods.
    Returns the proxies and the time spent (``calibration_s``, ``proxies_s``).
    """
    device = torch.device(cfg.device)
    clf = _as_parts(model)
    if any(p.device != device for p in clf.parameters()):
        clf = copy.deepcopy(clf).to(device)   # PGD runs where the config says, never on the caller's copy
    forget_x, forget_y = forget_x.to(device), forget_y.to(device)
    n_classes = clf.head.out_features
    t0 = time.perf_counter()
    eps, calibrated = cfg.eps, None
    if eps is None:
        eps, calibrated = calibrate_radius(clf, forget_x, forget_y, num_classes=n_classes,
                                           target_success=cfg.target_success, steps=cfg.pgd_steps,
                                           step_size=cfg.pgd_step_size, batch_size=cfg.pgd_batch_size,
                                           seed=cfg.seed, backend=cfg.backend, progress=cfg.progress)
    t1 = time.perf_counter()
    proxies = generate_proxies(clf, forget_x, forget_y, num_classes=n_classes, repetitions=cfg.repetitions,
                               steps=cfg.pgd_steps, step_size=cfg.pgd_step_size, eps=eps,
                               batch_size=cfg.pgd_batch_size, seed=cfg.seed, backend=cfg.backend,
                               progress=cfg.progress)
    timings = {"calibration_s": t1 - t0 if calibrated is not None else 0.0, "proxies_s": time.perf_counter() - t1}
    return proxies, timings


# ----------------------------------------------------------------------------- the run


class _Run:
    """State of one unlearning run; the loop lives in :meth:`fit`."""

    def __init__(self, model, forget_set, method, anchors, cfg: UnlearnConfig, eval_sets, proxies, callbacks,
                 checkpoint_path, retain_size):
        self.method, self.cfg = method, cfg
        self.device = torch.device(cfg.device)
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

        # anchors and random projection (needed by StructGuard, and by every method for drift logging)
        if anchors is None:
            if method == "structguard":
                raise ValueError("method 'structguard' needs anchors: pass anchors=stakes.anchors.build_anchors(...)")
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

        self.projector = None
        if method == "structguard" and not cfg.warm_start and cfg.projector_lr == 0:
            raise ValueError("config.projector_lr=0 needs warm_start=True for StructGuard: a cold projector that is "
                             "never trained stays a random map on the deployed path (set projector_lr > 0, e.g. "
                             "0.009 as in the paper, or warm_start=True)")
        if self.needs_projector():
            hidden = max(self.anchor_dim, self.feature_dim) if cfg.warm_start else self.anchor_dim
            self.projector = Projector(self.feature_dim, self.anchor_dim, hidden).to(self.device)
        self.deployed = DeployedModel(self.features, self.head, self.projector)

        self.proxies = None if proxies is None else self._checked_proxies(proxies)
        self.opt: Optional[StructureSGD] = None

    # ------------------------------------------------------------------ set-up pieces
    def needs_projector(self) -> bool:
        """StructGuard's projector, except a warm-started one that is never trained: that one is the
        identity on the features, so it is left out and the deployed model is h∘g."""
        return self.method == "structguard" and not (self.cfg.warm_start and self.cfg.projector_lr == 0)

    def make_proxies(self) -> ProxySet:
        proxies, timings = build_proxies(self.orig, self.fx, self.fy, self.cfg)
        self.timings.update(timings)
        return proxies

    def _orig_structure_input(self, x: torch.Tensor) -> torch.Tensor:
        """v^ori before normalisation: g_ψ0(x)·R_p (the op normalises rows)."""
        with torch.no_grad():
            return self.orig.features(x) @ self.rp

    def unlearned_structure_input(self, x: torch.Tensor):
        """(projector output, v^unl before normalisation).

        Paper: v^unl = z, the projector's d_a-dim representation (§4). With the deployed-model warm
        start [ours], v^unl = p(g(x))·R_p instead: the structure of what the head actually sees, read
        through the same fixed R_p as the original branch, so both structures coincide at step 0.
        """
        if self.projector is None:   # fixed warm start: the deployed representation is g(x) itself
            out = self.features(x)
            return out, out @ self.rp
        out, z = self.projector(self.features(x))
        if self.cfg.warm_start:
            z = out @ self.rp
        return out, z

    def param_groups(self) -> list:
        cfg = self.cfg
        groups = [{"params": list(self.features.parameters()), "name": "features", "lr": cfg.lr}]
        head_lr = cfg.lr if cfg.head_lr is None else cfg.head_lr
        if head_lr > 0:
            groups.append({"params": list(self.head.parameters()), "name": "head", "lr": head_lr})
        else:  # a frozen head: the deletion has to go through the representation
            for p in self.head.parameters():
                p.requires_grad_(False)
        if self.projector is not None and cfg.projector_lr > 0:
            groups.append({"params": list(self.projector.parameters()), "name": "projector", "lr": cfg.projector_lr})
        elif self.projector is not None:  # a fixed projector (with warm start: the identity on features)
            for p in self.projector.parameters():
                p.requires_grad_(False)
        return groups

    def _importance_structguard(self) -> dict:
        """I_p = (1/N_tot) Σ_B |B|·|∂L(B)/∂ψ_p| over proxy batches cycled to N_tot (§6).

        L is the alignment loss (the paper). With the deployed-model warm start both structures
        coincide at step 0, so the alignment loss sits at its minimum and its gradient is exactly
        zero; there L is the structure's own sensitivity, mean_i ‖S_i^unl‖² (MAS applied to the
        structure [ours]), which measures how much each parameter moves the anchor profile.
        """
        cfg = self.cfg
        params = list(self.features.parameters())
        imp = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        n_tot = cfg.importance_samples or self.retain_size or len(self.proxies)
        n_tot = max(n_tot, 1)
        seen = 0
        g = torch.Generator().manual_seed(cfg.seed + 31)
        self._set_train()
        while seen < n_tot:
            order = torch.randperm(len(self.proxies), generator=g).to(self.device)
            for i in range(0, len(order), cfg.proxy_batch_size):
                idx = order[i:i + cfg.proxy_batch_size]
                if seen >= n_tot:
                    break
                xb = self.proxies.x[idx]
                _, z = self.unlearned_structure_input(xb)
                if cfg.warm_start:
                    loss = fused.anchor_similarity(z, self.anchors, backend=cfg.backend).pow(2).sum(1).mean()
                else:
                    loss = fused.structure_alignment_loss(z, self._orig_structure_input(xb), self.anchors,
                                                          backend=cfg.backend)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                fused.accumulate_importance(imp, list(grads), weight=len(idx) / n_tot, backend=cfg.backend)
                seen += len(idx)
        if seen != n_tot:  # the last batch overshot N_tot: divide by the samples actually seen
            torch._foreach_mul_(imp, n_tot / seen)
        return self._finish_importance(dict(zip(params, imp)))

    def _finish_importance(self, imp: dict) -> dict:
        kind = self.cfg.importance
        if kind == "topq":
            masks = _topq_mask(list(imp.values()), self.cfg.importance_topq)
            return {p: m.float() for p, m in zip(imp, masks)}
        if kind == "inverted":
            return {p: _minmax_invert(v) for p, v in imp.items()}
        return imp

    def _importance_l2ul(self) -> dict:
        """Ω = |∂ mean_x ‖f(x_f)‖₂ / ∂θ| on the forget set, min-max normalised per tensor, inverted (§10)."""
        params = [p for p in self.deployed.parameters() if p.requires_grad]
        self._set_train()
        out = self.deployed(self.fx).norm(dim=1).mean()
        grads = torch.autograd.grad(out, params, allow_unused=True)
        return {p: _minmax_invert(g.abs() if g is not None else torch.zeros_like(p)) for p, g in zip(params, grads)}

    def _salun_masks(self) -> dict:
        """Top-q of |∇θ CE(f(x_f), y_f)| over all parameters, as a binary gradient mask (§10)."""
        params = [p for p in self.deployed.parameters() if p.requires_grad]
        self._set_train()
        loss = F.cross_entropy(self.deployed(self.fx), self.fy)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        mags = [g.abs() if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]
        return dict(zip(params, _topq_mask(mags, self.cfg.importance_topq)))

    def new_optimizer(self) -> StructureSGD:
        cfg = self.cfg
        # SalUn: only masked weights move, so weight decay is folded into the gradient before the
        # mask (see fit) instead of being applied to every weight by the update [ours]
        wd = 0.0 if self.method == "salun" else cfg.weight_decay
        return StructureSGD(self.param_groups(), lr=cfg.lr, lam=cfg.lam, momentum=cfg.momentum,
                            weight_decay=wd, proximal=cfg.proximal, backend=cfg.backend)

    def build_optimizer(self) -> StructureSGD:
        opt = self.new_optimizer()
        t0 = time.perf_counter()
        if self.method == "structguard":
            opt.set_importance(self._importance_structguard())
        elif self.method == "l2ul":
            opt.set_importance(self._importance_l2ul())
        elif self.method == "salun":
            opt.set_grad_masks(self._salun_masks())
        self.timings["importance_s"] = time.perf_counter() - t0
        return opt

    # ------------------------------------------------------------------ modes and evaluation
    def _set_train(self):
        self.deployed.train()
        if not self.cfg.bn_train_mode:   # backbone BatchNorm statistics stay as pretrained [ours]
            self.features.eval()

    @torch.no_grad()
    def log_entry(self, losses: dict) -> dict:
        entry = {"step": self.step, "epoch": self.epoch}
        self.deployed.eval()
        entry["forget_accuracy"] = accuracy(self.deployed, self.fx, self.fy)
        drift_set = "test" if self.anchors is not None and "test" in self.eval_sets else None
        for name, (x, y) in self.eval_sets.items():
            if name != drift_set:
                entry[f"{name}_accuracy"] = accuracy(self.deployed, x, y)
                continue
            # one backbone pass serves the accuracy and the drift; the original side is computed once
            feats = torch.cat([self.features(x[i:i + 512]) for i in range(0, len(x), 512)])
            emb = feats if self.projector is None else self.projector(feats)[0]
            entry[f"{name}_accuracy"] = accuracy_from_logits(self.head(emb), y)
            if self._drift_orig is None:
                self._drift_orig = torch.cat([self._orig_structure_input(x[i:i + 512])
                                              for i in range(0, len(x), 512)])
            entry["structure_drift"] = structure_drift(self._drift_orig, feats @ self.rp, self.anchors)
        entry.update({k: float(v) for k, v in losses.items()})
        self._set_train()
        self.check_finite(f"trajectory log at step {self.step}")
        self.history.append(entry)
        for cb in self.callbacks:
            cb(entry)
        return entry

    def check_finite(self, where: str):
        for name, module in (("features", self.features), ("head", self.head), ("projector", self.projector)):
            if module is None:
                continue
            for pname, p in module.named_parameters():
                if not torch.isfinite(p).all():
                    raise NonFiniteError(f"{self.method}: parameter {name}.{pname} became non-finite at step "
                                         f"{self.step} ({where}); the run was stopped and no model was written")

    # ------------------------------------------------------------------ checkpoints (resume)
    def fingerprint(self) -> dict:
        """What a checkpoint must match to be resumed by this run: the forget set and the recipe."""
        cfg = {k: v for k, v in self.cfg.to_dict().items() if k not in ("progress", "device", "log_every")}
        return {"method": self.method, "k": self.k, "forget_shape": list(self.fx.shape),
                "forget_labels": self.fy.tolist(), "forget_sum": float(self.fx.double().sum()), "config": cfg}

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
        side = self.checkpoint_path + ".proxies"
        if not getattr(self, "_proxies_saved", False):
            atomic_torch_save(self.proxies, side)
            self._proxies_saved = True
        atomic_torch_save(self.state(), self.checkpoint_path)

    def remove_checkpoint(self):
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
        try:
            proxies = torch.load(side, map_location=self.device, weights_only=False)
        except Exception as err:
            raise ValueError(f"cannot read the proxy set of the checkpoint {side!r}: {err}") from None
        self.proxies = self._checked_proxies(proxies)
        self._proxies_saved = True
        self.opt = self.new_optimizer()
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.history = list(state["history"])
        self.timings = dict(state["timings"])
        torch.set_rng_state(state["rng"].cpu())
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda_rng"]])

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

    # ------------------------------------------------------------------ the loss of one step
    def loss_terms(self, xf, yf, xa, ya) -> dict:
        cfg, m = self.cfg, self.method
        n_f, n_a = xf.shape[0], xa.shape[0]
        if cfg.loss_weighting == "equal":
            w_f = w_a = 1.0
        else:  # the batch fractions of METHOD.md §8
            w_f, w_a = n_f / (n_f + n_a), n_a / (n_f + n_a)
        bound = cfg.deletion_bound or (math.log(self.num_classes) + 1.0)
        terms = {}

        def deletion(logits):
            if cfg.deletion == "bounded":
                return -_ce_bounded(logits, yf, bound)
            if cfg.deletion == "margin":
                return _margin_deletion(logits, yf, cfg.deletion_margin)
            return -F.cross_entropy(logits, yf)

        if m == "neggrad":
            terms["deletion"] = deletion(self.deployed(xf))
        elif m in ("adv", "l2ul"):
            terms["deletion"] = w_f * deletion(self.deployed(xf))
            terms["retention"] = w_a * F.cross_entropy(self.deployed(xa), ya)
        elif m == "finetune":
            terms["retention"] = F.cross_entropy(self.deployed(xa), ya)
        elif m == "salun":
            g = torch.Generator().manual_seed(cfg.seed * 100003 + self.step)
            yr = random_targets(yf, self.num_classes, g)
            terms["random_label"] = w_f * F.cross_entropy(self.deployed(xf), yr)
            terms["retention"] = w_a * F.cross_entropy(self.deployed(xa), ya)
        elif m == "structguard":
            # deletion through h∘g (no projector); retention and alignment through the projector (§7-8)
            del_model = self.deployed if cfg.deletion_path == "deployed" else (lambda x: self.head(self.features(x)))
            terms["deletion"] = w_f * deletion(del_model(xf))
            out, z = self.unlearned_structure_input(xa)
            terms["retention"] = w_a * F.cross_entropy(self.head(out), ya)
            terms["alignment"] = cfg.align_weight * fused.structure_alignment_loss(
                z, self._orig_structure_input(xa), self.anchors, backend=cfg.backend)
            w = self.head.weight
            terms["classifier_reg"] = cfg.cr_weight * (0.99 * w.abs().sum() + 0.5 * 0.01 * w.pow(2).sum())
        else:  # pragma: no cover - guarded in unlearn()
            raise ValueError(m)
        return terms

    # ------------------------------------------------------------------ the loop
    def fit(self) -> tuple[str, float]:
        cfg = self.cfg
        n_s = len(self.proxies)
        steps_per_epoch = max(1, math.ceil(n_s / cfg.proxy_batch_size))
        total = cfg.max_epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        bar = tqdm(total=total, initial=min(self.step, total), desc=f"unlearn [{self.method}]",
                   disable=not cfg.progress, leave=False)
        stopped = "max_epochs"
        t0 = time.perf_counter()
        before = self.timings.get("loop_s", 0.0)   # a resumed run carries the loop time it had already spent
        self._set_train()
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
                # cycled forget loader
                nf = min(cfg.forget_batch_size, self.k)
                if f_pos + nf > self.k:
                    f_order, f_pos = torch.randperm(self.k, generator=g).to(self.device), 0
                jf = f_order[f_pos:f_pos + nf]
                f_pos += nf
                xf, yf, xa, ya = self.fx[jf], self.fy[jf], self.proxies.x[ia], self.proxies.y[ia]

                terms = self.loss_terms(xf, yf, xa, ya)
                loss = sum(terms.values())
                if not torch.isfinite(loss):
                    detail = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
                    raise NonFiniteError(f"{self.method}: non-finite loss at step {self.step} ({detail}); "
                                         "the run was stopped and no model was written")
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.method == "salun" and cfg.weight_decay > 0:
                    for grp in self.opt.param_groups:
                        torch._foreach_add_([p.grad for p in grp["params"] if p.grad is not None],
                                            [p for p in grp["params"] if p.grad is not None], alpha=cfg.weight_decay)
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_([p for grp in self.opt.param_groups for p in grp["params"]],
                                                   cfg.grad_clip)
                skip_sr = cfg.skip_sr_first_steps and (i // cfg.proxy_batch_size) < 2
                if skip_sr:
                    saved = [grp["lam"] for grp in self.opt.param_groups]
                    for grp in self.opt.param_groups:
                        grp["lam"] = 0.0
                self.opt.step()
                if skip_sr:
                    for grp, lam in zip(self.opt.param_groups, saved):
                        grp["lam"] = lam
                self.step += 1
                bar.update(1)
                if self.step % cfg.log_every == 0:
                    sr = self.opt.last_sr_loss
                    entry = self.log_entry({**terms, "loss": loss, "sr": sr if sr is not None else 0.0})
                    bar.set_postfix(forget=f"{entry['forget_accuracy']:.1f}",
                                    test=f"{entry.get('test_accuracy', float('nan')):.1f}")
            self.epoch += 1
            self.check_finite(f"end of epoch {self.epoch}")
            # stop rule: forget accuracy through the deployed model, checked after every epoch (§9)
            if self.step >= cfg.stop_warmup_steps:
                self.deployed.eval()
                acc = accuracy(self.deployed, self.fx, self.fy)
                self._set_train()
                if acc == 0.0:
                    stopped = "forget_accuracy_zero"
                    break
            self.timings["loop_s"] = before + time.perf_counter() - t0
            self.save_checkpoint()
        else:
            stopped = "max_steps" if self.step >= total and self.epoch < cfg.max_epochs else "max_epochs"
        bar.close()
        if not self.history or self.history[-1]["step"] != self.step:
            self.log_entry({})
        return stopped, before + time.perf_counter() - t0


def unlearn(model, forget_set, *, method: str = "structguard", anchors: Optional[torch.Tensor] = None,
            config: Optional[UnlearnConfig] = None, eval_sets: Optional[dict] = None,
            proxies: Optional[ProxySet] = None, retain_size: Optional[int] = None,
            callbacks: Iterable[Callable[[dict], None]] = (), checkpoint_path: Optional[str] = None,
            resume: bool = False, keep_checkpoint: bool = False) -> UnlearnResult:
    """Unlearn ``forget_set`` from ``model``.

    Args:
        model: a :class:`stakes.models.Classifier`, a ``(features, head)`` pair, or a
            torchvision-style ResNet (split at ``fc``). It is not modified.
        forget_set: ``(images [k, C, H, W] in [0, 1], labels [k])``.
        method: one of :data:`METHODS` except ``"retrain"`` (see :func:`stakes.methods.retrain`).
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
    """
    if method not in METHODS or method == "retrain":
        valid = [m for m in METHODS if m != "retrain"]
        raise ValueError(f"unknown method {method!r}; expected one of {valid} (retrain: stakes.methods.retrain)")
    cfg = config if config is not None else preset("stable")
    if not isinstance(cfg, UnlearnConfig):
        raise TypeError(f"config must be a stakes.UnlearnConfig, got {type(cfg).__name__}")
    cfg.validate()
    start = time.perf_counter()
    run = _Run(model, forget_set, method, anchors, cfg, eval_sets, proxies, callbacks, checkpoint_path, retain_size)
    state = None
    if resume:
        if not checkpoint_path:
            raise ValueError("resume=True needs checkpoint_path")
        if os.path.exists(checkpoint_path):
            try:
                state = torch.load(checkpoint_path, map_location=run.device, weights_only=False)
            except Exception as err:
                raise ValueError(f"cannot read checkpoint {checkpoint_path!r}: {err}") from None
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
    result = UnlearnResult(
        method=method, model=run.deployed.eval(), metrics=metrics, history=run.history, config=cfg.to_dict(),
        proxies=run.proxies.summary(), steps=run.step, epochs=run.epoch, stopped=stopped,
        wall_time_s=time.perf_counter() - start, timings=run.timings,
    )
    if not keep_checkpoint:
        run.remove_checkpoint()  # the run finished: the resumable state is no longer needed
    return result
