"""Every hyper-parameter of an unlearning run in one object, with the two presets.

``paper``  — the values and recipe of METHOD.md §3-9 (CIFAR-10 numbers; PGD radius 3.0 pixels in
             [0, 1] space, so scale ``eps`` for other image sizes or let it calibrate).
``stable`` — the default: METHOD.md §12's measured stabilisers (the PGD radius is calibrated on
             the forget set to a target attack success rate, gradients are clipped, and the SR term
             is a proximal (implicit) step, which cannot diverge whatever lr·λ·I is) and the fixes
             §13 proposed, measured on digits (README "Science"): the projector is warm-started so
             the deployed model h∘p∘g starts equal to the pretrained one, deletion is the margin
             loss (stop pushing a forget image once it is misclassified) applied through the
             deployed model, and deletion and retention are weighted equally.

Quirks of the reference code (skip the SR term on the first two steps of every epoch, keep
BatchNorm in train mode while unlearning) are options that default to off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

PRESETS = ("stable", "paper")
IMPORTANCE_KINDS = ("dense", "topq", "inverted")
DELETION_KINDS = ("ascent", "bounded", "margin")
DELETION_PATHS = ("features_head", "deployed")
LOSS_WEIGHTINGS = ("batch_fraction", "equal")


@dataclass
class UnlearnConfig:
    """Hyper-parameters of :func:`stakes.unlearn` (names follow METHOD.md)."""

    preset: str = "custom"           # set by stakes.preset(); a hand-built config is "custom"
    seed: int = 0

    # Proxy set (METHOD.md §3): targeted L2 PGD around each forget image.
    repetitions: int = 20            # R proxies per forget image
    pgd_steps: int = 100
    pgd_step_size: float = 0.1
    eps: Optional[float] = None      # None -> calibrate to `target_success` (§12)
    target_success: float = 0.9
    pgd_batch_size: int = 1024       # repetitions are batched into batches this large [ours]

    # Batches and optimisation (§8-9).
    forget_batch_size: int = 128
    proxy_batch_size: int = 128
    lr: float = 0.005                # backbone + head
    projector_lr: float = 0.009      # 0 -> the (warm-started) projector stays fixed [ours]
    head_lr: Optional[float] = None  # classifier head; None -> lr, 0 -> frozen head [ours]
    momentum: float = 0.0
    weight_decay: float = 0.0
    max_epochs: int = 100
    max_steps: Optional[int] = None  # hard cap on optimisation steps (None = epochs decide)

    # Loss weights (§5, §6, §8).
    align_weight: float = 1.0
    lam: float = 1.0                 # SR weight λ
    cr_weight: float = 0.001         # classifier elastic net weight
    deletion: str = "ascent"         # "ascent" (−CE), "bounded" (−mean min(CE_i, ln C + 1)) or "margin" [ours]
    deletion_bound: Optional[float] = None  # None -> ln C + 1
    deletion_margin: float = 1.0     # "margin": mean_i relu(z_y − max_{j≠y} z_j + m)
    deletion_path: str = "features_head"  # StructGuard: delete through h∘g (§7) or the deployed h∘p∘g [ours]
    loss_weighting: str = "batch_fraction"  # "batch_fraction" (n_f/(n_f+n_a), §8) or "equal" (1 and 1) [ours]

    # Importance (§6).
    importance: str = "dense"        # "dense" | "topq" (binary top-q mask) | "inverted" (L2UL-style)
    importance_topq: float = 0.5
    importance_samples: Optional[int] = None  # N_tot; None -> |D_r| = train size − k when known

    # Stabilisers (§12).
    grad_clip: Optional[float] = None
    proximal: bool = False

    # Deployed-model warm start (§13): projector initialised so h∘p∘g == h∘g at step 0.
    warm_start: bool = False
    stop_warmup_steps: int = 0       # no stop check before this many steps

    # Reference-code quirks, off by default [ours].
    skip_sr_first_steps: bool = False
    bn_train_mode: bool = False

    # Bookkeeping.
    log_every: int = 5               # trajectory entry every this many steps
    eval_max_samples: Optional[int] = 2000  # cap on test / retain samples per trajectory entry
    backend: Optional[str] = None    # fused backend; None = automatic
    device: str = "cpu"
    deterministic: bool = False      # deterministic cuDNN / torch algorithms on a GPU (slower), see below
    progress: bool = True

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> "UnlearnConfig":
        def positive(name, allow_zero=False, integer=False):
            v = getattr(self, name)
            ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok_type or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
                kind = "an integer" if integer else "a finite number"
                bound = ">= 0" if allow_zero else "> 0"
                raise ValueError(f"config.{name} must be {kind} {bound}, got {v!r}")

        for name in ("proximal", "warm_start", "skip_sr_first_steps", "bn_train_mode", "progress", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config.{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"config.seed must be an integer, got {self.seed!r}")
        for name in ("momentum", "target_success", "importance_topq"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"config.{name} must be a number, got {v!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"config.device must be a torch device such as 'cpu' or 'cuda:0', got {self.device!r}") from None
        if self.preset not in PRESETS + ("custom",):
            raise ValueError(f"config.preset must be one of {PRESETS}, got {self.preset!r}")
        for name in ("repetitions", "pgd_steps", "pgd_batch_size", "forget_batch_size", "proxy_batch_size",
                     "max_epochs", "log_every"):
            positive(name, integer=True)
        for name in ("pgd_step_size", "lr"):
            positive(name)
        positive("projector_lr", allow_zero=True)
        for name in ("weight_decay", "align_weight", "lam", "cr_weight"):
            positive(name, allow_zero=True)
        positive("stop_warmup_steps", allow_zero=True, integer=True)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"config.momentum must be in [0, 1), got {self.momentum!r}")
        if self.eps is not None:
            positive("eps")
        if self.head_lr is not None:
            positive("head_lr", allow_zero=True)
        if not 0.0 < self.target_success <= 1.0:
            raise ValueError(f"config.target_success must be in (0, 1], got {self.target_success!r}")
        if self.max_steps is not None:
            positive("max_steps", integer=True)
        if self.grad_clip is not None:
            positive("grad_clip")
        if self.deletion not in DELETION_KINDS:
            raise ValueError(f"config.deletion must be one of {DELETION_KINDS}, got {self.deletion!r}")
        if self.deletion_path not in DELETION_PATHS:
            raise ValueError(f"config.deletion_path must be one of {DELETION_PATHS}, got {self.deletion_path!r}")
        positive("deletion_margin", allow_zero=True)
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"config.loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if self.deletion_bound is not None:
            positive("deletion_bound")
        if self.importance not in IMPORTANCE_KINDS:
            raise ValueError(f"config.importance must be one of {IMPORTANCE_KINDS}, got {self.importance!r}")
        if not 0.0 < self.importance_topq <= 1.0:
            raise ValueError(f"config.importance_topq must be in (0, 1], got {self.importance_topq!r}")
        if self.importance_samples is not None:
            positive("importance_samples", integer=True)
        if self.eval_max_samples is not None:
            positive("eval_max_samples", integer=True)
        if self.backend not in (None, "triton", "reference"):
            raise ValueError(f"config.backend must be None, 'triton' or 'reference', got {self.backend!r}")
        return self

    # ------------------------------------------------------------------ helpers
    def replace(self, **changes) -> "UnlearnConfig":
        """A copy with ``changes`` applied (validated; unknown names are a clear error)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; valid fields: {sorted(self.to_dict())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "UnlearnConfig":
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}")
        return cls(**values)


