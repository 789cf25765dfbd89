"""``python -m benchmarks whole-run``: the authors' recipe against stakes' defaults on the same work,
one whole unlearning run each, in one process, per phase (issue 17, item 5; PERFORMANCE.md
"Where a whole run's time goes").

The two recipes, on the same model (CIFAR-10 ResNet-18 of ``stakes.models``, random weights), the
same random images in [0, 1] and labels, the same random unit anchors [10, 512], the same PGD
radius (3.0, fixed: no calibration on either side):

* ``authors`` — METHOD.md §3-9 as the authors' released loop runs it, written here in plain eager
  PyTorch, fp32 (on a CUDA card cuDNN's default TF32 for fp32 convolutions applies, as it does for
  them; matrix products stay fp32, torch's default), data resident on the device (a conservative
  choice: their loaders copy every batch from the host):

  - proxies: for every repetition r = 1..R, for every batch of (at most) 128 forget images, a fresh
    random target ỹ ≠ y and random start inside the ε-ball, then ``pgd_steps`` steps of the plain
    per-sample step/projection of §3 (g ← ∇ₓCE(f(x), ỹ); x ← x − α·g/‖g‖; δ ← Π_ε(x − x₀);
    x ← clamp(x₀ + δ, 0, 1): about 15 eager launches a step);
  - importance (§6): |∂L_align/∂ψ| over proxy batches of 128, reshuffled and cycled until N_tot
    samples, L_align in eager PyTorch (§4-5) through the cold, randomly initialised projector (§7)
    against the frozen original, accumulated tensor by tensor;
  - optimisation steps (§8-9): batches 128 forget (cycled) + 128 proxies (an epoch of shuffled
    proxies), L = L_del + L_ret + L_align + λ·L_reg + 0.001·L_CR with the paper's batch-fraction
    weights, L_reg = ½ Σ I(ψ − ψ₀)² built tensor by tensor and differentiated by autograd, plain
    ``torch.optim.SGD`` (lr 0.005 backbone + head, 0.009 projector, no momentum), BatchNorm in
    train mode and no L_reg on the first two steps of every epoch (the reference code's quirks),
    and ``loss.item()`` every step (their logging: one host synchronisation a step);
  - evaluation: forget and test accuracy through the deployed h∘p∘g, batches of 128, one
    ``.item()`` a batch, on the schedule stakes logs (step 0 and every epoch).

* ``stakes`` — ``stakes.unlearn(model, (fx, fy), method="structguard", anchors=A,
  config=stakes.preset("stable", method="structguard", eps=3.0, repetitions=R, pgd_steps=P,
  max_steps=S, stop_warmup_steps=10**9, importance_samples=N, log_every=steps_per_epoch,
  progress=False, device=...), eval_sets={"test": (tx, ty)})``: stakes' defaults (the stable preset;
  the execution policy — precision, channels_last, compile, CUDA graphs — left automatic), timed
  by ``result.timings``. The resolved policy is recorded (``result.execution``).

The same work on both sides, counted as the runs go and compared (``work``; a difference is an
error): proxies × PGD steps, importance samples, optimisation steps, evaluations and evaluated
images. How the work is batched differs by design (the authors: PGD batches of 128, one
repetition at a time; stakes: all repetitions batched), and the per-sample work of some phases
differs by method (stakes' stable preset warm-starts the projector, so its importance needs no
original-model forward; stakes checks each proxy's success with one more forward, and computes the
test set's original structure once for its drift metric): those are part of what is compared.

Phases: ``proxies``, ``importance``, ``steps`` (the optimisation loop without its evaluations),
``evaluation``; ``whole`` is each recipe's wall time from its model copies to its result, and the
ratio is authors / stakes (> 1: stakes faster). Before the timed runs each recipe runs once at a
tiny size (warm-up: cuDNN / oneDNN plans, Triton compilation from a cold cache; its time is
recorded, not counted). Results: ``benchmarks/results/<device>/whole_run.json`` and ``.csv``,
rewritten after each recipe (a killed run keeps what finished). Exit status 1 when a recipe fails
or the work differs.

Sizes: the issue's size on a GPU (k = 256, R = 20, 100 PGD steps, |D_r| = 50,000 − k importance
samples, 3 epochs of steps, a 2,000-image test set: stakes' evaluation cap); ``--quick`` a reduced
size for the CPU, said as such in the results (``size.label``).
"""

from __future__ import annotations

import copy
import csv
import io
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import measure

PHASES = ("proxies", "importance", "steps", "evaluation")
WORK_KEYS = ("proxies", "pgd_image_steps", "importance_samples", "optimisation_steps", "evaluations",
             "evaluated_images")
