"""Result rows: the column set, and writing/reading ``results.json`` and ``results.csv``.

``results.json`` = ``{"metadata": {...}, "results": [row, ...]}``. ``results.csv`` has one row per
measurement and repeats the run metadata (device, versions, date, commit, copy bandwidth) in its
last columns, so rows from different machines can be concatenated into one table.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Dict, List, Sequence, Tuple

COLUMNS = (
    "op",             # similarity | alignment | importance | update | pgd | proxy_generation | structguard
    "regime",         # paper | large | e2e
    "shape",          # exact size of the case
    "dtype",
    "provider",       # eager | compile | fused | loop | foreach+sgd_fused | foreach | e2e variants
    "pass",           # fwd | bwd | fwd+bwd | step | e2e
    "median_ms",
    "p20_ms",
    "p80_ms",
    "timer",          # cudagraph | do_bench | perf_counter | wall
    "peak_mem_mb",    # extra memory the call allocated above what was live before it
    "mem_method",     # cuda_max_allocated | cpu_profiler
    "min_mem_mb",     # analytic: what the op must allocate (its outputs, dX, O(N) scalars)
    "bytes",          # minimum bytes moved by the op (roofline.py)
    "flops",
    "gbps",           # bytes / median time (effective bandwidth)
    "tflops",         # flops / median time
    "roofline_ms",    # max(bytes / copy bandwidth, flops / matmul rate)
    "roofline_frac",  # roofline_ms / median_ms
    "bound",          # memory | compute
    "speedup_vs_eager",
    "throughput",     # end-to-end rows: images/s or steps/s
    "throughput_unit",
    "status",         # ok | skipped: ... | error: ... | not available: ...
    "note",
)
META_COLUMNS = ("device", "torch", "triton", "date", "git_commit", "copy_gbps")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(out_dir: str, metadata: Dict[str, object], rows: Sequence[Dict[str, object]]) -> Tuple[str, str]:
    """Write both files atomically (a run killed by a timeout leaves the last complete version)."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    csv_path = os.path.join(out_dir, "results.csv")
    rows = [{k: _clean(r.get(k)) for k in COLUMNS} for r in rows]
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"metadata": metadata, "results": rows}, f, indent=1)
    os.replace(tmp, json_path)
    tmp = csv_path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS + META_COLUMNS)
        meta = [metadata.get(k) for k in META_COLUMNS]
        for r in rows:
            writer.writerow([_fmt(r[k]) for k in COLUMNS] + [_fmt(m) for m in meta])
    os.replace(tmp, csv_path)
    return json_path, csv_path


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def read_results(in_dir: str) -> Tuple[Dict[str, object], List[Dict[str, object]]]:
    """Load ``results.json`` from ``in_dir``."""
    path = os.path.join(in_dir, "results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no results.json in {in_dir!r}: run `python -m benchmarks run --out {in_dir}` first")
    with open(path) as f:
        data = json.load(f)
    return data["metadata"], data["results"]
