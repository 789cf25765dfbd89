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


@dataclass
class ProxySet:
    """N_s = R·k proxy pairs (x̃, ỹ)."""

    x: torch.Tensor            # [N_s, C, H, W] in [0, 1]
    y: torch.Tensor            # [N_s] target labels, never the true label
    source: torch.Tensor       # [N_s] index of the forget image each proxy comes from
    eps: float                 # radius used
    success_rate: float        # fraction of proxies the pretrained model classifies as ỹ

    def __len__(self) -> int:
        return self.x.shape[0]

    def summary(self) -> dict:
        """n, eps, success rate, and ``checksum`` (the sum of all proxy pixels, in float64) to compare
        proxy sets of runs within rounding."""
        return {"n": len(self), "eps": self.eps, "success_rate": self.success_rate,
                "checksum": float(self.x.double().sum())}


def random_targets(y: torch.Tensor, num_classes: int, generator: torch.Generator, *,
                   rows: Optional[slice] = None, total: Optional[int] = None) -> torch.Tensor:
    """Uniform random labels ≠ y: y + U{1..C−1} mod C.

    When ``y`` holds the rows ``rows`` of a batch of ``total`` labels split over ranks, the shifts
    are drawn for the whole batch and those rows taken, so the labels do not depend on the split."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 for targeted proxies, got {num_classes}")
    shape = y.shape if total is None else (total,)
    shift = torch.randint(1, num_classes, shape, generator=generator, device="cpu")
    if rows is not None:
        shift = shift[rows]
    return (y + shift.to(y.device)) % num_classes


def _random_start(x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor, seed: int) -> torch.Tensor:
    """A random point inside each sample's ε-ball (uniform direction, uniform radius fraction).

    Sample ``index[i]`` draws from its own generator seeded by ``(seed, index[i])``, so a proxy does
    not depend on how the attack is cut into batches (``batch_size``), only on the seed and its place.
    """
    noise = torch.empty((x0.shape[0], *x0.shape[1:]), dtype=torch.float32)
    frac = torch.empty(x0.shape[0], dtype=torch.float32)
    for row, i in enumerate(index.tolist()):
        g = torch.Generator().manual_seed(((seed & 0x7FFFFFFF) << 32) | (int(i) & 0xFFFFFFFF))
        noise[row] = torch.randn(x0.shape[1:], generator=g)
        frac[row] = torch.rand((), generator=g)
    noise, frac = noise.to(device=x0.device, dtype=x0.dtype), frac.to(x0.device)
    norms = noise.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (eps * frac / norms).view(-1, *([1] * (x0.dim() - 1)))
    return (x0 + noise * scale).clamp(0.0, 1.0)


class _PGD:
    """Targeted L2 PGD on batches (METHOD.md §3) under a run's execution policy: the model's
    forward/backward under autocast, inputs in the model's memory format, and on CUDA with
    ``execution.cuda_graphs`` the step captured once per batch shape in a CUDA graph and replayed
    ``steps`` times (batches padded to that shape, the padding dropped). No host synchronisation
    inside the steps either way."""

    def __init__(self, model: nn.Module, *, steps: int, step_size: float, backend: Optional[str],
                 execution: Optional[Execution] = None):
        self.model, self.steps, self.step_size, self.backend = model, steps, step_size, backend
        self.execution = execution or Execution()
        self._graphs: dict = {}

    def __call__(self, x0: torch.Tensor, target: torch.Tensor, eps: torch.Tensor, *, index: torch.Tensor,
                 seed: int, pad_to: Optional[int] = None) -> torch.Tensor:
        """The attacked images of ``x0`` towards ``target`` within radii ``eps`` (``index``: the
        samples' places, which key their random starts)."""
        exe = self.execution
        x0 = exe.inputs(x0)
        x = exe.inputs(_random_start(x0, eps, index, seed))
        if exe.cuda_graphs and x0.is_cuda:
            return self._replayed(x, x0, target, eps, pad_to or len(x0))
        return self.run_steps(x, x0, target, eps)

    def release(self) -> None:
        """Drop the captured graphs (their static buffers and memory pools)."""
        self._graphs.clear()

    def step(self, x: torch.Tensor, x0: torch.Tensor, target: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """One step: ∇_x CE(f(x), ỹ) (summed over the batch, so each sample gets its own gradient),
        then the fused per-sample step, projection and clamp."""
        x = x.detach().requires_grad_(True)
        with self.execution.autocast():
            loss = F.cross_entropy(self.model(x), target, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
        return fused.l2_pgd_step(x.detach(), x0, grad, step_size=self.step_size, eps=eps, targeted=True,
                                 backend=self.backend)

    def run_steps(self, x, x0, target, eps) -> torch.Tensor:
        for _ in range(self.steps):
            x = self.step(x, x0, target, eps)
        return x.detach()

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


def _eval_mode(model: nn.Module):
    """Context: model in eval mode with frozen parameters; restores both after."""

    class _Ctx:
        def __enter__(self_):
            self_.training = model.training
            self_.flags = [p.requires_grad for p in model.parameters()]
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)

        def __exit__(self_, *exc):
            model.train(self_.training)
            for p, f in zip(model.parameters(), self_.flags):
                p.requires_grad_(f)

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
                     execution: Optional[Execution] = None) -> tuple[float, float]:
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
    format and CUDA graphs (:class:`stakes.execution.Execution`; default fp32 eager).
    """
    from stakes.distributed import all_reduce_, resolve

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
    target = random_targets(y.repeat(repetitions), num_classes, g)
    rates: dict = {}
    index = torch.arange(len(x0))

    mine = ctx.batches(len(x0), batch_size)   # this rank's attacks (all of them on one process)
    pgd = _PGD(model, steps=steps, step_size=step_size, backend=backend, execution=execution)
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

    with _eval_mode(model):
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
                     report: Optional[dict] = None) -> ProxySet:
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
    that fitted goes into ``report["batch_size"]`` when a ``report`` dict is given.
    """
    from stakes.distributed import all_gather_rows, resolve

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
    source = torch.arange(k, device=x.device).repeat(repetitions)       # [R·k]: repetition-major
    target = random_targets(y[source], num_classes, g)
    n = len(source)
    if ctx.world_size > n:
        raise ValueError(f"world size {ctx.world_size} > {n} (forget image, repetition) pairs to attack")
    mine = ctx.rows(n)   # this rank's pairs (all of them on one process)
    lo = mine.start
    out = torch.empty((mine.stop - lo, *x.shape[1:]), dtype=x.dtype, device=x.device)
    hits = torch.empty(out.shape[0], dtype=torch.bool, device=x.device)
    places = torch.arange(n)
    pgd = _PGD(model, steps=steps, step_size=step_size, backend=backend, execution=execution)
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

    with _eval_mode(model):
        fitted = _with_backoff(attack_all, batch_size, x.device, release=pgd.release)
    if report is not None:
        report["batch_size"] = fitted
    out, hits = all_gather_rows(out, n, ctx), all_gather_rows(hits, n, ctx)
    return ProxySet(x=out, y=target, source=source, eps=float(eps), success_rate=float(hits.float().mean()))