NUM_CLASSES = 10
CIFAR_TRAIN = 50_000
EXECUTION_FIELDS = ("precision", "channels_last", "compile", "cuda_graphs")


# ----------------------------------------------------------------------------- the work


@dataclass(frozen=True)
class Work:
    """The size of one whole run (the same for both recipes)."""

    k: int                      # forget images
    repetitions: int            # R
    pgd_steps: int
    steps: int                  # optimisation steps
    importance_samples: int     # N_tot
    test_size: int              # test images per evaluation
    batch: int = 128            # forget / proxy / PGD / importance / evaluation batch of the authors
    eps: float = 3.0
    step_size: float = 0.1
    anchor_dim: int = 512
    label: str = "custom"

    def __post_init__(self):
        for name in ("k", "repetitions", "pgd_steps", "steps", "importance_samples", "test_size", "batch",
                     "anchor_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

    @property
    def n_proxies(self) -> int:
        return self.repetitions * self.k

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_proxies / self.batch)

    @property
    def forget_batch(self) -> int:
        return min(self.batch, self.k)

    def evaluations(self) -> int:
        """Step 0, every ``steps_per_epoch`` steps, and the last step if it is not one of those."""
        spe = self.steps_per_epoch
        return 1 + self.steps // spe + (1 if self.steps % spe else 0)

    def expected(self) -> Dict[str, int]:
        """The work both recipes must do (``work`` in the results)."""
        return {"proxies": self.n_proxies, "pgd_image_steps": self.n_proxies * self.pgd_steps,
                "importance_samples": sum(importance_batches(self.n_proxies, self.batch, self.importance_samples)),
                "optimisation_steps": self.steps, "evaluations": self.evaluations(),
                "evaluated_images": self.evaluations() * (self.k + self.test_size)}


def importance_batches(n_proxies: int, batch: int, n_tot: int) -> List[int]:
    """The batch sizes of the importance pass: shuffled proxy batches of ``batch``, cycled until at
    least ``n_tot`` samples (METHOD.md §6; stakes' StructGuard.importance follows the same rule)."""
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
    """The issue's size: CIFAR-10, k forget images, R = 20, 100 PGD steps, |D_r| = 50,000 − k,
    3 epochs of steps, 2,000 test images (stakes' ``eval_max_samples``)."""
    w = Work(k=k, repetitions=20, pgd_steps=100, steps=1, importance_samples=CIFAR_TRAIN - k, test_size=2000,
             label="full" if k == 256 else f"full but k = {k}")
    return replace(w, steps=3 * w.steps_per_epoch)


QUICK = Work(k=16, repetitions=2, pgd_steps=3, steps=2, importance_samples=64, test_size=32,
             label="reduced (CPU --quick): k = 16, R = 2, 3 PGD steps, 2 steps (2 epochs), 64 importance samples, "
                   "32 test images")
WARMUP = Work(k=4, repetitions=1, pgd_steps=1, steps=1, importance_samples=4, test_size=4, label="warm-up")


# ----------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    model: nn.Module            # a stakes Classifier (features, head)
    fx: torch.Tensor
    fy: torch.Tensor
    tx: torch.Tensor
    ty: torch.Tensor
    anchors: torch.Tensor       # [num_classes, anchor_dim], unit rows


def default_model() -> nn.Module:
    from stakes.models import build_model

    return build_model("resnet18", NUM_CLASSES, in_channels=3, image_size=32)


