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

import functools
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "work_cuts_parity"))
import make_table as parity  # noqa: E402
from tables import fmt, mean_std  # noqa: E402  (work_cuts_parity put reports/ on the path)

# read once: parity.render() and the tables below both ask for each data set's pair
load_pair = functools.lru_cache(maxsize=None)(parity.pair_loader(
    lambda d: HERE.parent / "channels_last_parity" / f"{d}_channels_last" / "results.json",
    lambda d: HERE / f"{d}_early_exit" / "results.json"))


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


def paired_table(dataset, k, first):
    """Seeds 0-4 (the parity grids) and 5-9 (``more_seeds/``, both sides run the same way) together:
    per method the test accuracy at the stop on each side, the paired differences, how many are
    positive, and the one-sided sign test's p (ties dropped). ``first``: the seeds 0-4 pair
    (:func:`load_pair`)."""
    more = {side: HERE / "more_seeds" / f"{dataset}_{side}" / "results.json" for side in ("default", "early_exit")}
    if not all(p.is_file() for p in more.values()):
        return []
    runs = {"without": list(first["without"]["runs"]) + json.loads(more["default"].read_text())["runs"],
            "cuts": list(first["cuts"]["runs"]) + json.loads(more["early_exit"].read_text())["runs"]}
    by = {side: {(r["method"], r["seed"]): r for r in rs if r["k"] == k and r.get("status") == "ok"}
          for side, rs in runs.items()}
    out = [f"Ten seeds, {dataset} k = {k} (seeds 0-4 above and 5-9 in `more_seeds/`, run the same way): test % at "
           "the stop, paired by seed.", "",
           "| method | 100 steps | early exit | mean paired difference | higher / lower | sign test p (one-sided) "
           "| forget 0 % 100 steps / early exit |", "|---|---|---|---|---|---|---|"]
    for m in ("structguard", "adv"):
        seeds = sorted(s for (mm, s) in by["without"] if mm == m and (m, s) in by["cuts"])
        a = [by["without"][(m, s)]["test_accuracy"] for s in seeds]
        b = [by["cuts"][(m, s)]["test_accuracy"] for s in seeds]
        d = [y - x for x, y in zip(a, b)]
        up, down = sum(x > 0 for x in d), sum(x < 0 for x in d)
        n = up + down
        p = sum(math.comb(n, i) for i in range(up, n + 1)) / 2 ** n if n else float("nan")
        am, asd = mean_std(a)
        bm, bsd = mean_std(b)
        dm, dsd = mean_std(d)
        na = sum(by["without"][(m, s)]["forget_accuracy"] == 0.0 for s in seeds)
        nb = sum(by["cuts"][(m, s)]["forget_accuracy"] == 0.0 for s in seeds)
        out.append(f"| {parity.NAMES.get(m, m)} | {fmt(am)} ± {fmt(asd)} | {fmt(bm)} ± {fmt(bsd)} "
                   f"| {fmt(dm, sign=True)} ± {fmt(dsd)} | {up} / {down} | {p:.3f} | {na}/{len(seeds)} / {nb}/{len(seeds)} |")
    return out + [""]


def render():
    text = parity.render(load_pair, before="100 steps", after="early exit", timing=parity.PROXIES_TIMING)
    extra = []
    for dataset, k in parity.GRIDS:
        payloads = load_pair(dataset)
        if all(p is not None for p in payloads.values()):
            extra += proxy_table(dataset, k, payloads)
            extra += paired_table(dataset, k, payloads)
    return text + "\n\n" + "\n".join(extra).rstrip()


def main(argv):
    return parity.main(argv, text=render(), folder=HERE)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
