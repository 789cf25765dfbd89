"""A *model*, not a measurement, of what a data-parallel unlearning run computes and communicates.

``python -m benchmarks.scaling_model [--json PATH] [--markdown]``

For two setups (CIFAR-10 ResNet-18, ImageNet ViT-B/16) at 1, 8 and 64 GPUs it derives, from the
real model objects (random weights, nothing downloaded):

* the trainable parameter count (features + head) and the gradient bytes all-reduced per
  optimisation step (fp32 and bf16), and the ring all-reduce traffic per GPU, 2·(W−1)/W × bytes;
* the FLOPs of one forward and of forward+backward per image, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on the model at batch 1 (matmuls and convolutions
  only; attention is forced onto the math SDPA path so its two batched matmuls are counted);
* the proxy set's cost (R·k proxies, each pgd_steps × (forward + input backward) + one forward
  for the success check), split over ranks (⌈R·k/W⌉ proxies per GPU);
* the per-step compute per GPU (the rank's share of the global proxy batch and of the forget
  batch, which is split like the proxy batch when it has at least one image per rank and is
  computed whole on every rank otherwise, as stakes.methods.loop does) against the per-step
  gradient all-reduce;
* the importance pass (N_tot = |D_r| samples of forward+backward, one all-reduce per global batch);
* time estimates from the stated throughput and bandwidth assumptions (:data:`ASSUMPTIONS`).

Every time in the output is modelled from these counts and assumptions; none is measured.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "scaling_model.json"
WORLD_SIZES = (1, 8, 64)

ASSUMPTIONS = {
    "kind": "model, not measured: every number below is derived from parameter/FLOP counts and the "
            "assumptions listed here; no GPU was run",
    "gpu": "H100-class GPU",
    "peak_bf16_dense_tflops": 400.0,   # assumed effective bf16 dense peak
    "utilisation": 0.40,               # assumed fraction of that peak reached by the whole step
    "gpus_per_node": 8,
    "intra_node_bw_gbps": 150.0,       # NVLink ring bandwidth per GPU within a node, GB/s
    "inter_node_bw_gbps": 25.0,        # 200 Gb/s InfiniBand per GPU across nodes, GB/s
    "ring_link": "a ring spanning nodes runs at the slower (inter-node) link: W <= 8 uses NVLink, W = 64 "
                 "(8 nodes x 8 GPUs) uses 25 GB/s",
    "allreduce": "ring all-reduce: each GPU sends (and receives) 2*(W-1)/W x gradient bytes; latency and "
                 "the per-hop alpha term are ignored",
    "grad_dtype": "fp32 gradients (4 B/param) by default; bf16 (2 B/param) listed alongside",
    "params": "all trainable parameters of the model (features + head); the method's projector p_w and "
              "the head's zero importance gradient are not counted",
    "flops": "FlopCounterMode, batch 1, matmul/conv FLOPs only (2 per MAC; norms, activations, softmax, "
             "loss and optimiser not counted); per-image FLOPs scale linearly with the batch",
    "pgd_step": "one PGD step = forward + backward w.r.t. the input only (parameters frozen, as "
                "stakes/proxy.py does), measured as fwd_bwd_input; a step that also computed weight "
                "gradients would cost fwd_bwd_params_input (about 3x forward)",
    "proxy_cost": "one proxy = pgd_steps x fwd_bwd_input + 1 forward (success check); radius "
                  "calibration (calibrate_radius) and the final all_gather of the proxies are extra and "
                  "not in the proxy time",
    "proxy_split": "the R*k (image, repetition) pairs are split over ranks: ceil(R*k/W) proxies per GPU",
    "train_step": "per step and GPU: ceil(global proxy batch / W) proxies + ceil(forget batch / W) forget images "
                  "(forget batch = min(forget_batch_size, k); split when it has >= W images, else every rank "
                  "computes it whole), "
                  "each forward + weight backward (fwd_bwd_params); one gradient all-reduce per step",
    "step_time": "compute time and communication time are given separately; the step takes between "
                 "max(compute, comm) (perfect overlap) and their sum (no overlap)",
    "small_batches": "the 40% utilisation is optimistic when the per-GPU batch is tiny (e.g. 2 proxies "
                     "at W=64 on CIFAR); the model does not lower it",
    "importance": "N_tot = |D_r| = train size - k samples of forward + weight backward, split over "
                  "ranks; one all-reduce of the full gradient per global proxy batch, "
                  "ceil(N_tot / proxy_batch_size) all-reduces",
}


@dataclass(frozen=True)
class Setup:
    name: str
    model: str
    dataset: str
    input_shape: tuple          # one image, (C, H, W)
    num_classes: int
    k: int                      # forget images
    repetitions: int            # R
    pgd_steps: int
    proxy_batch_size: int       # global
    forget_batch_size: int
    train_size: int             # |D| before removing the forget set


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision ResNet-18 in its CIFAR form: 3×3 stride-1 stem, no max-pool."""
    import torchvision

    m = torchvision.models.resnet18(num_classes=num_classes)
    m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


