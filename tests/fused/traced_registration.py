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

On a card (``benchmarks/gpu_check.sh``): ``python tests/fused/traced_registration.py --device cuda
--real-kernels`` runs the same cases with the real kernels (nothing stubbed) on CUDA tensors at
D = 512, ``torch.compile`` with both the ``aot_eager`` and the default ``inductor`` backend, and the
update and importance steps compiled too; it exits with status 1 when a case fails. The knobs that
mode sets (``--d``, ``--backends``, ``--compile-steps``, ``--strict``) can also be given alone,
e.g. to try the inductor backend over the stubbed kernels on a CPU.
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
CARD_D_VALUES = (512,)
RUNS = {"launches": 0, "devices": set()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated case-name prefixes")
    parser.add_argument("--device", default="cpu", help="where the cases' tensors live (cpu, cuda)")
    parser.add_argument("--real-kernels", action="store_true",
                        help="launch the real kernels (a card) instead of the stub; implies --d 512 "
                             "--backends aot_eager,inductor --compile-steps --strict unless given")
    parser.add_argument("--d", default=None, help="comma-separated feature sizes (default 32,512,768; 512 with "
                                                  "--real-kernels)")
    parser.add_argument("--backends", default=None,
                        help="torch.compile backends, comma-separated (default aot_eager; aot_eager,inductor with "
                             "--real-kernels)")
    parser.add_argument("--compile-steps", action="store_true", default=None,
                        help="also torch.compile the update and importance steps")
    parser.add_argument("--strict", action="store_true", default=None, help="exit 1 when a case fails")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    return parser


def _settings(argv=None) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    real = args.real_kernels
    args.d_values = tuple(int(d) for d in args.d.split(",")) if args.d else (CARD_D_VALUES if real else D_VALUES)
    args.backend_list = tuple(b for b in (args.backends or ("aot_eager,inductor" if real else "aot_eager"))
                              .split(",") if b)
    args.compile_steps = real if args.compile_steps is None else args.compile_steps
    args.strict = real if args.strict is None else args.strict
    return args


# The stub is installed before fused is imported unless this process runs the real kernels.
_REAL_KERNELS = __name__ == "__main__" and "--real-kernels" in sys.argv[1:]


def _stub_run(self, wrap: bool = False) -> None:
    """Stands in for a kernel: writes a fixed pattern into the launch's outputs."""
    for i in self.writes:
        t = self.args[i]
        if t.numel():
            t.copy_(torch.linspace(-1.0, 1.0, t.numel(), device=t.device).reshape(t.shape).to(t.dtype))
    RUNS["launches"] += 1
    RUNS["devices"].add(str(self.device))


_real_run = launch_mod.Launch.run


def _counting_run(self, wrap: bool = False):
    """The real launch, counted (which devices the kernels ran on)."""
    RUNS["launches"] += 1
    RUNS["devices"].add(str(self.device))
    return _real_run(self, wrap)


launch_mod.Launch.run = _counting_run if _REAL_KERNELS else _stub_run

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


BACKENDS = ("aot_eager",)  # set by main()
# Real kernels: eager and compiled calls may differ by rounding (another reduction order in the code
# inductor generates around the op, atomics); the stubbed kernels must agree to torch's defaults.
TOLERANCE = {}


def _compiled_equals_eager(fn, *inputs, grad: bool = True):
    """torch.compile(fullgraph=True) through AOTAutograd gives the eager values and gradients."""
    for backend in BACKENDS:
        compiled = torch.compile(fn, backend=backend, fullgraph=True)
        out = {}
        for name, f in (("eager", fn), ("compiled", compiled)):
            xs = [t.clone().requires_grad_(grad and t.is_floating_point()) for t in inputs]
            value = f(*xs)
            if grad:
                value.backward()
                out[name] = (value.detach(), [t.grad for t in xs])
            else:
                out[name] = value
        torch.testing.assert_close(out["compiled"], out["eager"], **TOLERANCE,
                                   msg=lambda m, backend=backend: f"backend={backend}: {m}")
        torch._dynamo.reset()


def _compiled_step_equals_eager(step, lists):
    """torch.compile(fullgraph=True) of an in-place multi-tensor step (update, importance) leaves the
    same tensors and returns the same value as the eager call, from identical copies."""
    for backend in BACKENDS:
        compiled = torch.compile(step, backend=backend, fullgraph=True)
        out = {}
        for name, f in (("eager", step), ("compiled", compiled)):
            copies = [[t.clone() for t in ts] for ts in lists]
            value = f(*copies)
            out[name] = (value, copies)
        torch.testing.assert_close(out["compiled"], out["eager"], **TOLERANCE,
                                   msg=lambda m, backend=backend: f"backend={backend}: {m}")
        torch._dynamo.reset()


def cases(device="cpu", d_values=D_VALUES, compile_steps=False):
    gen = torch.Generator().manual_seed(0)
    device = torch.device(device)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    def rand(*shape):
        return torch.rand(*shape, generator=gen).to(device)

    for D in d_values:
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

        x0 = rand(3, D)
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
                          [randn(*s).abs() for s in shapes], [torch.zeros(s, device=device) for s in shapes],
                          [None] * len(shapes), 0.1, 1.0, 0.9, 0.0, False))

        def importance_opcheck(shapes=shapes):
            op = torch.ops.fused.accumulate_importance.default
            _opcheck(op, ([torch.zeros(s, device=device) for s in shapes], [randn(*s) for s in shapes], 0.5))

        yield f"update.opcheck.D{D}", update_opcheck
        yield f"importance.opcheck.D{D}", importance_opcheck

        if not compile_steps:
            continue

        def update_compile(shapes=shapes):
            p = [randn(*s) for s in shapes]
            lists = (p, [randn(*s) for s in shapes], [t + 0.1 * randn(*t.shape) for t in p],
                     [randn(*s).abs() for s in shapes])

            def step(params, grads, refs, imps):
                return fused.masked_regularized_sgd_step(params, grads, refs, imps, lr=0.1, lam=1.0)

            _compiled_step_equals_eager(step, lists)

        def importance_compile(shapes=shapes):
            lists = ([randn(*s).abs() for s in shapes], [randn(*s) for s in shapes])

            def step(importance, grads):
                fused.accumulate_importance(importance, grads, 0.5)
                return importance[0].sum()

            _compiled_step_equals_eager(step, lists)

        yield f"update.compile.D{D}", update_compile
        yield f"importance.compile.D{D}", importance_compile