def make_inputs(work: Work, device: torch.device, *, seed: int = 0,
                model_builder: Optional[Callable[[], nn.Module]] = None, image_shape=(3, 32, 32)) -> Inputs:
    """Random weights, random CIFAR-shaped images in [0, 1], random labels, random unit anchors."""
    torch.manual_seed(seed)
    model = (model_builder or default_model)().to(device).eval()
    g = torch.Generator().manual_seed(seed)
    fx = torch.rand(work.k, *image_shape, generator=g)
    fy = torch.randint(0, NUM_CLASSES, (work.k,), generator=g)
    tx = torch.rand(work.test_size, *image_shape, generator=g)
    ty = torch.randint(0, NUM_CLASSES, (work.test_size,), generator=g)
    anchors = F.normalize(torch.randn(NUM_CLASSES, work.anchor_dim, generator=g), dim=1)
    return Inputs(model, fx.to(device), fy.to(device), tx.to(device), ty.to(device), anchors.to(device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the authors' recipe


class AuthorsProjector(nn.Module):
    """p_ω (METHOD.md §7): Linear(d_f, d_a) → BatchNorm1d → ReLU → Linear(d_a, d_f), random init;
    returns (output, z): z is the output when d_f = d_a, else the hidden layer of width d_a."""

    def __init__(self, d_f: int, d_a: int):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(d_f, d_a), nn.BatchNorm1d(d_a), nn.Linear(d_a, d_f)
        self.same = d_f == d_a

    def forward(self, h):
        hidden = self.fc1(h)
        out = self.fc2(F.relu(self.bn(hidden)))
        return out, (out if self.same else hidden)


def eager_alignment_loss(v_unl: torch.Tensor, v_ori: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """L_align = 1 − mean_i cos(S_i^ori, S_i^unl), S = normalize(V)·Aᵀ (METHOD.md §4-5), eager."""
    s = F.normalize(v_unl, dim=1) @ anchors.t()
    s0 = F.normalize(v_ori, dim=1) @ anchors.t()
    return 1.0 - F.cosine_similarity(s, s0, dim=1).mean()


def authors_projection(d_f: int, d_a: int, seed: int) -> torch.Tensor:
    """R_p (§4): identity when d_f = d_a, else Gaussian with unit columns."""
    if d_f == d_a:
        return torch.eye(d_f)
    r = torch.randn(d_f, d_a, generator=torch.Generator().manual_seed(seed + 7))
    return r / r.norm(dim=0, keepdim=True)


def authors_pgd_step(model: nn.Module, xa: torch.Tensor, x0: torch.Tensor, target: torch.Tensor, eps: float,
                     alpha: float) -> torch.Tensor:
    """One PGD step of §3, eager: g = ∇ₓCE(f(x), ỹ); x ← x − α·g/‖g‖; δ = Π_ε(x − x₀); x ← clamp(x₀ + δ)."""
    view = (-1,) + (1,) * (x0.dim() - 1)
    xa.requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xa), target), xa)
    xa = xa.detach() - alpha * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
    delta = xa - x0
    delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-30)).clamp(max=1.0).view(view)
    return (x0 + delta).clamp(0, 1)


def authors_pgd(model: nn.Module, fx: torch.Tensor, fy: torch.Tensor, work: Work, counts: dict,
                seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Proxies (METHOD.md §3): one repetition and one batch of 128 at a time, eager step/projection."""
    gen = torch.Generator().manual_seed(seed)
    eps, alpha = work.eps, work.step_size
    xs, ys = [], []
    model.eval()
    for _ in range(work.repetitions):
        for i in range(0, work.k, work.batch):
            x0, y0 = fx[i:i + work.batch], fy[i:i + work.batch]
            view = (-1,) + (1,) * (x0.dim() - 1)
            target = (y0 + torch.randint(1, NUM_CLASSES, y0.shape, generator=gen).to(y0.device)) % NUM_CLASSES
            noise = torch.randn(x0.shape, generator=gen).to(x0.device)
            radius = eps * torch.rand(x0.shape[0], generator=gen).to(x0.device)
            xa = (x0 + noise * (radius / noise.flatten(1).norm(dim=1)).view(view)).clamp(0, 1)
            for _ in range(work.pgd_steps):
                xa = authors_pgd_step(model, xa, x0, target, eps, alpha)
                counts["pgd_image_steps"] += x0.shape[0]
                counts["pgd_batches"] += 1
            xs.append(xa.detach())
            ys.append(target)
    counts["proxies"] = sum(len(y) for y in ys)
    return torch.cat(xs), torch.cat(ys)


class _Authors:
    """The authors' unlearning state: the frozen original, the unlearned copy and its projector."""

    def __init__(self, model: nn.Module, anchors: torch.Tensor, device: torch.device, seed: int):
        self.orig = copy.deepcopy(model).to(device).eval()
        for p in self.orig.parameters():
            p.requires_grad_(False)
        self.work = copy.deepcopy(model).to(device)
        for p in self.work.parameters():
            p.requires_grad_(True)
        self.features, self.head = self.work.features, self.work.head
        d_f, d_a = self.head.in_features, anchors.shape[1]
        torch.manual_seed(seed + 1)
        self.proj = AuthorsProjector(d_f, d_a).to(device)
        self.rp = authors_projection(d_f, d_a, seed).to(device)
        self.anchors = anchors
        self.psi = list(self.features.parameters())
        self.psi0 = [p.detach().clone() for p in self.psi]

    def train(self):
        self.work.train()
        self.proj.train()

    def structure_loss(self, xb: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            v0 = self.orig.features(xb) @ self.rp
        return eager_alignment_loss(z, v0, self.anchors)

    def deployed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.features(x))[0])


