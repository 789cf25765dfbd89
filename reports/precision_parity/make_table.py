"""The fp32 vs bf16 parity tables of this folder, generated from the four grids' results.json.

    python reports/precision_parity/make_table.py            # rewrite the generated parts of README.md
    python reports/precision_parity/make_table.py --print    # print it instead

Reads ``{digits,shapes}_{fp32,bf16}/results.json`` (``stakes compare`` output) next to this file and
replaces the text between the ``<!-- generated:begin -->`` / ``<!-- generated:end -->`` markers of
README.md (and the timing table of ``timing.json``, written by timing.py, between the
``<!-- timing:begin -->`` / ``<!-- timing:end -->`` markers). Test accuracy is at the stop (the
first epoch end with forget accuracy 0, or max_epochs); std is the sample standard deviation (ddof = 1, as in stakes' own summaries). The two criteria of
issue 17, Deliver item 7, per data set and method:

* C1: every bf16 run reaches forget accuracy 0 (and so does every fp32 run);
* C2: |mean_bf16 - mean_fp32| <= std_fp32 of the test accuracy at the stop.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from tables import BEGIN, END, fmt, mean_std, run_cell, splice  # noqa: E402
GRIDS = (("digits", 8), ("shapes", 16))
PRECISIONS = ("fp32", "bf16")
NAMES = {"structguard": "StructGuard (`stable`)", "adv": "Adv"}


def load(dataset: str, precision: str):
    path = HERE / f"{dataset}_{precision}" / "results.json"
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    for r in payload["runs"]:
        got = (r.get("execution") or {}).get("precision")
        if r.get("status") == "ok" and got != precision:
            raise SystemExit(f"{path}: run {r['method']} seed {r['seed']} ran in {got}, not {precision}")
    return payload


def by_run(payload, k):
    """{(method, seed): record} of the grid's runs at k."""
    return {(r["method"], r["seed"]): r for r in payload["runs"] if r["k"] == k}


def test_acc(r):
    return r["test_accuracy"] if r and r.get("status") == "ok" else None


def deleted(r):
    return bool(r) and r.get("status") == "ok" and r.get("forget_accuracy") == 0.0