def main(argv=None) -> int:
    global BACKENDS, TOLERANCE
    args = _settings(argv)
    if args.real_kernels != _REAL_KERNELS:
        raise SystemExit("traced_registration.py: --real-kernels must be on the command line of the script itself "
                         "(the kernel stub is chosen before fused is imported)")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("traced_registration.py: --device cuda but torch sees no CUDA device")
    BACKENDS = args.backend_list
    if args.real_kernels:
        TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
    prefixes = [p for p in args.only.split(",") if p]
    results = {}
    for name, fn in cases(args.device, args.d_values, args.compile_steps):
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
    results["_settings"] = {"device": args.device, "real_kernels": args.real_kernels, "d": list(args.d_values),
                            "backends": list(BACKENDS), "compile_steps": args.compile_steps}
    print(json.dumps(results))
    failed = sorted(k for k, v in results.items() if not k.startswith("_") and v != "ok")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.strict:
        ran = len([k for k in results if not k.startswith("_")])
        if args.real_kernels and not RUNS["launches"]:
            failed.append("_no_kernel_launched")
        print(f"VERDICT: {ran - len(failed)} of {ran} cases ok on {args.device} "
              f"(backends {','.join(BACKENDS)}, {RUNS['launches']} launches on {sorted(RUNS['devices'])})"
              + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
