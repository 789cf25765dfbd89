"""What the reports' table generators share: number formatting, mean ± std over seeds, a run's cell,
and the README part between the generated markers (each report's make_table.py / make_report.py
imports this file from its parent folder)."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

BEGIN, END = "<!-- generated:begin -->", "<!-- generated:end -->"


def fmt(x, d=1, sign=False):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:+.{d}f}" if sign else f"{x:.{d}f}"


def mean_std(values):
    """Mean and sample std (ddof 1) of the values that are numbers; NaN, NaN when none is."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_cell(r, error_width: int = 60) -> str:
    """One run as "test % / forget % / steps", "missing", or "FAILED: <why>"."""
    if r is None:
        return "missing"
    if r.get("status") != "ok":
        return f"FAILED: {str(r.get('error', r.get('status')))[:error_width]}"
    return f"{fmt(r['test_accuracy'], 2)} / {fmt(r['forget_accuracy'], 1)} / {r['steps']}"


def splice(doc: str, begin: str, end: str, text: str) -> str:
    """``doc`` with what lies between ``begin`` and ``end`` replaced by ``text``."""
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{text}\n{end}{tail}"


def write_generated(readme: Path, text: str, new_doc: str | None = None) -> None:
    """``text`` between the generated markers of ``readme`` (``new_doc`` when the file does not exist)."""
    doc = readme.read_text() if readme.exists() or new_doc is None else new_doc
    readme.write_text(splice(doc, BEGIN, END, text))
