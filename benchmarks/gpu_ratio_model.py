"""A MODEL, not a measurement: the whole-run ratio (the authors' script as it runs / stakes with the
issue-24 work cuts) that ``python -m benchmarks whole-run`` should measure on an H100, phase by phase,
and the job's floor (issue 17 item 6, issue 24 Deliver 3).

``python -m benchmarks.gpu_ratio_model [--k 256] [--json PATH] [--markdown] [--no-check]``

Nothing here runs on a GPU. What is counted, on this machine's CPU:

* every aten op of each recipe's unit of work (a PGD step, an attack's set-up, an importance batch,
  an optimisation step, a stop-check or evaluation batch, ...) is recorded by a ``TorchDispatchMode``
  on **meta tensors at the real batch sizes**: its FLOPs (``torch.utils.flop_counter``'s formulas;
  each unit also runs under ``FlopCounterMode`` and the totals must agree), the bytes of its tensor
  operands (read + written: an unfused kernel's traffic), its dtype, its memory layout, the GEMM
  shapes (M, N, K) of a convolution or matrix product, and one kernel launch (views, allocations and
  profiler markers are not kernels);
* **the authors' units are the functions ``python -m benchmarks whole-run`` runs**
  (:mod:`benchmarks.whole_run`: advertorch's PGD step with the weight gradients, their importance
  batch, their optimisation step with L_reg built tensor by tensor, their evaluation batch with its
  loss), fp32, NCHW, eager, on **their network** (the max-pool stem) by default; their host work per
  batch (PIL + ToTensor per image, collation, pinning) and blocking host-to-device copies are added
  (:data:`ASSUMPTIONS`);
* **stakes' units are stakes with the issue-24 work cuts** (the stable preset; its execution on an
  sm_90 card: bf16 autocast, channels_last, fp32 master weights): PGD, its success check, the
  original's proxy features (**once**) and the drift's reference run on the frozen original's
  inference copy as ``stakes.execution.frozen_copy`` builds it (BatchNorm folded into the
  convolutions, weights pre-cast to bf16) **compiled** (``compile="frozen"``: the ReLU, residual add
  and bias of each convolution's output fused into one pointwise kernel, modelled by fusing every run
  of consecutive pointwise ops between two library kernels into one kernel that reads its external
  inputs once and writes only what a later op reads), PGD replayed from a CUDA graph; the importance
  **each distinct proxy batch once** (``stakes.methods.structguard.importance_plan``); the stop
  rule's forget accuracy at its cadence (epoch ends) and the evaluation sets **once at the end**
  (D_r and the test set whole); the fused kernels (PGD step, importance accumulation, masked update)
  one launch each at :mod:`benchmarks.roofline`'s minimum bytes.

Time of an op, a unit, a phase (every number in :data:`ASSUMPTIONS`, per recipe where it can differ):

    op   = max(Σ_gemm F_g / (peak(dtype) · e(dtype, layout) · u(M, N, K)), bytes / (HBM · bw_eff), min_kernel)
    gpu  = Σ_ops op
    cpu  = kernels × launch (0 in a CUDA graph) + host loading (the authors' loaders)
    unit = max(gpu, cpu) + syncs × sync latency + blocking copies (bytes / PCIe rate)

* ``e(dtype, layout)``: the fraction of the datasheet peak a large convolution reaches, **calibrated**
  from NVIDIA's published A100 ResNet-50 v1.5 training throughput (TF32 with NCHW for the authors'
  fp32 convolutions; mixed precision with NHWC for stakes' bf16 channels_last ones): the value at
  which this model, counting one ResNet-50 training step the same way on the A100's datasheet rates,
  gives the published images/s (:func:`calibrate`; sources in :data:`CALIBRATION`);
* ``u(M, N, K)``: the fraction of the card's SMs a GEMM of that shape fills (tile and wave
  quantisation as NVIDIA's Matrix Multiplication Background guide describes them): 128×128 output
  tiles, split along K into chunks of ≥ 256 when there are fewer tiles than SMs (the split-K partials
  counted as extra traffic), u = min(1, tiles × splits / SMs): monotone in the batch size;
* the job's **floor**: stakes' work (the cut work: the job) at the card's bf16 datasheet peak and its
  convolution / matrix-product operand bytes at the datasheet HBM bandwidth, max of the two per unit.

Sensitivity cases move **one recipe at a time** (its convolution efficiency, launch cost, bandwidth
efficiency, smallest kernel, host loading; stakes' fusion and graphs), plus the card's bandwidth for
both; the report gives the ratio in each and their range. Every time printed or written is modelled.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks import roofline
from benchmarks import whole_run as wr
from stakes.execution import is_channels_last

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "gpu_ratio_model.json"
META = torch.device("meta")

# ----------------------------------------------------------------------------- the cards and the cited figures

H100 = {"name": "NVIDIA H100 SXM5 80 GB", "sms": 132, "bf16_tflops": 989.4, "tf32_tflops": 494.7,
        "fp32_tflops": 66.9, "hbm_tbps": 3.35,
        "source": "NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: TF32 Tensor Core 989 TFLOPS and BF16/FP16 "
                  "1,979 TFLOPS with sparsity (dense: half, 494.7 and 989.4), FP32 67 TFLOPS, GPU memory bandwidth "
                  "3.35 TB/s; 132 SMs (NVIDIA Hopper architecture whitepaper)"}
A100 = {"name": "NVIDIA A100 SXM4 80 GB", "sms": 108, "bf16_tflops": 312.0, "tf32_tflops": 156.0,
        "fp32_tflops": 19.5, "hbm_tbps": 2.039,
        "source": "NVIDIA A100 Tensor Core GPU datasheet, 80 GB SXM column: TF32 156 TFLOPS, BF16/FP16 312 TFLOPS "
                  "(dense), FP32 19.5 TFLOPS, GPU memory bandwidth 2,039 GB/s; 108 SMs"}

CALIBRATION = {
    "source": "NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, section "
              "'Training performance: NVIDIA DGX A100 (8x A100 80GB)' (pytorch-21.03 NGC container), the 1-GPU row: "
              "TF32 938 img/s, mixed precision 2470 img/s; PyTorch/Classification/ConvNets/configs.yml: DGXA100 "
              "TF32 batch 256 (PyTorch's default NCHW), AMP batch 256 with memory_format nhwc, SGD momentum 0.875",
    "model": "torchvision resnet50 (the v1.5 layout: stride 2 in the 3x3 convolution), 224x224, batch 256",
    "points": {"tf32_nchw": {"images_per_s": 938.0, "batch": 256, "precision": "fp32 with TF32 convolutions",
                             "layout": "NCHW"},
               "16bit_nhwc": {"images_per_s": 2470.0, "batch": 256, "precision": "mixed (fp16 autocast)",
                              "layout": "NHWC"}},
    "method": "one training step (forward, cross-entropy, backward, SGD with momentum 0.875 and weight decay, foreach) "
              "counted by this model's op counter on meta tensors, timed by this model on the A100's datasheet "
              "rates with the central elementwise assumptions; e is the convolution efficiency at which the "
              "modelled throughput equals the published one (bisection). Applied to the H100 as the same fraction "
              "of its datasheet peak (an assumption: the sensitivity cases move it per recipe)",
    "limits": "the published runs load ImageNet through 16 workers and overlap it; a loader that held them back "
              "would make e low (the authors' TF32 e drives their time: see the cases that raise it); cuDNN's "
              "deterministic, not benchmarked choice in the authors' script is not modelled (favours the authors)",
}

CHANNELS_LAST_SOURCE = ("MosaicML Composer, method card 'Channels Last': with NCHW tensors cuDNN transposes to NHWC "
                        "around each convolution; channels-last speeds convolutions 1.5-2x, ResNet-50 ~30 % on "
                        "V100/A100. Used only for the 16-bit NCHW combination (not a headline recipe): the "
                        "transposes' bytes are added to such a convolution")
WAVES_SOURCE = ("NVIDIA Deep Learning Performance, 'Matrix Multiplication Background User's Guide', chapter 3 "
                "(tile quantization, wave quantization): a GEMM's output is split into thread-block tiles (typically "
                "128x128 or 256x128) and the tiles run in waves of one per SM")

ASSUMPTIONS = {
    "kind": "MODEL, not a measurement: op counts from meta-tensor runs on a CPU and the assumptions below; "
            "no GPU was run",
    "gpu": H100["name"],
    "card": {k: v for k, v in H100.items()},
    "calibration_card": {k: v for k, v in A100.items()},
    "gemm_tile": 128,               # output tile side of a convolution / matrix-product kernel (WAVES_SOURCE)
    "split_k_min": 256,             # the smallest K chunk a split-K kernel gives one tile
    "sync_us": 10.0,                # one host synchronisation (.item(), a blocking copy): the queue drains
    "pcie_pinned_gbps": 25.0,       # host-to-device copy from pinned memory (PCIe Gen5 x16: 64 GB/s peak)
    "pcie_pageable_gbps": 10.0,     # from pageable memory (staged through a pinned buffer)
    "pin_gbps": 5.0,                # the DataLoader's pin_memory: one host memcpy into pinned memory
    "host_pil_image_us": 50.0,      # PIL Image.fromarray + ToTensor + collation, one 32x32x3 image
    "host_numpy_batch_us": 300.0,   # collating a batch of 128 per-image numpy arrays (their proxy loader)
    "host_measured": "on this project's CPU (x86_64, 2 cores shared with a background job, load average 3.6-4.1; "
                     "2026-12-07; fastest of 7): PIL + ToTensor + collation 97-106 us an image, a proxy batch of "
                     "128 numpy arrays 0.54-0.67 ms, a tiny eager op 3.2 us of host time; the central values are "
                     "half of those (the measuring process had about half a core); a card's host core is likely "
                     "faster still: see 'authors: host loading at half'",
    "recipes": {
        "authors": {"conv_eff_scale": 1.0, "launch_us": 5.0, "bw_efficiency": 0.8, "min_kernel_us": 2.0,
                    "host_loading_scale": 1.0, "copies": True, "launch_blocking": False},
        "stakes": {"conv_eff_scale": 1.0, "launch_us": 5.0, "bw_efficiency": 0.8, "min_kernel_us": 2.0,
                   "host_loading_scale": 1.0, "copies": True, "launch_blocking": False},
    },
    "recipe_parameters": {
        "conv_eff_scale": "multiplies the calibrated convolution / matrix-product efficiency e",
        "launch_us": "host time to issue one kernel from eager PyTorch (dispatch, autograd, launch); 0 in a CUDA graph",
        "bw_efficiency": "fraction of the datasheet HBM bandwidth a pointwise / reduction kernel reaches",
        "min_kernel_us": "GPU time of the smallest kernel (start-up, ramp, drain)",
        "host_loading_scale": "multiplies the host loading costs (PIL, collation, pinning): the authors' only",
        "copies": "whether blocking host-to-device copies are charged",
        "launch_blocking": "CUDA_LAUNCH_BLOCKING=1: host and GPU work serialised (their published command)",
    },
    "authors_precision": "fp32 eager as their script runs it: cuDNN convolutions in TF32 (torch's default "
                         "cudnn.allow_tf32 = True), NCHW, matrix products in plain fp32 (matmul.allow_tf32 = False)",
    "stakes_precision": "bf16 autocast (stakes' policy on sm_90), channels_last convolutions, fp32 master weights, "
                        "gradients and optimiser state; the frozen copy's weights cast once (no per-call casts); "
                        "CUDA graphs for the PGD steps",
    "not_modelled": "PGD random starts drawn on the host, memory allocation, cuDNN algorithm choice and "
                    "determinism, Triton compilation and CUDA-graph capture (one-off), Python overhead beyond the "
                    "per-kernel launch cost, host work the authors' loaders overlap with the GPU beyond the unit's "
                    "max(gpu, cpu)",
    "kernels": "one launch per aten op that is not a view, an allocation or a profiler marker (a cuDNN "
               "convolution may launch more); a torch._foreach_* op one launch; the fused ops one launch each; a "
               "fused pointwise group one launch",
}

CONV = {"aten.convolution", "aten.convolution_backward", "aten._convolution", "aten.cudnn_convolution"}
MATMUL = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm"}
NOT_KERNELS = ("aten.empty", "aten.new_empty", "aten.empty_like", "aten.empty_strided", "aten.detach",
               "aten.lift_fresh", "aten._local_scalar_dense", "profiler.", "aten.alias", "aten.set_")


# ----------------------------------------------------------------------------- counting


@dataclass
class Op:
    name: str
    kind: str            # conv | matmul | other
    dtype: str           # float32 | bfloat16 | ...
    flops: float
    bytes: float
    kernels: float = 1
    gemms: List[Tuple[int, int, int]] = field(default_factory=list)   # (M, N, K) of each GEMM it runs
    layout: str = "nchw"
    ins: List[Tuple[int, float]] = field(default_factory=list)        # (storage key, bytes) read
    outs: List[Tuple[int, float]] = field(default_factory=list)       # (storage key, bytes) written
    fusable: bool = False                                             # an aten pointwise / reduction op


def _key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage()._cdata
    except Exception:   # a tensor without storage (a wrapper subclass)
        return id(t)


def _conv_gemms(name: str, args, out) -> List[Tuple[int, int, int]]:
    """The implicit GEMMs of a convolution (forward) or its backward (input and weight gradients)."""
    if name == "aten.convolution":
        x, w = args[0], args[1]
        groups = int(args[8]) if len(args) > 8 else 1
        n, co = out.shape[0], out.shape[1]
        spatial = math.prod(out.shape[2:])
        k = math.prod(w.shape[1:])
        return [(n * spatial, co // groups, k)] * groups
    if name == "aten.convolution_backward":
        go, x, w = args[0], args[1], args[2]
        groups = int(args[9]) if len(args) > 9 else 1
        mask = args[10] if len(args) > 10 else (True, True, False)
        n, co, ci = go.shape[0], go.shape[1], x.shape[1]
        out_sp, in_sp, kk = math.prod(go.shape[2:]), math.prod(x.shape[2:]), math.prod(w.shape[2:])
        gemms = []
        if mask[0]:
            gemms += [(n * in_sp, ci // groups, (co // groups) * kk)] * groups
        if mask[1]:
            gemms += [(co // groups, (ci // groups) * kk, n * out_sp)] * groups
        return gemms
    return []


def _mm_gemms(name: str, args) -> List[Tuple[int, int, int]]:
    if name == "aten.mm":
        a, b = args[0], args[1]
        return [(a.shape[0], b.shape[1], a.shape[1])]
    if name == "aten.addmm":
        a, b = args[1], args[2]
        return [(a.shape[0], b.shape[1], a.shape[1])]
    if name in ("aten.bmm", "aten.baddbmm"):
        a, b = (args[0], args[1]) if name == "aten.bmm" else (args[1], args[2])
        return [(a.shape[0] * a.shape[1], b.shape[2], a.shape[2])]
    return []


def _cuda_conv_nhwc(name: str, args) -> bool:
    """Whether cuDNN runs this convolution (or its backward) NHWC: ATen's
    ``cudnn_conv_suggest_memory_format`` picks channels_last when the input or the weight is in it
    (for the backward: the forward's input and weight, its 2nd and 3rd arguments)."""
    x, w = (args[1], args[2]) if name == "aten.convolution_backward" else (args[0], args[1])
    return is_channels_last(x) or is_channels_last(w)


def _channels_last_outputs(out):
    """A convolution's 4-D outputs strided NHWC, as cuDNN writes them on a card. Meta tensors cannot
    say: torch's meta convolution always returns contiguous tensors (it has no device to choose a
    backend by), so without this every layer after a channels_last network's first would be counted
    NCHW."""
    fix = (lambda t: t.contiguous(memory_format=torch.channels_last)
           if isinstance(t, torch.Tensor) and t.dim() == 4 else t)
    return tuple(fix(t) for t in out) if isinstance(out, tuple) else fix(out)


class OpCounter(TorchDispatchMode):
    """Records every aten op: FLOPs (torch.utils.flop_counter's formulas), operand bytes, dtype,
    layout, GEMM shapes and the storages it reads and writes (for the pointwise fusion)."""

    def __init__(self):
        super().__init__()
        self.ops: List[Op] = []
        self.syncs = 0
        self.keep: list = []    # every tensor seen stays alive: storage keys stay unique within a unit

    def add(self, name: str, *, bytes_: float = 0.0, flops: float = 0.0, kind: str = "other",
            dtype: str = "float32", kernels: float = 1) -> None:
        """An op not run here (a fused kernel, an autocast cast) with its stated cost."""
        self.ops.append(Op(name, kind, dtype, flops, bytes_, kernels))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        name = name if name.startswith(("aten.", "profiler.", "prims.")) else f"aten.{name}"
        kind = "conv" if name in CONV else "matmul" if name in MATMUL else "other"
        nhwc = kind == "conv" and _cuda_conv_nhwc(name, list(args))
        if nhwc:
            out = _channels_last_outputs(out)
        if name == "aten._local_scalar_dense":
            self.syncs += 1
        if getattr(func, "is_view", False) or name.startswith(NOT_KERNELS):
            return out
        flops = 0
        packet = getattr(func, "overloadpacket", None)
        if packet in flop_registry:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.keep.extend(ins + outs)
        seen, nbytes, rd = set(), 0, []
        for t in ins:
            if id(t) not in seen:
                seen.add(id(t))
                b = t.numel() * t.element_size()
                nbytes += b
                rd.append((_key(t), float(b)))
        wr_ = [(_key(t), float(t.numel() * t.element_size())) for t in outs]
        nbytes += sum(b for _, b in wr_)   # written (in place: read and written)
        first = next((t for t in ins if t.is_floating_point()), None)
        gemms = _conv_gemms(name, list(args), out if not isinstance(out, tuple) else None) if kind == "conv" else \
            _mm_gemms(name, list(args)) if kind == "matmul" else []
        self.ops.append(Op(name, kind, str(first.dtype).replace("torch.", "") if first is not None else "none",
                           float(flops), float(nbytes), 1, gemms, "nhwc" if nhwc else "nchw", rd, wr_,
                           fusable=kind == "other"))
        return out


@dataclass
class Unit:
    """One unit of work: its ops, host syncs, host loading, blocking copies and the FLOPs
    FlopCounterMode counted."""

    ops: List[Op]
    syncs: int = 0
    flop_counter: Optional[float] = None   # FlopCounterMode's total (None: not runnable, see count)
    graph: bool = False                    # replayed from a CUDA graph
    host_s: float = 0.0                    # host loading (PIL, collation, pinning), before its scale
    copies: List[Tuple[float, bool]] = field(default_factory=list)   # (bytes, pinned) blocking copies

    @property
    def kernels(self) -> float:
        return sum(o.kernels for o in self.ops)

    @property
    def flops(self) -> float:
        return sum(o.flops for o in self.ops)

    @property
    def bytes(self) -> float:
        return sum(o.bytes for o in self.ops)

    @property
    def gemm_bytes(self) -> float:
        return sum(o.bytes for o in self.ops if o.kind in ("conv", "matmul"))


def count(fn: Callable[[OpCounter], None]) -> Unit:
    """Run ``fn(counter)`` under FlopCounterMode and the op counter; the two FLOP totals must agree.

    FlopCounterMode's module tracker cannot follow ``autograd.grad`` with respect to a leaf input
    in some torch versions: such a unit is counted by the op counter alone (the same library's
    formulas, ``torch.utils.flop_counter.flop_registry``) and its ``flop_counter`` is None."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as fc:
            with OpCounter() as oc:
                fn(oc)
        total: Optional[float] = float(fc.get_total_flops())
    except RuntimeError as exc:
        if "autograd.grad" not in str(exc):
            raise
        with OpCounter() as oc:
            fn(oc)
        total = None
    unit = Unit(oc.ops, oc.syncs, total)
    if total is not None and abs(unit.flops - total) > 1e-6 * max(1.0, total):
        raise AssertionError(f"FLOPs per op {unit.flops} != FlopCounterMode {total}")
    return unit


def fuse_pointwise(ops: List[Op]) -> List[Op]:
    """What compiling a network does to its pointwise work (inductor): every run of consecutive aten
    pointwise / reduction ops between two library kernels (convolutions, matrix products, the fused
    ops) becomes one kernel that reads each of its external inputs once and writes only the outputs a
    later op reads (or the run's last result). FLOPs unchanged."""
    out: List[Op] = []
    i = 0
    while i < len(ops):
        if not ops[i].fusable:
            out.append(ops[i])
            i += 1
            continue
        j = i
        while j < len(ops) and ops[j].fusable:
            j += 1
        group = ops[i:j]
        produced: Dict[int, float] = {}
        reads: Dict[int, float] = {}
        for o in group:
            for key, b in o.ins:
                if key not in produced:
                    reads[key] = max(reads.get(key, 0.0), b)
            for key, b in o.outs:
                produced[key] = max(produced.get(key, 0.0), b)
        later = {key for o in ops[j:] for key, _ in o.ins}
        last = {key for key, _ in group[-1].outs}
        writes = sum(b for key, b in produced.items() if key in later or key in last)
        out.append(Op(f"fused pointwise ({len(group)} ops)", "other", group[0].dtype, sum(o.flops for o in group),
                      sum(reads.values()) + writes, 1, [], "nchw", list(reads.items()),
                      [(k, b) for k, b in produced.items() if k in later or k in last]))
        i = j
    return out


# ----------------------------------------------------------------------------- the efficiency curve and time


def wave_fill(m: int, n: int, k: int, a: dict) -> Tuple[float, int]:
    """(u, splits): the fraction of the SMs a GEMM of this shape fills, and its split-K factor."""
    t, sms = a["gemm_tile"], a["card"]["sms"]
    tiles = math.ceil(m / t) * math.ceil(n / t)
    if tiles >= sms:
        return 1.0, 1
    splits = max(1, min(k // a["split_k_min"], math.ceil(sms / tiles)))
    return min(1.0, tiles * splits / sms), splits


def efficiency_class(op: Op) -> str:
    half = op.dtype in ("bfloat16", "float16")
    if op.kind == "matmul":
        return "16bit_nhwc" if half else "tf32_nchw"     # linear layers: the same fractions as the convolutions
    if half:
        return "16bit_nhwc" if op.layout == "nhwc" else "16bit_nchw"
    return "tf32_nchw"                                   # fp32 convolutions in TF32 (NCHW or NHWC: one figure)


def peak_tflops(op: Op, card: dict) -> float:
    if op.dtype in ("bfloat16", "float16"):
        return card["bf16_tflops"]
    return card["tf32_tflops"] if op.kind == "conv" else card["fp32_tflops"]


def op_seconds(op: Op, a: dict, p: dict, eff: Dict[str, float]) -> float:
    """Modelled GPU seconds of one op; ``p`` the recipe's parameters, ``eff`` the calibrated e."""
    card = a["card"]
    bw = card["hbm_tbps"] * 1e12 * p["bw_efficiency"]
    extra_bytes, t_flop = 0.0, 0.0
    if op.kind in ("conv", "matmul") and op.flops > 0 and op.gemms:
        cls = efficiency_class(op)
        e = eff["16bit_nhwc" if cls == "16bit_nchw" else cls] * p["conv_eff_scale"]
        rate = peak_tflops(op, card) * 1e12 * e
        gemm_flops = [2.0 * m * n * k for m, n, k in op.gemms]
        scale = op.flops / sum(gemm_flops) if sum(gemm_flops) else 0.0
        for (m, n, k), f in zip(op.gemms, gemm_flops):
            u, splits = wave_fill(m, n, k, a)
            t_flop += f * scale / (rate * u)
            if splits > 1:   # fp32 partials written and read back
                extra_bytes += 2.0 * 4 * m * n * splits
        if cls == "16bit_nchw":   # cuDNN's transposes around an NCHW tensor-core convolution
            extra_bytes += op.bytes
    elif op.kind in ("conv", "matmul") and op.flops > 0:
        cls = efficiency_class(op)
        t_flop = op.flops / (peak_tflops(op, card) * 1e12 * eff["16bit_nhwc" if cls == "16bit_nchw" else cls]
                             * p["conv_eff_scale"])
    t_mem = (op.bytes + extra_bytes) / bw
    return max(t_flop, t_mem, op.kernels * p["min_kernel_us"] * 1e-6)


def unit_seconds(unit: Unit, a: dict, p: dict, eff: Dict[str, float]) -> Dict[str, float]:
    """Modelled GPU, host and total seconds of ``unit`` for a recipe with parameters ``p``."""
    gpu = sum(op_seconds(o, a, p, eff) for o in unit.ops)
    launch = 0.0 if unit.graph else p["launch_us"]
    cpu = unit.kernels * launch * 1e-6 + unit.host_s * p["host_loading_scale"]
    copy_s = 0.0
    if p["copies"]:
        copy_s = sum(b / ((a["pcie_pinned_gbps"] if pinned else a["pcie_pageable_gbps"]) * 1e9)
                     for b, pinned in unit.copies)
    syncs = unit.syncs + (len(unit.copies) if p["copies"] else 0)
    overlap = gpu + cpu if p.get("launch_blocking") else max(gpu, cpu)
    return {"gpu_s": gpu, "cpu_s": cpu, "copy_s": copy_s,
            "time_s": overlap + syncs * a["sync_us"] * 1e-6 + copy_s}


def forward_efficiency(units: "Units", batch: int, cls: str, a: dict, eff: Dict[str, float]) -> float:
    """The fraction of the peak the network's convolutions reach in one forward at ``batch``
    (the efficiency curve): their FLOPs over Σ their modelled times, over the peak."""
    unit = units.unit("forward_curve", batch, cls)
    p = a["recipes"]["stakes" if cls == "16bit_nhwc" else "authors"]
    t = sum(op_seconds(o, a, p, eff) for o in unit.ops if o.kind == "conv")
    f = sum(o.flops for o in unit.ops if o.kind == "conv")
    peak = a["card"]["bf16_tflops" if cls == "16bit_nhwc" else "tf32_tflops"] * 1e12
    return f / t / peak if t else 0.0


# ----------------------------------------------------------------------------- the calibration


def _resnet50_step(oc: OpCounter, precision: str, batch: int) -> None:
    """One torchvision ResNet-50 training step at 224x224 as NVIDIA's example runs it."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50().to(META)
    params = list(net.parameters())
    master = [torch.empty_like(p) for p in params]
    x = torch.empty(batch, 3, 224, 224, device=META)
    y = torch.empty(batch, dtype=torch.long, device=META)
    if precision == "16bit_nhwc":
        oc.add("autocast casts (weights, every step)", bytes_=6.0 * sum(p.numel() for p in params),
               kernels=len(params))
        net = net.to(torch.float16).to(memory_format=torch.channels_last)
        x = x.to(torch.float16).to(memory_format=torch.channels_last)
    out = net(x)
    loss = F.cross_entropy(out.float(), y)
    loss.backward()
    if precision == "16bit_nhwc":   # the weight gradients back to fp32 (autocast's cast backward), the scaler
        oc.add("autocast cast backward (weight gradients to fp32)", bytes_=6.0 * sum(p.numel() for p in params),
               kernels=len(params))
        oc.add("GradScaler unscale (foreach)", bytes_=8.0 * sum(p.numel() for p in params), kernels=2)
    for m, p in zip(master, params):
        m.grad = torch.empty_like(m)
    opt = torch.optim.SGD(master, lr=0.1, momentum=0.875, weight_decay=3.0517578125e-05, foreach=True)
    for m in master:
        opt.state[m]["momentum_buffer"] = torch.empty_like(m)
    opt.step()


def calibrate(a: dict = ASSUMPTIONS, calibration: dict = CALIBRATION) -> dict:
    """e for each calibrated combination: the convolution efficiency at which this model's ResNet-50
    step on the A100 gives NVIDIA's published throughput (see :data:`CALIBRATION`)."""
    a100 = {**a, "card": a["calibration_card"]}
    out = {}
    for cls, point in calibration["points"].items():
        unit = count(functools.partial(lambda oc, cls_: _resnet50_step(oc, cls_, point["batch"]), cls_=cls))
        target = point["batch"] / point["images_per_s"]
        p = a["recipes"]["authors" if cls == "tf32_nchw" else "stakes"]

        def modelled(e):
            eff = {"tf32_nchw": e, "16bit_nhwc": e}
            return unit_seconds(unit, a100, {**p, "copies": False, "host_loading_scale": 0.0}, eff)["time_s"]

        lo, hi = 1e-3, 1.0
        if modelled(hi) > target:
            e = 1.0   # even at the full peak the model is slower than the published figure: capped
        else:
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if modelled(mid) > target else (lo, mid)
            e = (lo + hi) / 2
        conv_s = sum(op_seconds(o, a100, p, {"tf32_nchw": e, "16bit_nhwc": e}) for o in unit.ops
                     if o.kind in ("conv", "matmul"))
        out[cls] = {"e": e, "published_images_per_s": point["images_per_s"],
                    "modelled_images_per_s": point["batch"] / modelled(e), "step_ms": 1e3 * modelled(e),
                    "conv_share_of_step": conv_s / modelled(e), "step_flops": unit.flops, "kernels": unit.kernels}
    return out


# ----------------------------------------------------------------------------- the units, on meta


def _meta(shape, dtype=torch.float32, requires_grad=False):
    return torch.empty(shape, device=META, dtype=dtype, requires_grad=requires_grad)


def _labels(n):
    return torch.empty(n, device=META, dtype=torch.long)


def _weights(module: nn.Module) -> List[torch.Tensor]:
    """The weights autocast casts to bf16 (convolutions and linear layers)."""
    return [m.weight for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


class Units:
    """Builds and caches the units of both recipes for one network (meta tensors).

    ``stakes_dtype`` float32 with ``fuse=False`` and no graphs is stakes as it runs on the CPU (the
    composition check); the default is stakes on an sm_90 card with the work cuts."""

    def __init__(self, model_builder: Optional[Callable[[], nn.Module]] = None, *, anchor_dim: int = 512,
                 image_shape=(3, 32, 32), num_classes: int = 10, stakes_dtype: torch.dtype = torch.bfloat16,
                 a: dict = ASSUMPTIONS):
        from stakes.execution import frozen_copy

        torch.manual_seed(0)
        model = (model_builder or wr.default_model)().to(META)
        self.a = a
        self.image_shape, self.num_classes = tuple(image_shape), num_classes
        self.elems = math.prod(image_shape)
        self.half = stakes_dtype in (torch.bfloat16, torch.float16)
        anchors = _meta((num_classes, anchor_dim))
        # the authors: fp32, their state object (their normalisation, their projector) is the benchmark's own
        self.au = wr._Authors(model, anchors, META, seed=0)
        self.au_opt = wr.authors_optimizer(self.au, foreach=True)   # torch's default on CUDA: foreach
        self.au_attacked = copy.deepcopy(self.au.work).eval()
        for p in self.au_attacked.parameters():   # advertorch's steady state: gradients accumulate into .grad
            p.grad = torch.zeros_like(p)
        self.au_imp = {n: torch.zeros_like(p) for n, p in self.au.params}
        self.au_proj_copy = copy.deepcopy(self.au.proj)
        for p in self.au_proj_copy.parameters():
            p.grad = torch.zeros_like(p)
        # stakes: the trained model in its autocast dtype, and the frozen original's inference copy
        self.dt = stakes_dtype
        self.s_work = copy.deepcopy(model).to(stakes_dtype)
        self.s_work.features.eval()      # backbone BatchNorm statistics frozen (bn_train_mode False)
        # stakes.methods.loop.frozen_classifier: the features and the head copied by frozen_copy
        from stakes.models import Classifier

        features, self.folded = frozen_copy(copy.deepcopy(model.features), fold=True,
                                            dtype=stakes_dtype if self.half else None)
        head, _ = frozen_copy(copy.deepcopy(model.head), fold=False, dtype=stakes_dtype if self.half else None)
        self.s_frozen = Classifier(features, head).to(stakes_dtype)   # on meta the normalisation too (autocast
        #                                                               would cast its output for the first conv)
        if self.half:   # stakes.execution.Execution.prepare: channels_last on a card (the loop's every model)
            self.s_work.to(memory_format=torch.channels_last)
            self.s_frozen.to(memory_format=torch.channels_last)
        self.s_anchors = anchors
        d_f = model.head.in_features
        self.s_rp = _meta((d_f, anchor_dim), stakes_dtype)
        self.s_params = list(self.s_work.parameters())
        self.s_psi = list(self.s_work.features.parameters())
        self.n_params = sum(p.numel() for p in self.s_params)
        self.n_psi = sum(p.numel() for p in self.s_psi)
        self.n_weights = sum(w.numel() for w in _weights(model))
        self.n_weight_tensors = len(_weights(model))
        self.d_f = d_f
        self.layout = torch.channels_last if self.half else torch.contiguous_format
        self.curve_models = {"tf32_nchw": copy.deepcopy(model).eval(),
                             "16bit_nhwc": copy.deepcopy(model).to(torch.bfloat16).to(memory_format=torch.channels_last)
                             .eval()}
        self.cache: Dict[tuple, Unit] = {}

    def unit(self, name: str, *sizes, graph: bool = False, fuse: bool = False, host_s: float = 0.0,
             copies: Sequence[Tuple[float, bool]] = ()) -> Unit:
        key = (name, *sizes, graph, fuse, host_s, tuple(copies))
        if key not in self.cache:
            u = count(lambda oc: getattr(self, "_" + name)(oc, *sizes))
            if fuse:
                u = replace(u, ops=fuse_pointwise(u.ops))
            u.graph, u.host_s, u.copies = graph, host_s, list(copies)
            self.cache[key] = u
        return self.cache[key]

    def _x(self, b, dtype=torch.float32, requires_grad=False):
        x = _meta((b, *self.image_shape), dtype)
        if dtype != torch.float32 or self.half:
            x = x.to(memory_format=self.layout) if len(self.image_shape) == 3 else x
        return x.requires_grad_(requires_grad) if requires_grad else x

    # ------------------------------------------------------------- the efficiency curve
    def _forward_curve(self, oc, b, cls):
        m = self.curve_models[cls]
        with torch.no_grad():
            if cls == "16bit_nhwc":
                m(_meta((b, *self.image_shape), torch.bfloat16).to(memory_format=torch.channels_last))
            else:
                m(_meta((b, *self.image_shape)))

    # ------------------------------------------------------------- the authors (benchmarks/whole_run.py)
    def _authors_pgd(self, oc, b):
        """One step of advertorch's perturb_iterative on the attacked model (weight gradients accumulated)."""
        x0 = _meta((b, *self.image_shape))
        delta = nn.Parameter(_meta((b, *self.image_shape)))
        delta.grad = torch.zeros_like(delta)
        wr.authors_pgd_step(self.au_attacked, x0, delta, _labels(b), 3.0, 0.1)

    def _authors_attack(self, oc, b):
        """An attack's set-up and end: the target drawn on the host (two small copies), the start, the
        last clamp, the result copied back to the host (``.cpu()``: a sync)."""
        x = _meta((b, *self.image_shape))
        y = _labels(b)
        t = (_meta((b,)) * 10).to(torch.long)
        torch.where(t == y, t, t)
        delta = torch.zeros_like(x).uniform_(0.0, 1.0)
        delta = wr._clamp_by_l2(delta - x, 3.0)
        delta = wr._clamp01(x + delta) - x
        wr._clamp01(x + delta)
        oc.syncs += 1

    def _authors_importance(self, oc, b):
        xb = _meta((b, *self.image_shape))
        wr.authors_importance_batch(self.au, self.au_proj_copy, xb, self.au_imp)

    def _authors_step(self, oc, nf, na, with_reg):
        st = self.au
        xf, xa = _meta((nf, *self.image_shape)), _meta((na, *self.image_shape))
        self.au_opt.zero_grad()
        loss = wr.authors_step_forward(st, xf, _labels(nf), xa, xa, _labels(na))
        if with_reg:
            loss = loss + 1.0 * wr.authors_reg(st, self.au_imp)
        loss.backward()
        self.au_opt.step()

    def _authors_eval(self, oc, b):
        """test_ours on one batch: h∘p∘g in eval mode, the loss, the hits, one ``.item()``."""
        st = self.au
        st.work.eval()
        st.proj.eval()
        with torch.no_grad():
            wr.authors_eval_batch(st, _meta((b, *self.image_shape)), _labels(b))
        oc.syncs += 1
        st.work.train()
        st.proj.train()

    def _authors_forget_load(self, oc, b):
        """A forget batch through their loader (host work and copies only: see the plan)."""

    def _host_only(self, oc):
        """Host work alone (see the plan)."""

    # ------------------------------------------------------------- stakes with the work cuts
    def _casts(self, oc, n_tensors, numel, what):
        """autocast: fp32 → bf16 copies (read 4 B, write 2 B an element)."""
        if self.half:
            oc.add(f"autocast cast ({what})", bytes_=6.0 * numel, kernels=n_tensors)

    def _stakes_pgd(self, oc, b):
        """stakes/proxy.py's attack, one step, on the frozen copy (folded, weights pre-cast): CE(sum),
        ∇ₓ, fused.l2_pgd_step."""
        self._casts(oc, 1, b * self.elems, "input")
        x = self._x(b, self.dt, requires_grad=True)
        loss = F.cross_entropy(self.s_frozen(x).float(), _labels(b), reduction="sum")
        loss.backward()     # the input gradient alone (the frozen copy's parameters do not require grad)
        self._casts(oc, 1, b * self.elems, "input gradient back to fp32")
        c = roofline.pgd_step(b * self.elems, torch.float32)
        oc.add("fused.l2_pgd_step", bytes_=c.bytes, kernels=1)

    def _stakes_success(self, oc, b):
        self._casts(oc, 1, b * self.elems, "input")
        with torch.no_grad():
            self.s_frozen(self._x(b, self.dt)).argmax(1) == _labels(b)

    def _stakes_frozen_features(self, oc, b):
        """The frozen copy's features of a chunk (the proxies' S^ori once; the drift's reference once)."""
        self._casts(oc, 1, b * self.elems, "input")
        with torch.no_grad():
            self.s_frozen.features(self._x(b, self.dt))

    def _stakes_drift_reference(self, oc, b):
        """The drift's reference of a test chunk, once a run: the frozen copy's features times R_p."""
        self._casts(oc, 1, b * self.elems, "input")
        with torch.no_grad():
            self.s_frozen.features(self._x(b, self.dt)) @ self.s_rp

    def _structure(self, x):
        out = self.s_work.features(x)
        return out, out @ self.s_rp

    def _stakes_importance(self, oc, b):
        """StructGuard.importance with the warm start: mean ‖S^unl‖² through the features, |∇ψ|, fused accumulate."""
        import fused

        self._casts(oc, self.n_weight_tensors - 1, self.n_weights - self.s_work.head.weight.numel(), "trained weights")
        xb = self._x(b, self.dt)
        _, z = self._structure(xb)
        loss = fused.anchor_similarity(z, self.s_anchors, backend="reference").pow(2).sum(1).mean()
        loss.backward()     # the features' gradients (the head takes no part): autograd.grad's ops
        for p in self.s_params:
            p.grad = None
        oc.add("fused.accumulate_importance", bytes_=roofline.importance_accumulate(self.n_psi, torch.float32).bytes)

    def _stakes_step(self, oc, nf, na):
        """loop._train_step with StructGuard's stable terms: margin deletion through h∘g, retention CE,
        alignment against the proxies' stored S^ori (a gather and R_p), the classifier elastic net;
        backward; NonFiniteWatch.record; gradient clipping (foreach, fp32 gradients); the fused masked
        update (StructureSGD)."""
        import fused
        from stakes.methods.base import margin_deletion
        from stakes.methods.finite import NonFiniteWatch

        self._casts(oc, self.n_weight_tensors, self.n_weights, "trained weights, once a step")
        xf, xa = self._x(nf, self.dt), self._x(na, self.dt)
        yf, ya = _labels(nf), _labels(na)
        terms = {"deletion": margin_deletion(self.s_work.head(self.s_work.features(xf)), yf, 1.0)}
        out, z = self._structure(xa)
        terms["retention"] = F.cross_entropy(self.s_work.head(out), ya)
        with torch.no_grad():
            stored = _meta((4 * na, self.d_f), self.dt)
            v0 = stored[_labels(na)] @ self.s_rp
        terms["alignment"] = fused.structure_alignment_loss(z, v0, self.s_anchors, backend="reference")
        w = self.s_work.head.weight
        terms["classifier_reg"] = 0.001 * (0.99 * w.abs().sum() + 0.5 * 0.01 * w.pow(2).sum())
        loss = sum(terms.values())
        NonFiniteWatch("structguard", META, None).record(1, terms, loss)
        loss.backward()
        for p in self.s_params:
            p.grad = None
        P = self.n_params
        oc.add("clip_grad_norm_ norms (foreach)", bytes_=4.0 * P)
        oc.add("clip_grad_norm_ total norm, coefficient", bytes_=0.0, kernels=3)
        oc.add("clip_grad_norm_ scale (foreach mul_)", bytes_=8.0 * P)
        oc.add("fused masked update (StructureSGD)", bytes_=roofline.masked_sgd_step(P, torch.float32).bytes)
        oc.add("sum of the update's SR partials", bytes_=0.0)

    def _stakes_eval(self, oc, b):
        """One evaluation chunk (CHUNK = 512) through the deployed model: features → head → argmax == y."""
        self._casts(oc, self.n_weight_tensors, self.n_weights, "weights")
        with torch.no_grad():
            self.s_work.head(self.s_work.features(self._x(b, self.dt))).argmax(1).eq(_labels(b))

    def _stakes_stop_check(self, oc, k):
        """The stop rule at its cadence: forget accuracy through the deployed model, one ``.item()``."""
        self._stakes_eval(oc, k)
        oc.syncs += 1

    def _stakes_eval_fixed(self, oc, n_test):
        """Once a final evaluation: the drift (from the stored features), the sums, the finite check, the watch."""
        from stakes.metrics import structure_drift

        with torch.no_grad():
            f = _meta((n_test, self.d_f), self.dt)
            v0 = _meta((n_test, self.s_rp.shape[1]), self.dt)
            try:
                structure_drift(v0.float(), (f @ self.s_rp).float(), self.s_anchors)
            except Exception:   # it returns a float (a host sync), which a meta tensor cannot give
                pass
            torch.stack([torch.isfinite(p).all() for p in self.s_params]).all()
        oc.syncs += 5

    def _stakes_data(self, oc, n):
        """The evaluation and forget images to the card once as uint8, converted to float there."""
        oc.add("uint8 images to float (x / 255) on the card", bytes_=5.0 * n * self.elems)


# ----------------------------------------------------------------------------- the phases of a whole run


@dataclass
class Phase:
    units: List[tuple] = field(default_factory=list)   # (unit, count, label)


def chunks(n: int, size: int) -> List[int]:
    return [min(size, n - i) for i in range(0, n, size)]


def epoch_proxy_batches(work: wr.Work) -> List[int]:
    """The proxy batch of each optimisation step (an epoch's last batch may be short)."""
    per_epoch = chunks(work.n_proxies, work.batch)
    return [per_epoch[s % len(per_epoch)] for s in range(work.steps)]


def stakes_importance_rows(work: wr.Work) -> List[int]:
    """The batches stakes' importance computes under the stable preset: its own plan (each distinct
    batch once), with the whole-run benchmark's options."""
    return wr.stakes_importance_batches(work.n_proxies, work.batch, work.importance_samples,
                                        {"importance_order": "shuffled", "importance_passes": "one"}, {"seed": 0})


def plan(work: wr.Work, units: Units, *, pgd_batch: int = 1024, eval_chunk: int = 512, cuda_graphs: bool = True,
         fuse: bool = True, stop_checks: bool = True, loaders: bool = True) -> Dict[str, Dict[str, Phase]]:
    """Which units each phase of each recipe runs and how often. ``fuse``: stakes' frozen copy
    compiled (its pointwise work fused); ``stop_checks``: stakes' stop rule at its cadence (off in the
    composition check, as in the benchmark); ``loaders``: the authors' host loading and copies."""
    a = units.a
    out = {"authors": {p: Phase() for p in wr.PHASES}, "stakes": {p: Phase() for p in wr.PHASES}}
    A, S = out["authors"], out["stakes"]
    spe = work.steps_per_epoch
    nbytes = 4 * units.elems
    pil, npb = a["host_pil_image_us"] * 1e-6, a["host_numpy_batch_us"] * 1e-6

    def host(images=0, numpy_batch=0, pin_bytes=0.0):
        return (images * pil + numpy_batch * npb + pin_bytes / (a["pin_gbps"] * 1e9)) if loaders else 0.0

    def cp(*items):
        return tuple(items) if loaders else ()

    # proxies: per forget batch, its R attacks of pgd_steps steps
    for b, n in Counter(work.forget_batches_in_order()).items():
        A["proxies"].units.append((units.unit("authors_pgd", b), n * work.repetitions * work.pgd_steps,
                                   f"PGD step, batch {b} (weight gradients too)"))
        A["proxies"].units.append((units.unit("authors_attack", b, copies=cp((4.0 * b, False), (4.0 * b, False))),
                                   n * work.repetitions, f"attack set-up and copy back, batch {b}"))
        A["proxies"].units.append((units.unit("authors_forget_load", b, host_s=host(images=b),
                                              copies=cp((nbytes * b, False), (8.0 * b, False))),
                                   n, f"forget batch {b} through PIL and copied"))
    for b, n in Counter(chunks(work.n_proxies, pgd_batch)).items():
        S["proxies"].units.append((units.unit("stakes_pgd", b, graph=cuda_graphs, fuse=fuse), n * work.pgd_steps,
                                   f"PGD step, batch {b}" + (" (CUDA graph)" if cuda_graphs else "")))
        S["proxies"].units.append((units.unit("stakes_success", b, fuse=fuse), n, f"success check, batch {b}"))
    for b, n in Counter(chunks(work.n_proxies, eval_chunk)).items():
        S["proxies"].units.append((units.unit("stakes_frozen_features", b, fuse=fuse), n,
                                   f"the proxies' S^ori once, chunk {b}"))
    # importance: the authors' cycled loader; stakes' distinct batches
    for b, n in Counter(wr.importance_batches(work.n_proxies, work.batch, work.importance_samples)).items():
        A["importance"].units.append((units.unit("authors_importance", b,
                                                 host_s=host(numpy_batch=b / 128, pin_bytes=nbytes * b),
                                                 copies=cp((nbytes * b, True))), n, f"importance batch {b}"))
    for b, n in Counter(stakes_importance_rows(work)).items():
        S["importance"].units.append((units.unit("stakes_importance", b), n, f"importance batch {b} (distinct)"))
    # steps
    fsizes = work.forget_batches_in_order()
    steps = Counter((fsizes[s % len(fsizes)], na, (s % spe) >= 2) for s, na in enumerate(epoch_proxy_batches(work)))
    for (nf, na, reg), n in sorted(steps.items()):
        A["steps"].units.append((units.unit("authors_step", nf, na, int(reg),
                                            host_s=host(numpy_batch=na / 128, pin_bytes=nbytes * na),
                                            copies=cp((nbytes * nf, False), (8.0 * nf, False), (nbytes * na, True),
                                                      (nbytes * na, True), (8.0 * na, True))),
                                 n, f"step {nf}+{na}" + (" with L_reg" if reg else " without L_reg (an epoch's first two)")))
    A["steps"].units.append((units.unit("host_only", host_s=host(images=work.k)), 1,
                             "the cycled forget loader's first pass through PIL"))
    nf = work.forget_batch
    for na, n in Counter(epoch_proxy_batches(work)).items():
        S["steps"].units.append((units.unit("stakes_step", nf, na), n, f"step {nf}+{na}"))
    # evaluation: the authors' stop check after every step from the second epoch, then the three sets
    checks = work.authors_stop_checks()
    for b, n in Counter(fsizes).items():
        A["evaluation"].units.append((units.unit("authors_eval", b, host_s=host(images=b),
                                                 copies=cp((nbytes * b, False), (8.0 * b, False))),
                                      n * (checks + 1), f"forget batch {b}: stop checks and the final evaluation"))
    for name, size in (("D_r", work.retain), ("test", work.test_size)):
        for b, n in Counter(chunks(size, work.batch)).items():
            A["evaluation"].units.append((units.unit("authors_eval", b, host_s=host(images=b, pin_bytes=nbytes * b),
                                                     copies=cp((nbytes * b, True), (8.0 * b, True))),
                                          n, f"{name} batch {b} (final)"))
    if stop_checks:
        epochs = math.ceil(work.steps / spe)
        S["evaluation"].units.append((units.unit("stakes_stop_check", work.k), epochs,
                                      "stop check at an epoch end (forget set)"))
    for b, n in Counter(chunks(work.k, eval_chunk) + chunks(work.retain, eval_chunk)
                        + chunks(work.test_size, eval_chunk)).items():
        S["evaluation"].units.append((units.unit("stakes_eval", b), n, f"final evaluation chunk {b}"))
    for b, n in Counter(chunks(work.test_size, eval_chunk)).items():
        S["evaluation"].units.append((units.unit("stakes_drift_reference", b, fuse=fuse), n,
                                      f"drift reference: the test set's S^ori once, chunk {b}"))
    S["evaluation"].units.append((units.unit("stakes_eval_fixed", work.test_size), 1, "drift, finite check, syncs"))
    n_img = work.k + work.retain + work.test_size
    S["evaluation"].units.append((units.unit("stakes_data", n_img, copies=cp((1.0 * n_img * units.elems, False))), 1,
                                  "the images to the card once (uint8) and to float"))
    return out


def predict(work: wr.Work, a: dict, units: Units, phases: Dict[str, Dict[str, Phase]],
            eff: Dict[str, float]) -> dict:
    """Modelled seconds, kernels and FLOPs per phase for both recipes, and the ratios."""
    out: dict = {"recipes": {}}
    for recipe, by_phase in phases.items():
        p = a["recipes"][recipe]
        rec = {}
        for ph, phase in by_phase.items():
            t = gpu = cpu = copy_s = flops = nbytes = 0.0
            kernels = syncs = 0
            rows = []
            for unit, n, label in phase.units:
                s = unit_seconds(unit, a, p, eff)
                t += n * s["time_s"]
                gpu += n * s["gpu_s"]
                cpu += n * s["cpu_s"]
                copy_s += n * s["copy_s"]
                flops += n * unit.flops
                nbytes += n * unit.bytes
                kernels += n * unit.kernels
                syncs += n * (unit.syncs + (len(unit.copies) if p["copies"] else 0))
                rows.append({"unit": label, "count": n, "kernels": unit.kernels, "flops": unit.flops,
                             "bytes": unit.bytes, "syncs": unit.syncs, "copies": len(unit.copies),
                             "graph": unit.graph, "gpu_ms": 1e3 * s["gpu_s"], "cpu_ms": 1e3 * s["cpu_s"],
                             "time_ms": 1e3 * s["time_s"],
                             "bound": "host (launches, loading)" if s["cpu_s"] > s["gpu_s"] else "GPU"})
            rec[ph] = {"seconds": t, "gpu_s": gpu, "cpu_s": cpu, "copy_s": copy_s, "flops": flops, "bytes": nbytes,
                       "kernels": kernels, "syncs": syncs, "units": rows}
        rec["whole"] = {"seconds": sum(v["seconds"] for v in rec.values()),
                        "flops": sum(v["flops"] for v in rec.values())}
        out["recipes"][recipe] = rec
    A, S = out["recipes"]["authors"], out["recipes"]["stakes"]
    out["ratios"] = {ph: A[ph]["seconds"] / S[ph]["seconds"] for ph in (*wr.PHASES, "whole")}
    return out


def time_by_kind(a: dict, phases: Dict[str, Dict[str, Phase]], recipe: str, eff: Dict[str, float]) -> dict:
    """Where a recipe's modelled time goes: GPU seconds in convolutions and matrix products, in the
    other (pointwise, reduction, copy, fused) kernels, and what the host adds beyond the GPU time
    (launches, loading, syncs, copies): the terms that keep a recipe from its floor."""
    p = a["recipes"][recipe]
    out = {"conv_matmul_gpu_s": 0.0, "other_gpu_s": 0.0, "host_and_sync_beyond_gpu_s": 0.0}
    for phase in phases[recipe].values():
        for unit, n, _ in phase.units:
            for o in unit.ops:
                key = "conv_matmul_gpu_s" if o.kind in ("conv", "matmul") else "other_gpu_s"
                out[key] += n * op_seconds(o, a, p, eff)
            s = unit_seconds(unit, a, p, eff)
            out["host_and_sync_beyond_gpu_s"] += n * (s["time_s"] - s["gpu_s"])
    return out


def job_floor(a: dict, phases: Dict[str, Dict[str, Phase]]) -> dict:
    """The job's floor: stakes' work (the cut work) with every FLOP at the card's bf16 datasheet peak
    and only its convolution / matrix-product operands moved at the datasheet HBM bandwidth, the max of
    the two per unit."""
    card = a["card"]
    peak, bw = card["bf16_tflops"] * 1e12, card["hbm_tbps"] * 1e12
    flops = nbytes = floor = 0.0
    per_phase = {}
    for ph, phase in phases["stakes"].items():
        f_ph = b_ph = fl_ph = 0.0
        for unit, n, _ in phase.units:
            f_ph += n * unit.flops
            b_ph += n * unit.gemm_bytes
            fl_ph += n * max(unit.flops / peak, unit.gemm_bytes / bw)
        per_phase[ph] = {"flops": f_ph, "bytes": b_ph, "floor_s": fl_ph}
        flops, nbytes, floor = flops + f_ph, nbytes + b_ph, floor + fl_ph
    return {"flops": flops, "bytes": nbytes, "flops_at_peak_s": flops / peak, "bytes_at_bandwidth_s": nbytes / bw,
            "floor_s": floor, "per_phase": per_phase,
            "definition": "stakes' work (the job with the cuts: the FLOPs it must do) at the H100's bf16 datasheet "
                          "peak, and the bytes of its convolutions' and matrix products' operands (bf16 activations "
                          "read and written once per layer, weights) at the datasheet HBM bandwidth; per unit the "
                          "larger of the two, summed"}


# ----------------------------------------------------------------------------- sensitivity


def _case(authors=None, stakes=None, card=None, plan_=None):
    return {"authors": authors or {}, "stakes": stakes or {}, "card": card or {}, "plan": plan_ or {}}


SENSITIVITY = {
    "central": _case(),
    "authors: convolutions at 1.5x the calibrated efficiency": _case(authors={"conv_eff_scale": 1.5}),
    "authors: convolutions at 2x the calibrated efficiency": _case(authors={"conv_eff_scale": 2.0}),
    "authors: convolutions at 0.67x": _case(authors={"conv_eff_scale": 0.67}),
    "authors: 3 us a launch": _case(authors={"launch_us": 3.0}),
    "authors: 10 us a launch": _case(authors={"launch_us": 10.0}),
    "authors: host loading at half (a faster host)": _case(authors={"host_loading_scale": 0.5}),
    "authors: no host loading and no copies (kernels only)": _case(authors={"host_loading_scale": 0.0,
                                                                            "copies": False}),
    "authors: pointwise kernels at 0.9 of the bandwidth": _case(authors={"bw_efficiency": 0.9}),
    "authors: smallest kernel 1 us": _case(authors={"min_kernel_us": 1.0}),
    "authors, combined: all of the above in their favour at once (2x convolutions, 3 us, kernels only, 0.9, 1 us)":
        _case(authors={"conv_eff_scale": 2.0, "launch_us": 3.0, "host_loading_scale": 0.0, "copies": False,
                       "bw_efficiency": 0.9, "min_kernel_us": 1.0}),
    "stakes: convolutions at 0.67x the calibrated efficiency": _case(stakes={"conv_eff_scale": 0.67}),
    "stakes: convolutions at 0.5x": _case(stakes={"conv_eff_scale": 0.5}),
    "stakes: 10 us a launch": _case(stakes={"launch_us": 10.0}),
    "stakes: pointwise kernels at 0.5 of the bandwidth": _case(stakes={"bw_efficiency": 0.5}),
    "stakes: smallest kernel 4 us": _case(stakes={"min_kernel_us": 4.0}),
    "stakes: frozen copy not compiled (folded and pre-cast, pointwise unfused: compile off)": _case(plan_={"fuse": False}),
    "stakes: no CUDA graph for PGD": _case(plan_={"cuda_graphs": False}),
    "stakes, combined: all of the above against it at once (0.5x, 10 us, 0.5, 4 us, unfused, no graph)":
        _case(stakes={"conv_eff_scale": 0.5, "launch_us": 10.0, "bw_efficiency": 0.5, "min_kernel_us": 4.0},
              plan_={"fuse": False, "cuda_graphs": False}),
    "both: the card's bandwidth at half": _case(card={"hbm_tbps": H100["hbm_tbps"] / 2}),
}


def with_case(a: dict, case: dict) -> dict:
    """The assumptions with one sensitivity case applied (each recipe's parameters separately)."""
    out = {**a, "recipes": {r: {**a["recipes"][r], **case.get(r, {})} for r in a["recipes"]},
           "card": {**a["card"], **case.get("card", {})}}
    return out


def _brief(work: wr.Work, pred: dict) -> dict:
    return {"work": {**wr.asdict(work), "expected": work.expected()}, "ratios": pred["ratios"],
            "seconds": {rec: {p: v["seconds"] for p, v in pred["recipes"][rec].items()} for rec in pred["recipes"]}}


def network_report(name: str, builder: Callable[[], nn.Module], work: wr.Work, a: dict, eff: Dict[str, float],
                   *, sensitivity: bool = True, other_ks: Sequence[int] = ()) -> dict:
    """The model for one network: the prediction, the floor, the sensitivity cases, other sizes, the curve."""
    units = Units(builder, anchor_dim=work.anchor_dim, a=a)
    phases = plan(work, units)
    central = predict(work, a, units, phases, eff)
    floor = job_floor(a, phases)
    stakes_s = central["recipes"]["stakes"]["whole"]["seconds"]
    out = {"network": name, "model": wr.NETWORKS[name][0] if name in wr.NETWORKS else "custom",
           "folded": units.folded, "params": units.n_params, "prediction": central, "floor": floor,
           "stakes_fraction_of_floor": floor["floor_s"] / stakes_s,
           "authors_fraction_of_floor": floor["floor_s"] / central["recipes"]["authors"]["whole"]["seconds"]}
    out["time_by_kind"] = {r: time_by_kind(a, phases, r, eff) for r in ("authors", "stakes")}
    full_e = {k: 1.0 for k in eff}
    out["stakes_fraction_of_floor_if_convolutions_reached_the_peak"] = floor["floor_s"] / predict(
        work, a, units, phases, full_e)["recipes"]["stakes"]["whole"]["seconds"]
    blocking = predict(work, {**a, "recipes": {**a["recipes"], "authors": {**a["recipes"]["authors"],
                                                                          "launch_blocking": True}}},
                       units, phases, eff)
    out["authors_under_cuda_launch_blocking"] = {
        "note": "the authors' recipe with CUDA_LAUNCH_BLOCKING=1 (their published command): host and GPU serialised; "
                "never a headline", "seconds": blocking["recipes"]["authors"]["whole"]["seconds"],
        "ratio": blocking["ratios"]["whole"]}
    if sensitivity:
        sens = {}
        for case_name, case in SENSITIVITY.items():
            ca = with_case(a, case)
            ph = plan(work, units, **case["plan"]) if case["plan"] else phases
            r = predict(work, ca, units, ph, eff)
            sens[case_name] = {"change": {k: v for k, v in case.items() if v}, **_brief(work, r)}
            del sens[case_name]["work"]
        out["sensitivity"] = sens
        wholes = [v["ratios"]["whole"] for v in sens.values()]
        single = {n: v for n, v in sens.items() if "combined" not in n}
        out["sensitivity_range"] = {"min": min(wholes), "max": max(wholes),
                                    "min_case": min(sens, key=lambda n: sens[n]["ratios"]["whole"]),
                                    "single_term_min": min(v["ratios"]["whole"] for v in single.values()),
                                    "single_term_min_case": min(single, key=lambda n: single[n]["ratios"]["whole"])}
    sizes = [_brief(work, central)]
    for k in other_ks:
        other = wr.full_work(k)
        sizes.append(_brief(other, predict(other, a, units, plan(other, units), eff)))
    for s in sizes:
        s["network"] = name
    out["predictions_by_size"] = sizes
    batches = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    out["efficiency_curve"] = {"batches": batches, **{cls: [forward_efficiency(units, b, cls, a, eff) for b in batches]
                                                      for cls in ("tf32_nchw", "16bit_nhwc")},
                               "what": "the fraction of the datasheet peak (TF32 for tf32_nchw, bf16 for 16bit_nhwc) "
                                       "the network's convolutions reach in one forward at each batch size (e x wave "
                                       "fill, the smallest kernel), central parameters"}
    return out


def build_report(work: Optional[wr.Work] = None, a: dict = ASSUMPTIONS, *, other_ks: Sequence[int] = (128,),
                 check: Optional[wr.Work] = None, networks: Sequence[str] = ("authors", "resnet18"),
                 builders: Optional[Dict[str, Callable[[], nn.Module]]] = None) -> dict:
    """The model at ``work`` (default: the issue's size) for each network (the first the headline),
    with the calibration, the sensitivity, the floor, k = 128 (gpu_check.sh's size), and the
    composition check at ``check``'s size."""
    t0 = time.perf_counter()
    work = work or wr.full_work()
    cal = calibrate(a)
    eff = {cls: v["e"] for cls, v in cal.items()}
    builders = builders or {n: wr.NETWORKS[n][1] for n in networks}
    rows = {}
    for i, name in enumerate(networks):
        rows[name] = network_report(name, builders[name], work, a, eff, sensitivity=True,
                                    other_ks=other_ks if i == 0 else ())
    head = rows[networks[0]]
    from benchmarks import measure

    report = {
        "kind": "MODEL, not a measurement (no GPU was run): predicted seconds per phase on an H100",
        "metadata": {"torch": torch.__version__, "python": sys.version.split()[0],
                     "date": measure.run_metadata(torch.device("cpu"))["date"], "git_commit": measure.git_commit(),
                     "counted_on": "meta tensors at the real batch sizes, on a CPU"},
        "assumptions": dict(a),
        "calibration": {**CALIBRATION, "result": cal, "waves": WAVES_SOURCE, "channels_last": CHANNELS_LAST_SOURCE},
        "work": {**wr.asdict(work), "n_proxies": work.n_proxies, "steps_per_epoch": work.steps_per_epoch,
                 "expected_same": work.expected(), "expected_authors": work.expected_authors(),
                 "stakes_importance_batches": len(stakes_importance_rows(work))},
        "headline": networks[0],
        "networks": rows,
        "prediction": head["prediction"],
        "floor": head["floor"],
        "stakes_fraction_of_floor": head["stakes_fraction_of_floor"],
        "sensitivity": head["sensitivity"],
        "sensitivity_range": head["sensitivity_range"],
        "predictions_by_size": head["predictions_by_size"],
        "targets": targets(head),
    }
    if check is not None:
        report["composition_check"] = {"work": wr.asdict(check), "note": COMPOSITION_NOTE,
                                       **composition_check(check)}
    report["metadata"]["seconds_to_compute"] = round(time.perf_counter() - t0, 1)
    return report


def targets(head: dict) -> dict:
    """Issue 24's modelled targets against this model (never tuned toward them)."""
    whole = head["prediction"]["ratios"]["whole"]
    lo = head["sensitivity_range"]["min"]
    frac = head["stakes_fraction_of_floor"]
    rng = head["sensitivity_range"]
    return {"ratio_at_least_5": {"target": 5.0, "model": whole, "met": whole >= 5.0},
            "no_case_below_4": {"target": 4.0, "model": lo, "case": rng["min_case"], "met": lo >= 4.0,
                                "single_term_cases_min": rng["single_term_min"],
                                "single_term_case": rng["single_term_min_case"]},
            "stakes_at_least_40_percent_of_floor": {"target": 0.40, "model": frac, "met": frac >= 0.40}}


# ----------------------------------------------------------------------------- the composition check


def composition_check(work: wr.Work, *, model_builder: Optional[Callable[[], nn.Module]] = None,
                      image_shape=(3, 32, 32), seed: int = 0) -> dict:
    """The model's composition against the real code: both recipes run whole (real tensors, fp32, on
    the CPU, at ``work``'s size) under the op counter, and their FLOPs and kernels are compared with
    what :func:`plan` composes from the units for the same work (stakes' units in fp32, unfused, no
    CUDA graphs, its stop rule off as in the benchmark). FLOPs should agree; kernels differ where the
    model counts a fused kernel and the CPU runs its eager reference, and by the per-batch bookkeeping
    the units leave out."""
    device = torch.device("cpu")
    inputs = wr.make_inputs(work, device, seed=seed, model_builder=model_builder, image_shape=image_shape)
    units = Units(model_builder, anchor_dim=work.anchor_dim, image_shape=image_shape, stakes_dtype=torch.float32)
    phases = plan(work, units, cuda_graphs=False, fuse=False, stop_checks=False, loaders=False)
    out = {}
    counters = {}
    # stakes on its reference path (backend="reference"), so that the counter sees its FLOPs even where the
    # Triton interpreter is on (the test suite): the work is the same, only the op implementations differ
    runs = {"authors": wr.authors_recipe, "stakes": functools.partial(wr.stakes_recipe, backend="reference")}
    for recipe, fn in runs.items():
        with OpCounter() as counters[recipe]:
            fn(inputs, work, device, seed, loaders=False)
    for recipe, oc in counters.items():
        modelled = {"flops": 0.0, "kernels": 0}
        for phase in phases[recipe].values():
            for unit, n, _ in phase.units:
                modelled["flops"] += n * unit.flops
                modelled["kernels"] += n * unit.kernels
        out[recipe] = {"counted_flops": sum(o.flops for o in oc.ops), "modelled_flops": modelled["flops"],
                       "counted_kernels": sum(o.kernels for o in oc.ops), "modelled_kernels": modelled["kernels"]}
        out[recipe]["flops_rel_diff"] = (out[recipe]["modelled_flops"] - out[recipe]["counted_flops"]) / \
            max(out[recipe]["counted_flops"], 1.0)
    return out


COMPOSITION_NOTE = ("both recipes run whole on the CPU (real tensors, fp32, the authors' CIFAR ResNet-18, kernels "
                    "only) at this reduced size under the op counter, against the model's composition of its units for "
                    "the same work (stakes in fp32, unfused, no CUDA graphs, its stop rule off as in the benchmark): "
                    "the FLOPs must agree; kernels differ (stakes' fused kernels run as eager references on the CPU, "
                    "one-off set-up and per-batch bookkeeping are left out of the units)")
CHECK_WORK = wr.Work(k=4, repetitions=2, pgd_steps=2, steps=3, importance_samples=10, test_size=6, batch=4,
                     retain_size=5, label="composition check (CPU): k = 4, R = 2, 2 PGD steps, 3 steps, 10 importance "
                                           "samples, 5 retained and 6 test images, batches of 4")


# ----------------------------------------------------------------------------- output


def markdown(report: dict) -> str:
    a = report["assumptions"]
    w = report["work"]
    cal = report["calibration"]["result"]
    lines = [
        "### Whole run on an H100: MODEL, not a measurement",
        "",
        f"Work: k = {w['k']}, R = {w['repetitions']}, {w['pgd_steps']} PGD steps, {w['steps']} steps; the authors: "
        f"{w['expected_authors']['importance_samples']:,} importance samples (their loader cycled), "
        f"{w['expected_authors']['stop_checks']} stop checks, D_r ({w['expected_authors']['final_evaluation']['retain']:,}) "
        f"and test ({w['test_size']:,}) evaluated once; stakes: {w['stakes_importance_batches']} distinct importance "
        f"batches, S^ori once, stop checks at epoch ends, the same final sets. Card: {a['card']['name']} datasheet "
        f"(bf16 {a['card']['bf16_tflops']:g}, TF32 {a['card']['tf32_tflops']:g} TFLOP/s, {a['card']['hbm_tbps']:g} "
        f"TB/s). Convolution efficiency calibrated on NVIDIA's A100 ResNet-50 figures: TF32 NCHW "
        f"e = {cal['tf32_nchw']['e']:.2f} (the authors), 16-bit NHWC e = {cal['16bit_nhwc']['e']:.2f} (stakes).",
    ]
    for name, row in report["networks"].items():
        pred = row["prediction"]
        A, S = pred["recipes"]["authors"], pred["recipes"]["stakes"]
        head = name == report["headline"]
        lines += ["", f"**{'Headline' if head else 'Second case'}: {row['model']}**", "",
                  "| phase | authors s (kernels) | stakes s (kernels) | modelled ratio |", "|---|---:|---:|---:|"]
        for p in wr.PHASES:
            lines.append(f"| {p} | {A[p]['seconds']:.2f} ({A[p]['kernels']:,.0f}) | {S[p]['seconds']:.2f} "
                         f"({S[p]['kernels']:,.0f}) | {pred['ratios'][p]:.2f} |")
        lines.append(f"| **whole** | {A['whole']['seconds']:.2f} | {S['whole']['seconds']:.2f} | "
                     f"**{pred['ratios']['whole']:.2f}** |")
        fl = row["floor"]
        lines += ["", f"Floor of the job: {fl['floor_s']:.2f} s (FLOPs at the bf16 peak {fl['flops_at_peak_s']:.2f} s, "
                      f"operand bytes at the bandwidth {fl['bytes_at_bandwidth_s']:.2f} s); stakes at "
                      f"{row['stakes_fraction_of_floor']:.0%} of it, the authors at {row['authors_fraction_of_floor']:.1%}. "
                      f"Under CUDA_LAUNCH_BLOCKING=1 (never a headline) the authors take "
                      f"{row['authors_under_cuda_launch_blocking']['seconds']:.1f} s."]
        tk = row["time_by_kind"]["stakes"]
        lines += ["", f"stakes' modelled time: convolutions and matrix products {tk['conv_matmul_gpu_s']:.2f} s of GPU, "
                      f"other kernels {tk['other_gpu_s']:.2f} s, host and syncs beyond the GPU "
                      f"{tk['host_and_sync_beyond_gpu_s']:.2f} s; with its convolutions at the datasheet peak it would be "
                      f"at {row['stakes_fraction_of_floor_if_convolutions_reached_the_peak']:.0%} of the floor."]
        rng = row["sensitivity_range"]
        lines += ["", f"Sensitivity of the whole ratio (each case moves one recipe): {rng['min']:.2f}-{rng['max']:.2f} "
                      f"(lowest: {rng['min_case']}; of the single-term cases {rng['single_term_min']:.2f}, "
                      f"{rng['single_term_min_case']}). " + "; ".join(
                          f"{n} {v['ratios']['whole']:.2f}" for n, v in row["sensitivity"].items()) + "."]
    for size in report["predictions_by_size"][1:]:
        sw, sec = size["work"], size["seconds"]
        lines += ["", f"At k = {sw['k']} (gpu_check.sh's size, {report['headline']} network): authors "
                      f"{sec['authors']['whole']:.1f} s, stakes {sec['stakes']['whole']:.1f} s, ratio "
                      f"{size['ratios']['whole']:.2f} (" + ", ".join(f"{p} {size['ratios'][p]:.2f}" for p in wr.PHASES)
                  + ")."]
    t = report["targets"]
    lines += ["", "Issue 24's modelled targets: " + "; ".join(
        f"{k} {'met' if v['met'] else 'MISSED'} ({v['model']:.2f} vs {v['target']:g})" for k, v in t.items()) + "."]
    check = report.get("composition_check")
    if check:
        lines += ["", "The " + check["work"]["label"] + ": FLOPs counted on the real code vs modelled: " + "; ".join(
            f"{r} {check[r]['counted_flops'] / 1e9:.2f} vs {check[r]['modelled_flops'] / 1e9:.2f} GFLOP"
            for r in ("authors", "stakes")) + "."]
    lines += ["", "Every time above is modelled, not measured."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_ratio_model",
                                     description="MODEL (not a measurement) of the whole-run ratio on an H100.")
    parser.add_argument("--k", type=int, default=256, help="forget images (default 256)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help=f"output JSON (default {DEFAULT_JSON})")
    parser.add_argument("--markdown", action="store_true", help="print only the Markdown table")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the composition check (both recipes run whole on the CPU at a tiny size)")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")
    from stakes._io import atomic_json_dump

    report = build_report(wr.full_work(args.k), check=None if args.no_check else CHECK_WORK)
    path = atomic_json_dump(report, args.json)
    print(markdown(report))
    if not args.markdown:
        print(f"\n(wrote {path}; MODEL, not measured)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
