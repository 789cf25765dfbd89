"""The options every unlearning run shares, the base of a method's own options, and the presets.

:class:`UnlearnConfig` holds what every run has whatever its method: the proxies (METHOD.md §3), the
batches and the optimiser (§8-9), the shared loss pieces a method may use (the deletion loss and the
batch weights of §8, the SR weight λ of §6), the stop rule, logging, device and seed. A method's own
options (StructGuard's alignment weight, its projector, its importance; SalUn's mask fraction) live
in the method's :class:`MethodConfig` subclass (``stakes.methods``), with its own presets;
``UnlearnConfig.method_options`` carries overrides of them, keyed by method name, so one config
serves a whole grid of methods.

``paper``  — the values and recipe of METHOD.md §3-9 (CIFAR-10 numbers; PGD radius 3.0 pixels in
             [0, 1] space, so scale ``eps`` for other image sizes or let it calibrate), in stakes'
             own control flow.
``authors``— the authors' released CIFAR-10 script as it runs (METHOD.md §9a): the paper's values
             and every behaviour of their control flow, each a named switch (data order, stop rule,
             projector mode, importance at step 2, advertorch's PGD on their L2UL model, ...).
``stable`` — the default: METHOD.md §12's measured stabilisers (the PGD radius is calibrated on
             the forget set to a target attack success rate, gradients are clipped, and the SR term
             is a proximal (implicit) step, which cannot diverge whatever lr·λ·I is) and the fixes
             §13 proposed, measured on digits (README "Science"): deletion is the margin loss (stop
             pushing a forget image once it is misclassified), and deletion and retention are
             weighted equally; StructGuard's own stable options add its warm-started projector.

:func:`preset` here builds the shared options of a preset; ``stakes.preset(name, method=...)``
(:mod:`stakes.methods`) adds the method's own preset values and routes a method's options.

The behaviours of the reference code (METHOD.md §9a) are options that default to stakes' own
choice; ``authors`` turns them all on, and README "Presets" lists them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

PRESETS = ("stable", "paper", "authors")
DELETION_KINDS = ("ascent", "bounded", "margin")
LOSS_WEIGHTINGS = ("batch_fraction", "equal")
STOP_CHECKS = ("epoch", "step")
PGD_STARTS = ("ball", "box_sphere")
PGD_ORDERS = ("project_clamp", "clamp_project")
PROXY_TARGETS = ("uniform", "collision_half")
PROXY_ORDERS = ("repetition", "forget_batch")


def _check_number(owner: str, name: str, v, *, allow_zero: bool = False, integer: bool = False) -> None:
    """``owner.name`` is a finite number (an integer with ``integer``) > 0, or >= 0 with ``allow_zero``."""
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        kind = "an integer" if integer else "a finite number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}.{name} must be {kind} {bound}, got {v!r}")


def _check_bool(owner: str, name: str, v) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{owner}.{name} must be True or False, got {v!r}")


def _check_choice(owner: str, name: str, v, choices) -> None:
    if v not in choices:
        raise ValueError(f"{owner}.{name} must be one of {tuple(choices)}, got {v!r}")


class _Options:
    """``replace`` / ``to_dict`` / ``from_dict`` of the option dataclasses, with unknown names refused."""

    _owner: ClassVar[str] = "config"

    def replace(self, **changes):
        """A copy with ``changes`` applied (validated; unknown names are a clear error)."""
        self._refuse_unknown(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: dict):
        cls._refuse_unknown(values)
        return cls(**values)

    @classmethod
    def _refuse_unknown(cls, values) -> None:
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown {cls._owner} field(s) {unknown}; valid fields: {sorted(cls.field_names())}"
                             + cls._unknown_hint())

    @classmethod
    def _unknown_hint(cls) -> str:
        return ""


@dataclass
class UnlearnConfig(_Options):
    """The options every run of :func:`stakes.unlearn` shares, whatever its method (names follow
    METHOD.md). A method's own options: ``method_options`` and the method's :class:`MethodConfig`."""

    preset: str = "custom"           # set by preset(); a hand-built config is "custom"
    seed: int = 0

    # Proxy set (METHOD.md §3): targeted L2 PGD around each forget image.
    repetitions: int = 20            # R proxies per forget image
    pgd_steps: int = 100
    pgd_step_size: float = 0.1
    eps: Optional[float] = None      # None -> calibrate to `target_success` (§12)
    target_success: float = 0.9
    pgd_batch_size: int = 1024       # repetitions are batched into batches this large [ours]
    # How the attacks run (§9a.7: the authors' are advertorch's L2PGDAttack on the model their script
    # holds at that point); stakes' choices first:
    pgd_start: str = "ball"          # "ball": uniform direction × uniform radius in the ε-ball; "box_sphere":
                                     # uniform in [0, 1]^D minus x, scaled onto the ε-ball (the sphere, for images), clamped
    pgd_order: str = "project_clamp"  # a step projects onto the ε-ball then clamps to [0, 1]; "clamp_project" the reverse
    proxy_targets: str = "uniform"   # "uniform": y + U{1..C−1} mod C; "collision_half": ⌊U·C⌋, a draw of y replaced by C//2
    proxy_order: str = "repetition"  # "repetition": R passes over the k images; "forget_batch": per forget batch, its R passes
    pgd_weight_grads: bool = False   # each PGD backward also computes the attacked model's weight gradients (cost only)
    pgd_early_exit: bool = False     # a proxy leaves its PGD batch at its first iterate classified as its target
                                     # (that iterate is the proxy; the batch compacts) [ours, optional]
    fold_batchnorm: bool = True      # the frozen original's BatchNorm folded into its convolutions for PGD and its
                                     # structures (exact up to rounding) [ours]; False: as the authors run it
    proxy_model: str = "pretrained"  # the attacked model: the pretrained one, or the model the named method unlearned first
    proxy_model_options: dict = field(default_factory=dict)   # shared options of that first run (e.g. {"eps": 4.0})

    # Batches and optimisation (§8-9): StructureSGD for every method.
    forget_batch_size: int = 128
    proxy_batch_size: int = 128
    lr: float = 0.005                # backbone + head
    head_lr: Optional[float] = None  # classifier head; None -> lr, 0 -> frozen head [ours]
    momentum: float = 0.0
    weight_decay: float = 0.0
    lam: float = 1.0                 # SR weight λ of the fused update (§6), for methods with an importance
    proximal: bool = False           # the SR term as a proximal (implicit) step (§12)
    grad_clip: Optional[float] = None
    max_epochs: int = 100
    max_steps: Optional[int] = None  # hard cap on optimisation steps (None = epochs decide)

    # The shared loss pieces a method may use (UnlearnContext.deletion / loss_weights, §8).
    deletion: str = "ascent"         # "ascent" (−CE), "bounded" (−mean min(CE_i, ln C + 1)) or "margin" [ours]
    deletion_bound: Optional[float] = None  # None -> ln C + 1
    deletion_margin: float = 1.0     # "margin": mean_i relu(z_y − max_{j≠y} z_j + m)
    loss_weighting: str = "batch_fraction"  # "batch_fraction" (n_f/(n_f+n_a), §8) or "equal" (1 and 1) [ours]

    # The data order (§9a.2): shuffled each epoch [ours], or (False) in index order, the forget
    # loader cycling on across epochs (the authors').
    shuffle: bool = True

    # The stop rule (§9, §9a.3): forget accuracy 0 % through the deployed model, checked at the end of
    # an epoch ("epoch") or after every step ("step", mid-epoch), from epoch `stop_start_epoch` on
    # (0-based: 0 checks from the first epoch's end / step, 1 from the second epoch).
    stop_check: str = "epoch"
    stop_start_epoch: int = 0
    stop_warmup_steps: int = 0       # no stop check before this many steps
    # The reference code's quirks (off by default [ours]).
    skip_sr_first_steps: bool = False   # no SR term on the first two steps of every epoch (§9a.6)
    bn_train_mode: bool = False         # the backbone's BatchNorm in training mode while unlearning (§9a.6)
    projector_eval_after_check: bool = False   # the stop check leaves the projector in eval mode (§9a.4)

    # Bookkeeping.
    log_every: Optional[int] = None  # a trajectory entry (the evaluation sets, drift, losses) every this many
                                     # steps; None: none, the evaluation sets once at the end (the stop rule
                                     # checks the forget set at its own cadence whatever this is)
    eval_max_samples: Optional[int] = 2000  # cap on test / retain samples per trajectory entry
    backend: Optional[str] = None    # fused backend; None = automatic
    device: str = "cpu"
    progress: bool = True
    deterministic: bool = False      # deterministic cuDNN / torch algorithms on a GPU (slower), see below

    # How the model work executes (stakes.execution); None = automatic for the device.
    precision: Optional[str] = None  # "fp32" | "bf16" | "fp16" autocast; None: bf16 on CUDA sm_80+, else fp32
    channels_last: Optional[bool] = None   # None: on for convolutional models (CUDA and CPU)
    compile: str = "off"             # torch.compile: "off" | "frozen" (the original's inference copy only: PGD,
                                     # its structures) | "default" | "max-autotune" (the backbones)
    cuda_graphs: Optional[bool] = None     # the PGD steps captured in a CUDA graph; None: on CUDA

    # A method's own options, {method name: {option: value}}, over the method's preset values.
    method_options: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "UnlearnConfig":
        own = "config"
        for name in ("proximal", "skip_sr_first_steps", "bn_train_mode", "progress", "deterministic", "shuffle",
                     "projector_eval_after_check", "pgd_weight_grads", "pgd_early_exit", "fold_batchnorm"):
            _check_bool(own, name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"config.seed must be an integer, got {self.seed!r}")
        for name in ("momentum", "target_success"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"config.{name} must be a number, got {v!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"config.device must be a torch device such as 'cpu' or 'cuda:0', got {self.device!r}") from None
        _check_choice(own, "preset", self.preset, PRESETS + ("custom",))
        for name in ("repetitions", "pgd_steps", "pgd_batch_size", "forget_batch_size", "proxy_batch_size",
                     "max_epochs"):
            _check_number(own, name, getattr(self, name), integer=True)
        for name in ("pgd_step_size", "lr"):
            _check_number(own, name, getattr(self, name))
        for name in ("weight_decay", "lam", "deletion_margin"):
            _check_number(own, name, getattr(self, name), allow_zero=True)
        _check_number(own, "stop_warmup_steps", self.stop_warmup_steps, allow_zero=True, integer=True)
        _check_number(own, "stop_start_epoch", self.stop_start_epoch, allow_zero=True, integer=True)
        _check_choice(own, "stop_check", self.stop_check, STOP_CHECKS)
        _check_choice(own, "pgd_start", self.pgd_start, PGD_STARTS)
        _check_choice(own, "pgd_order", self.pgd_order, PGD_ORDERS)
        _check_choice(own, "proxy_targets", self.proxy_targets, PROXY_TARGETS)
        _check_choice(own, "proxy_order", self.proxy_order, PROXY_ORDERS)
        if not isinstance(self.proxy_model, str) or not self.proxy_model:
            raise ValueError(f"config.proxy_model must be 'pretrained' or a registered method's name, got "
                             f"{self.proxy_model!r}")
        if not isinstance(self.proxy_model_options, dict) or not all(isinstance(k, str) for k in self.proxy_model_options):
            raise ValueError(f"config.proxy_model_options must be a dict {{option: value}}, got {self.proxy_model_options!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"config.momentum must be in [0, 1), got {self.momentum!r}")
        for name in ("eps", "grad_clip", "deletion_bound"):
            if getattr(self, name) is not None:
                _check_number(own, name, getattr(self, name))
        if self.head_lr is not None:
            _check_number(own, "head_lr", self.head_lr, allow_zero=True)
        if not 0.0 < self.target_success <= 1.0:
            raise ValueError(f"config.target_success must be in (0, 1], got {self.target_success!r}")
        for name in ("max_steps", "eval_max_samples", "log_every"):
            if getattr(self, name) is not None:
                _check_number(own, name, getattr(self, name), integer=True)
        _check_choice(own, "deletion", self.deletion, DELETION_KINDS)
        _check_choice(own, "loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        _check_choice(own, "backend", self.backend, (None, "triton", "reference"))
        _check_choice(own, "precision", self.precision, (None, "fp32", "bf16", "fp16"))
        _check_choice(own, "compile", self.compile, ("off", "frozen", "default", "max-autotune"))
        for name in ("channels_last", "cuda_graphs"):
            if getattr(self, name) is not None:
                _check_bool(own, name, getattr(self, name))
        if not isinstance(self.method_options, dict) or not all(
                isinstance(k, str) and isinstance(v, dict) for k, v in self.method_options.items()):
            raise ValueError("config.method_options must be a dict {method name: {option: value}}, got "
                             f"{self.method_options!r}")
        return self

    @classmethod
    def _unknown_hint(cls) -> str:
        return ("; a method's own options (e.g. StructGuard's align_weight) go into method_options={name: {...}}, or "
                "through stakes.preset(name, method=..., **options)")

    def with_method_options(self, method: str, **options) -> "UnlearnConfig":
        """A copy whose ``method_options[method]`` also holds ``options`` (checked when a run of
        ``method`` starts, against the method's own config)."""
        merged = {**self.method_options, method: {**self.method_options.get(method, {}), **options}}
        return self.replace(method_options=merged)


@dataclass
class MethodConfig(_Options):
    """Base of a method's own options: a dataclass of them, with ``PRESETS`` {preset name: values}.

    A subclass declares its fields (with the defaults of a hand-built config), overrides
    :meth:`validate` for their checks, and lists in ``PRESETS`` the values each of
    :data:`PRESETS` gives them."""

    PRESETS: ClassVar[dict] = {}
    _owner: ClassVar[str] = "method option"

    def __post_init__(self):
        self.validate()

    def validate(self):
        return self

    @classmethod
    def for_preset(cls, name: str, **overrides):
        """The options of preset ``name`` ("custom": the dataclass defaults) with ``overrides``."""
        values = dict(cls.PRESETS.get(name, {})) if name != "custom" else {}
        values.update(overrides)
        cls._refuse_unknown(values)
        return cls(**values)


_PAPER = dict(eps=3.0, lr=0.005, lam=1.0, deletion="ascent", grad_clip=None, proximal=False)
_PRESET_VALUES = {
    # METHOD.md §3-9: the paper's numbers and settings (CIFAR-10 values), in stakes' control flow.
    "paper": dict(_PAPER),
    # METHOD.md §9a: the authors' CIFAR-10 script as it runs — the paper's settings and every behaviour
    # of their control flow: index-order data, the stop check after every step from the second epoch
    # (at most 101 epochs), the projector left in eval mode by it, no SR on an epoch's first two steps,
    # BatchNorm in training mode, advertorch's PGD (start, clamp then project, collision target, weight
    # gradients) per forget batch; cuDNN deterministic. StructGuard's own part (the model its proxies
    # attack: the one their L2UL baseline unlearned first; the importance at step 2, ...) is its
    # method's preset.
    "authors": dict(_PAPER, shuffle=False, stop_check="step", stop_start_epoch=1, max_epochs=101,
                    projector_eval_after_check=True, skip_sr_first_steps=True, bn_train_mode=True,
                    pgd_start="box_sphere", pgd_order="clamp_project", proxy_targets="collision_half",
                    proxy_order="forget_batch", pgd_weight_grads=True, deterministic=True, fold_batchnorm=False),
    # METHOD.md §12's stabilisers (calibrated radius, clipping at 2, proximal SR step) plus the
    # measured fixes of §13 [ours]: the smallest deletion push that misclassifies (margin), weighted
    # equally with retention.
    "stable": dict(eps=None, grad_clip=2.0, proximal=True, deletion="margin", loss_weighting="equal"),
}


def preset(name: str = "stable", **overrides) -> UnlearnConfig:
    """The shared options of preset ``name`` ("stable", "paper" or "authors"), with ``overrides``.

    A method's own preset values (StructGuard's warm-started projector, the baselines' optimiser
    under ``paper``) and options come from ``stakes.preset(name, method=..., **options)``."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
    if "method" in overrides:
        raise ValueError("stakes.config.preset builds the options every run shares; a method's preset (its own "
                         "options and, under 'paper', the baselines' optimiser) comes from "
                         "stakes.preset(name, method=...)")
    values = {**_PRESET_VALUES[name], **overrides, "preset": name}
    UnlearnConfig._refuse_unknown(values)
    return UnlearnConfig(**values)


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