def authors_importance_batch(st: _Authors, xb: torch.Tensor, imp: List[torch.Tensor], weight: float) -> None:
    """I += weight·|∂L_align(xb)/∂ψ|, tensor by tensor (§6), eager."""
    _, z = st.proj(st.features(xb))
    loss = st.structure_loss(xb, z)
    grads = torch.autograd.grad(loss, st.psi, allow_unused=True)
    for acc, gr in zip(imp, grads):
        if gr is not None:
            acc.add_(gr.abs(), alpha=weight)


def authors_importance(st: _Authors, px: torch.Tensor, work: Work, counts: dict, seed: int = 0) -> List[torch.Tensor]:
    """I_p = (1/N_tot) Σ_B |B|·|∂L_align(B)/∂ψ_p| over proxy batches cycled to N_tot (§6), eager."""
    imp = [torch.zeros_like(p) for p in st.psi]
    n_tot = work.importance_samples
    g = torch.Generator().manual_seed(seed + 31)
    st.train()
    seen = 0
    while seen < n_tot:
        order = torch.randperm(len(px), generator=g).to(px.device)
        for i in range(0, len(order), work.batch):
            if seen >= n_tot:
                break
            xb = px[order[i:i + work.batch]]
            authors_importance_batch(st, xb, imp, len(xb) / n_tot)
            seen += len(xb)
            counts["importance_batches"] += 1
    counts["importance_samples"] = seen
    return imp


