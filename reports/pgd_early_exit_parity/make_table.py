"""Parity of PGD early exit (``--set pgd_early_exit=true``, optional, off by default; issue 24): the
``stakes compare`` grids of ``reports/channels_last_parity/*_channels_last`` (stakes' defaults: every
proxy takes its 100 steps) against the same commands with early exit, digits k = 8 and shapes
k = 16, StructGuard (``stable``) and Adv, seeds 0-4. The criteria and tables are work_cuts_parity's;
a third table gives each seed's proxy set: the mean PGD steps a proxy took under early exit, the
calibrated radius and the attack's success rate on each side.

    python reports/pgd_early_exit_parity/make_table.py            # rewrite the generated part of README.md
    python reports/pgd_early_exit_parity/make_table.py --print
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "work_cuts_parity"))
import make_table as parity  # noqa: E402
from tables import fmt, mean_std  # noqa: E402  (work_cuts_parity put reports/ on the path)

load_pair = parity.pair_loader(lambda d: HERE.parent / "channels_last_parity" / f"{d}_channels_last" / "results.json",
                               lambda d: HERE / f"{d}_early_exit" / "results.json")


def proxy_table(dataset, k, payloads):
    """Per seed (StructGuard's run: the proxies are shared by a seed's methods): the mean PGD steps
    under early exit, the radius and the success rate on each side."""
    runs = {side: {r["seed"]: r for r in p["runs"] if r["k"] == k and r["method"] == "structguard"
                   and r.get("status") == "ok"} for side, p in payloads.items()}
    seeds = sorted(set(runs["without"]) & set(runs["cuts"]))
    out = [f"Proxy sets, {dataset} k = {k} (R = 20, N_s = {20 * k}; a proxy that never reaches its target counts "
           "its 100 steps):", "",
           "| seed | mean PGD steps, early exit | radius 100 steps / early exit | success % 100 steps / early exit |",
           "|---|---|---|---|"]
    steps = []
    for s in seeds:
        a, b = runs["without"][s]["proxies"], runs["cuts"][s]["proxies"]
        steps.append(b.get("mean_pgd_steps"))
        out.append(f"| {s} | {fmt(b.get('mean_pgd_steps'), 1)} | {fmt(a['eps'], 3)} / {fmt(b['eps'], 3)} "
                   f"| {fmt(100 * a['success_rate'], 1)} / {fmt(100 * b['success_rate'], 1)} |")
    m, sd = mean_std(steps)
    out += ["", f"Mean PGD steps a proxy took under early exit, {dataset}: {fmt(m, 1)} ± {fmt(sd, 1)} of 100 "
            "(mean ± std over seeds).", ""]
    return out


def render():
    text = parity.render(load_pair, before="100 steps", after="early exit", timing=parity.PROXIES_TIMING)
    extra = []
    for dataset, k in parity.GRIDS:
        payloads = load_pair(dataset)
        if all(p is not None for p in payloads.values()):
            extra += proxy_table(dataset, k, payloads)
    return text + "\n\n" + "\n".join(extra).rstrip()


def main(argv):
    return parity.main(argv, text=render(), folder=HERE)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
