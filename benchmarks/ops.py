"""Benchmark cases of the five ``fused`` ops: sizes, providers, passes, and their cost model.

Providers (the ``provider`` column):

* ``eager``   — the op with ``backend="reference"``: its readable PyTorch specification.
* ``compile`` — ``torch.compile`` of that same reference call (one compiled function per op, shared
  by every shape of the op, so after the second shape Dynamo compiles a dynamic-shape graph).
* ``fused``   — the op with ``backend="triton"``. CUDA only: the Triton CPU interpreter is a
  correctness tool and is never timed.
* update op peers: ``loop`` — the paper's reference: a Python loop over every tensor builds
  ½·λ·ΣI(ψ−ψ0)², autograd differentiates it, then a per-tensor SGD step; ``foreach+sgd_fused`` —
  the penalty gradient λ·I⊙(ψ−ψ0) + g with ``torch._foreach_*`` then ``torch.optim.SGD(fused=True)``
  (it does not compute the SR value, which the op returns: a conservative peer).
* importance op peer: ``foreach`` — ``torch._foreach_add_(I, torch._foreach_abs(g), alpha=c)``.

Regimes (the ``regime`` column): ``paper`` — the paper's sizes (N = 128 proxies a batch, D = 512,
K = 10/100/1000 classes; the CIFAR-10 ResNet-18 parameter list; a batch of 128 CIFAR images), timed
with CUDA graphs on a GPU because they are launch-bound; ``large`` — bandwidth-bound sizes (N = 65,536
rows on a GPU; ResNet-50 and ViT-B/16 parameter lists), timed with ``do_bench``. The CPU uses smaller
``large`` sizes; the ``shape`` column always states the exact size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from benchmarks import roofline
from fused._ops import OP_NAMES

OPS = OP_NAMES  # every op of the library, from its registry (fused._ops)
REGIMES = ("paper", "large")
PROVIDERS = ("eager", "compile", "fused", "loop", "foreach+sgd_fused", "foreach")

# Paper hyperparameters (METHOD.md §3, §6, §9).
LR, LAM = 0.005, 1.0
PGD_STEP, PGD_EPS = 0.1, 3.0
IMPORTANCE_WEIGHT = 128 / 50_000  # |B| / N_tot on CIFAR


@dataclass
class Variant:
    """One timed call: a zero-argument ``fn`` for one provider and pass, and the op's cost."""

    provider: str
    pass_: str
    fn: Callable[[], object]
    cost: roofline.Cost


@dataclass
class Case:
    """One op at one size and dtype; ``build(device, providers)`` allocates and returns variants."""

    op: str
    regime: str
    shape: str
    dtype: torch.dtype
    build: Callable[[torch.device, Sequence[str]], List[Variant]]
    cuda_graph: bool  # time with CUDA graphs on a GPU (launch-bound sizes)
    compile_ok: bool = True  # whether the compile provider runs for this case
    priority: int = 0  # 0 = the PERFORMANCE.md targets (run first); 1 = the rest


# ----------------------------------------------------------------------------- compiled references

_COMPILED: Dict[str, Callable] = {}


