"""The proxy set's time with and without PGD early exit on this CPU, timed fairly: the same attack
alternated A/B in one process, one thread.

    python reports/pgd_early_exit_parity/timing.py --rounds 3

For digits k = 8 and shapes k = 16, seed 0, StructGuard's `stable` config (R = 20, 100 steps,
batch 1024) at the radius the default grid calibrated for that seed (so both sides attack the
same ball), each round builds the proxy set once per side (the order alternating between rounds)
through ``stakes.methods.build_proxies``, as a run does (the frozen, folded copy of the pretrained
model, the run's execution policy). Records the seconds, the proxies' mean PGD steps and success
rate, and the load average around each. Writes ``timing.json`` next to this file (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
JOBS = (("digits", 8), ("shapes", 16))
SIDES = {"full": False, "early_exit": True}


def radius(dataset: str, seed: int) -> float:
    """The radius the default (channels_last) grid calibrated for ``seed``."""
    path = HERE.parent / "channels_last_parity" / f"{dataset}_channels_last" / "results.json"
    runs = json.loads(path.read_text())["runs"]
    return float(next(r["proxies"]["eps"] for r in runs if r["seed"] == seed and r["method"] == "structguard"))


def main(argv=None) -> int:
    import stakes
    from stakes.data import load_dataset, sample_forget_indices
    from stakes.methods import build_proxies
    from stakes.pretrain import pretrained_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=str(HERE / "timing.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for dataset, k in JOBS:
        data = load_dataset(dataset, seed=0)
        model, _ = pretrained_model(dataset, data=data, cache_dir=args.cache_dir, progress=False)
        idx = sample_forget_indices(data.train_y, k, args.seed)
        fx, fy = data.train_x[idx], data.train_y[idx]
        eps = radius(dataset, args.seed)
        for rnd in range(args.rounds):
            order = list(SIDES) if rnd % 2 == 0 else list(reversed(SIDES))
            for side in order:
                cfg = stakes.preset("stable", method="structguard", seed=args.seed, eps=eps, progress=False,
                                    pgd_early_exit=SIDES[side])
                load_before = os.getloadavg()
                t0 = time.perf_counter()
                proxies, timings = build_proxies(model, fx, fy, cfg)
                row = {"dataset": dataset, "k": k, "side": side, "round": rnd, "eps": eps,
                       "proxies_s": timings["proxies_s"], "call_s": time.perf_counter() - t0,
                       "mean_pgd_steps": proxies.summary().get("mean_pgd_steps", float(cfg.pgd_steps)),
                       "success_rate": proxies.success_rate, "n": len(proxies),
                       "load_before": load_before, "load_after": os.getloadavg()}
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for dataset, k in JOBS:
        med = {side: statistics.median(r["proxies_s"] for r in rows if r["dataset"] == dataset and r["side"] == side)
               for side in SIDES}
        fastest = {side: min(r["proxies_s"] for r in rows if r["dataset"] == dataset and r["side"] == side)
                   for side in SIDES}
        steps = next(r["mean_pgd_steps"] for r in rows if r["dataset"] == dataset and r["side"] == "early_exit")
        summary[dataset] = {"k": k, "median_proxies_s": med, "fastest_proxies_s": fastest,
                            "speedup_median": med["full"] / med["early_exit"],
                            "speedup_fastest": fastest["full"] / fastest["early_exit"],
                            "mean_pgd_steps_early_exit": steps}
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rounds": args.rounds, "seed": args.seed,
            "statistic": "median and fastest over rounds"}
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