def grid_tables(dataset, k, fp, bf):
    runs = {p: by_run(payload, k) for p, payload in (("fp32", fp), ("bf16", bf))}
    methods = [m for m in fp["meta"]["methods"] if m in bf["meta"]["methods"]]
    seeds = [s for s in fp["meta"]["seeds"] if s in bf["meta"]["seeds"]]
    out = [f"### {dataset}, k = {k}", ""]
    step_diffs = []
    out.append(f"Pretrained test accuracy: fp32 grid {fmt(fp['meta']['pretrained_test_accuracy'], 2)} %, "
               f"bf16 grid {fmt(bf['meta']['pretrained_test_accuracy'], 2)} % (the same cached model; the "
               f"bf16 figure is evaluated under bf16 autocast). Calibrated PGD radius per seed "
               f"(fp32 / bf16): " + ", ".join(
                   f"{s}: {fp['meta']['radius'][str(k)]['eps'].get(str(s), '—')} / "
                   f"{bf['meta']['radius'][str(k)]['eps'].get(str(s), '—')}" for s in seeds) + ".")
    out.append("")
    out.append("| method | fp32 test % | bf16 test % | bf16 − fp32 | forget 0 % fp32 | forget 0 % bf16 "
               "| C1: every run deletes | C2: \\|Δmean\\| ≤ std_fp32 |")
    out.append("|---|---|---|---|---|---|---|---|")
    verdicts = {}
    for m in methods:
        fa = [test_acc(runs["fp32"].get((m, s))) for s in seeds]
        ba = [test_acc(runs["bf16"].get((m, s))) for s in seeds]
        fm, fs = mean_std(fa)
        bm, bs = mean_std(ba)
        nf = sum(deleted(runs["fp32"].get((m, s))) for s in seeds)
        nb = sum(deleted(runs["bf16"].get((m, s))) for s in seeds)
        c1 = nb == len(seeds) and nf == len(seeds)
        delta = bm - fm
        c2 = abs(delta) <= fs
        verdicts[m] = (c1, c2)
        out.append(f"| {NAMES.get(m, m)} | {fmt(fm)} ± {fmt(fs)} | {fmt(bm)} ± {fmt(bs)} | {fmt(delta, sign=True)} "
                   f"| {nf}/{len(seeds)} | {nb}/{len(seeds)} | {'holds' if c1 else 'FAILS'} "
                   f"| {'holds' if c2 else 'FAILS'} ({fmt(abs(delta), 2)} vs {fmt(fs, 2)}) |")
    out.append("")
    out.append("Per seed (test accuracy % at the stop, forget accuracy %, steps; fp32 → bf16) and the paired "
               "difference:")
    out.append("")
    out.append("| method | seed | fp32: test / forget / steps | bf16: test / forget / steps | bf16 − fp32 test "
               "| run wall s fp32 / bf16 (excl. proxies) |")
    out.append("|---|---|---|---|---|---|")
    for m in methods:
        diffs = []
        for s in seeds:
            f, b = runs["fp32"].get((m, s)), runs["bf16"].get((m, s))

            d = (test_acc(b) - test_acc(f)) if test_acc(b) is not None and test_acc(f) is not None else None
            if d is not None:
                diffs.append(d)
            if f and b and f.get("status") == b.get("status") == "ok" and f["steps"] != b["steps"]:
                step_diffs.append(f"{dataset} {m} seed {s}: {f['steps']} → {b['steps']}")
            # the run's own wall time (calibration and proxies are shared per seed: in the time table below);
            # not wall_time_with_proxies_s, which at d0ecb6a also adds timings["shared_pgd_batch_size"] (1024)
            wall = " / ".join(fmt(r.get("wall_time_s"), 1) if r else "—" for r in (f, b))
            out.append(f"| {NAMES.get(m, m)} | {s} | {run_cell(f, 80)} | {run_cell(b, 80)} | {fmt(d, 2, sign=True)} | {wall} |")
        dm, ds = mean_std(diffs)
        out.append(f"| {NAMES.get(m, m)} | mean ± std | | | {fmt(dm, 2, sign=True)} ± {fmt(ds, 2)} | |")
    out.append("")
    if "structguard" in methods and "adv" in methods:
        out.append("StructGuard − Adv, paired per seed (the README's comparison), test accuracy points:")
        out.append("")
        out.append("| precision | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | StructGuard ahead |")
        out.append("|---|" + "---|" * (len(seeds) + 2))
        for p in PRECISIONS:
            d = [test_acc(runs[p].get(("structguard", s))) - test_acc(runs[p].get(("adv", s)))
                 if test_acc(runs[p].get(("structguard", s))) is not None and test_acc(runs[p].get(("adv", s))) is not None
                 else None for s in seeds]
            ok = [x for x in d if x is not None]
            out.append(f"| {p} | " + " | ".join(fmt(x, 2, sign=True) for x in d)
                       + f" | {fmt(statistics.fmean(ok) if ok else None, 2, sign=True)} "
                       + f"| {sum(x > 0 for x in ok)}/{len(ok)} (tied {sum(x == 0 for x in ok)}) |")
        out.append("")
    out.append("Time as the grid ran (`stakes compare`'s wall time of the whole grid; calibration and proxies, "
               "shared by the methods, once per seed; the unlearning loops summed over the runs; the mean over "
               "runs of a run's mean step time). The load differed between the grids: see Speed below.")
    out.append("")
    out.append("| precision | grid wall s | calibration + proxies s (sum over seeds) | unlearning loop s (sum over "
               "runs) | mean step ms |")
    out.append("|---|---|---|---|---|")
    for p, payload in (("fp32", fp), ("bf16", bf)):
        ok = [r for r in payload["runs"] if r["k"] == k and r.get("status") == "ok"]
        shared = {}
        for r in ok:
            t = r.get("timings", {})
            shared[r["seed"]] = t.get("shared_calibration_s", 0.0) + t.get("shared_proxies_s", 0.0)
        loop = sum(r.get("timings", {}).get("loop_s", 0.0) for r in ok)
        steps = [r["timings"]["step_ms"] for r in ok if "step_ms" in r.get("timings", {})]
        out.append(f"| {p} | {fmt(payload['meta'].get('wall_time_s'), 0)} | {fmt(sum(shared.values()), 0)} "
                   f"| {fmt(loop, 0)} | {fmt(statistics.fmean(steps) if steps else None, 0)} |")
    out.append("")
    return out, verdicts, step_diffs


