"""A MODEL, not a measurement: the whole-run ratio (the authors' recipe / stakes' defaults) that
``python -m benchmarks whole-run`` should measure on an H100, phase by phase (issue 17, item 6).

``python -m benchmarks.gpu_ratio_model [--k 256] [--json PATH] [--markdown]``

Nothing here runs on a GPU. What is counted, on this machine's CPU:

* every aten op each recipe's unit of work runs — one PGD step, one importance batch, one
  optimisation step, one evaluation batch — is recorded by a ``TorchDispatchMode`` on **meta
  tensors at the real batch sizes** (128 for the authors and for stakes' importance and steps,
  1024 for stakes' PGD), so nothing is scaled: per op its FLOPs (``torch.utils.flop_counter``'s
  formulas; each unit is also run under ``FlopCounterMode`` and the totals must agree), the bytes
  of its tensor operands (inputs read + outputs written, the traffic of an unfused kernel), its
  dtype, and one kernel launch (views, allocations and profiler markers are not kernels);
* the authors' units are the functions ``python -m benchmarks whole-run`` times
  (:mod:`benchmarks.whole_run`), in fp32; stakes' units mirror what ``stakes.unlearn`` runs under
  its stable preset (stakes/proxy.py, stakes/methods/structguard.py, loop.py, evaluation.py) in
  the precision its policy picks on an sm_90 card (bf16 autocast: the model in bf16 on meta, plus
  the autocast casts of weights and inputs as extra ops); the fused kernels (PGD step, importance
  accumulation, the masked update) are one launch each with the minimum bytes of
  :mod:`benchmarks.roofline`; the fused alignment and similarity ops are counted as their eager
  references (more launches than the kernels: conservative for stakes);
* each phase's units and counts follow :class:`benchmarks.whole_run.Work` (the same work as the
  benchmark: k = 256, R = 20, 100 PGD steps, 389 importance batches, 120 steps, 4 evaluations).

Time of a unit (the assumptions are :data:`ASSUMPTIONS`, every number stated there):

    gpu  = Σ_ops max(FLOPs / (peak(op, dtype) · matmul_efficiency), bytes / (copy BW · bw_efficiency), min_kernel)
    cpu  = kernels × launch overhead (eager PyTorch; 0 for kernels replayed from a CUDA graph)
    time = max(gpu, cpu) + syncs × sync latency    (the CPU enqueues asynchronously; a host sync drains)

peak: convolutions in fp32 → TF32 (cuDNN's default ``allow_tf32=True``), matrix products in fp32 →
plain fp32 (torch's default ``matmul.allow_tf32=False``), bf16 → the bf16 rate; other ops have no
counted FLOPs and are bound by their bytes. Every time printed or written is modelled.
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
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks import roofline
from benchmarks import whole_run as wr

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "gpu_ratio_model.json"
META = torch.device("meta")

ASSUMPTIONS = {
    "kind": "MODEL, not a measurement: op counts from meta-tensor runs on a CPU and the assumptions below; "
            "no GPU was run",
    "gpu": "NVIDIA H100 (SXM, 80 GB)",
    "copy_tbps": 3.0,              # device-to-device copy, reads + writes counted (measured on an H100)
    "bf16_tflops": 790.0,          # 8192^3 bf16 matrix products (measured on an H100)
    "tf32_tflops": 395.0,          # TF32: half the bf16 rate
    "fp32_tflops": 790.0 / 15,     # plain fp32 (no tensor cores): about 1/15 of bf16
    "matmul_efficiency": 0.5,      # fraction of those 8192^3 rates a CIFAR ResNet-18 convolution reaches
    "bw_efficiency": 0.8,          # fraction of the copy bandwidth an elementwise / reduction kernel reaches
    "min_kernel_us": 2.0,          # GPU time of the smallest kernel (launch latency, ramp-up)
    "launch_us_eager": 5.0,        # host time to issue one kernel from eager PyTorch (dispatch + launch)
    "launch_us_graph": 0.0,        # host time per kernel replayed from a CUDA graph
    "sync_us": 10.0,               # one host synchronisation (.item(), float(tensor)): the pipeline drains
    "stakes_elementwise_scale": 1.0,   # what-if only: stakes' non-matmul traffic and launches scaled (1 = as counted)
    "authors_precision": "fp32 eager on the card as the authors run it: cuDNN convolutions in TF32 (torch's "
                         "default torch.backends.cudnn.allow_tf32 = True), matrix products in plain fp32 "
                         "(default torch.backends.cuda.matmul.allow_tf32 = False), activations 4 bytes",
    "stakes_precision": "stakes' automatic policy on sm_90: bf16 autocast for the model work of every phase (PGD, "
                        "importance, steps, evaluation; counted with the model in bf16 on meta, plus one cast "
                        "kernel per weight per forward of a frozen model or per step of a trained one, and the "
                        "input's cast), fp32 master weights, gradients and optimiser state (the fused update, "
                        "importance accumulation, gradient clipping at 4 bytes a parameter); CUDA graphs for the "
                        "PGD steps (launch overhead 0 there); channels_last (no change in bytes; its saving, "
                        "cuDNN's NCHW transposes of the authors' fp32 convolutions, is not modelled: "
                        "conservative for stakes)",
    "not_modelled": "the random starts of PGD (stakes draws one generator per proxy on the CPU: ~0.1 s for "
                    "5,120 proxies), host-to-device copies (none: data resident on both sides), memory "
                    "allocation, cuDNN algorithm choice, Triton compilation and CUDA-graph capture (one-off), "
                    "Python overhead beyond the per-kernel launch cost",
    "kernels": "one launch per aten op that is not a view, an allocation or a profiler marker (a cuDNN "
               "convolution may launch more); a torch._foreach_* op is one launch (multi_tensor_apply "
               "covers ResNet-18's 62 tensors in one or two); the fused ops one launch each",
}

CONV = {"aten.convolution", "aten.convolution_backward", "aten._convolution", "aten.cudnn_convolution"}
MATMUL = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm"}
NOT_KERNELS = ("aten.empty", "aten.new_empty", "aten.empty_like", "aten.empty_strided", "aten.detach",
               "aten.lift_fresh", "aten._local_scalar_dense", "profiler.", "aten.alias", "aten.set_")


@dataclass
class Op:
    name: str
    kind: str            # conv | matmul | other
    dtype: str           # float32 | bfloat16 | ...
    flops: float
    bytes: float
    kernels: float = 1   # launches (a what-if may scale them)


class OpCounter(TorchDispatchMode):
    """Records every aten op (FLOPs from torch.utils.flop_counter's formulas, operand bytes, dtype)."""

    def __init__(self):
        super().__init__()
        self.ops: List[Op] = []
        self.syncs = 0

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
        seen, nbytes = set(), 0
        for t in ins:
            if id(t) not in seen:
                seen.add(id(t))
                nbytes += t.numel() * t.element_size()
        nbytes += sum(t.numel() * t.element_size() for t in outs)   # written (in place: read and written)
        first = next((t for t in ins if t.is_floating_point()), None)
        kind = "conv" if name in CONV else "matmul" if name in MATMUL else "other"
        self.ops.append(Op(name, kind, str(first.dtype).replace("torch.", "") if first is not None else "none",
                           float(flops), float(nbytes)))
        return out


@dataclass
class Unit:
    """One unit of work: its ops, host syncs, and the FLOPs FlopCounterMode counted."""

    ops: List[Op]
    syncs: int = 0
    flop_counter: Optional[float] = None   # FlopCounterMode's total (None: not runnable, see count)
    graph: bool = False      # replayed from a CUDA graph

    @property
    def kernels(self) -> int:
        return sum(o.kernels for o in self.ops)

    @property
    def flops(self) -> float:
        return sum(o.flops for o in self.ops)

    @property
    def bytes(self) -> float:
        return sum(o.bytes for o in self.ops)


def count(fn: Callable[[OpCounter], None]) -> Unit:
    """Run ``fn(counter)`` under FlopCounterMode and the op counter; the two FLOP totals must agree.

    FlopCounterMode's module tracker cannot follow ``autograd.grad`` with respect to a leaf input
    (a PGD step): such a unit is counted by the op counter alone (the same library's formulas,
    ``torch.utils.flop_counter.flop_registry``) and its ``flop_counter`` is None."""
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


# ----------------------------------------------------------------------------- time of a unit


def peak_flops(op: Op, a: dict) -> Optional[float]:
    if op.kind not in ("conv", "matmul") or op.flops == 0:
        return None
    if op.dtype in ("bfloat16", "float16"):
        rate = a["bf16_tflops"]
    elif op.kind == "conv":
        rate = a["tf32_tflops"]       # cuDNN: TF32 for fp32 convolutions by default
    else:
        rate = a["fp32_tflops"]       # matmul.allow_tf32 is False by default
    return rate * 1e12 * a["matmul_efficiency"]


def op_seconds(op: Op, a: dict) -> float:
    rate = peak_flops(op, a)
    t_flop = op.flops / rate if rate else 0.0
    t_mem = op.bytes / (a["copy_tbps"] * 1e12 * a["bw_efficiency"])
    return max(t_flop, t_mem, op.kernels * a["min_kernel_us"] * 1e-6)


def unit_seconds(unit: Unit, a: dict, elementwise_scale: float = 1.0) -> Dict[str, float]:
    """Modelled GPU, host and total seconds of ``unit``; ``elementwise_scale`` scales the bytes and
    launches of its non-matmul ops (a what-if, 1 = as counted)."""
    ops = unit.ops
    if elementwise_scale != 1.0:
        ops = [o if o.kind != "other" else replace(o, bytes=o.bytes * elementwise_scale,
                                                    kernels=o.kernels * elementwise_scale) for o in ops]
    gpu = sum(op_seconds(o, a) for o in ops)
    launch = a["launch_us_graph"] if unit.graph else a["launch_us_eager"]
    cpu = sum(o.kernels for o in ops) * launch * 1e-6
    return {"gpu_s": gpu, "cpu_s": cpu, "time_s": max(gpu, cpu) + unit.syncs * a["sync_us"] * 1e-6}


# ----------------------------------------------------------------------------- the units, on meta


def _meta(shape, dtype=torch.float32, requires_grad=False):
    return torch.empty(shape, device=META, dtype=dtype, requires_grad=requires_grad)


def _labels(n):
    return torch.empty(n, device=META, dtype=torch.long)


def _weights(module: nn.Module) -> List[torch.Tensor]:
    """The weights autocast casts to bf16 (convolutions and linear layers)."""
    return [m.weight for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


class Units:
    """Builds and caches the units of both recipes for one model (meta tensors)."""

    def __init__(self, model_builder: Optional[Callable[[], nn.Module]] = None, *, anchor_dim: int = 512,
                 image_shape=(3, 32, 32), num_classes: int = 10, stakes_dtype: torch.dtype = torch.bfloat16):
        torch.manual_seed(0)
        model = (model_builder or wr.default_model)().to(META)
        self.image_shape, self.num_classes = tuple(image_shape), num_classes
        self.elems = math.prod(image_shape)
        anchors = _meta((num_classes, anchor_dim))
        # the authors: fp32 (their state object is the benchmark's own)
        self.a = wr._Authors(model, anchors, META, seed=0)
        self.a_opt = wr.authors_optimizer(self.a, foreach=True)   # torch's default on CUDA: foreach
        self.a_imp = [torch.zeros_like(p) for p in self.a.psi]
        # stakes: the model in its autocast dtype
        self.dt = stakes_dtype
        self.s_orig = copy.deepcopy(model).to(stakes_dtype).eval()
        for p in self.s_orig.parameters():
            p.requires_grad_(False)
        self.s_work = copy.deepcopy(model).to(stakes_dtype)
        self.s_work.features.eval()      # backbone BatchNorm statistics frozen (bn_train_mode False)
        self.s_anchors = anchors
        d_f = model.head.in_features
        self.s_rp = _meta((d_f, anchor_dim), stakes_dtype)
        self.s_params = list(self.s_work.parameters())
        self.s_psi = list(self.s_work.features.parameters())
        self.n_params = sum(p.numel() for p in self.s_params)
        self.n_psi = sum(p.numel() for p in self.s_psi)
        self.n_weights = sum(w.numel() for w in _weights(model))
        self.n_weight_tensors = len(_weights(model))
        self.cache: Dict[tuple, Unit] = {}

    def unit(self, name: str, *sizes, graph: bool = False) -> Unit:
        key = (name, *sizes, graph)
        if key not in self.cache:
            u = count(lambda oc: getattr(self, "_" + name)(oc, *sizes))
            u.graph = graph
            self.cache[key] = u
        return self.cache[key]

    # ------------------------------------------------------------- authors (benchmarks/whole_run.py)
    def _authors_pgd(self, oc, b):
        x0 = _meta((b, *self.image_shape))
        wr.authors_pgd_step(self.a.orig, x0.clone(), x0, _labels(b), 3.0, 0.1)

    def _authors_importance(self, oc, b):
        px = _meta((4 * b, *self.image_shape))
        xb = px[torch.empty(b, device=META, dtype=torch.long)]
        wr.authors_importance_batch(self.a, xb, self.a_imp, 1.0)

    def _authors_step(self, oc, nf, na, with_reg):
        fx, px = _meta((2 * nf, *self.image_shape)), _meta((4 * na, *self.image_shape))
        fy, py = _labels(2 * nf), _labels(4 * na)
        jf, ia = _labels(nf), _labels(na)
        loss = wr.authors_train_step(self.a, self.a_opt, fx[jf], fy[jf], px[ia], py[ia], self.a_imp,
                                     with_reg=bool(with_reg))
        oc.syncs += 1   # loss.item(): their per-step logging
        del loss

    def _authors_eval(self, oc, b):
        self.a.work.eval()
        self.a.proj.eval()
        with torch.no_grad():
            wr.authors_eval_batch(self.a, _meta((b, *self.image_shape)), _labels(b))
        oc.syncs += 1   # .item() a batch
        self.a.train()

    # ------------------------------------------------------------- stakes (mirrors stakes.unlearn, stable preset)
    def _casts(self, oc, n_tensors, numel, what):
        """autocast: fp32 → bf16 copies (read 4 B, write 2 B an element)."""
        if self.dt in (torch.bfloat16, torch.float16):
            oc.add(f"autocast cast ({what})", bytes_=6.0 * numel, kernels=n_tensors)

    def _stakes_pgd(self, oc, b):
        """stakes/proxy.py _attack, one step: CE(sum) through the frozen model, ∇ₓ, fused.l2_pgd_step."""
        self._casts(oc, self.n_weight_tensors, self.n_weights, "frozen weights, every forward")
        self._casts(oc, 1, b * self.elems, "input")
        x = _meta((b, *self.image_shape), self.dt, requires_grad=True)
        loss = F.cross_entropy(self.s_orig(x), _labels(b), reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
        self._casts(oc, 1, b * self.elems, "input gradient back to fp32")
        c = roofline.pgd_step(b * self.elems, torch.float32)
        oc.add("fused.l2_pgd_step", bytes_=c.bytes, kernels=1)

    def _stakes_success(self, oc, b):
        self._casts(oc, self.n_weight_tensors, self.n_weights, "frozen weights, every forward")
        with torch.no_grad():
            self.s_orig(_meta((b, *self.image_shape), self.dt)).argmax(1) == _labels(b)

    def _structure(self, x):
        out = self.s_work.features(x)
        return out, out @ self.s_rp

    def _stakes_importance(self, oc, b):
        """StructGuard.importance with the warm start: mean ‖S^unl‖² through the features, |∇ψ|, fused accumulate."""
        import fused

        self._casts(oc, self.n_weight_tensors - 1, self.n_weights - self.s_work.head.weight.numel(), "trained weights")
        px = _meta((4 * b, *self.image_shape), self.dt)
        xb = px[torch.empty(b, device=META, dtype=torch.long)]
        _, z = self._structure(xb)
        loss = fused.anchor_similarity(z, self.s_anchors, backend="reference").pow(2).sum(1).mean()
        torch.autograd.grad(loss, self.s_psi, allow_unused=True)
        oc.add("fused.accumulate_importance", bytes_=roofline.importance_accumulate(self.n_psi, torch.float32).bytes)

    def _stakes_step(self, oc, nf, na):
        """loop._train_step with StructGuard's stable terms: margin deletion through h∘g, retention CE,
        alignment against the original, the classifier elastic net; backward; NonFiniteWatch.record;
        gradient clipping (foreach, fp32 gradients); the fused masked update (StructureSGD)."""
        import fused
        from stakes.methods.base import margin_deletion
        from stakes.methods.finite import NonFiniteWatch

        self._casts(oc, self.n_weight_tensors, self.n_weights, "trained weights, once a step")
        self._casts(oc, self.n_weight_tensors, self.n_weights, "frozen original's weights")
        fx, px = _meta((2 * nf, *self.image_shape), self.dt), _meta((4 * na, *self.image_shape), self.dt)
        fy, py = _labels(2 * nf), _labels(4 * na)
        jf, ia = _labels(nf), _labels(na)
        xf, yf, xa, ya = fx[jf], fy[jf], px[ia], py[ia]
        terms = {"deletion": margin_deletion(self.s_work.head(self.s_work.features(xf)), yf, 1.0)}
        out, z = self._structure(xa)
        terms["retention"] = F.cross_entropy(self.s_work.head(out), ya)
        with torch.no_grad():
            v0 = self.s_orig.features(xa) @ self.s_rp
        terms["alignment"] = fused.structure_alignment_loss(z, v0, self.s_anchors, backend="reference")
        w = self.s_work.head.weight
        terms["classifier_reg"] = 0.001 * (0.99 * w.abs().sum() + 0.5 * 0.01 * w.pow(2).sum())
        loss = sum(terms.values())
        NonFiniteWatch("structguard", META, None).record(1, terms, loss)
        loss.backward()
        for p in self.s_params:
            p.grad = None
        P = self.n_params
        # clip_grad_norm_(foreach): per-tensor norms, their norm, the clip coefficient, one scaling
        oc.add("clip_grad_norm_ norms (foreach)", bytes_=4.0 * P)
        oc.add("clip_grad_norm_ total norm, coefficient", bytes_=0.0, kernels=3)
        oc.add("clip_grad_norm_ scale (foreach mul_)", bytes_=8.0 * P)
        oc.add("fused masked update (StructureSGD)", bytes_=roofline.masked_sgd_step(P, torch.float32).bytes)
        oc.add("sum of the update's SR partials", bytes_=0.0)

    def _stakes_eval(self, oc, b):
        """One evaluation chunk (CHUNK = 512): features → head → argmax == y (Evaluator / metrics.predict)."""
        self._casts(oc, self.n_weight_tensors, self.n_weights, "weights")
        with torch.no_grad():
            self.s_work.head(self.s_work.features(_meta((b, *self.image_shape), self.dt))).argmax(1).eq(_labels(b))

    def _stakes_drift_orig(self, oc, b):
        """The test set's original structure, computed once a run (Evaluator._drift)."""
        self._casts(oc, self.n_weight_tensors, self.n_weights, "frozen weights")
        with torch.no_grad():
            self.s_orig.features(_meta((b, *self.image_shape), self.dt)) @ self.s_rp

    def _stakes_eval_fixed(self, oc, n_test):
        """Per evaluation, beyond the chunks: the drift (reference, from the stored features), the sums,
        check_finite_parameters (an isfinite().all() per tensor, one host sync), the watch check."""
        from stakes.metrics import structure_drift

        with torch.no_grad():
            f = _meta((n_test, self.s_rp.shape[0]), self.dt)
            v0 = _meta((n_test, self.s_rp.shape[1]), self.dt)
            try:
                structure_drift(v0.float(), (f @ self.s_rp).float(), self.s_anchors)
            except Exception:   # it returns a float (a host sync), which a meta tensor cannot give
                pass
            torch.stack([torch.isfinite(p).all() for p in self.s_params]).all()
        oc.syncs += 5   # forget accuracy, the test hits, the drift, the finite check, the watch check


# ----------------------------------------------------------------------------- the phases of a whole run


@dataclass
class Phase:
    units: List[tuple] = field(default_factory=list)   # (unit, count, label)


def epoch_proxy_batches(work: wr.Work) -> List[int]:
    """The proxy batch of each optimisation step (an epoch's last batch may be short)."""
    per_epoch = [min(work.batch, work.n_proxies - i) for i in range(0, work.n_proxies, work.batch)]
    return [per_epoch[s % len(per_epoch)] for s in range(work.steps)]


def chunks(n: int, size: int) -> List[int]:
    return [min(size, n - i) for i in range(0, n, size)]


def plan(work: wr.Work, units: Units, *, pgd_batch: int = 1024, eval_chunk: int = 512,
         cuda_graphs: bool = True) -> Dict[str, Dict[str, Phase]]:
    """Which units each phase of each recipe runs, how often (the same work for both recipes)."""
    out = {"authors": {p: Phase() for p in wr.PHASES}, "stakes": {p: Phase() for p in wr.PHASES}}
    A, S = out["authors"], out["stakes"]
    spe = work.steps_per_epoch
    step_batches = epoch_proxy_batches(work)
    n_eval = work.evaluations()
    nf = work.forget_batch
    # proxies
    for b, n in Counter(chunks(work.k, work.batch)).items():
        A["proxies"].units.append((units.unit("authors_pgd", b), n * work.repetitions * work.pgd_steps,
                                   f"PGD step, batch {b}"))
    for b, n in Counter(chunks(work.n_proxies, pgd_batch)).items():
        S["proxies"].units.append((units.unit("stakes_pgd", b, graph=cuda_graphs), n * work.pgd_steps,
                                   f"PGD step, batch {b}" + (" (CUDA graph)" if cuda_graphs else "")))
        S["proxies"].units.append((units.unit("stakes_success", b), n, f"success check, batch {b}"))
    # importance
    for b, n in Counter(wr.importance_batches(work.n_proxies, work.batch, work.importance_samples)).items():
        A["importance"].units.append((units.unit("authors_importance", b), n, f"importance batch {b}"))
        S["importance"].units.append((units.unit("stakes_importance", b), n, f"importance batch {b}"))
    # steps
    a_steps = Counter((na, (s % spe) >= 2) for s, na in enumerate(step_batches))
    for (na, reg), n in sorted(a_steps.items()):
        A["steps"].units.append((units.unit("authors_step", nf, na, int(reg)), n,
                                 f"step {nf}+{na}" + (" with L_reg" if reg else " without L_reg (first two of an epoch)")))
    for na, n in Counter(step_batches).items():
        S["steps"].units.append((units.unit("stakes_step", nf, na), n, f"step {nf}+{na}"))
    # evaluation
    for b, n in Counter(chunks(work.k, work.batch) + chunks(work.test_size, work.batch)).items():
        A["evaluation"].units.append((units.unit("authors_eval", b), n * n_eval, f"eval batch {b}"))
    for b, n in Counter(chunks(work.k, eval_chunk) + chunks(work.test_size, eval_chunk)).items():
        S["evaluation"].units.append((units.unit("stakes_eval", b), n * n_eval, f"eval chunk {b}"))
    for b, n in Counter(chunks(work.test_size, eval_chunk)).items():
        S["evaluation"].units.append((units.unit("stakes_drift_orig", b), n, f"drift: original structure {b} (once)"))
    S["evaluation"].units.append((units.unit("stakes_eval_fixed", work.test_size), n_eval,
                                  "per evaluation: drift, finite check, syncs"))
    return out


def predict(work: wr.Work, assumptions: dict = ASSUMPTIONS, units: Optional[Units] = None,
            phases: Optional[dict] = None) -> dict:
    """Modelled seconds, kernels and FLOPs per phase for both recipes, and the ratios."""
    units = units or Units(anchor_dim=work.anchor_dim)
    phases = phases or plan(work, units)
    out: dict = {"recipes": {}}
    for recipe, by_phase in phases.items():
        rec = {}
        for p, phase in by_phase.items():
            t = gpu = cpu = flops = nbytes = 0.0
            kernels = syncs = 0
            rows = []
            scale = assumptions.get("stakes_elementwise_scale", 1.0) if recipe == "stakes" else 1.0
            for unit, n, label in phase.units:
                s = unit_seconds(unit, assumptions, scale)
                t += n * s["time_s"]
                gpu += n * s["gpu_s"]
                cpu += n * s["cpu_s"]
                flops += n * unit.flops
                nbytes += n * unit.bytes
                kernels += n * unit.kernels
                syncs += n * unit.syncs
                rows.append({"unit": label, "count": n, "kernels": unit.kernels, "flops": unit.flops,
                             "bytes": unit.bytes, "syncs": unit.syncs, "graph": unit.graph,
                             "gpu_ms": 1e3 * s["gpu_s"], "cpu_ms": 1e3 * s["cpu_s"], "time_ms": 1e3 * s["time_s"],
                             "bound": "launch (host)" if s["cpu_s"] > s["gpu_s"] else "GPU"})
            rec[p] = {"seconds": t, "gpu_s": gpu, "cpu_s": cpu, "flops": flops, "bytes": nbytes, "kernels": kernels,
                      "syncs": syncs, "units": rows}
        rec["whole"] = {"seconds": sum(v["seconds"] for v in rec.values())}
        out["recipes"][recipe] = rec
    a, s = out["recipes"]["authors"], out["recipes"]["stakes"]
    out["ratios"] = {p: a[p]["seconds"] / s[p]["seconds"] for p in (*wr.PHASES, "whole")}
    return out


def composition_check(work: wr.Work, *, model_builder: Optional[Callable[[], nn.Module]] = None,
                      image_shape=(3, 32, 32), seed: int = 0) -> dict:
    """The model's composition against the real code: both recipes run whole (real tensors, fp32, on
    the CPU, at ``work``'s size) under the op counter, and their FLOPs and kernels are compared with
    what :func:`plan` composes from the units for the same work (stakes' units in fp32 here, with
    ``cuda_graphs`` off). FLOPs should agree; kernels differ where the model counts a fused kernel
    and the CPU runs its eager reference, and by the per-batch bookkeeping the units leave out."""
    device = torch.device("cpu")
    inputs = wr.make_inputs(work, device, seed=seed, model_builder=model_builder, image_shape=image_shape)
    units = Units(model_builder, anchor_dim=work.anchor_dim, image_shape=image_shape, stakes_dtype=torch.float32)
    phases = plan(work, units, cuda_graphs=False)
    out = {}
    counters = {}
    # stakes on its reference path (backend="reference"), so that the counter sees its FLOPs even where the
    # Triton interpreter is on (the test suite): the work is the same, only the op implementations differ
    runs = {"authors": wr.authors_recipe, "stakes": functools.partial(wr.stakes_recipe, backend="reference")}
    for recipe, fn in runs.items():
        with OpCounter() as counters[recipe]:
            fn(inputs, work, device, seed)
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


SENSITIVITY = {
    "central": {},
    "fast host (launch 3 us)": {"launch_us_eager": 3.0},
    "slow host (launch 10 us)": {"launch_us_eager": 10.0},
    "very slow host (launch 20 us)": {"launch_us_eager": 20.0},
    "convolutions at the full 8192^3 rates": {"matmul_efficiency": 1.0},
    "convolutions at a third of them": {"matmul_efficiency": 1.0 / 3},
    "optimistic for the authors (launch 3 us, full rates)": {"launch_us_eager": 3.0, "matmul_efficiency": 1.0},
    "pessimistic for the authors (launch 10 us, a third)": {"launch_us_eager": 10.0, "matmul_efficiency": 1.0 / 3},
    "bandwidth at half the copy rate": {"bw_efficiency": 0.5},
    "WHAT-IF, not stakes' default: stakes' elementwise traffic and launches halved (a compiled model)":
        {"stakes_elementwise_scale": 0.5},
    "WHAT-IF, not stakes' default: stakes' elementwise traffic and launches a quarter": {"stakes_elementwise_scale": 0.25},
}


def _brief(work: wr.Work, pred: dict) -> dict:
    return {"work": {**wr.asdict(work), "expected": work.expected()}, "ratios": pred["ratios"],
            "seconds": {rec: {p: v["seconds"] for p, v in pred["recipes"][rec].items()} for rec in pred["recipes"]}}


def build_report(work: Optional[wr.Work] = None, assumptions: dict = ASSUMPTIONS, *, other_ks: Sequence[int] = (128,),
                 check: Optional[wr.Work] = None) -> dict:
    """The model at ``work`` (default: the issue's size), its sensitivity, the same prediction at
    the other ``other_ks`` (gpu_check.sh runs k = 128), and the composition check at ``check``'s size."""
    t0 = time.perf_counter()
    work = work or wr.full_work()
    units = Units(anchor_dim=work.anchor_dim)
    phases = plan(work, units)
    central = predict(work, assumptions, units, phases)
    sens = {}
    for name, change in SENSITIVITY.items():
        r = predict(work, {**assumptions, **change}, units, phases)
        sens[name] = {"change": change, **_brief(work, r)}
        del sens[name]["work"]
    sizes = [_brief(work, central)]
    for k in other_ks:
        other = wr.full_work(k)
        sizes.append(_brief(other, predict(other, assumptions, units)))
    from benchmarks import measure

    report = {
        "kind": "MODEL, not a measurement (no GPU was run): predicted seconds per phase on an H100",
        "metadata": {"torch": torch.__version__, "python": sys.version.split()[0],
                     "date": measure.run_metadata(torch.device("cpu"))["date"], "git_commit": measure.git_commit(),
                     "counted_on": "meta tensors at the real batch sizes, on a CPU"},
        "assumptions": dict(assumptions),
        "work": {**wr.asdict(work), "n_proxies": work.n_proxies, "steps_per_epoch": work.steps_per_epoch,
                 "expected": work.expected()},
        "params": units.n_params,
        "prediction": central,
        "sensitivity": sens,
        "predictions_by_size": sizes,
    }
    if check is not None:
        report["composition_check"] = {"work": wr.asdict(check), "note": COMPOSITION_NOTE,
                                       **composition_check(check)}
    report["metadata"]["seconds_to_compute"] = round(time.perf_counter() - t0, 1)
    return report


COMPOSITION_NOTE = ("both recipes run whole on the CPU (real tensors, fp32, CIFAR ResNet-18) at this reduced size "
                    "under the op counter, against the model's composition of its units for the same work (stakes "
                    "in fp32, no CUDA graphs): the FLOPs must agree; the CPU run has more kernels, because stakes' "
                    "fused kernels (PGD step, importance accumulation, masked update) run as their eager references "
                    "there, and both have one-off setup (model copies, optimiser and importance state) and per-batch "
                    "bookkeeping (random starts, shuffles, gathers) that the units leave out")
CHECK_WORK = wr.Work(k=4, repetitions=2, pgd_steps=2, steps=3, importance_samples=10, test_size=6, batch=4,
                     label="composition check (CPU): k = 4, R = 2, 2 PGD steps, 3 steps, 10 importance samples, "
                           "6 test images, batches of 4")


# ----------------------------------------------------------------------------- output


def markdown(report: dict) -> str:
    a = report["assumptions"]
    pred, w = report["prediction"], report["work"]
    A, S = pred["recipes"]["authors"], pred["recipes"]["stakes"]
    lines = [
        "### Whole run on an H100: MODEL, not a measurement",
        "",
        f"Work: k = {w['k']}, R = {w['repetitions']}, {w['pgd_steps']} PGD steps, "
        f"{w['expected']['importance_samples']:,} importance samples, {w['steps']} steps, "
        f"{w['expected']['evaluations']} evaluations of {w['k']} + {w['test_size']} images (CIFAR-10 ResNet-18). "
        f"Peaks {a['copy_tbps']} TB/s, bf16 {a['bf16_tflops']:.0f} / TF32 {a['tf32_tflops']:.0f} / fp32 "
        f"{a['fp32_tflops']:.0f} TFLOP/s at {a['matmul_efficiency']:.0%} for the model's convolutions, "
        f"{a['bw_efficiency']:.0%} of the bandwidth, ≥ {a['min_kernel_us']:g} µs a kernel, "
        f"{a['launch_us_eager']:g} µs host time a launch in eager ({a['launch_us_graph']:g} in a CUDA graph), "
        f"{a['sync_us']:g} µs a host sync.",
        "",
        "| phase | authors s (kernels) | stakes s (kernels) | modelled ratio |",
        "|---|---:|---:|---:|",
    ]
    for p in wr.PHASES:
        lines.append(f"| {p} | {A[p]['seconds']:.2f} ({A[p]['kernels']:,}) | {S[p]['seconds']:.2f} "
                     f"({S[p]['kernels']:,}) | {pred['ratios'][p]:.2f} |")
    lines.append(f"| **whole** | {A['whole']['seconds']:.2f} | {S['whole']['seconds']:.2f} | "
                 f"**{pred['ratios']['whole']:.2f}** |")
    lines += ["", "Sensitivity of the whole ratio: " + "; ".join(
        f"{n} {v['ratios']['whole']:.2f}" for n, v in report["sensitivity"].items()) + "."]
    for size in report["predictions_by_size"][1:]:
        sw, sec = size["work"], size["seconds"]
        lines += ["", f"At k = {sw['k']} (gpu_check.sh's size): authors {sec['authors']['whole']:.1f} s, stakes "
                      f"{sec['stakes']['whole']:.1f} s, ratio {size['ratios']['whole']:.2f} ("
                  + ", ".join(f"{p} {size['ratios'][p]:.2f}" for p in wr.PHASES) + ")."]
    check = report.get("composition_check")
    if check:
        lines += ["", "The " + check["work"]["label"] + ": FLOPs counted on the real code vs "
                  "modelled: " + "; ".join(f"{r} {check[r]['counted_flops'] / 1e9:.1f} vs {check[r]['modelled_flops'] / 1e9:.1f} "
                                           f"GFLOP" for r in ("authors", "stakes")) + "."]
    lines += ["", "Every time above is modelled, not measured."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_ratio_model",
                                     description="MODEL (not a measurement) of the whole-run ratio on an H100.")
    parser.add_argument("--k", type=int, default=256, help="forget images (default 256)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help=f"output JSON (default {DEFAULT_JSON})")
    parser.add_argument("--markdown", action="store_true", help="print only the Markdown table")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the composition check (both recipes run whole on the CPU at a tiny size, ~20 s)")
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
