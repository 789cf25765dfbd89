"""``python -m fused validate``: every fused op, on every backend here, against an fp64 oracle.

For each case (an op, a variant, a shape chosen not to be a multiple of any block size: each op
module declares its own, ``DECLARATION.validation``, and the op registry ``fused._ops`` lists the
ops) and each dtype (fp32, fp16, and bf16 on CUDA only), the inputs are drawn once in float64 and rounded to the
dtype; then

* the truth is the op's PyTorch reference evaluated in float64 on those rounded inputs,
* the baseline is the same reference evaluated in the dtype itself ("torch same-dtype"),
* each backend's result passes when (PERFORMANCE.md's rule)

      max |ours − truth| ≤ max |torch same-dtype − truth| + tol,  tol = fp32 5e-4, fp16 1e-3, bf16 1e-2

  and it is finite. An op that cannot be imported or raises counts as a failure.

Each printed row shows the rule it is judged by with its numbers, ``error <= torch's error + tol =
bound`` (``>`` when it fails): an error above ``tol`` passes when torch's own same-dtype error leaves
room for it, and the row says so. The JSON rows carry ``bound`` and ``rule`` too.

In-place ops are run on fresh copies, and every output they write (updated parameters, momentum
buffers, accumulated importance, the returned value) is compared. ``main`` returns 1 if any row
fails, so the command can gate CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import math
import platform
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fused._dispatch import BACKENDS, interpreter_enabled, triton_available_for
from fused._ops import REGISTRY, declaration

TOLERANCE = {torch.float32: 5e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclasses.dataclass
class Case:
    """One op variant on one shape (declared by the op module: ``DECLARATION.validation``).

    ``op`` labels the row and starts with the op's public function name; ``make(gen)`` draws
    float64 CPU inputs (a dict; tensors, lists of tensors, or other values). ``run(fn, inputs,
    backend)`` calls the op ``fn`` on inputs already cast to a dtype and moved to the device (fresh
    copies, so in-place ops may write them) and returns the tensors to compare.
    """

    op: str
    shape: str
    make: Callable[[torch.Generator], dict]
    run: Callable[[Callable, dict, str], List[torch.Tensor]]
    # Inputs that keep their own dtype (e.g. masks) are not cast.
    keep_dtype: Sequence[str] = ()


@dataclasses.dataclass
class Row:
    op: str
    shape: str
    dtype: str
    backend: str
    error: Optional[float]
    torch_error: Optional[float]
    tol: float
    status: str  # "pass", "FAIL", or "unavailable (...)" / "error (...)" (failures too)

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    @property
    def bound(self) -> Optional[float]:
        """What ``error`` is compared with: torch's own same-dtype error + tol (None if unknown)."""
        return None if self.torch_error is None else self.torch_error + self.tol

    @property
    def rule(self) -> str:
        """The comparison this row was judged by, with its numbers, e.g.
        ``1.46e-03 <= 9.77e-04 + 1e-03 = 1.98e-03`` (``>`` when it fails): the error, torch's own
        same-dtype error, the dtype's tolerance and their sum, the bound."""
        if self.bound is None:
            return "-"
        bound = f"{_num(self.torch_error)} + {self.tol:.0e} = {_num(self.bound)}"
        if self.error is None:
            return f"bound {bound}"
        within = math.isfinite(self.error) and self.error <= self.bound
        return f"{_num(self.error)} {'<=' if within else '>'} {bound}"


def _num(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2e}"


def rule_text() -> str:
    """The rule every row is judged by, with the tolerances in force (printed above the table)."""
    return ("a row passes when max |ours - fp64 truth| <= max |torch same-dtype - fp64 truth| + tol "
            "(PERFORMANCE.md; tol: " + ", ".join(f"{DTYPE_NAMES[d]} {t:.0e}" for d, t in TOLERANCE.items())
            + ") and is finite; the rule column shows: error <= torch's error + tol = bound")


# ----------------------------------------------------------------------------- the cases
# Each op module declares its cases (``DECLARATION.validation``, fused._ops); these are the
# helpers they draw their inputs with.


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def rand(gen, *shape):
    return torch.rand(*shape, generator=gen, dtype=torch.float64)