def vit_b16(num_classes: int = 1000) -> nn.Module:
    import timm

    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=num_classes)


BUILDERS: dict = {"resnet18_cifar": cifar_resnet18, "vit_base_patch16_224": vit_b16}

SETUPS = {
    "cifar10_resnet18": Setup("cifar10_resnet18", "resnet18_cifar", "CIFAR-10", (3, 32, 32), 10, k=100,
                              repetitions=20, pgd_steps=100, proxy_batch_size=128, forget_batch_size=128,
                              train_size=50_000),
    "imagenet_vitb16": Setup("imagenet_vitb16", "vit_base_patch16_224", "ImageNet-1k", (3, 224, 224), 1000,
                             k=256, repetitions=20, pgd_steps=100, proxy_batch_size=512, forget_batch_size=128,
                             train_size=1_281_167),
}


# ----------------------------------------------------------------------------- counting


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(model: nn.Module, input_shape: Sequence[int], num_classes: int) -> dict:
    """Per-image FLOPs at batch 1: ``fwd``; ``fwd_bwd_input`` (parameters frozen, gradient w.r.t.
    the input: a PGD step); ``fwd_bwd_params`` (weight gradients, input without grad: a training
    step); ``fwd_bwd_params_input`` (both)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    target = torch.zeros(1, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((1, *input_shape), generator=g)

    def run(params_grad: bool, input_grad: Optional[bool]) -> int:
        for p in model.parameters():
            p.requires_grad_(params_grad)
            p.grad = None
        x = x0.clone().requires_grad_(bool(input_grad))
        # The math SDPA path decomposes attention into counted bmm's (the fused CPU kernel is not counted).
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            if input_grad is None:
                with torch.no_grad():
                    model(x)
            else:
                F.cross_entropy(model(x), target).backward()
        return int(fc.get_total_flops())

    try:
        out = {"fwd": run(False, None), "fwd_bwd_input": run(False, True), "fwd_bwd_params": run(True, False),
               "fwd_bwd_params_input": run(True, True)}
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
            p.grad = None
    return out


# ----------------------------------------------------------------------------- formulas


def ring_allreduce_bytes_per_gpu(grad_bytes: float, world_size: int) -> float:
    """Bytes each GPU sends in a ring all-reduce of ``grad_bytes``: 2·(W−1)/W × bytes (0 at W = 1)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return 2.0 * (world_size - 1) / world_size * grad_bytes


def ring_bandwidth_gbps(world_size: int, assumptions: dict = ASSUMPTIONS) -> Optional[float]:
    """The ring's per-GPU link bandwidth (GB/s): NVLink within a node, InfiniBand once it spans nodes."""
    if world_size == 1:
        return None
    return assumptions["intra_node_bw_gbps"] if world_size <= assumptions["gpus_per_node"] else \
        assumptions["inter_node_bw_gbps"]


def effective_flops_per_s(assumptions: dict = ASSUMPTIONS) -> float:
    return assumptions["peak_bf16_dense_tflops"] * 1e12 * assumptions["utilisation"]


def _comm_s(nbytes: float, world_size: int, assumptions: dict) -> float:
    bw = ring_bandwidth_gbps(world_size, assumptions)
    return 0.0 if bw is None else nbytes / (bw * 1e9)


