"""The preflight's outputs: the table (one line per distinct compiled kernel), the summary by gate
and target, and the JSON file (versions, date, the targets with their limits, every grouped row)."""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from typing import Any, Dict, Sequence

from fused.preflight.gates import GATES


def _fmt_bits(bits) -> str:
    return f"{bits}b" if bits else "-"


def _count(row: Dict[str, Any]) -> int:
    return row.get("count", 1)


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """One line per (grouped) row: the first case it serves and how many more."""
    header = ("op", "shape", "dtype", "arch", "kernel", "config", "regs", "waves", "spill", "shared/limit", "mma",
              "ld/st", "verdict")
    lines = [header]
    for row in rows:
        count = _count(row)
        shape = row["shape"] + (f" (+{count - 1})" if count > 1 else "")
        arch = f"{row['arch']}{'*' if row.get('live') else ''}"
        if row.get("hash") is None or row.get("registers") is None:
            lines.append((row["op"], shape, row["dtype"] or "-", arch, row["kernel"], row["config"], "-", "-", "-", "-",
                          "-", "-", row["verdict"] + (f": {row['error'][:120]}" if row.get("error") else "")))
            continue
        spill = str(row["spill_bytes"]) + (f"/{row['spill_instructions']}i" if row["spill_instructions"] else "")
        lines.append((
            row["op"], shape, row["dtype"] or "-", arch, row["kernel"], row["config"], str(row["registers"]),
            "-" if row.get("waves") is None else str(row["waves"]), spill,
            f"{row['shared']}/{row['shared_limit']}", row["tensor_core"],
            f"{_fmt_bits(row['widest_load'])}/{_fmt_bits(row['widest_store'])}", row["verdict"],
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line[:-1], widths)) + "  " + line[-1] for line in lines)


def summarise(rows: Sequence[Dict[str, Any]], n_cases: int, stats: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Counts: case launches (rows), failing ones, by gate and op@target, and per target."""
    problems: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))  # gate -> "op@arch" -> rows
    kernels: Dict[str, set] = defaultdict(set)  # gate -> distinct failing kernels
    per_target: Dict[str, Dict[str, int]] = {a: {"rows": 0, "failing_rows": 0} for a in stats}
    for row in rows:
        n = _count(row)
        entry = per_target.setdefault(row["arch"], {"rows": 0, "failing_rows": 0})
        entry["rows"] += n
        if row["failed"]:
            entry["failing_rows"] += n
        for gate in row["failed"]:
            problems[gate][f"{row['op']}@{row['arch']}"] += n
            kernels[gate].add((row["arch"], row.get("hash") or row.get("error")))
    distinct = {(r["arch"], r["hash"]) for r in rows if r.get("hash")}
    return {
        "cases": n_cases, "rows": sum(_count(r) for r in rows),
        "failing_rows": sum(_count(r) for r in rows if r["failed"]),
        "distinct_kernels": len(distinct),
        "kernels_compiled": sum(s["kernels_compiled"] for s in stats.values()),
        "per_target": {a: {**per_target.get(a, {}), **s} for a, s in stats.items()},
        "problems": {g: dict(sorted(problems[g].items())) for g in GATES if g in problems},
        "failing_kernels": {g: len(kernels[g]) for g in GATES if g in kernels},
    }


def format_summary(summary: Dict[str, Any], seconds: float) -> str:
    lines = [
        f"preflight: {summary['cases']} cases x targets -> {summary['rows']} rows (case launches), "
        f"{summary['distinct_kernels']} distinct kernels ({summary['kernels_compiled']} compiled or loaded "
        f"from the Triton cache), {summary['failing_rows']} failing rows, {seconds:.0f} s"
    ]
    for arch, s in summary["per_target"].items():
        lines.append(f"  {arch}: {s.get('rows', 0)} rows, {s.get('failing_rows', 0)} failing, "
                     f"{s['kernels_compiled']} kernels, {s['compile_s']:.0f} s compiling, {s['wall_s']:.0f} s in all")
    if not summary["problems"]:
        lines.append("  no problems: every kernel compiles, fits, does not spill and takes its fast paths")
    for gate, where in summary["problems"].items():
        detail = ", ".join(f"{k} {v}" for k, v in where.items())
        lines.append(f"  {gate}: {sum(where.values())} rows ({summary['failing_kernels'][gate]} kernels): {detail}")
    return "\n".join(lines)


def write_json(path: str, payload: Dict[str, Any]) -> None:
    """Atomically: a temporary file next to ``path``, then os.replace."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".preflight-", suffix=".json", dir=directory)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a results file is for everyone
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