def unit_rows(t):
    return t / t.norm(dim=1, keepdim=True)


def shapes_label(shapes):
    return "+".join("x".join(map(str, s)) for s in shapes)


# Parameter shapes for the per-parameter ops: odd sizes, a 4-D conv weight, a bias, a scalar-like.
PARAM_SHAPES_A = [(33, 7), (129,), (5, 3, 3, 3), (1,)]
PARAM_SHAPES_B = [(70, 19), (257,), (6, 5, 3, 3)]

# The public function names of the ops (``--op``), from the op registry.
OP_NAMES = tuple(entry.function for entry in REGISTRY)


def build_cases(quick: bool = False, ops: Optional[Sequence[str]] = None):
    """(registry entry, its cases or the exception that stopped its module from declaring them)
    for every op (or those whose function is in ``ops``); ``quick`` keeps one shape per variant."""
    out = []
    for entry in REGISTRY:
        if ops and entry.function not in ops:
            continue
        try:
            cases = declaration(entry.name).validation(quick)
        except Exception as exc:  # a module that cannot be imported is a failure, reported per row
            cases = exc
        out.append((entry, cases))
    return out


# ----------------------------------------------------------------------------- running


def _cast(value, dtype, device, keep=False):
    """Fresh copy of an input (nested lists too): floating tensors to ``dtype`` unless ``keep``."""
    if isinstance(value, torch.Tensor):
        if keep or not value.is_floating_point():
            return value.to(device=device, copy=True)
        return value.to(device=device, dtype=dtype, copy=True)
    if isinstance(value, (list, tuple)):
        return [_cast(v, dtype, device, keep) for v in value]
    return value


def _max_abs_error(outputs: Sequence[torch.Tensor], truth: Sequence[torch.Tensor]) -> float:
    if len(outputs) != len(truth):
        raise RuntimeError(f"the op returned {len(outputs)} outputs, the reference {len(truth)}")
    err = 0.0
    for o, t in zip(outputs, truth):
        if o.shape != t.shape:
            raise RuntimeError(f"output shape {tuple(o.shape)} differs from the reference's {tuple(t.shape)}")
        if o.numel():
            d = (o.detach().double() - t.detach().double()).abs().max().item()
            err = max(err, d if math.isfinite(d) else math.inf)
    return err


def _short(exc: BaseException) -> str:
    kind = "ImportError" if isinstance(exc, ImportError) else type(exc).__name__  # incl. ModuleNotFoundError
    text = f"{kind}: {exc}".splitlines()[0]
    return text if len(text) <= 90 else text[:87] + "..."


def available_backends(device: torch.device) -> List[str]:
    """Backends that can run on ``device`` here: the reference always, Triton where it can."""
    return ["reference"] + (["triton"] if triton_available_for(device) else [])


