"""``python -m benchmarks run --quick`` runs whole, from the repository root, as the README says: it
exits 0 and every row it writes is ``ok`` (the end-to-end rows included; on a CPU the fused
provider is not run, so no row is ``not available``). About 2 minutes on 2 idle cores, hence slow.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_the_quick_benchmark_runs_whole(tmp_path):
    out = tmp_path / "quick"
    env = {**os.environ, "STAKES_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--quick", "--threads", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["results"]
    bad = [(r.get("op"), r.get("shape"), r.get("provider"), r.get("status")) for r in rows if r.get("status") != "ok"]
    assert bad == []
    # the whole run: every op and both end-to-end parts have rows
    assert {r["op"] for r in rows} == {"similarity", "alignment", "importance", "update", "pgd",
                                       "proxy_generation", "structguard"}
    e2e = {(r["op"], r["provider"]) for r in rows if r["regime"] == "e2e"}
    assert {("proxy_generation", "sequential"), ("proxy_generation", "batched_reference"),
            ("structguard", "reference")} <= e2e
    assert all(r["throughput"] > 0 for r in rows if r["regime"] == "e2e")


def test_the_structguard_row_runs(tmp_path):
    """The end-to-end StructGuard row alone (seconds): StructGuard's own options (importance_samples)
    reach it through the method's preset, and the run takes the steps it was asked for."""
    import torch

    from benchmarks import e2e

    rows = e2e.structguard_steps(torch.device("cpu"), quick=True)
    assert [(r["provider"], r["status"]) for r in rows] == [("reference", "ok")]
    assert rows[0]["shape"] == "k=8,R=4,steps=3" and "3 steps" in rows[0]["note"]
    assert rows[0]["throughput"] == pytest.approx(1e3 / rows[0]["median_ms"])
