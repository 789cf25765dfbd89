"""README.md of this folder from results.json (run.py): per setting and variant, mean ± std over the
seeds of the forget and test accuracy at the stop, the steps to forget 0 %, the held-out structure
drift, the runs that went non-finite or ended at chance; the paired change against the ``authors``
runs and whether it is beyond seed noise.

    python reports/authors_quirks/make_report.py            # rewrite the generated part of README.md
    python reports/authors_quirks/make_report.py --print

"Beyond seed noise": the mean paired change (variant − authors, same seed) exceeds the authors' seed
std of that figure, and at least 4 of the 5 paired changes have its sign. "At chance": test accuracy
≤ 100/C + 5 points (C = 10 classes: ≤ 15 %).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from tables import BEGIN, END, fmt, write_generated  # noqa: E402
import run as grid  # noqa: E402

CHANCE = 100 / 10 + 5


def ms(values):
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def label(name):
    table = {**grid.BACK_TO_STAKES, **grid.STABLE_ON_TOP}
    if name == "authors":
        return "**authors** (every §9a behaviour)"
    if name == "stable":
        return "`stable` preset (reference)"
    return table[name][0] if name in table else name


def verdict(base, other, key):
    pairs = [(b.get(key), o.get(key)) for b, o in zip(base, other)
             if b.get("status") == o.get("status") == "ok" and b.get(key) is not None and o.get(key) is not None]
    if len(pairs) < 3:
        return None, None, "too few runs"
    d = [o - b for b, o in pairs]
    mean_d = statistics.fmean(d)
    _, sd = ms([b for b, _ in pairs])
    same = sum(1 for x in d if (x > 0) == (mean_d > 0) and x != 0)
    beyond = abs(mean_d) > (sd or 0.0) and same >= 4
    return mean_d, sd, "beyond seed noise" if beyond else "within seed noise"


def render(runs):
    out = []
    settings = [(d, k) for d, k in grid.SETTINGS]
    order = ["authors", *grid.BACK_TO_STAKES, *grid.STABLE_ON_TOP, "stable"]
    for dataset, k in settings:
        rs = [r for r in runs if r["dataset"] == dataset and r["k"] == k]
        if not rs:
            continue
        eps, base_eps = grid.radii(dataset)
        seeds = sorted({r["seed"] for r in rs})
        by = {(r["variant"], r["seed"]): r for r in rs}
        base = [by.get(("authors", s), {}) for s in seeds]
        out += [f"### {dataset}, k = {k} (seeds {', '.join(map(str, seeds))}; ε = {eps}, L2UL's ε = {base_eps})", "",
                "| variant | forget % | steps to 0 % (runs) | test % at the stop | Δ test vs authors (paired) | drift "
                "| non-finite | at chance |", "|---|---|---|---|---|---|---|---|"]
        for v in order:
            vr = [by.get((v, s), {}) for s in seeds]
            ok = [r for r in vr if r.get("status") == "ok"]
            if v == "weight_grads_off":
                continue
            if not any(vr):
                continue
            f_m, f_s = ms([r.get("forget_accuracy") for r in ok])
            t_m, t_s = ms([r.get("test_accuracy") for r in ok])
            d_m, _ = ms([r.get("structure_drift") for r in ok])
            zero = [r["steps_to_zero"] for r in ok if r.get("steps_to_zero") is not None]
            z_m, _ = ms(zero)
            nonfinite = sum(1 for r in vr if r.get("status") == "non-finite")
            errors = sum(1 for r in vr if r.get("status") == "error")
            chance = sum(1 for r in ok if r.get("test_accuracy", 100) <= CHANCE)
            if v in ("authors", "stable"):
                delta = "—"
            else:
                dm, _, word = verdict(base, vr, "test_accuracy")
                delta = f"{fmt(dm, sign=True)} ({word})" if dm is not None else word
            out.append(f"| {label(v)} | {fmt(f_m)} ± {fmt(f_s)} | {fmt(z_m, 0)} ({len(zero)}/{len(vr)}) "
                       f"| {fmt(t_m)} ± {fmt(t_s)} | {delta} | {fmt(d_m, 3)} | {nonfinite}/{len(vr)}"
                       f"{f' (+{errors} errors)' if errors else ''} | {chance}/{len(ok)} |")
        wg = [by.get(("weight_grads_off", s), {}) for s in seeds]
        if any(wg):
            same = sum(1 for r in wg if r.get("same_proxies"))
            w, wo = ms([r.get("seconds_with") for r in wg]), ms([r.get("seconds_without") for r in wg])
            out += ["", f"Weight gradients during PGD (cost only): the proxies without them equal the authors' bit "
                        f"for bit in {same}/{len(wg)} seeds; building the proxy set took {fmt(w[0], 0)} s with and "
                        f"{fmt(wo[0], 0)} s without (means, its L2UL run included, on a loaded 2-core CPU)."]
        reached_101 = sum(1 for r in rs if r.get("epochs", 0) >= 101)
        out += ["", f"Runs that reached epoch 101 (where the authors' 101-epoch limit and stakes' 100 differ): "
                    f"{reached_101} of {len(rs)}.", ""]
    return "\n".join(out)


def per_quirk(runs):
    """One sentence per behaviour: its paired change in test accuracy against the authors' runs in
    each setting, whether that is beyond seed noise, and its non-finite runs."""
    out = ["### Per behaviour", ""]
    table = {**grid.BACK_TO_STAKES, **grid.STABLE_ON_TOP}
    for v, spec in table.items():
        parts = []
        for dataset, k in grid.SETTINGS:
            rs = [r for r in runs if r["dataset"] == dataset and r["k"] == k]
            by = {(r["variant"], r["seed"]): r for r in rs}
            seeds = sorted({r["seed"] for r in rs})
            vr = [by.get((v, s), {}) for s in seeds]
            if not any(vr):
                continue
            dm, _, word = verdict([by.get(("authors", s), {}) for s in seeds], vr, "test_accuracy")
            nonfinite = sum(1 for r in vr if r.get("status") == "non-finite")
            deleted = sum(1 for r in vr if r.get("steps_to_zero") is not None)
            change = f"{fmt(dm, sign=True)} points, {word}" if dm is not None else word
            parts.append(f"{dataset} k = {k}: {change}; {deleted}/{len(vr)} reach 0 %"
                         + (f", {nonfinite} non-finite" if nonfinite else ""))
        kind = "stable's choice on top of the authors'" if v in grid.STABLE_ON_TOP else "back to stakes' choice"
        out.append(f"* **{spec[0]}** ({kind}): " + "; ".join(parts) + ".")
    return "\n".join(out + [""])


def main(argv):
    runs = json.loads((HERE / "results.json").read_text())["runs"]
    text = render(runs) + "\n" + per_quirk(runs)
    if "--print" in argv:
        print(text)
        return 0
    write_generated(HERE / "README.md", text, new_doc=f"# The authors' quirks\n\n{BEGIN}\n{END}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
