"""Timing, peak memory, the machine's own copy bandwidth and matmul rate, and run metadata.

Timers (the ``timer`` column of every row):

* ``cudagraph``: ``triton.testing.do_bench_cudagraph`` — the call is captured many times into one
  CUDA graph and replayed, so host launch overhead disappears (the paper-size, launch-bound regime).
* ``do_bench``: ``triton.testing.do_bench`` — events around each call, L2 flushed in between
  (the bandwidth regime, sizes several times the L2 cache).
* ``perf_counter``: CPU wall clock of single calls after warm-up.

Peak memory (the ``mem_method`` column) is the extra memory the call allocates above what was
already live before it (inputs, parameters, saved tensors of an earlier forward):

* ``cuda_max_allocated``: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before.
* ``cpu_profiler``: the CPU allocator's allocation/free events recorded by ``torch.profiler``
  (``profile_memory=True``), summed in time order; the maximum of the running sum is the peak. This
  sees every allocation of the c10 CPU allocator, including the buffers of torch.compile'd code
  (``tracemalloc`` sees none of them).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import time
from typing import Callable, Dict, List

import numpy as np
import torch

QUANTILES = (0.5, 0.2, 0.8)  # median, 20th, 80th percentile


# ----------------------------------------------------------------------------- timing


def time_cpu(fn: Callable[[], object], *, min_reps: int = 5, max_reps: int = 200, target_s: float = 0.3,
             warmup: int = 2) -> Dict[str, float]:
    """Median and 20/80 percentiles (ms) of ``fn()`` on the CPU, timed one call at a time."""
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - start < target_s):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    p50, p20, p80 = np.percentile(samples, [50, 20, 80])
    return {"median_ms": float(p50), "p20_ms": float(p20), "p80_ms": float(p80), "timer": "perf_counter",
            "min_ms": float(min(samples)), "reps": len(samples)}


def time_cuda(fn: Callable[[], object], *, cuda_graph: bool, rep_ms: int = 100) -> Dict[str, object]:
    """Median and 20/80 percentiles (ms) of ``fn()`` on the GPU via Triton's benchmark helpers.

    With ``cuda_graph`` the call is captured into a CUDA graph (launch overhead removed). If the
    capture fails (an op that syncs with the host, or allocates outside the graph's pool, cannot be
    captured) the event timer is used instead and the result says so: ``timer`` is
    ``"do_bench (cudagraph capture failed)"`` and ``fallback`` holds the capture error, which the
    benchmark row keeps in its ``note`` column (a fallback is a finding, never silent).
    """
    import triton.testing

    fallback = None
    if cuda_graph:
        try:
            q = triton.testing.do_bench_cudagraph(fn, rep=rep_ms // 2 or 1, quantiles=list(QUANTILES))
            return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2], "timer": "cudagraph"}
        except Exception as exc:  # capture failure is a finding, not a crash
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            fallback = f"cudagraph capture failed ({type(exc).__name__}: {first[:200]}); timed with do_bench, " \
                       f"launch overhead included"
    q = triton.testing.do_bench(fn, rep=rep_ms, quantiles=list(QUANTILES))
    out: Dict[str, object] = {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2], "timer": "do_bench"}
    if fallback:
        out["timer"] = "do_bench (cudagraph capture failed)"
        out["fallback"] = fallback
    return out


def time_call(fn: Callable[[], object], device: torch.device, *, cuda_graph: bool = False,
              quick: bool = False) -> Dict[str, object]:
    """Time ``fn`` with the timer that suits ``device`` (see the module docstring)."""
    if device.type == "cuda":
        return time_cuda(fn, cuda_graph=cuda_graph, rep_ms=50 if quick else 100)
    if quick:
        return time_cpu(fn, min_reps=3, max_reps=50, target_s=0.1, warmup=1)
    return time_cpu(fn, min_reps=5, max_reps=200, target_s=0.4, warmup=2)


def _ceiling_ms(fn: Callable[[], object], device: torch.device, quick: bool) -> float:
    """Time of a ceiling measurement: the median on a GPU; on a (shared) CPU the fastest call,
    since contention from other processes only ever slows a call down."""
    if device.type == "cuda":
        return time_call(fn, device, quick=quick)["median_ms"]
    return time_cpu(fn, min_reps=10, max_reps=100, target_s=0.5, warmup=2)["min_ms"]


# ----------------------------------------------------------------------------- peak memory


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    import torch.profiler as profiler
    from torch._C._profiler import _EventType

    with profiler.profile(activities=[profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == "cpu":
            events.append((e.start_time_ns, e.typed[1].alloc_size))
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Dict[str, object]:
    """Extra memory (MB) allocated by one call of ``fn`` above what was live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return {"peak_mem_mb": peak / 2**20, "mem_method": "cuda_max_allocated"}
    return {"peak_mem_mb": _cpu_peak_bytes(fn) / 2**20, "mem_method": "cpu_profiler"}


# ----------------------------------------------------------------------------- machine ceilings


def copy_bandwidth_gbps(device: torch.device, *, quick: bool = False) -> float:
    """The machine's achievable memory bandwidth: a large device-local copy, 2·bytes / time."""
    if device.type == "cuda":
        nbytes = 2 << 30  # 2 GiB: far beyond any L2
    else:
        nbytes = (64 if quick else 256) << 20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t_ms = _ceiling_ms(lambda: dst.copy_(src), device, quick)
    return 2 * nbytes / (t_ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype, *, quick: bool = False) -> float:
    """Achieved dense matmul rate for ``dtype`` (the compute ceiling used by the roofline).

    fp32 on CUDA is measured with TF32 allowed, because Triton's ``tl.dot`` uses TF32 for fp32
    inputs by default; the larger ceiling keeps the fp32 roofline fraction conservative.
    """
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        t_ms = _ceiling_ms(lambda: a @ b, device, quick)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return 2 * n**3 / (t_ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------- metadata


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """Folder name for results: ``cpu`` or the card's name in lower case with dashes."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def results_root() -> str:
    """Where a run's results go unless ``--out`` says otherwise: ``$STAKES_CACHE/benchmarks`` (else,
    unset or empty, ``~/.cache/stakes/benchmarks``), outside the source tree, so a user's run never
    overwrites the results committed under ``benchmarks/results/`` (writing there is an explicit
    ``--out benchmarks/results/<device>``)."""
    return os.path.join(os.path.expanduser(os.environ.get("STAKES_CACHE") or "~/.cache/stakes"), "benchmarks")


def default_out_dir(device) -> str:
    """``results_root()/<device slug>``: ``device`` a torch.device, or a slug (``cpu``, a card's)."""
    slug = device if isinstance(device, str) else device_slug(device)
    return os.path.join(results_root(), slug)


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def run_metadata(device: torch.device) -> Dict[str, object]:
    """Device, versions, date and commit: copied into every JSON and CSV result."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - platform dependent
        triton_version = "not installed"
    meta: Dict[str, object] = {
        "device": device_name(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "cpu_threads": torch.get_num_threads(),
    }
    return meta


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def elapsed_s(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one (long) call, synchronised on CUDA: for end-to-end runs."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0
