"""``python -m benchmarks whole-run``: the authors' released StructGuard script, as it runs, against
stakes' defaults, one whole unlearning run each, in one process, per phase (issue 17 item 5, issue 24
Deliver 1; PERFORMANCE.md "Where a whole run's time goes"; METHOD.md §9a).

The same inputs for both: one network with random weights, random images (uint8, as CIFAR-10 holds
them) and labels for the forget set, the retained training set D_r and the test set, random unit
anchors [10, 512], the PGD radius 3.0 (fixed: no calibration on either side).

* ``authors`` — ``main_unlearn_cifar10.py``'s StructGuard part as it runs (METHOD.md §3-9a), written
  here in plain eager PyTorch from its behaviour (no code of theirs is copied), fp32 (on a card cuDNN's
  default TF32 for fp32 convolutions applies, as for them; matrix products plain fp32):

  - **their network**: the model's features and head with their normalisation layer (the mean and
    std repeated to the batch's shape, permuted, subtracted and divided: four full-size tensors a
    forward) in place of stakes' one;
  - **their data path** (``loaders=True``, the default): images held on the host as uint8 HWC arrays
    and converted per batch by a ``torch.utils.data.DataLoader`` (PIL ``Image.fromarray`` +
    ``ToTensor``, ``num_workers=0``, unshuffled, batches of 128), every batch copied to the card
    with a blocking ``.to(device)`` (the proxy, retained and test loaders pinned, as their CUDA
    kwargs do; the forget loader not); the forget loader cycled with ``itertools.cycle`` (which keeps
    the first pass's batches); the proxies copied back to the host after each attack and served by a
    loader over per-image numpy arrays. ``loaders=False`` (``--kernels-only``) keeps every tensor on
    the device instead, for a comparison of the device work alone. On the CPU the loaders still
    convert every image (PIL and ToTensor are host work on any device); the copies are no-ops and
    nothing is pinned;
  - **proxies** (advertorch's ``L2PGDAttack``: ``rand_init=True``, ``targeted=True``, clip [0, 1],
    ``CrossEntropyLoss(reduction="sum")``): for each forget batch of 128 (the forget loader), R
    repetitions, each a fresh target ⌊U·C⌋ with a collision replaced by C//2 (drawn on the host and
    copied), a start uniform in [0, 1]^D minus x projected onto the ε-ball and clamped, then
    ``pgd_steps`` steps of ``loss.backward()`` on the attacked model **whose parameters require
    grad** (every step also computes the weight gradients and accumulates them into ``.grad``, never
    zeroed), δ ← δ + α·g/max(‖g‖, 1e-6), clamp to [0, 1], then project onto the ε-ball;
    ``.detach().cpu().numpy()`` after each attack;
  - **optimisation**: an epoch zips the unshuffled proxy loader with the cycled forget loader;
    ``model.train()`` before each step (BatchNorm on batch statistics, running statistics updated),
    ``model.eval()`` after it; L = L_del + L_ret + L_align + λ·L_reg + 0.001·L_CR with the batch
    fractions, L_align against the frozen original (eval mode) recomputed every step, L_reg built
    tensor by tensor over every parameter (the head's zero importance included) and differentiated by
    autograd, **skipped on the first two steps of every epoch**, ``torch.optim.SGD`` (lr 0.005 backbone
    + head, 0.009 projector); the proxy batch copied to the card twice a step (their two ``.to``);
  - **importance at step 2** (the epoch's ``i == 1``, after its forward and before its backward):
    over the **unshuffled proxy loader cycled until ≥ N_tot samples** (the same ⌈N_s/128⌉ batches
    repeated), through a deep copy of the projector in its current mode and against a copy of the
    pretrained model made before unlearning, **in train mode** (BatchNorm on batch statistics);
    ``model.zero_grad()`` then ``loss.backward()`` a batch (the projector copy's gradients accumulate),
    ``I += |grad|·B`` tensor by tensor, divided by the samples seen;
  - **stop check**: none in the first epoch; from the second epoch on, forget accuracy through
    h∘p∘g (eval mode; it leaves the projector in eval mode for the rest of the run, the loop sets
    only the backbone back to train) **after every step**: the forget loader iterated afresh (PIL
    again), the loss and one ``.item()`` a batch. The benchmark fixes the step count, so the check
    runs but never stops the run;
  - **final evaluation**: the forget set, D_r and the test set through h∘p∘g, their loaders;
  - ``torch.backends.cudnn.deterministic = True`` and ``benchmark = False`` while it runs (restored
    after).

* ``stakes`` — ``stakes.unlearn(model, (fx, fy), method="structguard", anchors=A,
  config=stakes.preset("stable", method="structguard", eps=3.0, repetitions=R, pgd_steps=P,
  max_steps=S, stop_warmup_steps=10**9, importance_samples=N_tot, eval_max_samples=None,
  progress=False, device=...), eval_sets={"retain": D_r, "test": test})``:
  stakes' defaults (the stable preset; the execution policy — precision, channels_last, compile,
  CUDA graphs — left automatic, recorded from ``result.execution``), timed by ``result.timings``.
  Its data: the same uint8 host arrays converted to float tensors on the device once (timed, in its
  whole time as ``data_s``; not with ``loaders=False``). Its stop rule is off (the benchmark fixes the
  step count; stakes has no check that does not stop): its checks at epoch ends, one forward of the
  forget set each, are not run here (the work says so). No trajectory (stakes' default): the
  evaluation sets once at the end. ``eval_max_samples=None``: stakes evaluates the whole of D_r and the
  test set (its default caps an evaluation set at 2,000 images), so the final metrics are on the same
  sets.

**Work.** Counted as the runs go, both sides (``work``):

* the same by design (a difference fails the run): proxies, PGD image-steps, optimisation steps, and
  the final evaluation's sets and sizes (forget, D_r, test);
* different by design (counted, reported side by side, never an error): PGD image-steps that also
  computed weight gradients (the authors': all), importance samples and batches (the authors' cycled
  loader; stakes' own estimator, as ``result.timings`` reports it when it does, else its rule),
  stop checks (the authors' every step from the second epoch, run; stakes' at epoch ends, not run
  here), evaluations and evaluated images (their stop checks and final evaluation; stakes' final one).

Phases: ``proxies``, ``importance``, ``steps`` (the optimisation loop without its evaluations and, for
the authors, without the importance pass inside step 2), ``evaluation`` (stop checks, trajectory
entries, final evaluation); ``whole`` is each recipe's wall time from its model copies to its result,
and the ratio is authors / stakes (> 1: stakes faster). Before the timed runs each recipe runs once at
a tiny size (warm-up; recorded, not counted). ``repeats`` > 1 runs the recipes that many times,
interleaved (authors, stakes, authors, stakes, ...), and keeps each phase's fastest time and the
fastest whole (contention only slows a run down; every run is kept under ``runs``).

Rows: the authors' network (``stakes.authors.build("cifar10_resnet18")``: 3×3 stride-1 stem **and its
max-pool**) is the headline; stakes' CIFAR ResNet-18 (``stakes.models.build_model("resnet18")``, no
max-pool, 4× the FLOPs) a second row. On a card, ``--launch-blocking-row`` adds the authors' recipe run
in a child process under ``CUDA_LAUNCH_BLOCKING=1`` (the published command's setting): shown, never a
headline. Results: ``whole_run.json`` and ``.csv`` in the output folder, rewritten after each run.
Exit status 1 when a recipe fails or the work that must be the same differs.

Sizes (``Work``): ``full`` (the issue's: k = 256, R = 20, 100 PGD steps, N_tot = |D_r| = 49,744,
3 epochs, a 10,000-image test set), ``representative`` (a CPU size whose phase shares match the full
run's: the real R and PGD steps at k = 8, N_tot / N_s and the evaluated sets scaled with N_s as in the
full run), ``quick`` (a reduced smoke size).
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import measure

PHASES = ("proxies", "importance", "steps", "evaluation")
SAME_KEYS = ("proxies", "pgd_image_steps", "optimisation_steps", "final_evaluation")
DESIGN_KEYS = ("pgd_weight_grad_image_steps", "importance_samples", "importance_batches", "step_forget_rows",
               "stop_checks", "evaluations", "evaluated_images")
WORK_KEYS = SAME_KEYS + DESIGN_KEYS
NUM_CLASSES = 10
CIFAR_TRAIN = 50_000
CIFAR_TEST = 10_000
EXECUTION_FIELDS = ("precision", "channels_last", "compile", "cuda_graphs")


# ----------------------------------------------------------------------------- the work


@dataclass(frozen=True)
class Work:
    """The size of one whole run (the same inputs for both recipes)."""

    k: int                      # forget images
    repetitions: int            # R
    pgd_steps: int
    steps: int                  # optimisation steps
    importance_samples: int     # N_tot (their num_samples = |D_r|)
    test_size: int              # test images of the final evaluation
    batch: int = 128            # forget / proxy / PGD / importance / evaluation batch of the authors
    eps: float = 3.0
    step_size: float = 0.1
    anchor_dim: int = 512
    label: str = "custom"
    retain_size: Optional[int] = None   # D_r images of the final evaluation (None: importance_samples)
    stop_start_epoch: int = 1   # the authors' stop check from this epoch on (0-based)

    def __post_init__(self):
        for name in ("k", "repetitions", "pgd_steps", "steps", "importance_samples", "test_size", "batch",
                     "anchor_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.retain_size is not None and (isinstance(self.retain_size, bool) or not isinstance(self.retain_size, int)
                                             or self.retain_size < 1):
            raise ValueError(f"retain_size must be a positive integer or None, got {self.retain_size!r}")

    @property
    def n_proxies(self) -> int:
        return self.repetitions * self.k

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_proxies / self.batch)

    @property
    def forget_batch(self) -> int:
        return min(self.batch, self.k)

    @property
    def retain(self) -> int:
        return self.retain_size if self.retain_size is not None else self.importance_samples

    def forget_batches_in_order(self) -> List[int]:
        """The sizes of the unshuffled forget loader's batches (the last one partial)."""
        return [min(self.batch, self.k - i) for i in range(0, self.k, self.batch)]

    def authors_step_forget_rows(self) -> int:
        """Their cycled forget loader: step t takes batch t mod ⌈k/B⌉, the last one partial."""
        sizes = self.forget_batches_in_order()
        return sum(sizes[t % len(sizes)] for t in range(self.steps))

    def authors_stop_checks(self) -> int:
        """Their check runs after every step of epoch ``stop_start_epoch`` and later."""
        return max(0, self.steps - self.stop_start_epoch * self.steps_per_epoch)

    def final_evaluation(self) -> Dict[str, int]:
        return {"forget": self.k, "retain": self.retain, "test": self.test_size}

    def expected_authors(self) -> Dict[str, object]:
        """The work the authors' recipe does (``work.authors`` in the results)."""
        checks = self.authors_stop_checks()
        imp = importance_batches(self.n_proxies, self.batch, self.importance_samples)
        final = self.final_evaluation()
        return {"proxies": self.n_proxies, "pgd_image_steps": self.n_proxies * self.pgd_steps,
                "pgd_weight_grad_image_steps": self.n_proxies * self.pgd_steps,
                "importance_samples": sum(imp), "importance_batches": len(imp),
                "optimisation_steps": self.steps, "step_forget_rows": self.authors_step_forget_rows(),
                "stop_checks": checks, "evaluations": checks + 1,
                "evaluated_images": checks * self.k + sum(final.values()), "final_evaluation": final}

    def expected(self) -> Dict[str, object]:
        """The work both recipes must do alike (``SAME_KEYS``)."""
        a = self.expected_authors()
        return {key: a[key] for key in SAME_KEYS}