_PRESET_VALUES = {
    # METHOD.md §3-9 as the reference code runs it (CIFAR-10 values).
    "paper": dict(
        eps=3.0, lr=0.005, projector_lr=0.009, lam=1.0, deletion="ascent", grad_clip=None, proximal=False,
    ),
    # METHOD.md §12's stabilisers (calibrated radius, clipping at 2, proximal SR step) plus the
    # measured fixes of §13 [ours]: the deployed-model warm start with the projector kept fixed (so
    # the deployed model is h∘g, whose backbone the structure terms protect), the smallest deletion
    # push that misclassifies (margin), through the deployed model, weighted equally with retention.
    "stable": dict(
        eps=None, grad_clip=2.0, proximal=True, warm_start=True, projector_lr=0.0, deletion="margin",
        deletion_path="deployed", loss_weighting="equal",
    ),
}


def preset(name: str = "stable", method: str = "structguard", **overrides) -> UnlearnConfig:
    """The config of preset ``name`` ("stable" or "paper") for ``method``, with ``overrides``.

    Under ``paper`` each method adds its own ``paper_preset`` values (the baselines: the paper's
    baseline optimiser, SGD lr 0.001, momentum 0.9, weight decay 1e-4, PGD ε 4.0; StructGuard:
    none); under ``stable`` every method shares the same values.
    """
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
    values = dict(_PRESET_VALUES[name])
    if name == "paper":
        from stakes.methods.base import PAPER_BASELINE_VALUES, get_method

        try:
            values.update(get_method(method).paper_preset)
        except ValueError:   # a name not registered (yet): a baseline's values
            values.update(PAPER_BASELINE_VALUES)
    values.update(overrides)
    values["preset"] = name
    try:
        return UnlearnConfig(**values)
    except TypeError as err:  # unknown keyword
        raise ValueError(f"bad config override: {err}") from None


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """While active (``enabled``): cuDNN picks deterministic algorithms and does not benchmark, and
    torch uses deterministic implementations where it has them (``warn_only``: an op without one
    warns instead of failing the run). cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` before its
    first use for deterministic matrix products; it is set here if unset, which takes effect when
    nothing has used cuBLAS yet in this process (the command line sets it first). On the CPU torch
    is deterministic for a fixed thread count anyway. Restores the previous settings on exit."""
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[0], before[1]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])
