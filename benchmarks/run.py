"""``python -m benchmarks run``: time every case, write results.json / results.csv after each case.

Every row ends with a ``status``: ``ok``, ``error: ...`` (the case or provider raised, or its module
failed to import), ``skipped: ...`` (a time limit), or ``not available: ...`` (an op whose module does
not exist). ``python -m benchmarks run`` exits with status 1 when any row is an error, so a failure on
a GPU is never just a line in a table. A row whose CUDA-graph capture failed and fell back to the
event timer keeps the reason in its ``note`` (see :func:`benchmarks.measure.time_cuda`).

Time limits: ``max_minutes`` is the budget of the op cases, counted from after the end-to-end rows
(which run first and are never cut); ``deadline_minutes`` bounds the whole run, end-to-end rows
included. Either way a case is never interrupted: the limits only stop new cases from starting.
"""

from __future__ import annotations

import gc
import importlib.util
import time
from typing import Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from benchmarks import measure, ops, report, roofline
from fused._ops import REGISTRY

OP_MODULES = {op.name: op.module for op in REGISTRY}   # from the op registry: no op listed here
FUSED_ON_CPU = ("fused provider not run: fused (Triton) timings need a CUDA GPU; the Triton CPU interpreter "
                "is a correctness tool and is never timed")


default_out_dir = measure.default_out_dir   # outside the source tree (see measure.results_root)


def _op_available(op: str) -> Optional[str]:
    """None when the op's module imports, else the status of its rows: ``not available: ...`` when
    the module does not exist, ``error: ...`` when it exists and fails to import (a bug, not a gap)."""
    name = OP_MODULES[op]
    try:
        if importlib.util.find_spec(name) is None:
            return f"not available: {name} does not exist yet"
        importlib.import_module(name)
    except Exception as exc:  # a module that fails to import is reported (and fails the run), not fatal here
        return f"error: {name} failed to import ({type(exc).__name__}: {exc})"[:300]
    return None


STATUS_KINDS = ("ok", "error", "skipped", "not available")


def status_kind(row: Dict[str, object]) -> str:
    """``ok``, ``error``, ``skipped`` or ``not available``; a missing or unknown status is an error."""
    status = str(row.get("status") or "")
    for kind in STATUS_KINDS:
        if status == kind or status.startswith(kind + ":"):
            return kind
    return "error"


def is_error(row: Dict[str, object]) -> bool:
    return status_kind(row) == "error"


def is_fallback(row: Dict[str, object]) -> bool:
    return str(row.get("note") or "").startswith("cudagraph capture failed")