def importance_batches(n_proxies: int, batch: int, n_tot: int) -> List[int]:
    """The batch sizes of the authors' importance pass: the unshuffled proxy loader (batches of
    ``batch``, the last one partial) cycled until at least ``n_tot`` samples (METHOD.md §6, §9a.5)."""
    sizes, seen = [], 0
    while seen < n_tot:
        for i in range(0, n_proxies, batch):
            if seen >= n_tot:
                break
            b = min(batch, n_proxies - i)
            sizes.append(b)
            seen += b
    return sizes


def full_work(k: int = 256) -> Work:
    """The issue's size: CIFAR-10, k forget images, R = 20, 100 PGD steps, N_tot = |D_r| = 50,000 − k
    (their ``num_samples``; D_r is evaluated whole at the end), 3 epochs of steps, the 10,000-image
    test set."""
    w = Work(k=k, repetitions=20, pgd_steps=100, steps=1, importance_samples=CIFAR_TRAIN - k, test_size=CIFAR_TEST,
             label="full" if k == 256 else f"full but k = {k}")
    return replace(w, steps=3 * w.steps_per_epoch)


def representative_work(k: int = 8) -> Work:
    """A CPU size whose phase shares match the full run's: the real R = 20 and 100 PGD steps at a
    small k, 3 epochs of steps, and N_tot = |D_r| and the test set scaled with N_s = R·k as in the
    full run (N_tot / N_s = 49,744 / 5,120, test / N_s = 10,000 / 5,120)."""
    full = full_work()
    n_s = 20 * k
    n_tot = round(n_s * full.importance_samples / full.n_proxies)
    w = Work(k=k, repetitions=20, pgd_steps=100, steps=1, importance_samples=n_tot,
             test_size=round(n_s * full.test_size / full.n_proxies),
             label=f"representative (CPU): k = {k}, R = 20, 100 PGD steps, 3 epochs, N_tot and the test set "
                   f"scaled with N_s as in the full run")
    return replace(w, steps=3 * w.steps_per_epoch)


def phase_passes(work: Work) -> Dict[str, float]:
    """The authors' recipe's work per phase in forward-pass equivalents of one image (a forward 1, a
    backward to the input 1, one to the input and the weights 2): what ``representative`` matches."""
    nf, spe = work.forget_batch, work.steps_per_epoch
    proxy_rows = sum(min(work.batch, work.n_proxies - (s % spe) * work.batch) for s in range(work.steps))
    imp = sum(importance_batches(work.n_proxies, work.batch, work.importance_samples))
    return {"proxies": work.n_proxies * work.pgd_steps * 3.0,          # forward + backward to input and weights
            "importance": imp * (3.0 + 1.0),                            # live forward+backward, reference forward
            "steps": work.steps * nf * 3.0 + proxy_rows * (3.0 + 1.0),  # forget and proxy rows, original forward
            "evaluation": float(work.authors_stop_checks() * work.k + sum(work.final_evaluation().values()))}


def phase_shares(work: Work) -> Dict[str, float]:
    p = phase_passes(work)
    total = sum(p.values())
    return {k: v / total for k, v in p.items()}


QUICK = Work(k=16, repetitions=2, pgd_steps=3, steps=3, importance_samples=64, test_size=32, retain_size=48, batch=16,
             label="reduced (CPU --quick): k = 16, R = 2, 3 PGD steps, batches of 16, 3 steps (2 an epoch), 64 "
                   "importance samples, 48 retained and 32 test images")
WARMUP = Work(k=4, repetitions=2, pgd_steps=1, steps=3, importance_samples=8, test_size=4, retain_size=4, batch=4,
              label="warm-up")
SIZES = {"full": full_work, "representative": representative_work, "quick": lambda: QUICK}


# ----------------------------------------------------------------------------- networks and inputs


def authors_network() -> nn.Module:
    """The authors' CIFAR-10 ResNet-18 (max-pool stem) as a stakes Classifier, random weights."""
    from stakes.authors import build
    from stakes.models import as_classifier

    return as_classifier(build("cifar10_resnet18", num_classes=NUM_CLASSES))


def stakes_resnet18() -> nn.Module:
    """stakes' own CIFAR ResNet-18 (no max-pool), random weights."""
    from stakes.models import build_model

    return build_model("resnet18", NUM_CLASSES, in_channels=3, image_size=32)


NETWORKS = {
    "authors": ("CIFAR-10 ResNet-18 of the authors' code (stakes.authors.build('cifar10_resnet18')): 3x3 stride-1 "
                "stem and max-pool, random weights", authors_network),
    "resnet18": ("stakes' CIFAR ResNet-18 (stakes.models.build_model('resnet18')): no max-pool, 4x the FLOPs, "
                 "random weights", stakes_resnet18),
}


