"""End-to-end rows: proxy generation (images/s) and StructGuard optimisation steps/s.

Proxy generation (METHOD.md §3, PERFORMANCE.md hot spot 1), same model, same R·k images, same steps:

* ``sequential`` — the paper's recipe written here with plain torch ops: for every repetition, for
  every batch of 128 forget images, a fresh random target and random start, then ``steps`` PGD
  steps, each an eager gradient-normalised step, projection and clamp.
* ``batched_reference`` / ``batched_fused`` — ``stakes.proxy.generate_proxies``: all R·k
  repetitions in large batches, the step via ``fused.l2_pgd_step`` with ``backend="reference"``
  or ``"triton"`` (GPU only).

Throughput is PGD image-steps per second (images × steps / wall time); a full proxy set uses 100
steps, so proxy images/s = throughput / 100.

StructGuard steps/s: ``stakes.unlearn`` for a fixed number of optimisation steps on precomputed
proxies, ``backend="reference"`` vs ``"triton"`` (GPU only); ``timings["step_ms"]`` is the time per
step of its optimisation loop (loss, backward, fused update).
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import measure

NUM_CLASSES = 10
PGD_STEP_SIZE, PGD_EPS = 0.1, 3.0  # CIFAR-10 values (METHOD.md §3)


class SmallCNN(nn.Module):
    """A 3-conv CIFAR-size classifier (128-d features) for runs where the ResNet is too slow."""

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def build_classifier(device: torch.device, *, prefer_resnet: bool) -> Tuple[nn.Module, str, str]:
    """The CIFAR ResNet-18 of ``stakes.models`` when wanted, else :class:`SmallCNN`: ``(model, arch,
    note)``. A ResNet that fails to build falls back to the small CNN, and ``note`` says why (it goes
    into the rows: a fallback is never silent)."""
    note = ""
    if prefer_resnet:
        try:
            from stakes.models import build_model

            return (build_model("resnet18", NUM_CLASSES, in_channels=3, image_size=32).to(device).eval(),
                    "resnet18", "")
        except Exception as exc:
            note = f"resnet18 failed to build ({type(exc).__name__}: {exc}"[:200] + "); small CNN instead"
    torch.manual_seed(0)
    return SmallCNN().to(device).eval(), "small_cnn", note


def sequential_proxies(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, repetitions: int, steps: int,
                       step_size: float = PGD_STEP_SIZE, eps: float = PGD_EPS, batch_size: int = 128,
                       seed: int = 0) -> torch.Tensor:
    """The paper's proxy loop: one repetition and one batch of 128 at a time, eager torch ops.

    Per step: g = ∇_x CE(f(x), ỹ); x ← x − α·g/‖g‖; δ = x − x0 scaled by min(1, ε/‖δ‖); x ← clamp(x0 + δ).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(repetitions):
        for i in range(0, x.shape[0], batch_size):
            x0, y0 = x[i:i + batch_size], y[i:i + batch_size]
            view = (-1,) + (1,) * (x0.dim() - 1)
            target = (y0 + torch.randint(1, NUM_CLASSES, y0.shape, generator=gen).to(y0.device)) % NUM_CLASSES
            noise = torch.randn(x0.shape, generator=gen).to(x0.device)
            radius = eps * torch.rand(x0.shape[0], generator=gen).to(x0.device)
            xa = (x0 + noise * (radius / noise.flatten(1).norm(dim=1)).view(view)).clamp(0, 1)
            for _ in range(steps):
                xa.requires_grad_(True)
                (g,) = torch.autograd.grad(F.cross_entropy(model(xa), target), xa)
                xa = xa.detach() - step_size * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
                delta = xa - x0
                delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-30)).clamp(max=1.0).view(view)
                xa = (x0 + delta).clamp(0, 1)
            out.append(xa.detach())
    return torch.cat(out)


def _row(op: str, shape: str, provider: str, seconds: float, throughput: float, unit: str,
         note: str = "") -> Dict[str, object]:
    return {"op": op, "regime": "e2e", "shape": shape, "dtype": "float32", "provider": provider, "pass": "e2e",
            "median_ms": seconds * 1e3, "timer": "wall (one run after a warm-up)",
            "throughput": throughput, "throughput_unit": unit, "status": "ok", "note": note}


def _error(op: str, shape: str, provider: str, why: str) -> Dict[str, object]:
    return {"op": op, "regime": "e2e", "shape": shape, "dtype": "float32", "provider": provider, "pass": "e2e",
            "status": f"error: {why}"[:300]}


def _with_note(rows: List[Dict[str, object]], note: str) -> List[Dict[str, object]]:
    """Append ``note`` (a fallback's reason) to every row's note."""
    if note:
        for r in rows:
            r["note"] = f"{r['note']}; {note}" if r.get("note") else note
    return rows