def compiled(name: str, fn: Callable) -> Callable:
    """One ``torch.compile`` of ``fn`` per op, kept for every shape of the op."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn)
    return _COMPILED[name]


def _similarity_ref(x, anchors):
    import fused

    return fused.anchor_similarity(x, anchors, backend="reference")


def _alignment_ref(x, x_ref, anchors):
    import fused

    return fused.structure_alignment_loss(x, x_ref, anchors, backend="reference")


def _importance_ref(importance, grads, weight):
    import fused

    fused.accumulate_importance(importance, grads, weight, backend="reference")


def _update_ref(params, grads, ref_params, importance, lr, lam):
    import fused

    return fused.masked_regularized_sgd_step(params, grads, ref_params, importance, lr=lr, lam=lam,
                                             backend="reference")


def _pgd_ref(x, x_orig, grad, step_size, eps):
    import fused

    return fused.l2_pgd_step(x, x_orig, grad, step_size=step_size, eps=eps, backend="reference")


# ----------------------------------------------------------------------------- parameter lists


@functools.lru_cache(maxsize=None)
def model_param_shapes(name: str) -> Tuple[Tuple[int, ...], ...]:
    """Parameter shapes of a torchvision model built on the meta device (no weights, no memory).

    ``resnet18_cifar10`` is ResNet-18 with a 10-class head, the paper's CIFAR-10 model (the 3×3
    CIFAR stem changes one tensor's shape; the parameter count is within 4 %).
    """
    import torchvision

    ctor, kwargs = {
        "resnet18_cifar10": (torchvision.models.resnet18, {"num_classes": 10}),
        "resnet50": (torchvision.models.resnet50, {}),
        "vit_b_16": (torchvision.models.vit_b_16, {}),
    }[name]
    with torch.device("meta"):
        model = ctor(weights=None, **kwargs)
    return tuple(tuple(p.shape) for p in model.parameters())


def _param_list(shapes, device, dtype, fill: str) -> List[torch.Tensor]:
    make = {"randn": torch.randn, "zeros": torch.zeros}[fill]
    return [make(s, device=device, dtype=dtype) for s in shapes]


def _model_label(name: str, shapes) -> str:
    P = sum(torch.Size(s).numel() for s in shapes)
    return f"{name} (P={P / 1e6:.1f}M, {len(shapes)} tensors)"


# ----------------------------------------------------------------------------- op builders


def _similarity_case(regime, N, D, K, dtype, cuda_graph) -> Case:
    def build(device, providers):
        import fused

        x = torch.randn(N, D, device=device, dtype=dtype)
        anchors = torch.nn.functional.normalize(torch.randn(K, D, device=device), dim=1).to(dtype)
        cost = roofline.anchor_similarity(N, D, K, dtype)
        fns = {
            "eager": lambda: _similarity_ref(x, anchors),
            "compile": lambda: compiled("similarity", _similarity_ref)(x, anchors),
            "fused": lambda: fused.anchor_similarity(x, anchors, backend="triton"),
        }
        return [Variant(p, "fwd", fns[p], cost) for p in providers if p in fns]

    return Case("similarity", regime, f"N={N},D={D},K={K}", dtype, build, cuda_graph)


def _alignment_case(regime, N, D, K, dtype, cuda_graph) -> Case:
    def build(device, providers):
        import fused

        x = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
        x_ref = torch.randn(N, D, device=device, dtype=dtype)
        anchors = torch.nn.functional.normalize(torch.randn(K, D, device=device), dim=1).to(dtype)
        impls = {
            "eager": _alignment_ref,
            "compile": lambda *a: compiled("alignment", _alignment_ref)(*a),
            "fused": lambda *a: fused.structure_alignment_loss(*a, backend="triton"),
        }
        variants = []
        for p in providers:
            if p not in impls:
                continue
            loss_fn = impls[p]

            def fwd(loss_fn=loss_fn):
                return loss_fn(x, x_ref, anchors)

            def fwd_bwd(loss_fn=loss_fn):
                x.grad = None
                loss_fn(x, x_ref, anchors).backward()

            def make_bwd(loss_fn=loss_fn):
                # The forward runs once, lazily (after the previous provider's tensors are gone);
                # each timed call back-propagates through the retained graph.
                state = {}

                def bwd():
                    if "loss" not in state:
                        state["loss"] = loss_fn(x, x_ref, anchors)
                    x.grad = None
                    state["loss"].backward(retain_graph=True)

                return bwd

            variants += [
                Variant(p, "fwd", fwd, roofline.alignment_loss(N, D, K, dtype, "fwd")),
                Variant(p, "bwd", make_bwd(), roofline.alignment_loss(N, D, K, dtype, "bwd")),
                Variant(p, "fwd+bwd", fwd_bwd, roofline.alignment_loss(N, D, K, dtype, "fwd+bwd")),
            ]
        return variants

    return Case("alignment", regime, f"N={N},D={D},K={K}", dtype, build, cuda_graph)


def _importance_case(regime, model, dtype) -> Case:
    shapes = model_param_shapes(model)
    P = sum(torch.Size(s).numel() for s in shapes)

    def build(device, providers):
        import fused

        importance = _param_list(shapes, device, dtype, "zeros")
        grads = _param_list(shapes, device, dtype, "randn")
        w = IMPORTANCE_WEIGHT
        fns = {
            "eager": lambda: _importance_ref(importance, grads, w),
            "compile": lambda: compiled("importance", _importance_ref)(importance, grads, w),
            "fused": lambda: fused.accumulate_importance(importance, grads, w, backend="triton"),
            "foreach": lambda: torch._foreach_add_(importance, torch._foreach_abs(grads), alpha=w),
        }
        cost = roofline.importance_accumulate(P, dtype)
        return [Variant(p, "step", fns[p], cost) for p in providers if p in fns]

    return Case("importance", regime, _model_label(model, shapes), dtype, build, cuda_graph=False)


def sr_loop_step(params: Sequence[torch.Tensor], grads, ref_params, importance, *, lr: float, lam: float):
    """The paper's reference update: autograd of ½·λ·ΣI(ψ−ψ0)² built tensor by tensor, then SGD.

    ``params`` must be leaves with ``requires_grad``; they are updated in place under ``no_grad``.
    """
    with torch.enable_grad():
        reg = sum(0.5 * (imp * (p - p0) ** 2).sum() for p, p0, imp in zip(params, ref_params, importance))
        reg_grads = torch.autograd.grad(lam * reg, params)
    with torch.no_grad():
        for p, g, rg in zip(params, grads, reg_grads):
            p.add_(g + rg, alpha=-lr)
    return reg.detach()


def _update_case(regime, model, dtype) -> Case:
    shapes = model_param_shapes(model)
    P = sum(torch.Size(s).numel() for s in shapes)

    def build(device, providers):
        import fused

        params = _param_list(shapes, device, dtype, "randn")
        grads = _param_list(shapes, device, dtype, "randn")
        ref_params = [p.clone() for p in params]
        importance = [t.abs_() for t in _param_list(shapes, device, dtype, "randn")]
        # Leaves sharing the parameters' storage, for the autograd-based peers.
        leaves = [p.detach().requires_grad_() for p in params]
        fns = {
            "eager": lambda: _update_ref(params, grads, ref_params, importance, LR, LAM),
            "compile": lambda: compiled("update", _update_ref)(params, grads, ref_params, importance, LR, LAM),
            "fused": lambda: fused.masked_regularized_sgd_step(params, grads, ref_params, importance, lr=LR,
                                                               lam=LAM, backend="triton"),
            "loop": lambda: sr_loop_step(leaves, grads, ref_params, importance, lr=LR, lam=LAM),
        }
        if "foreach+sgd_fused" in providers:
            opt = torch.optim.SGD(leaves, lr=LR, fused=True)

            def foreach_step():
                d = torch._foreach_sub(params, ref_params)
                torch._foreach_mul_(d, importance)
                torch._foreach_mul_(d, LAM)
                torch._foreach_add_(d, grads)  # d = g + λ·I⊙(ψ − ψ0)
                for leaf, gi in zip(leaves, d):
                    leaf.grad = gi
                opt.step()

            fns["foreach+sgd_fused"] = foreach_step
        cost = roofline.masked_sgd_step(P, dtype)
        return [Variant(p, "step", fns[p], cost) for p in providers if p in fns]

    return Case("update", regime, _model_label(model, shapes), dtype, build, cuda_graph=False)


def _pgd_case(regime, shape, dtype, cuda_graph) -> Case:
    M = torch.Size(shape).numel()

    def build(device, providers):
        import fused

        x_orig = torch.rand(shape, device=device, dtype=dtype)
        x = (x_orig + 0.01 * torch.randn_like(x_orig)).clamp_(0, 1)
        grad = torch.randn_like(x_orig)
        fns = {
            "eager": lambda: _pgd_ref(x, x_orig, grad, PGD_STEP, PGD_EPS),
            "compile": lambda: compiled("pgd", _pgd_ref)(x, x_orig, grad, PGD_STEP, PGD_EPS),
            "fused": lambda: fused.l2_pgd_step(x, x_orig, grad, step_size=PGD_STEP, eps=PGD_EPS, backend="triton"),
        }
        cost = roofline.pgd_step(M, dtype)
        return [Variant(p, "step", fns[p], cost) for p in providers if p in fns]

    return Case("pgd", regime, "B={},C={},H={},W={}".format(*shape), dtype, build, cuda_graph)


# ----------------------------------------------------------------------------- the case table


def make_cases(ops: Sequence[str], regimes: Sequence[str], device: torch.device, *, quick: bool) -> List[Case]:
    """Every case to run, in order. Sizes depend on the device and on ``quick``.

    GPU sizes are chosen so that the full run fits the 8-minute budget of gpu_check.sh; CPU sizes
    are scaled down (``--quick``: < ~2 minutes on 2 idle cores; no ResNet-50/ViT parameter lists).
    With ``quick``, the slow-to-build ``compile`` provider runs only for each op's first case.
    """
    gpu = device.type == "cuda"
    f32, bf16 = torch.float32, torch.bfloat16
    cases: List[Case] = []
    for op in ops:
        op_cases: List[Case] = []
        if op in ("similarity", "alignment"):
            make = _similarity_case if op == "similarity" else _alignment_case
            if "paper" in regimes:
                dtypes = (f32, bf16) if gpu else (f32,)
                for dtype in dtypes:
                    for K in (10, 100, 1000):
                        op_cases.append(make("paper", 128, 512, K, dtype, True))
            if "large" in regimes:
                if gpu:
                    sizes = [(65536, D, K) for D in (512, 768) for K in (64, 256, 1024)]
                    dtypes = (bf16,) if quick else (bf16, f32)
                else:
                    sizes = [(4096, 512, K) for K in (64, 256)] if quick else [
                        (16384, 512, K) for K in (64, 256, 1024)]
                    dtypes = (f32,)
                for dtype in dtypes:
                    for N, D, K in sizes:
                        op_cases.append(make("large", N, D, K, dtype, False))
        elif op in ("importance", "update"):
            make = _importance_case if op == "importance" else _update_case
            if "paper" in regimes:
                op_cases.append(make("paper", "resnet18_cifar10", f32))
            if "large" in regimes and (gpu or not quick):  # ResNet-18 (11M) is enough for a quick CPU run
                for m in ("resnet50", "vit_b_16"):
                    op_cases.append(make("large", m, f32))
        elif op == "pgd":
            if "paper" in regimes:
                op_cases.append(_pgd_case("paper", (128, 3, 32, 32), f32, True))
            if "large" in regimes:
                if gpu:
                    shapes = [(65536, 3, 32, 32), (1024, 3, 224, 224)]
                else:
                    shapes = [(1024, 3, 32, 32)] if quick else [(8192, 3, 32, 32), (64, 3, 224, 224)]
                for s in shapes:
                    op_cases.append(_pgd_case("large", s, f32, False))
        else:
            raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
        if quick:
            for c in op_cases[1:]:
                c.compile_ok = False
        for c in op_cases:
            c.priority = _priority(c)
        cases += op_cases
    return sorted(cases, key=lambda c: c.priority)  # stable: the given op order within a priority


def _priority(case: Case) -> int:
    """0 for the cases PERFORMANCE.md sets targets on, so a time-limited GPU run measures them first:
    alignment at paper size (fp32) and at scale (bf16), the update and importance steps, and the
    paper-size PGD step; 1 for the rest (similarity, other dtypes, large PGD)."""
    if case.op in ("update", "importance"):
        return 0
    if case.op == "alignment":
        want = torch.float32 if case.regime == "paper" else torch.bfloat16
        return 0 if case.dtype == want else 1
    if case.op == "pgd":
        return 0 if case.regime == "paper" else 1
    return 1


def providers_for(op: str, device: torch.device) -> Tuple[str, ...]:
    """The providers that apply to ``op`` on ``device`` (``fused`` needs a CUDA GPU)."""
    base = ["eager", "compile"]
    if op == "update":
        base += ["loop", "foreach+sgd_fused"]
    if op == "importance":
        base += ["foreach"]
    if device.type == "cuda":
        base.append("fused")
    return tuple(base)