def default_model() -> nn.Module:
    return authors_network()


@dataclass
class Inputs:
    """The same inputs for both recipes: the model, the anchors, and the images as CIFAR-10 holds
    them (uint8 [N, H, W, C] numpy arrays on the host, int64 labels), plus the same images as float
    tensors on the device (x / 255, NCHW) for the kernels-only comparison."""

    model: nn.Module            # a stakes Classifier (features, head)
    anchors: torch.Tensor       # [num_classes, anchor_dim], unit rows, on the device
    host: Dict[str, Tuple[np.ndarray, np.ndarray]]   # "forget" / "retain" / "test" -> (uint8 NHWC, labels)
    device: Dict[str, Tuple[torch.Tensor, torch.Tensor]]

    # the forget set on the device (the older interface)
    @property
    def fx(self):
        return self.device["forget"][0]

    @property
    def fy(self):
        return self.device["forget"][1]

    @property
    def tx(self):
        return self.device["test"][0]

    @property
    def ty(self):
        return self.device["test"][1]


def to_device(images: np.ndarray, labels: np.ndarray, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, H, W, C] → float [N, C, H, W] in [0, 1] on ``device`` (x / 255: ToTensor's arithmetic)."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    return x, torch.from_numpy(labels).to(device)


def make_inputs(work: Work, device: torch.device, *, seed: int = 0,
                model_builder: Optional[Callable[[], nn.Module]] = None, image_shape=(3, 32, 32)) -> Inputs:
    """Random weights, random uint8 images and labels, random unit anchors."""
    torch.manual_seed(seed)
    model = (model_builder or default_model)().to(device).eval()
    rng = np.random.default_rng(seed)
    c, h, w = image_shape
    host = {}
    for name, n in (("forget", work.k), ("retain", work.retain), ("test", work.test_size)):
        host[name] = (rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8),
                      rng.integers(0, NUM_CLASSES, size=n, dtype=np.int64))
    g = torch.Generator().manual_seed(seed)
    anchors = F.normalize(torch.randn(NUM_CLASSES, work.anchor_dim, generator=g), dim=1)
    dev = {name: to_device(x, y, device) for name, (x, y) in host.items()}
    return Inputs(model, anchors.to(device), host, dev)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the authors' data path


def _to_tensor(pic) -> torch.Tensor:
    """torchvision's ``ToTensor`` of a PIL image (its own function when torchvision is installed)."""
    try:
        from torchvision.transforms.functional import to_tensor
    except ImportError:   # the same arithmetic: HWC uint8 → CHW float / 255
        arr = np.array(pic, np.uint8, copy=True)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous().to(torch.get_default_dtype()).div(255)
    return to_tensor(pic)


class HostImages(torch.utils.data.Dataset):
    """A CIFAR-10-like dataset: uint8 HWC images held on the host, each item a PIL image through ToTensor."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.data, self.targets = images, [int(v) for v in labels]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image

        img = self.data[i]
        return _to_tensor(Image.fromarray(img if img.shape[2] != 1 else img[:, :, 0])), self.targets[i]


class JointDataset(torch.utils.data.Dataset):
    """Their proxy dataset: a list of per-image numpy arrays and a list of labels."""

    def __init__(self, inputs: list, labels: list):
        self.inputs, self.labels = inputs, labels

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, i):
        return self.inputs[i], self.labels[i]


class DeviceBatches:
    """The kernels-only stand-in for a loader: unshuffled batches sliced from tensors already on the device."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int):
        self.x, self.y, self.batch = x, y, batch
        self.dataset = y

    def __len__(self):
        return math.ceil(len(self.y) / self.batch)

    def __iter__(self):
        for i in range(0, len(self.y), self.batch):
            yield self.x[i:i + self.batch], self.y[i:i + self.batch]


def pin_memory(device: torch.device) -> bool:
    """Their CUDA kwargs pin the proxy, retained and test loaders (``pin_memory=True``); nothing on the CPU."""
    return device.type == "cuda"


class Timed:
    """An iterable whose ``__next__`` time (the host's loading: conversion, collation, pinning) is summed."""

    def __init__(self, it, clock: dict):
        self.it, self.clock = it, clock

    def __iter__(self):
        inner = iter(self.it)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(inner)
            except StopIteration:
                self.clock["host_loading_s"] += time.perf_counter() - t0
                return
            self.clock["host_loading_s"] += time.perf_counter() - t0
            yield item

    def __len__(self):
        return len(self.it)


# ----------------------------------------------------------------------------- the authors' recipe


class AuthorsNormalize(nn.Module):
    """Their normalisation layer as it computes: mean and std repeated to [B, H, W, C], permuted to
    NCHW, then (x − mean) / std."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("means", torch.as_tensor(mean, dtype=torch.float32).flatten().clone())
        self.register_buffer("sds", torch.as_tensor(std, dtype=torch.float32).flatten().clone())

    def forward(self, x):
        b, c, h, w = x.shape
        means = self.means.repeat((b, h, w, 1)).permute(0, 3, 1, 2)
        sds = self.sds.repeat((b, h, w, 1)).permute(0, 3, 1, 2)
        return (x - means) / sds


def with_authors_normalisation(module: nn.Module) -> nn.Module:
    """``module`` with every stakes ``Normalize`` replaced by :class:`AuthorsNormalize` (same values)."""
    from stakes.models import Normalize

    for name, child in list(module.named_children()):
        if isinstance(child, Normalize):
            setattr(module, name, AuthorsNormalize(child.mean, child.std))
        else:
            with_authors_normalisation(child)
    return module


class AuthorsProjector(nn.Module):
    """p_ω (METHOD.md §7, their ProjectionMLP): Linear(d_f, d_a) → BatchNorm1d → ReLU → Linear(d_a, d_f),
    random init; returns (output, z): z is the output when d_f = d_a, else the hidden layer."""

    def __init__(self, d_f: int, d_a: int):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(d_f, d_a), nn.BatchNorm1d(d_a), nn.Linear(d_a, d_f)
        self.same = d_f == d_a

    def forward(self, h):
        hidden = self.fc1(h)
        out = self.fc2(F.relu(self.bn(hidden)))
        return out, (out if self.same else hidden)


def authors_projection(d_f: int, d_a: int, seed: int) -> Optional[torch.Tensor]:
    """R_p (§4): None when d_f = d_a (their CIFAR-10 script: no projection), else Gaussian, unit columns."""
    if d_f == d_a:
        return None
    r = torch.randn(d_f, d_a, generator=torch.Generator().manual_seed(seed + 7))
    return r / r.norm(dim=0, keepdim=True)


def eager_alignment_loss(v_unl: torch.Tensor, v_ori: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """L_align = 1 − mean_i cos(S_i^ori, S_i^unl), S = normalize(V)·Aᵀ (METHOD.md §4-5), eager."""
    s = F.normalize(v_unl, dim=1).float() @ anchors.t()
    s0 = F.normalize(v_ori, dim=1).float() @ anchors.t()
    return 1.0 - F.cosine_similarity(s0, s, dim=1).mean()


def _l2_norms(x: torch.Tensor) -> torch.Tensor:
    """advertorch's per-sample norm: |x|^2 summed over the sample, then the square root."""
    return x.abs().pow(2).view(x.shape[0], -1).sum(dim=1).pow(0.5)


