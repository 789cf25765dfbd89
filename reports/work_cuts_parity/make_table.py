"""Parity of issue 24's work cuts that are not bit-identical, generated from four ``stakes compare``
grids: digits k = 8 and shapes k = 16, StructGuard (``stable``) and Adv, seeds 0-4, with the cuts
(stakes' defaults) and without them (``--set importance_passes=all --set fold_batchnorm=false``).

    python reports/work_cuts_parity/make_table.py            # rewrite the generated part of README.md
    python reports/work_cuts_parity/make_table.py --print    # print it instead

The cuts that are bit-identical on the CPU are not in it (the proxies' original features computed
once; the evaluation sets at the end; checked by .ci/equality_set.py). Criteria per data set and
method (those of reports/precision_parity):

* C1: the runs with the cuts delete the whole forget set as often as those without;
* C2: |mean_cuts - mean_without| <= std_without of the test accuracy at the stop (sample std, ddof 1).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from tables import fmt, mean_std, run_cell, write_generated  # noqa: E402

GRIDS = (("digits", 8), ("shapes", 16))
SIDES = ("without", "cuts")
NAMES = {"structguard": "StructGuard (`stable`)", "adv": "Adv"}


def load(dataset, side):
    path = HERE / f"{dataset}_{side}" / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


# the timing column of the reports that compare proxy sets (channels_last, early exit)
PROXIES_TIMING = ("shared_proxies_s", "the proxy set's seconds (PGD; shared by a seed's methods; under whatever load "
                  "the grid ran)", "proxies s")


def pair_loader(without, cuts):
    """A ``load_pair`` for :func:`render`: ``without(dataset)`` and ``cuts(dataset)`` give the two
    grids' results.json paths (a grid not run yet loads as None)."""
    def load_pair(dataset):
        paths = {"without": without(dataset), "cuts": cuts(dataset)}
        return {side: json.loads(p.read_text()) if p.is_file() else None for side, p in paths.items()}
    return load_pair


def acc(r):
    return r["test_accuracy"] if r and r.get("status") == "ok" else None


def deleted(r):
    return bool(r) and r.get("status") == "ok" and r.get("forget_accuracy") == 0.0


def grid(dataset, k, payloads, before="without the cuts", after="with", timing=("importance_s", "the importance "
         "pass's seconds (StructGuard)", "importance s")):
    """The tables of one grid: ``payloads["without"]`` (the reference) against ``payloads["cuts"]``;
    ``before`` / ``after`` name them in the headers, ``timing`` = (timings key, what it is, its column)."""
    key, what, column = timing
    runs = {side: {(r["method"], r["seed"]): r for r in p["runs"] if r["k"] == k} for side, p in payloads.items()}
    methods = [m for m in payloads["without"]["meta"]["methods"] if m in payloads["cuts"]["meta"]["methods"]]
    seeds = [s for s in payloads["without"]["meta"]["seeds"] if s in payloads["cuts"]["meta"]["seeds"]]
    out = [f"### {dataset}, k = {k}", "",
           f"| method | {before}: test % | {after}: test % | difference | forget 0 % {before} / {after} "
           "| C1 | C2: \\|Δmean\\| ≤ std_before |", "|---|---|---|---|---|---|---|"]
    verdicts = {}
    for m in methods:
        a = [acc(runs["without"].get((m, s))) for s in seeds]
        b = [acc(runs["cuts"].get((m, s))) for s in seeds]
        am, as_ = mean_std(a)
        bm, bs = mean_std(b)
        na = sum(deleted(runs["without"].get((m, s))) for s in seeds)
        nb = sum(deleted(runs["cuts"].get((m, s))) for s in seeds)
        c1, c2 = nb >= na, abs(bm - am) <= as_
        verdicts[m] = (c1, c2)
        out.append(f"| {NAMES.get(m, m)} | {fmt(am)} ± {fmt(as_)} | {fmt(bm)} ± {fmt(bs)} | {fmt(bm - am, sign=True)} "
                   f"| {na}/{len(seeds)} / {nb}/{len(seeds)} | {'holds' if c1 else 'FAILS'} "
                   f"| {'holds' if c2 else 'FAILS'} ({fmt(abs(bm - am), 2)} vs {fmt(as_, 2)}) |")
    out += ["", f"Per seed: test accuracy % / forget accuracy % / steps, {before} → {after}; {what}:", "",
            f"| method | seed | {before} | {after} | difference | {column} {before} / {after} |", "|---|---|---|---|---|---|"]
    for m in methods:
        for s in seeds:
            a, b = runs["without"].get((m, s)), runs["cuts"].get((m, s))

            d = acc(b) - acc(a) if acc(a) is not None and acc(b) is not None else None
            imp = " / ".join(fmt((r or {}).get("timings", {}).get(key), 2) for r in (a, b))
            out.append(f"| {NAMES.get(m, m)} | {s} | {run_cell(a)} | {run_cell(b)} | {fmt(d, 2, sign=True)} | {imp} |")
    out.append("")
    return out, verdicts


def render(load_pair=None, **labels):
    """Every grid's tables and the verdict; ``load_pair(dataset)`` gives ``{"without": ..., "cuts": ...}``
    (default: this folder's two grids), ``labels`` go to :func:`grid`."""
    out, verdicts = [], {}
    for dataset, k in GRIDS:
        payloads = load_pair(dataset) if load_pair else {side: load(dataset, side) for side in SIDES}
        if any(p is None for p in payloads.values()):
            out += [f"### {dataset}, k = {k}", "", "(not run yet)", ""]
            continue
        lines, v = grid(dataset, k, payloads, **labels)
        out += lines
        verdicts.update({(dataset, m): x for m, x in v.items()})
    if verdicts:
        c1, c2 = all(v[0] for v in verdicts.values()), all(v[1] for v in verdicts.values())
        out.append(f"**Verdict over the {len(verdicts)} cells:** C1 {'holds' if c1 else 'FAILS'}; C2 "
                   f"{'holds' if c2 else 'FAILS'}" + (" in every cell." if c1 and c2 else " (see the cells above)."))
    return "\n".join(out)


def main(argv, text=None, folder=HERE):
    """Print (``--print``) or write the generated part of ``folder``/README.md."""
    text = render() if text is None else text
    if "--print" in argv:
        print(text)
        return 0
    write_generated(folder / "README.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