def authors_eval_batch(st: _Authors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct predictions of the deployed h∘p∘g on one batch (a 0-d tensor; the caller's ``.item()``)."""
    return (st.deployed(x).argmax(1) == y).sum()


def authors_evaluate(st: _Authors, sets, batch: int, counts: dict) -> Dict[str, float]:
    """Accuracy of each set through the deployed h∘p∘g, batches of ``batch``, one ``.item()`` a batch."""
    st.work.eval()
    st.proj.eval()
    out = {}
    with torch.no_grad():
        for name, (x, y) in sets.items():
            correct = 0
            for i in range(0, len(x), batch):
                correct += authors_eval_batch(st, x[i:i + batch], y[i:i + batch]).item()
            out[name] = 100.0 * correct / len(x)
            counts["evaluated_images"] += len(x)
    counts["evaluations"] += 1
    st.train()
    return out


def authors_optimizer(st: _Authors, foreach: Optional[bool] = None) -> torch.optim.SGD:
    """Plain SGD (§9): lr 0.005 backbone + head, 0.009 projector, no momentum, torch's defaults
    otherwise (``foreach`` on CUDA)."""
    return torch.optim.SGD([{"params": list(st.features.parameters()) + list(st.head.parameters()), "lr": 0.005},
                            {"params": list(st.proj.parameters()), "lr": 0.009}], lr=0.005, momentum=0.0,
                           foreach=foreach)


def authors_train_step(st: _Authors, opt: torch.optim.Optimizer, xf: torch.Tensor, yf: torch.Tensor,
                       xa: torch.Tensor, ya: torch.Tensor, imp: List[torch.Tensor], *, with_reg: bool) -> torch.Tensor:
    """One optimisation step of §8-9, eager: the losses, L_reg tensor by tensor through autograd,
    ``loss.backward()``, ``opt.step()``; returns the loss (the caller's ``.item()``)."""
    n_f, n_a = len(yf), len(ya)
    opt.zero_grad()
    l_del = -F.cross_entropy(st.head(st.features(xf)), yf) * n_f / (n_f + n_a)
    out, z = st.proj(st.features(xa))
    l_ret = F.cross_entropy(st.head(out), ya) * n_a / (n_f + n_a)
    l_align = st.structure_loss(xa, z)
    w = st.head.weight
    l_cr = 0.99 * w.abs().sum() + 0.5 * 0.01 * w.pow(2).sum()
    loss = l_del + l_ret + l_align + 0.001 * l_cr
    if with_reg:
        l_reg = 0.0
        for p, p0, i_p in zip(st.psi, st.psi0, imp):
            l_reg = l_reg + (i_p * (p - p0).pow(2)).sum()
        loss = loss + 1.0 * 0.5 * l_reg
    loss.backward()
    opt.step()
    return loss


def authors_recipe(inp: Inputs, work: Work, device: torch.device, seed: int = 0) -> dict:
    """The authors' whole run; returns ``{"phases_s", "whole_s", "counts", "history"}``."""
    counts = {"proxies": 0, "pgd_image_steps": 0, "pgd_batches": 0, "importance_samples": 0, "importance_batches": 0,
              "optimisation_steps": 0, "evaluations": 0, "evaluated_images": 0}
    phases = {p: 0.0 for p in PHASES}
    _sync(device)
    t_start = time.perf_counter()
    st = _Authors(inp.model, inp.anchors, device, seed)

    t0 = time.perf_counter()
    px, py = authors_pgd(st.orig, inp.fx, inp.fy, work, counts, seed)
    _sync(device)
    phases["proxies"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    imp = authors_importance(st, px, work, counts, seed)
    _sync(device)
    phases["importance"] = time.perf_counter() - t0

    opt = authors_optimizer(st)
    sets = {"forget": (inp.fx, inp.fy), "test": (inp.tx, inp.ty)}
    history, losses = [], []
    spe, k, nf = work.steps_per_epoch, work.k, work.forget_batch

    def evaluate(step):
        _sync(device)
        t = time.perf_counter()
        history.append({"step": step, **authors_evaluate(st, sets, work.batch, counts)})
        _sync(device)
        phases["evaluation"] += time.perf_counter() - t

    t_loop = time.perf_counter()
    evaluate(0)
    st.train()
    step, epoch = 0, 0
    while step < work.steps:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(px), generator=g).to(device)
        f_order, f_pos = torch.randperm(k, generator=g).to(device), 0
        for b, i in enumerate(range(0, len(px), work.batch)):
            if step >= work.steps:
                break
            ia = order[i:i + work.batch]
            if f_pos + nf > k:
                f_order, f_pos = torch.randperm(k, generator=g).to(device), 0
            jf = f_order[f_pos:f_pos + nf]
            f_pos += nf
            # the reference code skips L_reg on the first two steps of every epoch
            loss = authors_train_step(st, opt, inp.fx[jf], inp.fy[jf], px[ia], py[ia], imp, with_reg=b >= 2)
            losses.append(loss.item())   # their per-step logging: a host synchronisation every step
            step += 1
            counts["optimisation_steps"] += 1
            if step % spe == 0:
                evaluate(step)
        epoch += 1
    if history[-1]["step"] != step:
        evaluate(step)
    _sync(device)
    phases["steps"] = time.perf_counter() - t_loop - phases["evaluation"]
    whole = time.perf_counter() - t_start
    return {"phases_s": phases, "whole_s": whole, "other_s": whole - sum(phases.values()), "counts": counts,
            "history": history, "final_loss": losses[-1] if losses else None}


# ----------------------------------------------------------------------------- stakes' defaults


def stakes_has_execution_policy() -> bool:
    import stakes

    return all(f in stakes.UnlearnConfig.field_names() for f in EXECUTION_FIELDS)


def stakes_config(work: Work, device: torch.device, seed: int = 0, **overrides):
    """stakes' defaults for this work: the stable preset, a fixed radius, no stop, log every epoch
    (``overrides``: for the model's composition check only, never for the benchmark)."""
    import stakes

    # batches of 128 are stakes' default too; a test's smaller work sets both sides' batches
    batches = {} if work.batch == 128 else {"forget_batch_size": work.batch, "proxy_batch_size": work.batch}
    return stakes.preset("stable", method="structguard", eps=work.eps, repetitions=work.repetitions,
                         pgd_steps=work.pgd_steps, max_steps=work.steps, stop_warmup_steps=10**9,
                         importance_samples=work.importance_samples, log_every=work.steps_per_epoch,
                         progress=False, device=str(device), seed=seed, **batches, **overrides)


def stakes_recipe(inp: Inputs, work: Work, device: torch.device, seed: int = 0, **overrides) -> dict:
    """stakes.unlearn with its defaults; returns ``{"phases_s", "whole_s", "counts", "execution", ...}``."""
    import stakes

    cfg = stakes_config(work, device, seed, **overrides)
    if cfg.eval_max_samples is not None and work.test_size > cfg.eval_max_samples:
        raise ValueError(f"test_size {work.test_size} > stakes' eval_max_samples {cfg.eval_max_samples}: stakes would "
                         f"evaluate a subset, not the same work")
    if cfg.proxy_batch_size != work.batch or cfg.forget_batch_size != work.batch:
        raise ValueError(f"stakes' batches ({cfg.forget_batch_size} + {cfg.proxy_batch_size}) differ from the "
                         f"authors' {work.batch}")
    _sync(device)
    t0 = time.perf_counter()
    res = stakes.unlearn(inp.model, (inp.fx, inp.fy), method="structguard", anchors=inp.anchors, config=cfg,
                         eval_sets={"test": (inp.tx, inp.ty)})
    _sync(device)
    whole = time.perf_counter() - t0
    t = dict(res.timings)
    phases = {"proxies": t.get("calibration_s", 0.0) + t["proxies_s"], "importance": t["importance_s"],
              "steps": t["loop_s"] - t.get("eval_s", 0.0), "evaluation": t.get("eval_s", 0.0)}
    n = int(res.proxies["n"])
    n_tot = res.method_config.get("importance_samples") or work.importance_samples
    evaluations = len(res.history)
    counts = {"proxies": n, "pgd_image_steps": n * int(res.config["pgd_steps"]),
              "pgd_batches": math.ceil(n / res.config["pgd_batch_size"]) * int(res.config["pgd_steps"]),
              "importance_samples": sum(importance_batches(n, res.config["proxy_batch_size"], n_tot)),
              "importance_batches": len(importance_batches(n, res.config["proxy_batch_size"], n_tot)),
              "optimisation_steps": int(res.steps), "evaluations": evaluations,
              "evaluated_images": evaluations * (len(inp.fy) + len(inp.ty))}
    execution = getattr(res, "execution", None)
    if execution is None:
        execution = {"available": False,
                     "note": "this stakes has no execution policy (UnlearnConfig lacks precision / channels_last / "
                             "compile / cuda_graphs): fp32, eager, no CUDA graphs"}
    else:
        execution = {"available": True, **dict(execution)}
    return {"phases_s": phases, "whole_s": whole, "other_s": whole - sum(phases.values()), "counts": counts,
            "execution": execution, "timings": t, "wall_time_s": res.wall_time_s, "steps": res.steps,
            "stopped": res.stopped, "eps": res.proxies.get("eps"), "success_rate": res.proxies.get("success_rate"),
            "history": [{k: v for k, v in e.items() if k in ("step", "forget_accuracy", "test_accuracy")}
                        for e in res.history],
            "config": {k: res.config[k] for k in ("preset", "eps", "repetitions", "pgd_steps", "pgd_batch_size",
                                                  "proxy_batch_size", "forget_batch_size", "max_steps",
                                                  "log_every", "eval_max_samples", "backend", "device",
                                                  *[f for f in EXECUTION_FIELDS if f in res.config])},
            "method_config": dict(res.method_config)}


RECIPES = {"authors": authors_recipe, "stakes": stakes_recipe}


# ----------------------------------------------------------------------------- the comparison


def compare_work(counts: Dict[str, Dict[str, int]], expected: Dict[str, int]) -> List[str]:
    """Each difference between the recipes' counted work and the expected work, as a sentence."""
    problems = []
    for key in WORK_KEYS:
        seen = {name: c.get(key) for name, c in counts.items()}
        if len(set(seen.values())) != 1:
            problems.append(f"{key} differs: " + ", ".join(f"{n} {v}" for n, v in seen.items()))
        elif next(iter(seen.values())) != expected[key]:
            problems.append(f"{key}: both {next(iter(seen.values()))}, expected {expected[key]}")
    return problems


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
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


class _KeepFlags:
    """Restores torch's backend flags after stakes ran (so nothing stakes sets reaches the authors' run)."""

    def __enter__(self):
        self.flags = (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
                      torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())

    def __exit__(self, *exc):
        (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         prec) = self.flags
        torch.set_float32_matmul_precision(prec)


def _error(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"error: {type(exc).__name__}: {first}"[:400]


def run_whole(work: Work, device: torch.device, *, seed: int = 0, warmup: bool = True,
              model_builder: Optional[Callable[[], nn.Module]] = None, image_shape=(3, 32, 32),
              on_update: Optional[Callable[[dict], None]] = None, recipes=RECIPES, repeats: int = 1) -> dict:
    """Both recipes on the same work; the report (see the module docstring). ``repeats`` > 1 runs
    them that many times, interleaved, and keeps each phase's fastest time (every run is in
    ``runs``). ``on_update`` is called with the report so far after each run (partial results)."""
    meta = measure.run_metadata(device)
    meta["load_avg_1_5_15"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    meta["cpu_count"] = os.cpu_count()
    report = {
        "benchmark": "whole-run",
        "kind": "measurement: both recipes run in this process on this device",
        "metadata": meta,
        "size": {**asdict(work), "n_proxies": work.n_proxies, "steps_per_epoch": work.steps_per_epoch,
                 "forget_batch": work.forget_batch,
                 "model": "CIFAR-10 ResNet-18 (stakes.models.build_model('resnet18', 10, in_channels=3, image_size=32)), "
                          "random weights" if model_builder is None else "custom model",
                 "data": f"random images {list(image_shape)} in [0, 1], random labels, random unit anchors "
                         f"[{NUM_CLASSES}, {work.anchor_dim}]"},
        "work": {"expected": work.expected()},
        "recipes": {},
        "stakes_execution_policy_in_config": None,
        "warmup_s": {},
        "status": "running",
    }
    try:
        report["stakes_execution_policy_in_config"] = stakes_has_execution_policy()
    except Exception as exc:   # stakes fails to import: the stakes recipe will report it
        report["stakes_execution_policy_in_config"] = _error(exc)
    inputs = make_inputs(work, device, seed=seed, model_builder=model_builder, image_shape=image_shape)
    small = make_inputs(WARMUP, device, seed=seed + 1, model_builder=model_builder, image_shape=image_shape) \
        if warmup else None
    report["repeats"] = repeats
    for rep in range(repeats):   # interleaved, so that a change of load hits both recipes alike
        for name, fn in recipes.items():
            rec = report["recipes"].setdefault(name, {"runs": []})
            if str(rec.get("status", "ok")).startswith("error"):
                continue
            with _KeepFlags():
                flags = cuda_flags() if device.type == "cuda" else None
                try:
                    if warmup and rep == 0:
                        t0 = time.perf_counter()
                        fn(small, WARMUP, device, seed)
                        _sync(device)
                        report["warmup_s"][name] = time.perf_counter() - t0
                    run = fn(inputs, work, device, seed)
                except Exception as exc:   # recorded, and the run exits non-zero
                    rec["status"] = _error(exc)
                    continue
            run["cuda_flags_at_start"] = flags
            rec["runs"].append({k: run[k] for k in ("phases_s", "whole_s", "other_s")})
            if rec["runs"][0] is not rec["runs"][-1] and run["counts"] != rec["counts"]:
                rec["status"] = f"error: repeat {rep} did other work than the first: {run['counts']} vs {rec['counts']}"
                continue
            rec.update({k: v for k, v in run.items() if k not in ("phases_s", "whole_s", "other_s")})
            # the fastest of the repeats, per phase and for the whole: contention only slows a run down
            rec["phases_s"] = {p: min(r["phases_s"][p] for r in rec["runs"]) for p in PHASES}
            rec["whole_s"] = min(r["whole_s"] for r in rec["runs"])
            rec["status"] = "ok"
            if on_update:
                on_update(report)
    ok = all(r.get("status") == "ok" for r in report["recipes"].values())
    problems = [f"{n}: {r['status']}" for n, r in report["recipes"].items() if r.get("status") != "ok"]
    if ok:
        counts = {n: r["counts"] for n, r in report["recipes"].items()}
        report["work"].update({n: c for n, c in counts.items()})
        diff = compare_work(counts, work.expected())
        report["work"]["same"] = not diff
        report["work"]["differences"] = diff
        problems += [f"work: {d}" for d in diff]
        report["ratios"] = ratios(report["recipes"]["authors"], report["recipes"]["stakes"])
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


MODEL_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu_ratio_model.json")
MATCH_KEYS = ("k", "repetitions", "pgd_steps", "steps", "importance_samples", "test_size", "batch")


def model_prediction(work: Work, path: str = MODEL_JSON) -> Optional[dict]:
    """The labelled model's prediction (benchmarks/gpu_ratio_model.py, an H100) for this work, if
    its results file has one for exactly this size; None otherwise."""
    import json

    try:
        with open(path) as fh:
            model = json.load(fh)
    except (OSError, ValueError):
        return None
    for size in model.get("predictions_by_size", []):
        if all(size["work"].get(k) == getattr(work, k) for k in MATCH_KEYS):
            return {"kind": "MODEL, not a measurement (benchmarks/gpu_ratio_model.py)",
                    "gpu": model.get("assumptions", {}).get("gpu"), "ratios": size["ratios"],
                    "seconds": size["seconds"],
                    "source": os.path.relpath(path, os.path.dirname(os.path.dirname(MODEL_JSON)) + "/..")}
    return None


# ----------------------------------------------------------------------------- output


def default_out_dir(device: torch.device) -> str:
    return measure.default_out_dir(device)   # outside the source tree (benchmarks.measure.results_root)


def write_report(report: dict, out_dir: str) -> Tuple[str, str]:
    """``whole_run.json`` (everything) and ``whole_run.csv`` (a row per phase and the whole), atomically."""
    from stakes._io import atomic_json_dump, atomic_text

    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "whole_run.json")
    atomic_json_dump(report, json_path)
    meta, recs, rat = report["metadata"], report["recipes"], report.get("ratios", {})
    cols = ("phase", "authors_s", "stakes_s", "ratio", "size", "status", "device", "torch", "triton", "python",
            "date", "git_commit")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for p in PHASES + ("whole",):
        def sec(name):
            r = recs.get(name, {})
            if r.get("status") != "ok":
                return None
            return r["whole_s"] if p == "whole" else r["phases_s"][p]
        w.writerow([p, sec("authors"), sec("stakes"), rat.get(p), report["size"]["label"], report["status"],
                    meta["device"], meta["torch"], meta["triton"], meta["python"], meta["date"], meta["git_commit"]])
    csv_path = os.path.join(out_dir, "whole_run.csv")
    atomic_text(buf.getvalue(), csv_path)
    return json_path, csv_path


def summary_lines(report: dict) -> List[str]:
    """The printed table and one ``VERDICT:`` line (gpu_check.sh's summary reads it)."""
    recs, rat, size = report["recipes"], report.get("ratios") or {}, report["size"]
    lines = [f"whole run on {report['metadata']['device']} (torch {report['metadata']['torch']}), size: {size['label']} "
             f"(k={size['k']}, R={size['repetitions']}, PGD steps {size['pgd_steps']}, steps {size['steps']}, "
             f"importance samples {size['importance_samples']}, test {size['test_size']})",
             f"{'phase':<12} {'authors s':>10} {'stakes s':>10} {'ratio':>7}"]

    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    for p in PHASES + ("whole",):
        vals = []
        for name in ("authors", "stakes"):
            r = recs.get(name, {})
            vals.append((r["whole_s"] if p == "whole" else r["phases_s"][p]) if r.get("status") == "ok" else None)
        lines.append(f"{p:<12} {fmt(vals[0], '10.2f'):>10} {fmt(vals[1], '10.2f'):>10} {fmt(rat.get(p), '7.2f'):>7}")
    ex = recs.get("stakes", {}).get("execution")
    if ex:
        lines.append("stakes execution: " + ", ".join(f"{k}={v}" for k, v in ex.items() if k != "note")
                     + (f" ({ex['note']})" if ex.get("note") else ""))
    model = report.get("model_prediction")
    if model:
        lines.append(f"{'MODEL ' + str(model['gpu'])[:20]:<26} ratios (modelled, not measured): "
                     + ", ".join(f"{p} x{model['ratios'][p]:.2f}" for p in (*PHASES, "whole")))
    if report["status"] == "ok":
        per = ", ".join(f"{p} x{rat[p]:.2f}" for p in PHASES if rat.get(p))
        lines.append(f"VERDICT: ok whole run x{rat['whole']:.2f} (authors / stakes; {per}), size {size['label']}, "
                     f"k={size['k']}" + (f"; the MODEL predicted x{model['ratios']['whole']:.2f}" if model else ""))
    else:
        lines.append(f"VERDICT: FAILED {report['status']}"[:300])
    return lines


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
    base = QUICK if args.quick else full_work()
    changes = {name: getattr(args, name) for name in ("k", "repetitions", "pgd_steps", "steps", "importance_samples",
                                                      "test_size") if getattr(args, name) is not None}
    work = base
    if not args.quick and set(changes) == {"k"}:
        work = full_work(changes["k"])
    elif changes:
        if "k" in changes and "importance_samples" not in changes and not args.quick:
            changes["importance_samples"] = CIFAR_TRAIN - changes["k"]   # |D_r| of CIFAR-10
        work = replace(base, **changes)
        if "steps" not in changes:   # as many epochs as the base size
            work = replace(work, steps=max(1, base.steps // base.steps_per_epoch) * work.steps_per_epoch)
        what = ", ".join(f"{k} = {v}" for k, v in changes.items())
        work = replace(work, label=f"{base.label.split(':')[0]}, changed: {what}")
    if device.type == "cpu" and not args.quick:
        print("whole-run: the full size on a CPU takes many hours; --quick is the reduced CPU size", file=sys.stderr)
    out_dir = args.out or default_out_dir(device)
    report = run_whole(work, device, seed=args.seed, warmup=not args.no_warmup, repeats=args.repeats,
                       on_update=lambda r: write_report(r, out_dir))
    json_path, csv_path = write_report(report, out_dir)
    for line in summary_lines(report):
        print(line)
    print(f"wrote {json_path} and {csv_path}")
    if report["status"] != "ok":
        print(f"python -m benchmarks whole-run: {report['status']}", file=sys.stderr)
        return 1
    return 0