def model_setup(setup: Setup, world_sizes: Sequence[int] = WORLD_SIZES, assumptions: dict = ASSUMPTIONS,
                builder: Optional[Callable[[int], nn.Module]] = None) -> dict:
    """All the modelled numbers of one setup: a dict with the counts and one row per world size."""
    torch.manual_seed(0)
    model = (builder or BUILDERS[setup.model])(setup.num_classes)
    params = count_params(model)
    flops = count_flops(model, setup.input_shape, setup.num_classes)
    rate = effective_flops_per_s(assumptions)

    grad_bytes_fp32, grad_bytes_bf16 = 4 * params, 2 * params
    n_pairs = setup.repetitions * setup.k
    proxy_flops = setup.pgd_steps * flops["fwd_bwd_input"] + flops["fwd"]
    forget_batch = min(setup.forget_batch_size, setup.k)
    n_retain = setup.train_size - setup.k
    image_bytes = 4 * math.prod(setup.input_shape)
    importance_allreduces = math.ceil(n_retain / setup.proxy_batch_size)
    steps_per_epoch = math.ceil(n_pairs / setup.proxy_batch_size)

    rows = []
    for w in world_sizes:
        ring32 = ring_allreduce_bytes_per_gpu(grad_bytes_fp32, w)
        ring16 = ring_allreduce_bytes_per_gpu(grad_bytes_bf16, w)
        proxies_per_gpu = math.ceil(n_pairs / w)
        proxy_share = math.ceil(setup.proxy_batch_size / w)
        forget_share = math.ceil(forget_batch / w) if forget_batch >= w else forget_batch
        step_images = proxy_share + forget_share
        step_flops = step_images * flops["fwd_bwd_params"]
        step_compute_s = step_flops / rate
        step_comm32_s, step_comm16_s = _comm_s(ring32, w, assumptions), _comm_s(ring16, w, assumptions)
        proxy_gen_s = proxies_per_gpu * proxy_flops / rate
        gather_bytes = (w - 1) / w * n_pairs * image_bytes   # all_gather of the fp32 proxies, per GPU received
        imp_samples = math.ceil(n_retain / w)
        imp_flops = imp_samples * flops["fwd_bwd_params"]
        imp_comm_s = importance_allreduces * step_comm32_s
        rows.append({
            "world_size": w,
            "ring_link_gbps": ring_bandwidth_gbps(w, assumptions),
            "allreduce_bytes_per_gpu_per_step_fp32": ring32,
            "allreduce_bytes_per_gpu_per_step_bf16": ring16,
            "proxy_images_per_gpu_per_step": proxy_share,
            "forget_images_per_gpu_per_step": forget_share,
            "compute_flops_per_gpu_per_step": step_flops,
            "step_compute_ms": 1e3 * step_compute_s,
            "step_comm_ms_fp32": 1e3 * step_comm32_s,
            "step_comm_ms_bf16": 1e3 * step_comm16_s,
            "step_ms_overlap_fp32": 1e3 * max(step_compute_s, step_comm32_s),
            "step_ms_no_overlap_fp32": 1e3 * (step_compute_s + step_comm32_s),
            "comm_to_compute_fp32": step_comm32_s / step_compute_s,
            "proxies_per_gpu": proxies_per_gpu,
            "proxy_flops_per_gpu": proxies_per_gpu * proxy_flops,
            "proxy_gen_s_per_gpu": proxy_gen_s,
            "proxy_all_gather_bytes_per_gpu": gather_bytes,
            "proxy_all_gather_s": _comm_s(gather_bytes, w, assumptions),
            "importance_samples_per_gpu": imp_samples,
            "importance_flops_per_gpu": imp_flops,
            "importance_compute_s_per_gpu": imp_flops / rate,
            "importance_allreduces": importance_allreduces if w > 1 else 0,
            "importance_comm_s_fp32": imp_comm_s,
        })

    return {
        "setup": asdict(setup),
        "params": params,
        "grad_bytes_per_step_fp32": grad_bytes_fp32,
        "grad_bytes_per_step_bf16": grad_bytes_bf16,
        "flops_per_image": flops,
        "n_proxies": n_pairs,
        "proxy_flops_each": proxy_flops,
        "proxy_flops_total": n_pairs * proxy_flops,
        "steps_per_epoch": steps_per_epoch,
        "importance_samples_total": n_retain,
        "rows": rows,
    }


def build_report(setups: Sequence[str] = tuple(SETUPS), world_sizes: Sequence[int] = WORLD_SIZES,
                 assumptions: dict = ASSUMPTIONS) -> dict:
    t0 = time.perf_counter()
    results = [model_setup(SETUPS[name], world_sizes, assumptions) for name in setups]
    return {
        "metadata": {"kind": "model, not measured", "torch": torch.__version__,
                     "effective_tflops": effective_flops_per_s(assumptions) / 1e12,
                     "seconds_to_compute": round(time.perf_counter() - t0, 2)},
        "assumptions": dict(assumptions),
        "setups": results,
    }


# ----------------------------------------------------------------------------- output


