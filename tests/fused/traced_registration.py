"""Trace every op's GPU-side ``torch.library`` registration on a machine without a GPU.

Run as a script with ``TRITON_INTERPRET`` unset (``tests/fused/test_traced_registration.py`` does):
then ``fused`` registers its Triton paths as on a card (``torch.library.triton_op`` for the
similarity, alignment and PGD ops), and AOTAutograd / ``torch.compile`` trace the ops' bodies with
Fake and Functional tensors exactly as they would on the card. The kernels themselves cannot run
here, so :meth:`fused._launch.Launch.run` is replaced by a stub that fills each launch's written
tensors (``Launch.writes``) with a fixed pattern: everything around the kernels (argument
preparation, row padding, the anchor cache, output slicing, the autograd formulas) is exercised,
the kernels are not. Prints one JSON object: {case: "ok" | error text}.

Usage: ``python tests/fused/traced_registration.py [--only NAME,...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # the GPU registration: decided when fused is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

import fused._launch as launch_mod  # noqa: E402

D_VALUES = (32, 512, 768)
RUNS = {"launches": 0, "devices": set()}


def _stub_run(self, wrap: bool = False) -> None:
    """Stands in for a kernel: writes a fixed pattern into the launch's outputs."""
    for i in self.writes:
        t = self.args[i]
        if t.numel():
            t.copy_(torch.linspace(-1.0, 1.0, t.numel(), device=t.device).reshape(t.shape).to(t.dtype))
    RUNS["launches"] += 1
    RUNS["devices"].add(str(self.device))


launch_mod.Launch.run = _stub_run

import fused  # noqa: E402
import fused.alignment as alignment_mod  # noqa: E402
import fused.importance  # noqa: E402,F401  (registers fused::accumulate_importance)
import fused.pgd  # noqa: E402,F401  (registers fused::l2_pgd_step)
import fused.update  # noqa: E402,F401  (registers fused::masked_regularized_sgd_step)
from fused.alignment import _structure_alignment_triton  # noqa: E402
from fused.similarity import _anchor_similarity_triton  # noqa: E402


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=(
        "test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic"))


def _compiled_equals_eager(fn, *inputs, grad: bool = True):
    """torch.compile(fullgraph=True) through AOTAutograd gives the eager values and gradients."""
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out = {}
    for name, f in (("eager", fn), ("compiled", compiled)):
        xs = [t.clone().requires_grad_(grad and t.is_floating_point()) for t in inputs]
        value = f(*xs)
        if grad:
            value.backward()
            out[name] = (value.detach(), [t.grad for t in xs])
        else:
            out[name] = value
    torch.testing.assert_close(out["compiled"], out["eager"])
    torch._dynamo.reset()


def cases():
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    for D in D_VALUES:
        x, anchors = randn(5, D), randn(7, D)

        def sim_opcheck(x=x, anchors=anchors):
            _opcheck(_anchor_similarity_triton, (x.clone().requires_grad_(), anchors.clone().requires_grad_()))

        def sim_compile(x=x, anchors=anchors):
            _compiled_equals_eager(lambda a: fused.anchor_similarity(a, anchors).square().sum(), x)

        yield f"similarity.opcheck.D{D}", sim_opcheck
        yield f"similarity.compile.D{D}", sim_compile
        for path, K in (("anchors", 7), ("gram", 150)):
            x_ref, a = randn(5, D), randn(K, D)

            def align_opcheck(x=x, x_ref=x_ref, a=a, path=path):
                alignment_mod._FORCE_PATH = path
                try:
                    _opcheck(_structure_alignment_triton,
                             (x.clone().requires_grad_(), x_ref.clone().requires_grad_(), a, True, True))
                    _opcheck(_structure_alignment_triton, (x, x_ref, a, False, False))
                finally:
                    alignment_mod._FORCE_PATH = None

            def align_compile(x=x, x_ref=x_ref, a=a, path=path):
                alignment_mod._FORCE_PATH = path
                try:
                    _compiled_equals_eager(
                        lambda v: fused.structure_alignment_loss(v, x_ref, a) + 0.1 * v.square().mean(), x)
                finally:
                    alignment_mod._FORCE_PATH = None

            yield f"alignment.{path}.opcheck.D{D}", align_opcheck
            yield f"alignment.{path}.compile.D{D}", align_compile

        x0 = torch.rand(3, D, generator=gen)
        xa, g = (x0 + 0.1 * randn(3, D)).clamp(0, 1), randn(3, D)

        def pgd_opcheck(xa=xa, x0=x0, g=g):
            _opcheck(torch.ops.fused.l2_pgd_step.default,
                     (xa, x0, g, torch.empty_like(xa), None, 0.1, 0.5, -1.0, 0.0, 1.0, True))

        def pgd_compile(xa=xa, x0=x0, g=g):
            _compiled_equals_eager(lambda a, b, c: fused.l2_pgd_step(a, b, c, step_size=0.1, eps=0.5),
                                   xa, x0, g, grad=False)

        yield f"pgd.opcheck.D{D}", pgd_opcheck
        yield f"pgd.compile.D{D}", pgd_compile

        shapes = [(D,), (3, D), (D, 2)]

        def update_opcheck(shapes=shapes):
            p = [randn(*s) for s in shapes]
            op = torch.ops.fused.masked_regularized_sgd_step.default
            _opcheck(op, (p, [randn(*s) for s in shapes], [t.clone() for t in p],
                          [randn(*s).abs() for s in shapes], [torch.zeros(s) for s in shapes],
                          [None] * len(shapes), 0.1, 1.0, 0.9, 0.0, False))

        def importance_opcheck(shapes=shapes):
            op = torch.ops.fused.accumulate_importance.default
            _opcheck(op, ([torch.zeros(s) for s in shapes], [randn(*s) for s in shapes], 0.5))

        yield f"update.opcheck.D{D}", update_opcheck
        yield f"importance.opcheck.D{D}", importance_opcheck


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated case-name prefixes")
    args = parser.parse_args(argv)
    prefixes = [p for p in args.only.split(",") if p]
    results = {}
    for name, fn in cases():
        if prefixes and not any(name.startswith(p) for p in prefixes):
            continue
        try:
            fn()
            results[name] = "ok"
        except Exception as exc:  # reported, not raised: every case runs
            results[name] = f"{type(exc).__name__}: {exc}"[:2000] + "\n" + traceback.format_exc(limit=-3)[-1500:]
    from torch._library.triton import triton_ops_to_kernels

    results["_triton_ops"] = sorted(name for name in triton_ops_to_kernels if name.startswith("fused::"))
    results["_stub_launches"] = RUNS["launches"]
    results["_launch_devices"] = sorted(RUNS["devices"])
    results["_anchor_cache_traced"] = any(
        launch_mod.is_traced(v[2]) for v in alignment_mod._ANCHOR_CACHE.values())
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