def tally(rows: Sequence[Dict[str, object]]) -> str:
    """One line: how many rows are ok, errors, skipped, not available, and CUDA-graph fallbacks."""
    counts = {k: 0 for k in STATUS_KINDS}
    for r in rows:
        counts[status_kind(r)] += 1
    fallbacks = sum(1 for r in rows if is_fallback(r))
    return (f"{len(rows)} rows: {counts['ok']} ok, {counts['error']} errors, {counts['skipped']} skipped, "
            f"{counts['not available']} not available, {fallbacks} CUDA-graph fallbacks")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def machine_ceilings(device: torch.device, quick: bool) -> Dict[str, object]:
    """Copy bandwidth and matmul rates measured now, on this device (the roofline's ceilings)."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32,)
    return {
        "copy_gbps": measure.copy_bandwidth_gbps(device, quick=quick),
        "matmul_tflops": {str(d).replace("torch.", ""): measure.matmul_tflops(device, d, quick=quick) for d in dtypes},
    }


def measure_variant(case: ops.Case, variant: ops.Variant, device: torch.device, ceilings: Dict[str, object],
                    quick: bool) -> Dict[str, object]:
    """Time one variant, measure its peak memory and place it on the roofline."""
    dtype_name = str(case.dtype).replace("torch.", "")
    row: Dict[str, object] = {
        "op": case.op, "regime": case.regime, "shape": case.shape, "dtype": dtype_name,
        "provider": variant.provider, "pass": variant.pass_, "bytes": variant.cost.bytes,
        "flops": variant.cost.flops, "min_mem_mb": variant.cost.min_mem_bytes / 2**20,
    }
    try:
        timing = measure.time_call(variant.fn, device, cuda_graph=case.cuda_graph, quick=quick)
        row.update({k: timing[k] for k in ("median_ms", "p20_ms", "p80_ms", "timer")})
        if timing.get("fallback"):  # kept in the row: a fallback is never silent
            row["note"] = timing["fallback"]
        row.update(measure.peak_memory_mb(variant.fn, device))
    except Exception as exc:  # one failing provider must not stop the run
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        row["status"] = f"error: {type(exc).__name__}: {msg[:200]}"
        return row
    t_s = row["median_ms"] * 1e-3
    rate = ceilings["matmul_tflops"].get(dtype_name) or ceilings["matmul_tflops"].get("float32")
    roof = roofline.roofline_ms(variant.cost, ceilings["copy_gbps"], rate)
    row.update({
        "gbps": variant.cost.bytes / t_s / 1e9,
        "tflops": variant.cost.flops / t_s / 1e12,
        "roofline_ms": roof,
        "roofline_frac": roof / row["median_ms"],
        "bound": roofline.bound(variant.cost, ceilings["copy_gbps"], rate),
        "status": "ok",
    })
    return row


def add_speedups(rows: List[Dict[str, object]]) -> None:
    """speedup_vs_eager = eager median / provider median, within one (op, regime, shape, dtype, pass)."""
    key = lambda r: tuple(r.get(k) for k in ("op", "regime", "shape", "dtype", "pass"))  # noqa: E731
    eager = {key(r): r["median_ms"] for r in rows if r.get("provider") == "eager" and r.get("status") == "ok"}
    for r in rows:
        base = eager.get(key(r))
        if base and r.get("status") == "ok" and r.get("median_ms"):
            r["speedup_vs_eager"] = base / r["median_ms"]


def print_summary(rows: Sequence[Dict[str, object]]) -> None:
    header = f"{'op':<16} {'regime':<6} {'shape':<38} {'dtype':<8} {'provider':<18} {'pass':<8} " \
             f"{'median_ms':>10} {'peak_MB':>9} {'roof%':>6} {'x eager':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if r.get("status") != "ok":
            print(f"{r['op']:<16} {str(r.get('regime') or ''):<6} {str(r.get('shape') or '')[:38]:<38} "
                  f"{str(r.get('dtype') or ''):<8} {str(r.get('provider') or ''):<18} {str(r.get('pass') or ''):<8} "
                  f"{r.get('status')}")
            continue
        frac = r.get("roofline_frac")
        sp = r.get("speedup_vs_eager")
        mem = r.get("peak_mem_mb")
        print(f"{r['op']:<16} {r['regime']:<6} {str(r['shape'])[:38]:<38} {str(r['dtype']):<8} {r['provider']:<18} "
              f"{r['pass']:<8} {r['median_ms']:>10.4g} {'' if mem is None else f'{mem:9.1f}':>9} "
              f"{'' if frac is None else f'{100 * frac:6.1f}':>6} {'' if sp is None else f'{sp:8.2f}':>8}"
              + (f"  [{r['note']}]" if is_fallback(r) else ""))


def run(ops_: Sequence[str], regimes: Sequence[str], out_dir: Optional[str], *, quick: bool,
        providers: Optional[Sequence[str]] = None, e2e: bool = True, max_minutes: Optional[float] = None,
        deadline_minutes: Optional[float] = None) -> str:
    """Run the selected cases (and the end-to-end runs) and return the output folder.

    ``max_minutes``: no op case starts once this much time has passed since the end-to-end rows
    ended (they run first). ``deadline_minutes``: no op case starts once this much time has passed
    since the start of the run. Cases not started are kept as ``skipped`` rows.
    """
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from fused._dispatch import interpreter_enabled

    if device.type == "cuda" and interpreter_enabled():
        raise SystemExit("TRITON_INTERPRET is set on a CUDA machine: the fused timings would be interpreter "
                         "timings. Unset it and rerun.")
    if device.type == "cpu":
        print(FUSED_ON_CPU + ". Running eager and compile (and the memory comparison) only.")
    # One compiled function per op serves every shape; allow the recompiles instead of a silent
    # fallback to eager when the default limit (8) is reached.
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = 64
    dynamo_config.accumulated_recompile_limit = 4096

    out_dir = out_dir or default_out_dir(device)
    print(f"results go to {out_dir}")
    metadata = measure.run_metadata(device)
    metadata.update(machine_ceilings(device, quick))
    metadata.update({
        "quick": quick,
        "ops": list(ops_),
        "regimes": list(regimes),
        "fused_provider": "run (backend='triton')" if device.type == "cuda" else FUSED_ON_CPU,
    })
    print(f"device: {metadata['device']}; copy bandwidth {metadata['copy_gbps']:.1f} GB/s; matmul "
          + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in metadata["matmul_tflops"].items()))

    rows: List[Dict[str, object]] = []
    cases = ops.make_cases(ops_, regimes, device, quick=quick)
    missing: Dict[str, Optional[str]] = {}
    if e2e:  # first: bounded in time, and it must not be the part a time limit cuts off
        from benchmarks import e2e as e2e_mod

        print("end to end: proxy generation and StructGuard steps ...")
        rows += e2e_mod.run_e2e(device, quick=quick)
        report.write_results(out_dir, metadata, rows)
    ops_start = time.perf_counter()  # the op-case budget starts here, after the end-to-end rows
    metadata["e2e_s"] = ops_start - start
    bar = tqdm(total=len(cases), desc="benchmarks", unit="case")
    for case in cases:
        bar.set_postfix_str(f"{case.op} {case.shape} {str(case.dtype).replace('torch.', '')}"[:60])
        bar.update(1)
        base = {"op": case.op, "regime": case.regime, "shape": case.shape,
                "dtype": str(case.dtype).replace("torch.", "")}
        if case.op not in missing:
            missing[case.op] = _op_available(case.op)
        if missing[case.op]:
            rows.append({**base, "status": missing[case.op]})
            continue
        now = time.perf_counter()
        if max_minutes is not None and now - ops_start > 60 * max_minutes:
            rows.append({**base, "status": f"skipped: op-case budget of {max_minutes:g} min (--max-minutes, "
                                          f"counted after the end-to-end rows) spent"})
            continue
        if deadline_minutes is not None and now - start > 60 * deadline_minutes:
            rows.append({**base, "status": f"skipped: deadline of {deadline_minutes:g} min (--deadline-minutes, "
                                          f"end-to-end rows included) reached"})
            continue
        wanted = [p for p in ops.providers_for(case.op, device)
                  if (providers is None or p in providers) and (p != "compile" or case.compile_ok)]
        try:
            variants = case.build(device, wanted)
        except Exception as exc:
            rows.append({**base, "status": f"error: building inputs: {type(exc).__name__}: {exc}"[:300]})
            continue
        for v in variants:
            rows.append(measure_variant(case, v, device, metadata, quick))
        del variants
        _free(device)
        add_speedups(rows)
        report.write_results(out_dir, metadata, rows)
    bar.close()

    add_speedups(rows)
    metadata["wall_s"] = time.perf_counter() - start
    json_path, csv_path = report.write_results(out_dir, metadata, rows)
    print_summary(rows)
    print(f"wrote {json_path} and {csv_path} in {metadata['wall_s']:.0f} s")
    print(f"benchmarks: {tally(rows)}")
    if device.type == "cpu":
        print(FUSED_ON_CPU + ".")
    return out_dir