def _fmt(x: float, digits: int = 3) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def markdown(report: dict) -> str:
    a = report["assumptions"]
    eff = report["metadata"]["effective_tflops"]
    lines = [
        "### Data-parallel scaling (model, not measured)",
        "",
        f"Modelled from parameter and FLOP counts of the real models (random weights) and these assumptions: "
        f"{a['gpu']} at an assumed {a['peak_bf16_dense_tflops']:.0f} TFLOP/s bf16 dense × "
        f"{100 * a['utilisation']:.0f} % utilisation = {eff:.0f} TFLOP/s effective; ring all-reduce "
        f"(2·(W−1)/W × gradient bytes per GPU, latency ignored) over NVLink at {a['intra_node_bw_gbps']:.0f} GB/s "
        f"per GPU within a node (W ≤ {a['gpus_per_node']}) and {a['inter_node_bw_gbps']:.0f} GB/s per GPU "
        f"(200 Gb/s InfiniBand) across nodes (W = 64 = 8 nodes; the ring runs at the slower link); fp32 "
        "gradients. FLOPs: `FlopCounterMode` at batch 1, matmul/conv only. A PGD step = forward + input "
        "backward (parameters frozen); one proxy = steps × that + 1 forward. A training step on each GPU = "
        "its share of the global proxy batch + its share of the forget batch (split when it has at least "
        "one image per rank, else computed whole on every rank), forward + weight backward, then one "
        "gradient all-reduce. Importance = "
        "|D_r| samples of forward + weight backward split over GPUs, one all-reduce per global proxy "
        "batch. Compute and comm are listed separately: a step takes between max and sum of the two.",
        "",
    ]
    for s in report["setups"]:
        st, f = s["setup"], s["flops_per_image"]
        lines.append(
            f"* **{st['dataset']} {st['model']}**: {s['params']:,} params; per image fwd "
            f"{f['fwd'] / 1e9:.3g} GFLOP, PGD step (fwd + input bwd) {f['fwd_bwd_input'] / 1e9:.3g}, training "
            f"(fwd + weight bwd) {f['fwd_bwd_params'] / 1e9:.3g}, fwd + both bwd {f['fwd_bwd_params_input'] / 1e9:.3g} "
            f"GFLOP; k = {st['k']}, R = {st['repetitions']}, {st['pgd_steps']} PGD steps → "
            f"{s['n_proxies']:,} proxies, {s['proxy_flops_total'] / 1e15:.3g} PFLOP; proxy batch "
            f"{st['proxy_batch_size']} (global), forget batch {min(st['forget_batch_size'], st['k'])}; "
            f"|D_r| = {s['importance_samples_total']:,}.")
    lines += [
        "",
        "| setup | W | params | grad MB/step (fp32) | all-reduce MB/GPU/step | compute GFLOP/GPU/step "
        "| step compute / comm ms (fp32) | proxies/GPU | proxy gen s/GPU | importance GFLOP/GPU "
        "(compute s / comm s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["setups"]:
        st = s["setup"]
        label = f"{st['dataset']} {st['model']}"
        for r in s["rows"]:
            lines.append(
                f"| {label} | {r['world_size']} | {s['params'] / 1e6:.2f} M | {s['grad_bytes_per_step_fp32'] / 1e6:.1f} "
                f"| {_fmt(r['allreduce_bytes_per_gpu_per_step_fp32'] / 1e6)} "
                f"| {_fmt(r['compute_flops_per_gpu_per_step'] / 1e9)} "
                f"| {_fmt(r['step_compute_ms'])} / {_fmt(r['step_comm_ms_fp32'])} "
                f"| {r['proxies_per_gpu']:,} | {_fmt(r['proxy_gen_s_per_gpu'])} "
                f"| {_fmt(r['importance_flops_per_gpu'] / 1e9)} ({_fmt(r['importance_compute_s_per_gpu'])} / "
                f"{_fmt(r['importance_comm_s_fp32'])}) |")
    lines += ["", "bf16 gradients halve the all-reduce bytes and times. Every time above is modelled, not measured."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling_model",
                                     description="Model (not measurement) of data-parallel compute and communication.")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help=f"output JSON (default {DEFAULT_JSON})")
    parser.add_argument("--markdown", action="store_true", help="print only the Markdown table")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated subset of {','.join(SETUPS)}")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.setups.split(",") if n.strip()]
    bad = [n for n in names if n not in SETUPS]
    if bad or not names:
        parser.error(f"--setups: expected a subset of {','.join(SETUPS)}, got {args.setups!r}")

    from stakes._io import atomic_json_dump

    report = build_report(names)
    path = atomic_json_dump(report, args.json)
    text = markdown(report)
    print(text)
    if not args.markdown:
        print(f"\n(wrote {path}; computed in {report['metadata']['seconds_to_compute']} s; model, not measured)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
