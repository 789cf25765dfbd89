"""Proxy set: targeted L2 PGD adversarial examples of the forget images (METHOD.md §3).

Each forget image gets R repetitions, each with a fresh random target label ỹ ≠ y. All
repetitions are batched together (``batch_size`` images per forward/backward), and the per-sample
step + projection is one launch of :func:`fused.l2_pgd_step`. The radius is given, or calibrated
on the forget set to a target attack success rate (METHOD.md §12): every radius of the grid
ε_i = base·2^(i/4) is tried at once (``l2_pgd_step`` takes a per-sample ε), and the smallest one
whose success rate reaches the target wins.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import fused
from stakes.execution import Execution, pad_rows, rows_independent


@dataclass(frozen=True)
class AttackSettings:
    """How the targeted L2 PGD attacks run (the ``UnlearnConfig`` fields of the same names; METHOD.md
    §3, and §9a.7 for the authors' advertorch attacks). The defaults are stakes' own choices."""

    start: str = "ball"              # "ball": a uniform direction at a uniform fraction of ε; "box_sphere":
                                     # uniform in [0, 1]^D minus x0, scaled into the ε-ball, clamped (advertorch)
    order: str = "project_clamp"     # a step: project onto the ε-ball, then clamp to [0, 1]; "clamp_project":
                                     # clamp, then project (advertorch), the gradient norm floored at 1e-6
    targets: str = "uniform"         # "uniform": y + U{1..C−1} mod C; "collision_half": ⌊U·C⌋, a draw of y → C//2
    proxy_order: str = "repetition"  # "repetition": R passes over the k images; "forget_batch": for each
                                     # forget batch (``forget_batch``), its R passes
    weight_grads: bool = False       # each backward also computes the attacked model's weight gradients
    forget_batch: int = 128          # the forget loader's batch (proxy_order="forget_batch")
    early_exit: bool = False         # a proxy leaves its batch at the first iterate the model classifies as its
                                     # target (that iterate is its result); the batch compacts [ours, optional]

    @classmethod
    def from_config(cls, cfg) -> "AttackSettings":
        return cls(start=cfg.pgd_start, order=cfg.pgd_order, targets=cfg.proxy_targets, proxy_order=cfg.proxy_order,
                   weight_grads=cfg.pgd_weight_grads, forget_batch=cfg.forget_batch_size,
                   early_exit=cfg.pgd_early_exit)


@dataclass
class ProxySet:
    """N_s = R·k proxy pairs (x̃, ỹ)."""

    x: torch.Tensor            # [N_s, C, H, W] in [0, 1]
    y: torch.Tensor            # [N_s] target labels (never the true label, except under the authors'
                               # "collision_half" draw, where a class-C//2 image may keep its own)
    source: torch.Tensor       # [N_s] index of the forget image each proxy comes from
    eps: float                 # radius used
    success_rate: float        # fraction of proxies the attacked model classifies as ỹ
    attacked: Optional[dict] = None   # the run that unlearned the attacked model first (config.proxy_model)
    steps: Optional[torch.Tensor] = None   # [N_s] PGD steps each proxy took (early exit only: the step count
                                           # for a proxy that never reached its target)

    def __len__(self) -> int:
        return self.x.shape[0]

    def summary(self) -> dict:
        """n, eps, success rate, and ``checksum`` (the sum of all proxy pixels, in float64) to compare
        proxy sets of runs within rounding; ``attacked_model``: the run that unlearned the attacked
        model first, where it was not the pretrained one (``config.proxy_model``)."""
        out = {"n": len(self), "eps": self.eps, "success_rate": self.success_rate,
               "checksum": float(self.x.double().sum())}
        if self.steps is not None:   # early exit: the mean steps a proxy took (to its success, or all of them)
            out["mean_pgd_steps"] = float(self.steps.double().mean())
        if self.attacked is not None:
            out["attacked_model"] = dict(self.attacked)
        return out


def random_targets(y: torch.Tensor, num_classes: int, generator: torch.Generator, *,
                   rows: Optional[slice] = None, total: Optional[int] = None, kind: str = "uniform") -> torch.Tensor:
    """Random target labels for ``y``, drawn on the host from ``generator``.

    ``kind="uniform"``: uniform over the labels ≠ y, y + U{1..C−1} mod C. ``kind="collision_half"``
    (the authors' draw, METHOD.md §9a.7): ⌊U·C⌋ with U uniform in [0, 1), a draw equal to y replaced
    by C//2 (so C//2 is drawn twice as often, and a class-C//2 image can keep its own label).

    When ``y`` holds the rows ``rows`` of a batch of ``total`` labels split over ranks, the draws
    are made for the whole batch and those rows taken, so the labels do not depend on the split."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 for targeted proxies, got {num_classes}")
    shape = y.shape if total is None else (total,)
    if kind == "collision_half":
        draw = (torch.rand(shape, generator=generator, device="cpu") * num_classes).long().clamp_(max=num_classes - 1)
        if rows is not None:
            draw = draw[rows]
        draw = draw.to(y.device)
        return torch.where(draw == y, torch.full_like(draw, num_classes // 2), draw)
    if kind != "uniform":
        raise ValueError(f"kind must be 'uniform' or 'collision_half', got {kind!r}")
    shift = torch.randint(1, num_classes, shape, generator=generator, device="cpu")
    if rows is not None:
        shift = shift[rows]
    return (y + shift.to(y.device)) % num_classes


def start_seed(seed: int, index: int) -> int:
    """The seed of proxy ``index``'s random start under run seed ``seed``: the two mixed (SplitMix64)
    into the 32 bits a CPU generator keeps. (torch's CPU generator seeds its Mersenne Twister with the
    seed's low 32 bits only: ``(seed << 32) | index``, used before, gave every run seed the same starts.)"""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(index) + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0xFFFFFFFF


def _random_start(x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor, seed: int,
                  kind: str = "ball") -> torch.Tensor:
    """A random start for each sample's attack: ``kind="ball"``, a point inside its ε-ball (uniform
    direction, uniform radius fraction); ``kind="box_sphere"`` (advertorch's, METHOD.md §9a.7), a
    uniform point of [0, 1]^D minus x0, scaled by min(1, ε/‖·‖) (onto the sphere, for images), and
    clamped to [0, 1].

    Sample ``index[i]`` draws from its own generator seeded by ``(seed, index[i])``, so a proxy does
    not depend on how the attack is cut into batches (``batch_size``), only on the seed and its place.
    """
    noise = torch.empty((x0.shape[0], *x0.shape[1:]), dtype=torch.float32)
    frac = torch.empty(x0.shape[0], dtype=torch.float32)
    for row, i in enumerate(index.tolist()):
        g = torch.Generator().manual_seed(start_seed(seed, int(i)))
        if kind == "box_sphere":
            noise[row] = torch.rand(x0.shape[1:], generator=g)
        else:
            noise[row] = torch.randn(x0.shape[1:], generator=g)
            frac[row] = torch.rand((), generator=g)
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    view = (-1, *([1] * (x0.dim() - 1)))
    if kind == "box_sphere":
        delta = noise - x0
        norms = delta.flatten(1).norm(dim=1)
        scale = torch.minimum(eps / norms, torch.ones_like(norms)).view(view)
        return (x0 + delta * scale).clamp(0.0, 1.0)
    frac = frac.to(x0.device)
    norms = noise.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (eps * frac / norms).view(view)
    return (x0 + noise * scale).clamp(0.0, 1.0)


def clamp_then_project(x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, *, step_size: float,
                       eps: torch.Tensor) -> torch.Tensor:
    """advertorch's targeted L2 step (METHOD.md §9a.7): x ← clamp(x − α·g/max(‖g‖, 1e-6), 0, 1), then
    δ = x − x0 projected onto the ε-ball (δ·min(1, ε/‖δ‖)); the result x0 + δ stays in [0, 1] (a
    convex combination of two points of the box). The fused step projects, then clamps."""
    b = x.shape[0]
    view = (b, *([1] * (x.dim() - 1)))
    g = grad.float()
    gnorm = g.reshape(b, -1).norm(dim=1).clamp_min(1e-6).view(view)
    moved = (x.float() - step_size * g / gnorm).clamp(0.0, 1.0)
    delta = moved - x0.float()
    dnorm = delta.reshape(b, -1).norm(dim=1)
    scale = torch.minimum(eps.float() / dnorm, torch.ones_like(dnorm)).view(view)
    return (x0.float() + delta * scale).to(x.dtype)


class _PGD:
    """Targeted L2 PGD on batches (METHOD.md §3) under a run's execution policy: the model's
    forward/backward under autocast, inputs in the model's memory format, and on CUDA with
    ``execution.cuda_graphs`` the step captured once per batch shape in a CUDA graph and replayed
    ``steps`` times (batches padded to that shape, the padding dropped). No host synchronisation
    inside the steps either way, except with ``attack.early_exit`` (:meth:`run_until_success`: eager
    steps, one synchronisation each; the CUDA graph is not used)."""

    def __init__(self, model: nn.Module, *, steps: int, step_size: float, backend: Optional[str],
                 execution: Optional[Execution] = None, attack: Optional[AttackSettings] = None):
        self.model, self.steps, self.step_size, self.backend = model, steps, step_size, backend
        self.execution = execution or Execution()
        self.attack = attack or AttackSettings()
        self._graphs: dict = {}
        self.last_steps: Optional[torch.Tensor] = None   # early exit: the steps each row of the last call took

    def __call__(self, x0: torch.Tensor, target: torch.Tensor, eps: torch.Tensor, *, index: torch.Tensor,
                 seed: int, pad_to: Optional[int] = None) -> torch.Tensor:
        """The attacked images of ``x0`` towards ``target`` within radii ``eps`` (``index``: the
        samples' places, which key their random starts)."""
        exe = self.execution
        x0 = exe.inputs(x0)
        x = exe.inputs(_random_start(x0, eps, index, seed, self.attack.start))
        if self.attack.early_exit:
            x, self.last_steps = self.run_until_success(x, x0, target, eps)
            return x
        if exe.cuda_graphs and x0.is_cuda:
            return self._replayed(x, x0, target, eps, pad_to or len(x0))
        return self.run_steps(x, x0, target, eps)

    def release(self) -> None:
        """Drop the captured graphs (their static buffers and memory pools)."""
        self._graphs.clear()

    def step(self, x: torch.Tensor, x0: torch.Tensor, target: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """One step: ∇_x CE(f(x), ỹ) (summed over the batch, so each sample gets its own gradient),
        then the fused per-sample step, projection and clamp."""
        x, grad, _ = self._gradient(x, target)
        return self._move(x, x0, grad, eps)

    def _gradient(self, x, target) -> tuple:
        """(x detached, ∇_x CE(f(x), ỹ) summed over the batch, the logits f(x) detached)."""
        x = x.detach().requires_grad_(True)
        with self.execution.autocast():
            logits = self.model(x)
            loss = F.cross_entropy(logits, target, reduction="sum")
        if self.attack.weight_grads:   # advertorch's loss.backward(): the weights' gradients too (cost only)
            loss.backward()
            grad = x.grad
        else:
            (grad,) = torch.autograd.grad(loss, x)
        return x.detach(), grad, logits.detach()

    def _move(self, x, x0, grad, eps) -> torch.Tensor:
        if self.attack.order == "clamp_project":
            return clamp_then_project(x, x0, grad, step_size=self.step_size, eps=eps)
        return fused.l2_pgd_step(x, x0, grad, step_size=self.step_size, eps=eps, targeted=True,
                                 backend=self.backend)

    def run_steps(self, x, x0, target, eps) -> torch.Tensor:
        for _ in range(self.steps):
            x = self.step(x, x0, target, eps)
        return x.detach()

    def run_until_success(self, x, x0, target, eps) -> tuple:
        """Early exit (``attack.early_exit``): before each step the step's own forward says which rows
        the model already classifies as their target; those rows keep that iterate as their result
        and leave the batch (the batch compacts: later steps compute only the rest); the others take
        the step. A row that never reaches its target ends after ``steps`` steps, as without early
        exit. Returns (the results, the steps each row took: the index of its first successful
        iterate, or ``steps``). One host synchronisation a step (the batch's new size)."""
        if not rows_independent(self.model, x):
            raise ValueError("pgd_early_exit needs an attacked model whose rows are independent (no BatchNorm on "
                             "batch statistics, nothing that mixes a batch's rows): a row leaving the batch would "
                             "change the others' attacks")
        out = x.detach().clone()
        taken = torch.full((len(x),), self.steps, dtype=torch.int32, device=x.device)
        rows = torch.arange(len(x), device=x.device)
        for t in range(self.steps):
            x, grad, logits = self._gradient(x, target)
            hit = logits.argmax(1) == target
            if bool(hit.any()):
                out[rows[hit]] = x[hit]
                taken[rows[hit]] = t
                keep = ~hit
                if not bool(keep.any()):
                    return out, taken
                rows, target, eps = rows[keep], target[keep], eps[keep]
                x, x0, grad = (self.execution.inputs(v[keep]) for v in (x, x0, grad))
            x = self._move(x, x0, grad, eps)
        out[rows] = x.detach()
        return out, taken

    def _replayed(self, x, x0, target, eps, size: int) -> torch.Tensor:
        n = len(x0)
        # a fixed shape for every batch: one graph, rows of the last one padded and dropped; a model
        # whose rows are not independent (a BatchNorm on batch statistics) gets a graph per shape instead
        if rows_independent(self.model, x):
            x, x0, target, eps = (pad_rows(t, size) for t in (x, x0, target, eps))
        graph = self._graphs.get((tuple(x.shape), x.dtype))
        if graph is None:
            graph = self._graphs[(tuple(x.shape), x.dtype)] = _CapturedSteps(self, x, x0, target, eps)
        for buf, value in ((graph.x, x), (graph.x0, x0), (graph.target, target), (graph.eps, eps)):
            buf.copy_(value)
        for _ in range(self.steps):
            graph.replay()
        return graph.x[:n].clone()


class _CapturedSteps:
    """One PGD step captured in a CUDA graph over static buffers (warmed up on a side stream, as
    torch.cuda.graphs requires); each replay advances ``x`` by one step. Warm-up, capture and replay
    run with the data's card current: a stream and a graph belong to the card that is current when
    they are made, and a capture records only that card's work (with ``--device cuda:1`` in one
    process the current card is still 0 unless entered)."""

    def __init__(self, pgd: _PGD, x, x0, target, eps):
        self.device = x.device
        with torch.cuda.device(self.device):
            self.x, self.x0, self.target, self.eps = x.clone(), x0.clone(), target.clone(), eps.clone()
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(3):   # warm-up: cuDNN/cuBLAS choices and Triton compilation happen outside the capture
                    self.x.copy_(pgd.step(self.x, self.x0, self.target, self.eps))
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.x.copy_(pgd.step(self.x, self.x0, self.target, self.eps))

    def replay(self) -> None:
        with torch.cuda.device(self.device):
            self.graph.replay()


def _with_backoff(run_batches, batch_size: int, device: torch.device, release=lambda: None) -> int:
    """``run_batches(size)`` with ``size`` halved after every CUDA out-of-memory error (from
    ``batch_size`` down to 1); returns the size that fitted. The proxy batch then fits the card.
    After an error ``release()`` drops what the failed size left behind (its CUDA graphs and their
    memory pools) before the allocator's cache is emptied."""
    size = batch_size
    while True:
        try:
            run_batches(size)
            return size
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            size = max(1, size // 2)
            release()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            warnings.warn(f"out of memory in the PGD attacks: retrying with batches of {size}", stacklevel=2)


def _check_inputs(model, x, y, num_classes):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError("x must be a floating tensor [k, C, H, W] of forget images in [0, 1]")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
        raise ValueError(f"y must be a label tensor of shape [{x.shape[0]}], got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if x.shape[0] == 0:
        raise ValueError("the forget set is empty: need at least one image to make proxies")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"forget labels must lie in [0, {num_classes}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")


@torch.no_grad()
def _success(model: nn.Module, x: torch.Tensor, target: torch.Tensor, batch_size: int,
             execution: Optional[Execution] = None) -> torch.Tensor:
    exe = execution or Execution()
    with exe.autocast():
        hits = [model(exe.inputs(x[i:i + batch_size])).argmax(1) == target[i:i + batch_size]
                for i in range(0, len(x), batch_size)]
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool, device=x.device)


def _eval_mode(model: nn.Module, weight_grads: bool = False):
    """Context: model in eval mode with frozen parameters (``weight_grads``: parameters that require
    gradients, as advertorch attacks a model, their gradients dropped on exit); restores both after."""

    class _Ctx:
        def __enter__(self_):
            self_.training = model.training
            self_.flags = [p.requires_grad for p in model.parameters()]
            model.eval()
            for p in model.parameters():
                p.requires_grad_(weight_grads)

        def __exit__(self_, *exc):
            model.train(self_.training)
            for p, f in zip(model.parameters(), self_.flags):
                p.requires_grad_(f)
                if weight_grads:
                    p.grad = None

    return _Ctx()


def radius_grid(base: float = 0.25, max_eps: float = 64.0) -> list[float]:
    """ε_i = base·2^(i/4), i = 0, 1, … up to ``max_eps`` (METHOD.md §12)."""
    n = int(math.floor(4 * math.log2(max_eps / base))) + 1
    return [base * 2 ** (i / 4) for i in range(n)]


def calibrate_radius(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_classes: int,
                     target_success: float = 0.9, steps: int = 100, step_size: float = 0.1,
                     grid: Optional[list[float]] = None, max_images: int = 64, repetitions: int = 2,
                     batch_size: int = 1024, seed: int = 0, backend: Optional[str] = None,
                     progress: bool = False, distributed=None,
                     execution: Optional[Execution] = None,
                     attack: Optional[AttackSettings] = None) -> tuple[float, float]:
    """Smallest radius of ``grid`` whose targeted PGD success rate on the forget set reaches
    ``target_success``; returns ``(eps, achieved_success)``. If no radius reaches it, the largest
    radius is returned with its success rate (the caller reports it).

    Binary search over the grid (success grows with the radius), each probe attacking at most
    ``max_images`` forget images × ``repetitions`` random targets with the same starts and targets,
    so about log2(len(grid)) probes instead of one per radius.

    ``distributed`` (None: the default process group if initialised; False: this process alone):
    in a group every probe's attacks are split over the ranks (:func:`stakes.distributed.shard_range`,
    batches of ⌈batch_size / W⌉) and the hits are all-reduced, so every rank takes the same
    decisions and returns the single-process result. ``execution``: the run's precision, memory
    format and CUDA graphs (:class:`stakes.execution.Execution`; default fp32 eager). ``attack``:
    how the attacks run (:class:`AttackSettings`; default stakes' own).
    """
    from stakes.distributed import all_reduce_, resolve

    attack = attack or AttackSettings()

    ctx = resolve(distributed)
    _check_inputs(model, x, y, num_classes)
    grid = list(grid) if grid is not None else radius_grid(max_eps=max(8.0, 1.2 * math.sqrt(x[0].numel())))
    if not grid or any(not (isinstance(e, (int, float)) and math.isfinite(e) and e > 0) for e in grid):
        raise ValueError(f"grid must be a non-empty list of finite radii > 0, got {grid!r}")
    if not 0.0 < target_success <= 1.0:
        raise ValueError(f"target_success must be in (0, 1], got {target_success!r}")
    grid = sorted(grid)
    g = torch.Generator().manual_seed(seed + 7919)
    if x.shape[0] > max_images:
        keep = torch.randperm(x.shape[0], generator=g)[:max_images].to(x.device)
        x, y = x[keep], y[keep]
    x0 = x.repeat(repetitions, *([1] * (x.dim() - 1)))
    target = random_targets(y.repeat(repetitions), num_classes, g, kind=attack.targets)
    rates: dict = {}
    index = torch.arange(len(x0))

    mine = ctx.batches(len(x0), batch_size)   # this rank's attacks (all of them on one process)
    pgd = _PGD(model, steps=steps, step_size=step_size, backend=backend, execution=execution, attack=attack)
    size = max((sl.stop - sl.start for sl in mine), default=1)

    def success_at(i: int) -> float:
        if i not in rates:   # every radius sees the same random starts and targets
            eps = torch.full((len(x0),), float(grid[i]), dtype=torch.float32, device=x.device)
            hits = torch.zeros((), dtype=torch.float32, device=x.device)
            for sl in mine:
                adv = pgd(x0[sl], target[sl], eps[sl], index=index[sl], seed=seed + 7919, pad_to=size)
                hits += _success(model, adv, target[sl], batch_size, execution).sum()
            all_reduce_(hits, ctx)
            # a float32 mean of the hits, as one process computes it (the target test sees the same value)
            rates[i] = float(hits / len(x0))
        return rates[i]

    with _eval_mode(model, attack.weight_grads):
        lo, hi = 0, len(grid) - 1
        bar = tqdm(total=max(1, math.ceil(math.log2(len(grid) + 1))), desc="calibrate radius",
                   disable=not progress or not ctx.is_main, leave=False)
        if success_at(hi) < target_success:
            bar.close()
            return float(grid[hi]), rates[hi]
        while lo < hi:   # invariant: grid[hi] reaches the target
            mid = (lo + hi) // 2
            bar.update(1)
            if success_at(mid) >= target_success:
                hi = mid
            else:
                lo = mid + 1
        bar.close()
    return float(grid[hi]), rates[hi]


def generate_proxies(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_classes: int,
                     repetitions: int = 20, steps: int = 100, step_size: float = 0.1, eps: float = 3.0,
                     batch_size: int = 1024, seed: int = 0, backend: Optional[str] = None,
                     progress: bool = True, distributed=None, execution: Optional[Execution] = None,
                     report: Optional[dict] = None, attack: Optional[AttackSettings] = None) -> ProxySet:
    """The proxy set of METHOD.md §3: R targeted PGD examples per forget image, batched.

    Deterministic for a given ``seed`` (on one device) and independent of ``batch_size`` up to
    floating-point rounding (each proxy's random start is drawn from its own generator). The target of every proxy differs from the
    true label of its source image.

    ``distributed`` (None: the default process group if initialised, False: this process alone):
    in a process group of W ranks, rank r attacks the contiguous slice
    :func:`stakes.distributed.shard_range` of the R·k (forget image, repetition) pairs, in batches
    of ⌈batch_size / W⌉ (``batch_size`` is global), and the slices are all-gathered: every rank
    returns the same set, equal to the single-process one up to rounding.

    ``execution``: the run's precision, memory format and CUDA graphs (default fp32 eager). On a
    CUDA out-of-memory error the attacks restart with half the batch size (down to 1); the size
    that fitted goes into ``report["batch_size"]`` when a ``report`` dict is given. ``attack``: how
    the attacks run (:class:`AttackSettings`: the start, the step's clamp/project order, the target
    draw, the proxies' order, weight gradients; default stakes' own).
    """
    from stakes.distributed import all_gather_rows, resolve

    attack = attack or AttackSettings()

    ctx = resolve(distributed)
    _check_inputs(model, x, y, num_classes)
    if not isinstance(repetitions, int) or repetitions < 1:
        raise ValueError(f"repetitions must be a positive integer, got {repetitions!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    for name, v in (("step_size", step_size), ("eps", eps)):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    g = torch.Generator().manual_seed(seed)
    k = x.shape[0]
    if attack.proxy_order == "forget_batch":   # the authors' order: each forget batch, its R passes
        fb = attack.forget_batch
        source = torch.cat([torch.arange(i, min(i + fb, k)).repeat(repetitions) for i in range(0, k, fb)]).to(x.device)
    else:
        source = torch.arange(k, device=x.device).repeat(repetitions)       # [R·k]: repetition-major
    target = random_targets(y[source], num_classes, g, kind=attack.targets)
    n = len(source)
    if ctx.world_size > n:
        raise ValueError(f"world size {ctx.world_size} > {n} (forget image, repetition) pairs to attack")
    mine = ctx.rows(n)   # this rank's pairs (all of them on one process)
    lo = mine.start
    out = torch.empty((mine.stop - lo, *x.shape[1:]), dtype=x.dtype, device=x.device)
    hits = torch.empty(out.shape[0], dtype=torch.bool, device=x.device)
    taken = torch.empty(out.shape[0], dtype=torch.int32, device=x.device) if attack.early_exit else None
    places = torch.arange(n)
    pgd = _PGD(model, steps=steps, step_size=step_size, backend=backend, execution=execution, attack=attack)
    desc = f"proxies (R={repetitions}, k={k}, eps={eps:.3g})" + (f", {ctx.world_size} ranks" if ctx.enabled else "")

    def attack_all(size: int) -> None:
        batches = ctx.batches(n, size)
        longest = max((sl.stop - sl.start for sl in batches), default=1)
        for sl in tqdm(batches, desc=desc, disable=not progress or not ctx.is_main, leave=False):
            dst = slice(sl.start - lo, sl.stop - lo)
            x0 = x[source[sl]]
            e = torch.full((x0.shape[0],), float(eps), dtype=torch.float32, device=x.device)
            out[dst] = pgd(x0, target[sl], e, index=places[sl], seed=seed, pad_to=longest)
            hits[dst] = _success(model, out[dst], target[sl], size, execution)
            if taken is not None:
                taken[dst] = pgd.last_steps

    with _eval_mode(model, attack.weight_grads):
        fitted = _with_backoff(attack_all, batch_size, x.device, release=pgd.release)
    if report is not None:
        report["batch_size"] = fitted
    out, hits = all_gather_rows(out, n, ctx), all_gather_rows(hits, n, ctx)
    if taken is not None:
        taken = all_gather_rows(taken, n, ctx)
    return ProxySet(x=out, y=target, source=source, eps=float(eps), success_rate=float(hits.float().mean()),
                    steps=taken)