def proxy_generation(device: torch.device, *, quick: bool) -> List[Dict[str, object]]:
    """Sequential paper loop vs batched repetitions (+ fused step on a GPU)."""
    gpu = device.type == "cuda"
    model, arch, model_note = build_classifier(device, prefer_resnet=gpu)
    for p in model.parameters():
        p.requires_grad_(False)
    R, k, steps = (20, 256, 10) if gpu else ((2, 32, 2) if quick else (4, 64, 3))
    batch = 2048 if gpu else 256
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(k, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (k,), generator=gen).to(device)
    shape = f"R={R},k={k},steps={steps},model={arch}"
    unit = "PGD image-steps/s"
    work = R * k * steps
    rows = []
    sequential_proxies(model, x[:8], y[:8], repetitions=1, steps=1)  # warm-up (allocator, cuDNN/oneDNN)
    seq_s = measure.elapsed_s(lambda: sequential_proxies(model, x, y, repetitions=R, steps=steps), device)
    rows.append(_row("proxy_generation", shape, "sequential", seq_s, work / seq_s, unit, "batch 128, eager step"))
    try:
        from stakes.proxy import generate_proxies
    except Exception as exc:  # stakes.proxy exists in this repository: failing to import it is a bug
        rows.append(_error("proxy_generation", shape, "batched_reference", f"importing stakes.proxy: {exc!r}"))
        return _with_note(rows, model_note)
    backends = [("batched_reference", "reference")] + ([("batched_fused", "triton")] if gpu else [])
    for provider, backend in backends:
        def gen_fn(backend=backend, repetitions=R, steps=steps):
            return generate_proxies(model, x, y, num_classes=NUM_CLASSES, repetitions=repetitions, steps=steps,
                                    step_size=PGD_STEP_SIZE, eps=PGD_EPS, batch_size=batch, backend=backend,
                                    progress=False)
        try:
            gen_fn(repetitions=1, steps=1)  # warm-up: Triton compilation, cuDNN autotuning
            s = measure.elapsed_s(gen_fn, device)
            rows.append(_row("proxy_generation", shape, provider, s, work / s, unit,
                             f"stakes.proxy.generate_proxies, batch {batch}"))
        except Exception as exc:
            rows.append(_error("proxy_generation", shape, provider, f"{type(exc).__name__}: {exc}"))
    seq = rows[0]["median_ms"]
    for r in rows:
        if r.get("status") == "ok":
            r["speedup_vs_eager"] = seq / r["median_ms"]  # vs the sequential paper loop
    return _with_note(rows, model_note)


def structguard_steps(device: torch.device, *, quick: bool) -> List[Dict[str, object]]:
    """StructGuard optimisation steps/s through ``stakes.unlearn``, reference vs fused ops."""
    gpu = device.type == "cuda"
    k, R, steps = (128, 20, 30) if gpu else ((8, 4, 3) if quick else (16, 8, 10))
    shape = f"k={k},R={R},steps={steps}"
    try:
        stakes = importlib.import_module("stakes")
        unlearn = getattr(stakes, "unlearn", None) or importlib.import_module("stakes.methods").unlearn
        preset = stakes.preset   # the method's preset: its own options (importance_samples) routed to it
        from stakes.proxy import ProxySet
    except Exception as exc:  # stakes exists in this repository: failing to import it is a bug
        return [_error("structguard", shape, "reference", f"importing stakes.unlearn: {exc!r}")]
    torch.manual_seed(0)
    body = SmallCNN().to(device)
    model = (body.features, body.head)
    gen = torch.Generator().manual_seed(0)
    fx = torch.rand(k, 3, 32, 32, generator=gen).to(device)
    fy = torch.randint(0, NUM_CLASSES, (k,), generator=gen).to(device)
    source = torch.arange(k, device=device).repeat(R)
    px = (fx[source] + 0.05 * torch.randn(source.shape[0], 3, 32, 32, generator=gen).to(device)).clamp(0, 1)
    py = (fy[source] + torch.randint(1, NUM_CLASSES, source.shape, generator=gen).to(device)) % NUM_CLASSES
    proxies = ProxySet(x=px, y=py, source=source, eps=1.0, success_rate=1.0)
    anchors = F.normalize(torch.randn(NUM_CLASSES, 384, generator=gen), dim=1).to(device)
    rows = []
    backends = [("reference", "reference")] + ([("fused", "triton")] if gpu else [])
    for provider, backend in backends:
        try:
            cfg = preset("stable", method="structguard", max_steps=steps, backend=backend, device=str(device),
                         progress=False, log_every=10**6, importance_samples=256, stop_warmup_steps=10**6)
            if gpu:  # warm-up run: kernel compilation is not throughput
                unlearn(model, (fx, fy), anchors=anchors, config=cfg, proxies=proxies, method="structguard")
            res = unlearn(model, (fx, fy), anchors=anchors, config=cfg, proxies=proxies, method="structguard")
            step_s = res.timings["step_ms"] / 1e3
            rows.append(_row("structguard", shape, provider, step_s, 1.0 / step_s, "steps/s",
                             f"stakes.unlearn, small CNN, {res.steps} steps, batches 128+128"))
        except Exception as exc:
            rows.append(_error("structguard", shape, provider, f"{type(exc).__name__}: {exc}"))
    ok = {r["provider"]: r for r in rows if r.get("status") == "ok"}
    if "reference" in ok:
        for r in ok.values():
            r["speedup_vs_eager"] = ok["reference"]["median_ms"] / r["median_ms"]
    return rows


def run_e2e(device: torch.device, *, quick: bool) -> List[Dict[str, object]]:
    """All end-to-end rows; a failure in one part is recorded as a row, not raised."""
    rows: List[Dict[str, object]] = []
    for part in (proxy_generation, structguard_steps):
        try:
            rows += part(device, quick=quick)
        except Exception as exc:
            rows.append({"op": part.__name__, "regime": "e2e", "status": f"error: {type(exc).__name__}: {exc}"[:300]})
    return rows
