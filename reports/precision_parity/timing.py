"""fp32 vs bf16 autocast on this CPU, timed fairly: the same job alternated A/B, one process at a time.

    python reports/precision_parity/timing.py --cache-dir /tmp/parity-cache --rounds 3

The grids' own wall times ran under different loads from other users of a shared machine, so they
cannot tell which precision is faster; here each round runs one `stakes unlearn` per precision back to
back (the order alternating between rounds) for StructGuard on digits k = 8 and shapes k = 16, seed 0,
and records each phase's time from the result files with the load average around it. Writes
``timing.json`` next to this file (pass --out to write elsewhere).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
JOBS = (("digits", 8), ("shapes", 16))


def one(dataset, k, precision, cache_dir, workdir):
    out = Path(workdir) / f"{dataset}_{precision}.json"
    cmd = [sys.executable, "-m", "stakes", "unlearn", "--dataset", dataset, "--method", "structguard", "--k", str(k),
           "--seed", "0", "--precision", precision, "--cache-dir", cache_dir, "--out", str(out), "--no-progress"]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    r = json.loads(out.read_text())
    t = r["timings"]
    return {"dataset": dataset, "k": k, "precision": r["execution"]["precision"], "process_wall_s": wall,
            "run_wall_s": r["wall_time_s"], "calibration_s": t.get("calibration_s"), "proxies_s": t.get("proxies_s"),
            "loop_s": t.get("loop_s"), "step_ms": t.get("step_ms"), "steps": r["steps"],
            "test_accuracy": r["test_accuracy"], "forget_accuracy": r["forget_accuracy"],
            "load_before": load_before, "load_after": os.getloadavg()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "timing.json"))
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for rnd in range(args.rounds):
            order = ("fp32", "bf16") if rnd % 2 == 0 else ("bf16", "fp32")
            for dataset, k in JOBS:
                for p in order:
                    row = one(dataset, k, p, args.cache_dir, workdir)
                    row["round"] = rnd
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    summary = {}
    for dataset, k in JOBS:
        for p in ("fp32", "bf16"):
            rs = [r for r in rows if r["dataset"] == dataset and r["precision"] == p]
            summary[f"{dataset}_{p}"] = {f: statistics.median(r[f] for r in rs)
                                         for f in ("run_wall_s", "calibration_s", "proxies_s", "loop_s", "step_ms")}
        f, b = summary[f"{dataset}_fp32"], summary[f"{dataset}_bf16"]
        summary[f"{dataset}_bf16_over_fp32"] = {m: b[m] / f[m] for m in f if f[m]}
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rounds": args.rounds,
            "statistic": "median over rounds"}
    Path(args.out).write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