def _batch_mul(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """advertorch's batch_multiply: (x.transpose(0, -1) * v).transpose(0, -1).contiguous()."""
    return (x.transpose(0, -1) * v).transpose(0, -1).contiguous()


def _clamp_by_l2(x: torch.Tensor, eps: float) -> torch.Tensor:
    factor = torch.min(eps / _l2_norms(x), torch.ones(x.shape[0], device=x.device))
    return _batch_mul(factor, x)


def _clamp01(x: torch.Tensor) -> torch.Tensor:
    """advertorch's clamp with float bounds: the lower bound, then the upper one (two kernels)."""
    return torch.clamp(torch.clamp(x, min=0.0), max=1.0)


def authors_pgd_step(model: nn.Module, x: torch.Tensor, delta: torch.Tensor, target: torch.Tensor, eps: float,
                     alpha: float) -> None:
    """One step of advertorch's perturb_iterative (ord 2, targeted: the loss negated), in place on
    ``delta`` (a leaf that requires grad): summed CE, ``loss.backward()`` (the model's parameters
    require grad: their gradients are computed and accumulated too), δ ← δ + α·g/max(‖g‖, 1e-6)
    (the step size a float: one in-place multiply), clamp x + δ to [0, 1], then project δ onto the
    ε-ball; δ's gradient zeroed."""
    loss = -F.cross_entropy(model(x + delta), target, reduction="sum")
    loss.backward()
    g = delta.grad.data
    norm = torch.max(_l2_norms(g), torch.ones(g.shape[0], device=g.device) * 1e-6)
    g = _batch_mul(1.0 / norm, g)
    g *= alpha
    delta.data = delta.data + g
    delta.data = _clamp01(x.data + delta.data) - x.data
    delta.data = _clamp_by_l2(delta.data, eps)
    delta.grad.data.zero_()


def authors_perturb(model: nn.Module, x: torch.Tensor, target: torch.Tensor, work: Work, counts: dict) -> torch.Tensor:
    """advertorch's ``L2PGDAttack.perturb(x, target)`` with ``rand_init=True``, clip [0, 1]."""
    x = x.detach().clone()
    target = target.detach().clone()
    delta = torch.zeros_like(x)
    delta.uniform_(0.0, 1.0)                    # rand_init_delta, ord 2: U[clip_min, clip_max] − x, onto the ε-ball
    delta = _clamp_by_l2(delta - x, work.eps)
    delta = _clamp01(x + delta) - x
    delta = nn.Parameter(delta)
    weight_grads = any(p.requires_grad for p in model.parameters())
    for _ in range(work.pgd_steps):
        authors_pgd_step(model, x, delta, target, work.eps, work.step_size)
        counts["pgd_image_steps"] += x.shape[0]
        counts["pgd_weight_grad_image_steps"] += x.shape[0] if weight_grads else 0
        counts["pgd_batches"] += 1
    return _clamp01(x + delta.data)


def authors_targets(y: torch.Tensor, device: torch.device) -> torch.Tensor:
    """⌊U·C⌋ drawn on the host and copied; a draw equal to the true label replaced by C//2."""
    t = (torch.rand(y.shape[0]).to(device) * NUM_CLASSES).to(torch.long)
    return torch.where(t == y, (torch.rand(y.shape[0]).long().to(device) * NUM_CLASSES + NUM_CLASSES) // 2, t)


def authors_proxies(attacked: nn.Module, forget_loader, work: Work, device: torch.device, counts: dict,
                    loaders: bool):
    """adv_attack: for each forget batch, R attacks; each result back to the host as per-image numpy
    arrays (``loaders``) or kept on the device."""
    attacked.eval()
    xs, ys = [], []
    for x, y in forget_loader:
        x, y = x.to(device), y.to(device)
        for _ in range(work.repetitions):
            target = authors_targets(y, device)
            adv = authors_perturb(attacked, x, target, work, counts)
            if loaders:
                xs.extend(list(adv.detach().cpu().numpy()))
                ys.extend(list(target.cpu().numpy()))
            else:
                xs.append(adv.detach())
                ys.append(target)
    counts["proxies"] = len(xs) if loaders else sum(len(t) for t in ys)
    return xs, ys


class _Authors:
    """The authors' unlearning state: their model (features + head with their normalisation), the
    frozen original, the copy for the importance, the projector and the reference parameters."""

    def __init__(self, model: nn.Module, anchors: torch.Tensor, device: torch.device, seed: int):
        base = with_authors_normalisation(copy.deepcopy(model)).to(device)
        self.work = copy.deepcopy(base).train()
        for p in self.work.parameters():
            p.requires_grad_(True)
        self.features, self.head = self.work.features, self.work.head
        self.orig = copy.deepcopy(base).eval()          # original_model: eval, no gradients
        for p in self.orig.parameters():
            p.requires_grad_(False)
        self.imp_ref = copy.deepcopy(self.work)         # model_for_importance: a copy made before unlearning
        d_f, d_a = self.head.in_features, anchors.shape[1]
        torch.manual_seed(seed + 1)
        self.proj = AuthorsProjector(d_f, d_a).to(device)
        rp = authors_projection(d_f, d_a, seed)
        self.rp = rp.to(device) if rp is not None else None
        self.anchors = anchors
        self.params = list(self.work.named_parameters())          # every parameter, the head's included
        self.params0 = {n: p.detach().clone() for n, p in self.params}

    def deployed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.features(x))[0])

    def structure(self, x: torch.Tensor, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            f = model.features(x)
            return f if self.rp is None else f @ self.rp


def authors_importance_batch(st: _Authors, proj: nn.Module, xb: torch.Tensor, imp: Dict[str, torch.Tensor]) -> None:
    """One batch of estimate_structure_aware_importance: the live model (train mode) through the
    projector copy, the pretrained copy (train mode, no grad), ``model.zero_grad()``, ``loss.backward()``,
    ``I += |grad|·B`` tensor by tensor."""
    _, z = proj(st.features(xb))
    loss = eager_alignment_loss(z, st.structure(xb, st.imp_ref), st.anchors)
    st.work.zero_grad()
    loss.backward()
    for n, p in st.params:
        if p.grad is not None:
            imp[n] += p.grad.abs() * xb.shape[0]


def authors_importance(st: _Authors, adv_loader, work: Work, device: torch.device, counts: dict) -> Dict[str, torch.Tensor]:
    """I_p = (1/N) Σ_B |B|·|∂L_align(B)/∂ψ_p| over the unshuffled proxy loader cycled until ≥ N_tot."""
    proj = copy.deepcopy(st.proj)          # their copy.deepcopy(projection_mlp), in its current mode
    st.work.train()
    imp = {n: torch.zeros_like(p) for n, p in st.params}
    total = 0
    it = iter(adv_loader)
    while total < work.importance_samples:
        try:
            xb, _ = next(it)
        except StopIteration:
            it = iter(adv_loader)
            xb, _ = next(it)
        xb = xb.to(device)
        total += xb.shape[0]
        authors_importance_batch(st, proj, xb, imp)
        counts["importance_batches"] += 1
    counts["importance_samples"] = total
    return {n: v / total for n, v in imp.items()}


def authors_eval_batch(st: _Authors, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """test_ours on one batch: the loss and the correct predictions of h∘p∘g (0-d tensors)."""
    out = st.deployed(x)
    pred = out.argmax(dim=1, keepdim=True)
    return F.cross_entropy(out, y), pred.eq(y.view_as(pred)).sum()


def authors_evaluate(st: _Authors, loader, device: torch.device, counts: dict) -> float:
    """test_ours: backbone and projector to eval mode (the loop puts only the backbone back), one
    ``.item()`` a batch; accuracy in percent."""
    st.work.eval()
    st.proj.eval()
    correct, loss, n = 0, 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            batch_loss, hits = authors_eval_batch(st, x, y)
            loss += batch_loss
            correct += hits.item()
            n += y.shape[0]
    counts["evaluated_images"] += n
    return 100.0 * correct / max(n, 1)


def authors_optimizer(st: _Authors, foreach: Optional[bool] = None) -> torch.optim.SGD:
    """Plain SGD (§9): lr 0.005 backbone + head, 0.009 projector, no momentum, torch's defaults."""
    return torch.optim.SGD([{"params": list(st.work.parameters()), "lr": 0.005},
                            {"params": list(st.proj.parameters()), "lr": 0.009}], lr=0.005, foreach=foreach)


def authors_step_forward(st: _Authors, xf, yf, xa_first, xa_second, ya):
    """A step's forward up to the terms that need no importance: L_del + L_ret + L_align + 0.001·L_CR.
    ``xa_first`` / ``xa_second``: the proxy batch as their two ``.to(device)`` give it (the trained
    model's and the original's)."""
    n_f, n_a = yf.shape[0], ya.shape[0]
    output = st.head(st.features(xf))
    emb, z = st.proj(st.features(xa_first))
    out_adv = st.head(emb)
    l_del = -F.cross_entropy(output, yf) * (n_f / (n_a + n_f))
    l_ret = F.cross_entropy(out_adv, ya) * (n_a / (n_a + n_f))
    l_align = eager_alignment_loss(z, st.structure(xa_second, st.orig), st.anchors)
    w = st.head.weight
    l_cr = 0.99 * torch.norm(w, p=1) + 0.5 * (1.0 - 0.99) * torch.norm(w, p="fro") ** 2
    return l_del + l_ret + l_align + 0.001 * l_cr


def authors_reg(st: _Authors, imp: Dict[str, torch.Tensor]) -> torch.Tensor:
    """L_reg = Σ_p sum(I_p (p − p0)²)/2 over every named parameter, built tensor by tensor."""
    reg = 0
    for n, p in st.params:
        reg = reg + torch.sum(imp[n] * (p - st.params0[n]).pow(2)) / 2
    return reg


def authors_recipe(inp: Inputs, work: Work, device: torch.device, seed: int = 0, *, loaders: bool = True) -> dict:
    """The authors' whole run; returns ``{"phases_s", "whole_s", "counts", "history", ...}``."""
    counts = {"proxies": 0, "pgd_image_steps": 0, "pgd_weight_grad_image_steps": 0, "pgd_batches": 0,
              "importance_samples": 0, "importance_batches": 0, "optimisation_steps": 0, "step_forget_rows": 0,
              "stop_checks": 0,
              "evaluations": 0, "evaluated_images": 0, "final_evaluation": {}}
    clock = {"host_loading_s": 0.0}
    phases = {p: 0.0 for p in PHASES}
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        _sync(device)
        t_start = time.perf_counter()
        torch.manual_seed(seed)
        st = _Authors(inp.model, inp.anchors, device, seed)
        pin = pin_memory(device)

        def loader(name, batch_pin):
            if not loaders:
                x, y = inp.device[name]
                return DeviceBatches(x, y, work.batch)
            x, y = inp.host[name]
            return Timed(torch.utils.data.DataLoader(HostImages(x, y), batch_size=work.batch, shuffle=False,
                                                     num_workers=0, pin_memory=batch_pin), clock)

        forget_loader = loader("forget", False)     # their naiive_unlearn_kwargs: batch 128 only
        retain_loader = loader("retain", pin)
        test_loader = loader("test", pin)

        # proxies: advertorch against the model their script holds (here: the pretrained weights, same cost)
        t0 = time.perf_counter()
        attacked = copy.deepcopy(st.work)
        xs, ys = authors_proxies(attacked, forget_loader, work, device, counts, loaders)
        del attacked
        if loaders:
            adv_loader = Timed(torch.utils.data.DataLoader(JointDataset(xs, ys), batch_size=work.batch, shuffle=False,
                                                           num_workers=0, pin_memory=pin), clock)
        else:
            adv_loader = DeviceBatches(torch.cat(xs), torch.cat(ys), work.batch)
        _sync(device)
        phases["proxies"] = time.perf_counter() - t0

        opt = authors_optimizer(st)
        history: List[dict] = []
        forget_cycle = itertools.cycle(forget_loader)
        imp: Optional[Dict[str, torch.Tensor]] = None
        t_loop = time.perf_counter()
        step, epoch = 0, 0
        while step < work.steps:
            st.work.train()
            for i, ((xa, ya), (xf, yf)) in enumerate(zip(adv_loader, forget_cycle)):
                if step >= work.steps:
                    break
                st.work.train()
                opt.zero_grad()
                loss = authors_step_forward(st, xf.to(device), yf.to(device), xa.to(device), xa.to(device),
                                            ya.to(device))
                if i == 1 and imp is None:      # their importance, inside the first epoch's second step
                    _sync(device)
                    t0 = time.perf_counter()
                    imp = authors_importance(st, adv_loader, work, device, counts)
                    opt.zero_grad(set_to_none=True)
                    _sync(device)
                    phases["importance"] = time.perf_counter() - t0
                if i > 1:
                    loss = loss + 1.0 * authors_reg(st, imp)
                loss.backward()
                opt.step()
                st.work.eval()
                step += 1
                counts["optimisation_steps"] += 1
                counts["step_forget_rows"] += yf.shape[0]
                if epoch >= work.stop_start_epoch:   # their stop check after every step (never stops here)
                    _sync(device)
                    t0 = time.perf_counter()
                    acc = authors_evaluate(st, forget_loader, device, counts)
                    counts["stop_checks"] += 1
                    counts["evaluations"] += 1
                    history.append({"step": step, "forget_accuracy": acc})
                    _sync(device)
                    phases["evaluation"] += time.perf_counter() - t0
            epoch += 1
        if imp is None:   # their importance runs at an epoch's second step: an epoch of one step never reaches it
            raise ValueError(f"the authors' recipe computes its importance at the first epoch's second step: this work "
                             f"has {work.steps_per_epoch} step(s) an epoch and {work.steps} in all")
        _sync(device)
        loop_s = time.perf_counter() - t_loop
        phases["steps"] = loop_s - phases["evaluation"] - phases["importance"]

        t0 = time.perf_counter()
        final = {"step": step}
        for name, ld in (("forget", forget_loader), ("retain", retain_loader), ("test", test_loader)):
            final[f"{name}_accuracy"] = authors_evaluate(st, ld, device, counts)
            counts["final_evaluation"][name] = len(inp.host[name][1])
        counts["evaluations"] += 1
        history.append(final)
        _sync(device)
        phases["evaluation"] += time.perf_counter() - t0
        whole = time.perf_counter() - t_start
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags
    grads_left = sum(1 for p in st.work.parameters() if p.grad is not None)
    return {"phases_s": phases, "whole_s": whole, "other_s": whole - sum(phases.values()), "counts": counts,
            "history": history, "host_loading_s": clock["host_loading_s"], "loaders": loaders,
            "cudnn_during_run": {"deterministic": True, "benchmark": False}, "parameters_with_grad_at_end": grads_left}


# ----------------------------------------------------------------------------- stakes' defaults


def stakes_has_execution_policy() -> bool:
    import stakes

    return all(f in stakes.UnlearnConfig.field_names() for f in EXECUTION_FIELDS)


def stakes_config(work: Work, device: torch.device, seed: int = 0, **overrides):
    """stakes' defaults for this work: the stable preset, a fixed radius, the step count fixed (its stop
    rule off), the evaluation sets whole (``overrides``: for the model's composition check only)."""
    import stakes

    # batches of 128 are stakes' default too; a test's smaller work sets both sides' batches
    batches = {} if work.batch == 128 else {"forget_batch_size": work.batch, "proxy_batch_size": work.batch}
    return stakes.preset("stable", method="structguard", eps=work.eps, repetitions=work.repetitions,
                         pgd_steps=work.pgd_steps, max_steps=work.steps, stop_warmup_steps=10**9,
                         importance_samples=work.importance_samples, eval_max_samples=None, progress=False,
                         device=str(device), seed=seed, **batches, **overrides)


def stakes_importance_batches(n: int, size: int, n_tot: int, method_config: dict, config: dict) -> List[int]:
    """The rows of each batch stakes' importance pass computes, from its own plan for its options
    (``importance_order``, ``importance_passes``: each distinct batch once by default), else the
    cycled rule of :func:`importance_batches` (a stakes without the plan)."""
    try:
        from stakes.methods.structguard import importance_plan
    except ImportError:
        return importance_batches(n, size, n_tot)
    order = method_config.get("importance_order", "shuffled")
    passes = method_config.get("importance_passes", "all")
    batches, _, _ = importance_plan(n, size, n_tot, order, passes, torch.Generator().manual_seed(int(config["seed"]) + 31))
    return [len(b) if isinstance(b, torch.Tensor) else len(range(n)[b]) for b in batches]


def stakes_counts(res, work: Work, sizes: Dict[str, int]) -> Dict[str, object]:
    """The work stakes did, from its result: proxies and PGD from ``result.proxies`` and its config,
    the importance as ``result.timings`` reports it (``importance_samples`` / ``importance_batches``)
    or else from its rule, the evaluations from its trajectory (each entry: the forget set and every
    set whose accuracy it holds)."""
    t = dict(res.timings)
    n = int(res.proxies["n"])
    pgd_steps = int(res.config["pgd_steps"])
    pgd_batch = int(t.get("pgd_batch_size") or res.config["pgd_batch_size"])
    n_tot = res.method_config.get("importance_samples") or work.importance_samples
    rule = stakes_importance_batches(n, int(res.config["proxy_batch_size"]), n_tot, res.method_config, res.config)
    entries = list(res.history)
    spe = work.steps_per_epoch
    evaluated = 0
    for e in entries:
        evaluated += sizes["forget"] + sum(size for name, size in sizes.items()
                                           if name != "forget" and f"{name}_accuracy" in e)
    last = entries[-1] if entries else {}
    final = {"forget": sizes["forget"], **{name: size for name, size in sizes.items()
                                           if name != "forget" and f"{name}_accuracy" in last}}
    return {"proxies": n, "pgd_image_steps": n * pgd_steps,
            "pgd_weight_grad_image_steps": n * pgd_steps if res.config.get("pgd_weight_grads") else 0,
            "pgd_batches": math.ceil(n / pgd_batch) * pgd_steps,
            "importance_samples": int(t["importance_samples"]) if "importance_samples" in t else sum(rule),
            "importance_batches": int(t["importance_batches"]) if "importance_batches" in t else len(rule),
            "importance_source": "result.timings" if "importance_samples" in t else
            "stakes' own plan (stakes.methods.structguard.importance_plan) for its options",
            "optimisation_steps": int(res.steps),
            "step_forget_rows": int(res.steps) * min(work.batch, sizes["forget"]) if res.config.get("shuffle", True)
            else sum(work.forget_batches_in_order()[t % len(work.forget_batches_in_order())] for t in range(res.steps)),
            "stop_checks": 0,     # its rule is off here (the step count is fixed): see DESIGN_NOTES
            "stop_checks_at_its_cadence": max(0, math.ceil(res.steps / spe) - 1),
            "evaluations": len(entries), "evaluated_images": evaluated, "final_evaluation": final,
            "drift_reference_images": sizes.get("test", 0) if any("structure_drift" in e for e in entries) else 0}


def stakes_recipe(inp: Inputs, work: Work, device: torch.device, seed: int = 0, *, loaders: bool = True,
                  **overrides) -> dict:
    """stakes.unlearn with its defaults; returns ``{"phases_s", "whole_s", "counts", "execution", ...}``."""
    import stakes

    cfg = stakes_config(work, device, seed, **overrides)
    if cfg.proxy_batch_size != work.batch or cfg.forget_batch_size != work.batch:
        raise ValueError(f"stakes' batches ({cfg.forget_batch_size} + {cfg.proxy_batch_size}) differ from the "
                         f"authors' {work.batch}")
    _sync(device)
    t_start = time.perf_counter()
    if loaders:   # the same host arrays, converted on the device once (what a stakes user does with CIFAR-10)
        data = {name: to_device(x, y, device) for name, (x, y) in inp.host.items()}
        _sync(device)
    else:
        data = inp.device
    data_s = time.perf_counter() - t_start
    res = stakes.unlearn(inp.model, data["forget"], method="structguard", anchors=inp.anchors, config=cfg,
                         eval_sets={"retain": data["retain"], "test": data["test"]})
    _sync(device)
    whole = time.perf_counter() - t_start
    t = dict(res.timings)
    phases = {"proxies": t.get("calibration_s", 0.0) + t["proxies_s"], "importance": t["importance_s"],
              "steps": t["loop_s"] - t.get("eval_s", 0.0), "evaluation": t.get("eval_s", 0.0)}
    sizes = {name: len(y) for name, (_, y) in data.items()}
    counts = stakes_counts(res, work, sizes)
    execution = getattr(res, "execution", None)
    if execution is None:
        execution = {"available": False,
                     "note": "this stakes has no execution policy (UnlearnConfig lacks precision / channels_last / "
                             "compile / cuda_graphs): fp32, eager, no CUDA graphs"}
    else:
        execution = {"available": True, **dict(execution)}
    return {"phases_s": phases, "whole_s": whole, "other_s": whole - sum(phases.values()), "data_s": data_s,
            "counts": counts, "execution": execution, "timings": t, "wall_time_s": res.wall_time_s,
            "steps": res.steps, "stopped": res.stopped, "eps": res.proxies.get("eps"),
            "success_rate": res.proxies.get("success_rate"), "loaders": loaders,
            "history": [{k: v for k, v in e.items() if k == "step" or k.endswith("_accuracy")} for e in res.history],
            "config": {k: res.config[k] for k in ("preset", "eps", "repetitions", "pgd_steps", "pgd_batch_size",
                                                  "proxy_batch_size", "forget_batch_size", "max_steps",
                                                  "log_every", "eval_max_samples", "backend", "device",
                                                  *[f for f in EXECUTION_FIELDS if f in res.config])},
            "method_config": dict(res.method_config)}


RECIPES = {"authors": authors_recipe, "stakes": stakes_recipe}


# ----------------------------------------------------------------------------- the comparison


def compare_work(counts: Dict[str, dict], work: Work) -> Tuple[List[str], Dict[str, dict]]:
    """(problems, by_design): each difference in the work that must be the same (and the authors'
    work against what their recipe must do), as a sentence; and the work that differs by design,
    side by side."""
    problems = []
    if "authors" in counts:
        exp = work.expected_authors()
        for key in WORK_KEYS:
            if counts["authors"].get(key) != exp[key]:
                problems.append(f"authors' {key}: {counts['authors'].get(key)}, their recipe does {exp[key]}")
    names = list(counts)
    if len(names) > 1:
        for key in SAME_KEYS:
            seen = {n: counts[n].get(key) for n in names}
            if any(v != seen[names[0]] for v in seen.values()):
                problems.append(f"{key} differs: " + ", ".join(f"{n} {v}" for n, v in seen.items()))
    by_design = {key: {n: counts[n].get(key) for n in names} for key in DESIGN_KEYS}
    return problems, by_design


DESIGN_NOTES = {
    "pgd_weight_grad_image_steps": "advertorch's backward on a model whose parameters require grad computes the "
                                   "weight gradients at every PGD step; stakes' attack computes the input gradient only",
    "importance_samples": "the authors' estimator cycles the unshuffled proxy loader to N_tot samples (the same "
                          "batches repeated); stakes counts its own estimator's work",
    "importance_batches": "as importance_samples",
    "step_forget_rows": "the authors' unshuffled forget loader cycles its batches, the last one partial when k is "
                        "not a multiple of the batch; stakes reshuffles and takes full batches",
    "stop_checks": "the authors check the forget set after every step from the second epoch; the check runs and is "
                   "charged (the benchmark fixes the step count, so it never stops the run). stakes' rule checks it at "
                   "epoch ends (stop_checks_at_its_cadence: one forward of the k forget images each); stakes offers "
                   "no check that does not stop, so its rule is off here and those few forwards are not run or "
                   "charged (the model, benchmarks/gpu_ratio_model.py, charges them)",
    "evaluations": "the authors: their stop checks and the final evaluation; stakes: its evaluations (by default "
                   "none before the end: no trajectory unless asked)",
    "evaluated_images": "the images of those evaluations",
}


def ratios(authors: dict, ours: dict) -> Dict[str, Optional[float]]:
    """authors / stakes per phase and for the whole (None where stakes' time is 0)."""
    out = {}
    for p in PHASES + ("whole",):
        a = authors["whole_s"] if p == "whole" else authors["phases_s"][p]
        s = ours["whole_s"] if p == "whole" else ours["phases_s"][p]
        out[p] = a / s if s > 0 else None
    return out


def cuda_flags() -> dict:
    return {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


class _KeepFlags:
    """Restores torch's backend flags after a recipe ran (nothing one recipe sets reaches the other)."""

    def __enter__(self):
        self.flags = (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
                      torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
                      torch.get_float32_matmul_precision())

    def __exit__(self, *exc):
        (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
         torch.backends.cuda.matmul.allow_tf32, prec) = self.flags
        torch.set_float32_matmul_precision(prec)


def _error(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"error: {type(exc).__name__}: {first}"[:400]


def run_row(name: str, description: str, builder: Callable[[], nn.Module], work: Work, device: torch.device, *,
            seed: int, warmup: bool, image_shape, recipes, repeats: int, loaders: bool,
            on_update: Optional[Callable[[], None]] = None) -> dict:
    """Both recipes on one network (one row of the report), ``repeats`` times interleaved."""
    row = {"network": name, "model": description, "recipes": {}, "warmup_s": {}, "repeats": repeats,
           "work": {"expected_same": work.expected(), "expected_authors": work.expected_authors()},
           "status": "running"}
    inputs = make_inputs(work, device, seed=seed, model_builder=builder, image_shape=image_shape)
    small = make_inputs(WARMUP, device, seed=seed + 1, model_builder=builder, image_shape=image_shape) if warmup else None
    for rep in range(repeats):   # interleaved, so that a change of load hits both recipes alike
        for rname, fn in recipes.items():
            rec = row["recipes"].setdefault(rname, {"runs": []})
            if str(rec.get("status", "ok")).startswith("error"):
                continue
            with _KeepFlags():
                flags = cuda_flags() if device.type == "cuda" else None
                try:
                    if warmup and rep == 0:
                        t0 = time.perf_counter()
                        fn(small, WARMUP, device, seed, loaders=loaders)
                        _sync(device)
                        row["warmup_s"][rname] = time.perf_counter() - t0
                    run = fn(inputs, work, device, seed, loaders=loaders)
                except Exception as exc:   # recorded, and the run exits non-zero
                    rec["status"] = _error(exc)
                    continue
            run["cuda_flags_at_start"] = flags
            rec["runs"].append({k: run[k] for k in ("phases_s", "whole_s", "other_s")})
            if len(rec["runs"]) > 1 and run["counts"] != rec["counts"]:
                rec["status"] = f"error: repeat {rep} did other work than the first: {run['counts']} vs {rec['counts']}"
                continue
            rec.update({k: v for k, v in run.items() if k not in ("phases_s", "whole_s", "other_s")})
            # the fastest of the repeats, per phase and for the whole: contention only slows a run down
            rec["phases_s"] = {p: min(r["phases_s"][p] for r in rec["runs"]) for p in PHASES}
            rec["whole_s"] = min(r["whole_s"] for r in rec["runs"])
            rec["status"] = "ok"
            if on_update:
                on_update()
    problems = [f"{n}: {r['status']}" for n, r in row["recipes"].items() if r.get("status") != "ok"]
    if not problems:
        counts = {n: r["counts"] for n, r in row["recipes"].items()}
        diff, by_design = compare_work(counts, work)
        row["work"].update({"counted": counts, "same": not diff, "differences": diff,
                            "differs_by_design": {k: {**v, "why": DESIGN_NOTES[k]} for k, v in by_design.items()}})
        problems += [f"work: {d}" for d in diff]
        if "authors" in row["recipes"] and "stakes" in row["recipes"]:
            row["ratios"] = ratios(row["recipes"]["authors"], row["recipes"]["stakes"])
    row["status"] = "ok" if not problems else "error: " + "; ".join(problems)
    return row


def run_whole(work: Work, device: torch.device, *, seed: int = 0, warmup: bool = True,
              model_builder: Optional[Callable[[], nn.Module]] = None, image_shape=(3, 32, 32),
              on_update: Optional[Callable[[dict], None]] = None, recipes=None, repeats: int = 1,
              networks: Sequence[str] = ("authors",), loaders: bool = True) -> dict:
    """Both recipes on the same work, one row per network (the first is the headline); the report
    (see the module docstring). ``model_builder``: one row of that model instead (tests).
    ``on_update`` is called with the report so far after each run (partial results)."""
    recipes = dict(RECIPES if recipes is None else recipes)
    meta = measure.run_metadata(device)
    meta["load_avg_1_5_15"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    meta["cpu_count"] = os.cpu_count()
    rows_to_run = [("custom", "custom model", model_builder)] if model_builder is not None else \
        [(n, *NETWORKS[n]) for n in networks]
    report = {
        "benchmark": "whole-run",
        "kind": "measurement: both recipes run in this process on this device",
        "metadata": meta,
        "size": {**asdict(work), "n_proxies": work.n_proxies, "steps_per_epoch": work.steps_per_epoch,
                 "forget_batch": work.forget_batch, "retain": work.retain,
                 "authors_stop_checks": work.authors_stop_checks(),
                 "phase_shares_authors": phase_shares(work), "phase_shares_authors_full_run": phase_shares(full_work()),
                 "data": f"random uint8 images {list(image_shape)} (forget, D_r, test), random labels, random unit "
                         f"anchors [{NUM_CLASSES}, {work.anchor_dim}]"},
        "options": {"loaders": loaders,
                    "loaders_means": ("the authors' data through torch DataLoaders (PIL + ToTensor per image, "
                                      "num_workers=0, blocking copies" + (", pinned" if pin_memory(device) else "")
                                      + "); stakes' data converted on the device once, timed in its whole")
                    if loaders else "kernels only: every tensor resident on the device for both recipes, "
                                    "no loaders, no host conversion",
                    "on_the_cpu": "the loaders convert every image on the host as on a card (PIL and ToTensor are "
                                  "host work on any device); there is no copy to make and nothing is pinned"
                    if device.type == "cpu" else None,
                    "cudnn_authors": "deterministic=True, benchmark=False while their recipe runs (restored after)"},
        "rows": {},
        "headline": rows_to_run[0][0],
        "stakes_execution_policy_in_config": None,
        "status": "running",
    }
    try:
        report["stakes_execution_policy_in_config"] = stakes_has_execution_policy()
    except Exception as exc:   # stakes fails to import: the stakes recipe will report it
        report["stakes_execution_policy_in_config"] = _error(exc)
    for i, (name, description, builder) in enumerate(rows_to_run):
        report["rows"][name] = {"network": name, "model": description, "status": "pending", "headline": i == 0}
    for i, (name, description, builder) in enumerate(rows_to_run):
        def update(name=name):
            if on_update:
                on_update(report)
        row = {"headline": i == 0}
        report["rows"][name] = row
        row.update(run_row(name, description, builder, work, device, seed=seed, warmup=warmup, image_shape=image_shape,
                           recipes=recipes, repeats=repeats, loaders=loaders, on_update=update))
        if on_update:
            on_update(report)
    head = report["rows"][report["headline"]]
    report["ratios"] = head.get("ratios")
    problems = [f"{n}: {r['status']}" for n, r in report["rows"].items() if r.get("status") != "ok"]
    report["status"] = "ok" if not problems else "error: " + "; ".join(problems)
    if device.type == "cuda":
        report["model_prediction"] = model_prediction(work)
        report["notes"] = ["stakes' phases come from result.timings, whose clocks synchronise the device at every "
                           "phase boundary (proxies, importance, each evaluation, the loop), so each phase is charged "
                           "its own queued work; the whole is synchronised here too"]
    meta["load_avg_1_5_15_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if on_update:
        on_update(report)
    return report


def launch_blocking_row(work: Work, device: torch.device, args_list: List[str], timeout_s: float = 3600) -> dict:
    """The authors' recipe in a child process under ``CUDA_LAUNCH_BLOCKING=1`` (the published command's
    setting; it must be set before CUDA starts, hence the child). Shown, never a headline."""
    row = {"network": "authors", "headline": False, "recipes": {},
           "note": "the authors' recipe under CUDA_LAUNCH_BLOCKING=1, as their published command runs it; never a "
                   "headline (it serialises every launch)"}
    if device.type != "cuda":
        row["status"] = "skipped: CUDA_LAUNCH_BLOCKING applies to a CUDA card only"
        return row
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "benchmarks", "whole-run", "--recipes", "authors", "--networks", "authors",
               "--out", tmp, *args_list]
        env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
            child = json.load(open(os.path.join(tmp, "whole_run.json")))
        except Exception as exc:
            row["status"] = _error(exc)
            return row
    crow = child["rows"].get("authors", {})
    row["recipes"] = crow.get("recipes", {})
    row["status"] = crow.get("status", child.get("status")) if proc.returncode == 0 else \
        f"error: exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:300]}"
    return row


MODEL_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu_ratio_model.json")
MATCH_KEYS = ("k", "repetitions", "pgd_steps", "steps", "importance_samples", "test_size", "batch", "retain_size")


def model_prediction(work: Work, path: str = MODEL_JSON) -> Optional[dict]:
    """The labelled model's prediction (benchmarks/gpu_ratio_model.py, an H100) for this work, if
    its results file has one for exactly this size; None otherwise."""
    try:
        with open(path) as fh:
            model = json.load(fh)
    except (OSError, ValueError):
        return None
    for size in model.get("predictions_by_size", []):
        if all(size["work"].get(k) == getattr(work, k) for k in MATCH_KEYS):
            return {"kind": "MODEL, not a measurement (benchmarks/gpu_ratio_model.py)",
                    "gpu": model.get("assumptions", {}).get("gpu"), "ratios": size["ratios"],
                    "seconds": size["seconds"], "network": size.get("network"),
                    "source": "benchmarks/results/gpu_ratio_model.json"}
    return None


# ----------------------------------------------------------------------------- output


def default_out_dir(device: torch.device) -> str:
    return measure.default_out_dir(device)   # outside the source tree (benchmarks.measure.results_root)


def _sec(row: dict, recipe: str, phase: str) -> Optional[float]:
    r = row.get("recipes", {}).get(recipe, {})
    if r.get("status") != "ok":
        return None
    return r["whole_s"] if phase == "whole" else r["phases_s"][phase]


def write_report(report: dict, out_dir: str) -> Tuple[str, str]:
    """``whole_run.json`` (everything) and ``whole_run.csv`` (a row per network and phase), atomically."""
    from stakes._io import atomic_json_dump, atomic_text

    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "whole_run.json")
    atomic_json_dump(report, json_path)
    meta = report["metadata"]
    cols = ("network", "headline", "phase", "authors_s", "stakes_s", "ratio", "size", "loaders", "status", "device",
            "torch", "triton", "python", "date", "git_commit")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for name, row in report["rows"].items():
        rat = row.get("ratios") or {}
        for p in PHASES + ("whole",):
            w.writerow([name, bool(row.get("headline")), p, _sec(row, "authors", p), _sec(row, "stakes", p), rat.get(p),
                        report["size"]["label"], report["options"]["loaders"], row.get("status"), meta["device"],
                        meta["torch"], meta["triton"], meta["python"], meta["date"], meta["git_commit"]])
    csv_path = os.path.join(out_dir, "whole_run.csv")
    atomic_text(buf.getvalue(), csv_path)
    return json_path, csv_path


def summary_lines(report: dict) -> List[str]:
    """The printed table and one ``VERDICT:`` line (gpu_check.sh's summary reads it): the headline row's."""
    size = report["size"]

    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    lines = [f"whole run on {report['metadata']['device']} (torch {report['metadata']['torch']}), size: {size['label']} "
             f"(k={size['k']}, R={size['repetitions']}, PGD steps {size['pgd_steps']}, steps {size['steps']}, "
             f"importance samples {size['importance_samples']}, D_r {size.get('retain')}, test {size['test_size']}); "
             f"loaders {'on' if report.get('options', {}).get('loaders', True) else 'off (kernels only)'}"]
    for name, row in report["rows"].items():
        tag = "headline" if row.get("headline") else ("never a headline" if "LAUNCH_BLOCKING" in row.get("note", "")
                                                      else "second row")
        lines.append(f"[{name}: {row.get('model', row.get('note', ''))[:90]}] ({tag}) status {row.get('status')}")
        lines.append(f"{'phase':<12} {'authors s':>10} {'stakes s':>10} {'ratio':>7}")
        rat = row.get("ratios") or {}
        for p in PHASES + ("whole",):
            lines.append(f"{p:<12} {fmt(_sec(row, 'authors', p), '10.2f'):>10} {fmt(_sec(row, 'stakes', p), '10.2f'):>10} "
                         f"{fmt(rat.get(p), '7.2f'):>7}")
        dd = row.get("work", {}).get("differs_by_design")
        if dd:
            lines.append("work that differs by design: " + "; ".join(
                f"{k} " + ", ".join(f"{n} {v}" for n, v in d.items() if n != "why") for k, d in dd.items()))
        ex = row.get("recipes", {}).get("stakes", {}).get("execution")
        if ex:
            lines.append("stakes execution: " + ", ".join(f"{k}={v}" for k, v in ex.items()
                                                          if k in ("precision", "channels_last", "compile",
                                                                   "cuda_graphs", "device_type")))
    model = report.get("model_prediction")
    if model:
        lines.append(f"{'MODEL ' + str(model['gpu'])[:20]:<26} ratios (modelled, not measured): "
                     + ", ".join(f"{p} x{model['ratios'][p]:.2f}" for p in (*PHASES, "whole")))
    head = report["rows"].get(report.get("headline"), {})
    rat = head.get("ratios") or {}
    if report["status"] == "ok" and rat.get("whole"):
        per = ", ".join(f"{p} x{rat[p]:.2f}" for p in PHASES if rat.get(p))
        lines.append(f"VERDICT: ok whole run x{rat['whole']:.2f} (authors / stakes; {per}), network "
                     f"{report.get('headline')}, size {size['label']}, k={size['k']}"
                     + (f"; the MODEL predicted x{model['ratios']['whole']:.2f}" if model else ""))
    elif report["status"] == "ok":
        lines.append(f"VERDICT: ok (one recipe: no ratio), size {size['label']}, k={size['k']}")
    else:
        lines.append(f"VERDICT: FAILED {report['status']}"[:300])
    return lines


def work_from_args(args) -> Work:
    """The Work of the command line: ``--size`` (or ``--quick``), then any field changed."""
    name = "quick" if args.quick else (args.size or "full")
    base = SIZES[name]()
    changes = {name_: getattr(args, name_) for name_ in ("k", "repetitions", "pgd_steps", "steps",
                                                         "importance_samples", "test_size", "retain_size")
               if getattr(args, name_, None) is not None}
    if name in ("full", "representative") and set(changes) == {"k"}:
        return (full_work if name == "full" else representative_work)(changes["k"])
    if not changes:
        return base
    if "k" in changes and name == "full":
        changes.setdefault("importance_samples", CIFAR_TRAIN - changes["k"])   # |D_r| of CIFAR-10
    work = replace(base, **changes)
    if "steps" not in changes:   # as many epochs as the base size
        work = replace(work, steps=max(1, base.steps // base.steps_per_epoch) * work.steps_per_epoch)
    what = ", ".join(f"{k} = {v}" for k, v in changes.items())
    return replace(work, label=f"{base.label.split(':')[0]}, changed: {what}")


def main(args) -> int:
    """The ``whole-run`` subcommand (arguments parsed in benchmarks/__main__.py)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from fused._dispatch import interpreter_enabled

    if interpreter_enabled():
        print("python -m benchmarks whole-run: TRITON_INTERPRET is set, so stakes' fused ops would run in the Triton "
              "CPU interpreter and be timed; unset it and rerun", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    work = work_from_args(args)
    size_name = "quick" if args.quick else (args.size or "full")
    networks = args.networks or (["authors", "resnet18"] if size_name == "full" else ["authors"])
    if device.type == "cpu" and size_name == "full":
        print("whole-run: the full size on a CPU takes many hours; --size representative (or --quick) is a CPU size",
              file=sys.stderr)
    recipes = {n: RECIPES[n] for n in (args.recipes or list(RECIPES))}
    out_dir = args.out or default_out_dir(device)
    report = run_whole(work, device, seed=args.seed, warmup=not args.no_warmup, repeats=args.repeats,
                       networks=networks, recipes=recipes, loaders=not args.kernels_only,
                       on_update=lambda r: write_report(r, out_dir))
    if args.launch_blocking_row:
        passed = [f"--{f.replace('_', '-')}={getattr(work, f)}" for f in ("k", "repetitions", "pgd_steps", "steps",
                                                                          "importance_samples", "test_size")]
        passed += [f"--retain-size={work.retain}", f"--seed={args.seed}", "--device", str(device)]
        if args.kernels_only:
            passed.append("--kernels-only")
        report["rows"]["authors, CUDA_LAUNCH_BLOCKING=1"] = launch_blocking_row(work, device, passed)
    json_path, csv_path = write_report(report, out_dir)
    for line in summary_lines(report):
        print(line)
    print(f"wrote {json_path} and {csv_path}")
    if report["status"] != "ok":
        print(f"python -m benchmarks whole-run: {report['status']}", file=sys.stderr)
        return 1
    return 0