def validation_dtypes(device: torch.device) -> List[torch.dtype]:
    """fp32 and fp16 everywhere; bf16 on CUDA only (the interpreter's bf16 is wrong)."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


def run_validation(
    *,
    quick: bool = False,
    backends: Optional[Sequence[str]] = None,
    device: Optional[torch.device] = None,
    ops: Optional[Sequence[str]] = None,
    progress: bool = False,
    seed: int = 0,
) -> List[Row]:
    """Run every case on every requested backend and dtype; one :class:`Row` per result.

    ``ops`` restricts the run to ops of those public names (e.g. ``["l2_pgd_step"]``).
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = list(backends) if backends else available_backends(device)
    dtypes = validation_dtypes(device)
    if ops:
        unknown = sorted(set(ops) - set(OP_NAMES))
        if unknown:
            raise ValueError(f"ops must be names among {OP_NAMES}, got {unknown}")
    rows: List[Row] = []
    work = []
    for entry, cases in build_cases(quick, ops):
        if isinstance(cases, Exception):  # its module did not import: every row of the op fails
            rows += [Row(entry.function, "-", DTYPE_NAMES[dt], b, None, None, TOLERANCE[dt],
                         f"unavailable ({_short(cases)})") for dt in dtypes for b in backends]
            continue
        work += [(entry, c, dt) for c in cases for dt in dtypes]
    if progress:
        from tqdm import tqdm

        work = tqdm(work, desc="validate", unit="case", file=sys.stderr)
    for entry, case, dtype in work:
        dname, tol = DTYPE_NAMES[dtype], TOLERANCE[dtype]
        try:  # looked up on every case: a patched function (tests) is the one validated
            fn = getattr(importlib.import_module(entry.module), entry.function)
        except Exception as exc:  # a missing module is a failure, reported per row
            rows += [Row(case.op, case.shape, dname, b, None, None, tol, f"unavailable ({_short(exc)})") for b in backends]
            continue

        gen = torch.Generator().manual_seed(seed)
        master = case.make(gen)
        # Round the inputs to the dtype once; truth and baseline then see the same numbers.
        rounded = {k: _cast(v, dtype, "cpu", keep=k in case.keep_dtype) for k, v in master.items()}

        def inputs(as_dtype):
            return {k: _cast(v, as_dtype, device, keep=k in case.keep_dtype) for k, v in rounded.items()}

        try:
            truth = case.run(fn, inputs(torch.float64), "reference")
            torch_error = _max_abs_error(case.run(fn, inputs(dtype), "reference"), truth)
        except Exception as exc:
            rows += [Row(case.op, case.shape, dname, b, None, None, tol, f"error in reference ({_short(exc)})")
                     for b in backends]
            continue
        for backend in backends:
            try:
                err = _max_abs_error(case.run(fn, inputs(dtype), backend), truth)
            except Exception as exc:
                rows.append(Row(case.op, case.shape, dname, backend, None, torch_error, tol, f"error ({_short(exc)})"))
                continue
            ok = math.isfinite(err) and err <= torch_error + tol
            rows.append(Row(case.op, case.shape, dname, backend, err, torch_error, tol, "pass" if ok else "FAIL"))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table: op, shape, dtype, backend, then the rule each row is judged by (its max
    abs error against its bound, torch's own same-dtype error + tol, with ``<=`` or ``>``), status."""
    header = ("op", "shape", "dtype", "backend", "rule: max abs err vs torch err + tol = bound", "status")
    body = [(r.op, r.shape, r.dtype, r.backend, r.rule, r.status) for r in rows]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header) - 1)]
    lines = []
    for line in [header, *body]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) + "  " + line[-1])
        if line is header:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def _environment(device: torch.device) -> Dict[str, object]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "triton_interpreter": interpreter_enabled(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m fused validate", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape per op variant (a few seconds)")
    parser.add_argument("--backend", choices=BACKENDS, action="append",
                        help="validate only this backend (repeatable; default: every backend available here)")
    parser.add_argument("--op", choices=OP_NAMES, action="append",
                        help="validate only this op (repeatable; default: every op)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and the environment as JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None, *, note: Optional[str] = None) -> int:
    """Command-line entry point; returns the exit code (0 all pass, 1 a failure, 2 bad usage)."""
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = available_backends(device)
    if note:
        print(note)
    if "triton" not in available:
        print("note: the triton backend is not available here (no CUDA device and TRITON_INTERPRET is off), "
              "only the reference is validated")
    if args.backend:
        missing = [b for b in args.backend if b not in available]
        if missing:
            print(f"error: backend {missing[0]!r} is not available on this machine (available: {available})",
                  file=sys.stderr)
            return 2
    start = time.perf_counter()
    rows = run_validation(quick=args.quick, backends=args.backend, device=device, ops=args.op,
                          progress=not args.no_progress and sys.stderr.isatty(), seed=args.seed)
    elapsed = time.perf_counter() - start
    print(rule_text())
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    env = _environment(device)
    print(f"\n{len(rows) - len(failed)}/{len(rows)} passed in {elapsed:.1f} s on {env['device']} "
          f"(torch {env['torch']}, triton {env['triton']}, interpreter {'on' if env['triton_interpreter'] else 'off'})")
    if failed:
        print(f"{len(failed)} FAILED: " + ", ".join(sorted({f'{r.op} ({r.backend}, {r.dtype})' for r in failed})))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**env, "quick": args.quick, "seconds": elapsed, "passed": not failed,
                       "rows": [{**dataclasses.asdict(r), "bound": r.bound, "rule": r.rule} for r in rows]}, f,
                      indent=2)
    return 1 if failed else 0
