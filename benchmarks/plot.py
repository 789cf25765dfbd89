"""``python -m benchmarks plot``: PNGs drawn from results.json, never by hand.

* ``speedup_<op>.png``  — speedup vs the eager reference, one panel per pass, bars per provider.
* ``roofline.png``      — fraction of the roofline (T_roof / T_measured) per op, case and provider.
* ``memory.png``        — extra peak memory per call, with the op's analytic minimum as a marker.
* ``e2e.png``           — end-to-end throughput (proxy generation, StructGuard steps).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.report import read_results  # noqa: E402

PROVIDER_COLORS = {
    "eager": "#7f7f7f", "compile": "#1f77b4", "fused": "#d62728", "loop": "#bcbd22",
    "foreach+sgd_fused": "#9467bd", "foreach": "#8c564b", "sequential": "#7f7f7f",
    "batched_reference": "#1f77b4", "batched_fused": "#d62728", "reference": "#7f7f7f",
}


def _case_label(r: Dict[str, object]) -> str:
    shape = str(r["shape"]).split(" (")[0]
    return f"{shape}\n{r['dtype']}"


def _grouped_bars(ax, rows: Sequence[Dict[str, object]], value: Callable[[Dict[str, object]], Optional[float]],
                  providers: Sequence[str]) -> None:
    cases: "OrderedDict[str, Dict[str, float]]" = OrderedDict()
    for r in rows:
        v = value(r)
        if v is None:
            continue
        cases.setdefault(_case_label(r), {})[r["provider"]] = v
    providers = [p for p in providers if any(p in c for c in cases.values())]
    if not cases or not providers:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    width = 0.8 / len(providers)
    x = np.arange(len(cases))
    for i, p in enumerate(providers):
        vals = [c.get(p, np.nan) for c in cases.values()]
        ax.bar(x + (i - (len(providers) - 1) / 2) * width, vals, width, label=p, color=PROVIDER_COLORS.get(p))
    ax.set_xticks(x)
    ax.set_xticklabels(list(cases), fontsize=7, rotation=30, ha="right")
    ax.legend(fontsize=7)


def _width(rows) -> float:
    """Figure width growing with the number of cases, so the labels stay readable."""
    return max(11.0, 0.8 * len({_case_label(r) for r in rows}))


def _providers(rows) -> List[str]:
    return list(OrderedDict.fromkeys(r["provider"] for r in rows))


def _title(meta: Dict[str, object]) -> str:
    return f"{meta.get('device')} — torch {meta.get('torch')}, triton {meta.get('triton')}, {meta.get('date', '')[:10]}"


def plot(in_dir: str, out_dir: Optional[str] = None) -> List[str]:
    """Draw every figure from ``in_dir/results.json`` into ``out_dir`` (default ``in_dir``); return paths."""
    meta, rows = read_results(in_dir)
    out_dir = out_dir or in_dir
    os.makedirs(out_dir, exist_ok=True)
    ok = [r for r in rows if r.get("status") == "ok"]
    kernels = [r for r in ok if r.get("regime") != "e2e"]
    paths: List[str] = []

    def save(fig, name, title):
        fig.suptitle(f"{title}\n{_title(meta)}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    ops = list(OrderedDict.fromkeys(r["op"] for r in kernels))
    for op in ops:
        op_rows = [r for r in kernels if r["op"] == op]
        passes = list(OrderedDict.fromkeys(r["pass"] for r in op_rows))
        fig, axes = plt.subplots(len(passes), 1, figsize=(_width(op_rows), 3.6 * len(passes)), squeeze=False)
        for ax, ps in zip(axes[:, 0], passes):
            sub = [r for r in op_rows if r["pass"] == ps and r["provider"] != "eager"]
            _grouped_bars(ax, sub, lambda r: r.get("speedup_vs_eager"), _providers(sub))
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_ylabel("speedup vs eager")
            ax.set_title(f"{op} — {ps}", fontsize=9)
        save(fig, f"speedup_{op}.png", f"{op}: speedup over the eager PyTorch reference (higher is better)")

    if ops:
        fig, axes = plt.subplots(len(ops), 1, figsize=(_width(kernels), 3.6 * len(ops)), squeeze=False)
        for ax, op in zip(axes[:, 0], ops):
            sub = [r for r in kernels if r["op"] == op and r["pass"] in ("fwd+bwd", "step", "fwd")
                   and not (op == "alignment" and r["pass"] == "fwd")]
            _grouped_bars(ax, sub, lambda r: r.get("roofline_frac"), _providers(sub))
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_ylabel("T_roof / T")
            ax.set_title(f"{op} ({', '.join(sorted({r['pass'] for r in sub}))})", fontsize=9)
        save(fig, "roofline.png", f"fraction of the roofline (copy {meta.get('copy_gbps', 0):.0f} GB/s measured in this run)")

        fig, axes = plt.subplots(len(ops), 1, figsize=(_width(kernels), 3.6 * len(ops)), squeeze=False)
        for ax, op in zip(axes[:, 0], ops):
            sub = [r for r in kernels if r["op"] == op and r["pass"] in ("fwd+bwd", "step", "fwd")
                   and not (op == "alignment" and r["pass"] == "fwd")]
            _grouped_bars(ax, sub, lambda r: r.get("peak_mem_mb"), _providers(sub))
            mins = OrderedDict((_case_label(r), r.get("min_mem_mb")) for r in sub)
            ax.plot(np.arange(len(mins)), [m if m else np.nan for m in mins.values()], "k_", ms=18,
                    label="analytic minimum")
            ax.set_yscale("symlog", linthresh=0.01)
            ax.set_ylabel("extra peak MB")
            ax.set_title(f"{op} ({sorted({r['mem_method'] for r in sub if r.get('mem_method')})})", fontsize=9)
        save(fig, "memory.png", "extra memory allocated by one call (lower is better)")

    e2e = [r for r in ok if r.get("regime") == "e2e" and r.get("throughput")]
    if e2e:
        groups = list(OrderedDict.fromkeys(r["op"] for r in e2e))
        fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), squeeze=False)
        for ax, op in zip(axes[0], groups):
            sub = [r for r in e2e if r["op"] == op]
            ax.bar([r["provider"] for r in sub], [r["throughput"] for r in sub],
                   color=[PROVIDER_COLORS.get(r["provider"], "#333333") for r in sub])
            ax.set_ylabel(sub[0]["throughput_unit"])
            ax.set_title(f"{op}\n{sub[0]['shape']}", fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
        save(fig, "e2e.png", "end to end (higher is better)")
    return paths