def render() -> str:
    out = []
    all_verdicts, all_steps, n_pairs = {}, [], 0
    for dataset, k in GRIDS:
        fp, bf = load(dataset, "fp32"), load(dataset, "bf16")
        if fp is None or bf is None:
            out += [f"### {dataset}, k = {k}", "", "(not run yet)", ""]
            continue
        lines, verdicts, step_diffs = grid_tables(dataset, k, fp, bf)
        out += lines
        all_steps += step_diffs
        n_pairs += sum(1 for r in fp["runs"] if r["k"] == k)
        all_verdicts.update({(dataset, m): v for m, v in verdicts.items()})
    if all_verdicts:
        c1 = all(v[0] for v in all_verdicts.values())
        c2 = all(v[1] for v in all_verdicts.values())
        out.append(f"**Verdict over the {len(all_verdicts)} cells:** C1 (every run deletes the whole forget set) "
                   f"{'holds' if c1 else 'FAILS'}; C2 (|mean_bf16 − mean_fp32| ≤ std_fp32) "
                   f"{'holds' if c2 else 'FAILS'}" + (" in every cell." if c1 and c2 else
                   " — see the cells marked FAILS above."))
        out.append("")
        out.append(f"Runs whose stop step differs between the precisions: {len(all_steps)} of {n_pairs} pairs"
                   + (f" ({'; '.join(all_steps)})." if all_steps else "."))
        out.append("")
    return "\n".join(out)


def render_timing() -> str:
    """timing.json (timing.py) as a table: median seconds per phase, bf16 / fp32 ratio."""
    path = HERE / "timing.json"
    if not path.is_file():
        return "(timing.py not run yet)"
    t = json.loads(path.read_text())
    rows = t["rows"]
    out = ["| job | precision | run s | calibration s | proxies s | loop s | step ms | steps | test % |",
           "|---|---|---|---|---|---|---|---|---|"]
    for dataset, k in GRIDS:
        for p in PRECISIONS:
            rs = [r for r in rows if r["dataset"] == dataset and r["precision"] == p]
            if not rs:
                continue
            med = {f: statistics.median(r[f] for r in rs) for f in
                   ("run_wall_s", "calibration_s", "proxies_s", "loop_s", "step_ms")}
            steps = sorted({r["steps"] for r in rs})
            acc = sorted({round(r["test_accuracy"], 2) for r in rs})
            out.append(f"| StructGuard {dataset} k = {k}, seed 0 | {p} | {fmt(med['run_wall_s'])} "
                       f"| {fmt(med['calibration_s'])} | {fmt(med['proxies_s'])} | {fmt(med['loop_s'])} "
                       f"| {fmt(med['step_ms'], 0)} | {'/'.join(map(str, steps))} | {'/'.join(fmt(a, 2) for a in acc)} |")
        ratio = t["summary"].get(f"{dataset}_bf16_over_fp32")
        if ratio:
            out.append(f"| | bf16 / fp32 | {fmt(ratio['run_wall_s'], 2)} | {fmt(ratio['calibration_s'], 2)} "
                       f"| {fmt(ratio['proxies_s'], 2)} | {fmt(ratio['loop_s'], 2)} | {fmt(ratio['step_ms'], 2)} | | |")
    loads = [x for r in rows for x in (r["load_before"][0], r["load_after"][0])]
    m = t["meta"]
    out.append("")
    out.append(f"Median of {m['rounds']} alternating rounds; {m['date']}, torch {m['torch']}, {m['threads']} threads, "
               f"CPU capability {m['cpu_capability']}; 1-minute load average {min(loads):.1f}-{max(loads):.1f} "
               f"around the runs. \"run s\" is the run's wall time (calibration, proxies, importance, loop, "
               f"final evaluation); the loop includes the trajectory evaluations every 5 steps.")
    return "\n".join(out)


def main(argv) -> int:
    text, timing = render(), render_timing()
    if "--print" in argv:
        print(text)
        print(timing)
        return 0
    readme = HERE / "README.md"
    doc = splice(readme.read_text(), BEGIN, END, text)
    readme.write_text(splice(doc, "<!-- timing:begin -->", "<!-- timing:end -->", timing))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
