"""The benchmark harness itself: CLI output format, plots, cost formulas, and the peers' math.

The CLI runs in a subprocess from the repository root (``benchmarks`` is not an installed
package), on the eager and compile providers of one small op; the fused provider must not appear
on a CPU (interpreter timings are never reported).
"""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fused
from benchmarks import e2e, ops, report, roofline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REQUIRED = ("op", "regime", "shape", "dtype", "provider", "pass", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb",
            "gbps", "tflops", "roofline_frac")


def _cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour of the CLI (no fused provider)")
def test_run_and_plot_cli(tmp_path):
    out = tmp_path / "res"
    proc = _cli("run", "--quick", "--ops", "similarity", "--regimes", "paper", "--no-e2e", "--threads", "1",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fused (Triton) timings need a CUDA GPU" in proc.stdout

    data = json.loads((out / "results.json").read_text())
    meta, rows = data["metadata"], data["results"]
    for key in ("device", "torch", "triton", "date", "git_commit", "copy_gbps", "matmul_tflops"):
        assert key in meta, key
    assert meta["cpu_threads"] == 1
    assert meta["copy_gbps"] > 0
    assert {(r["shape"], r["provider"]) for r in rows} == {
        ("N=128,D=512,K=10", "eager"), ("N=128,D=512,K=10", "compile"),  # --quick: compile on the first case
        ("N=128,D=512,K=100", "eager"), ("N=128,D=512,K=1000", "eager")}
    for r in rows:
        assert r["status"] == "ok" and r["op"] == "similarity" and r["pass"] == "fwd" and r["dtype"] == "float32"
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["peak_mem_mb"] >= 0 and r["gbps"] > 0 and r["tflops"] > 0 and r["roofline_frac"] > 0
        N, D, K = (int(kv.split("=")[1]) for kv in r["shape"].split(","))
        assert r["bytes"] == 4 * (N * D + K * D + N * K) and r["flops"] == 2 * N * K * D
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
    eager = [r for r in rows if r["provider"] == "eager"]
    assert all(r["speedup_vs_eager"] == pytest.approx(1.0) for r in eager)
    # The similarity output itself (N×K fp32) is allocated by the call: the profiler must see it.
    assert all(r["peak_mem_mb"] >= r["min_mem_mb"] * 0.99 for r in eager)

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert set(REQUIRED + report.META_COLUMNS) <= set(table[0])
    assert all(float(t["median_ms"]) > 0 for t in table)

    proc = _cli("plot", "--in", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["memory.png", "roofline.png", "speedup_similarity.png"]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_cli_rejects_unknown_op():
    proc = _cli("run", "--ops", "similarity,softmax", timeout=60)
    assert proc.returncode == 2 and "softmax" in proc.stderr


def test_plot_without_results_names_the_folder(tmp_path):
    proc = _cli("plot", "--in", str(tmp_path), timeout=60)
    assert proc.returncode != 0 and "no results.json" in proc.stderr


def test_roofline_matches_performance_md():
    # Masked SGD step in fp32: 20 B/param; ResNet-50 (25.6M) at 3.0 TB/s is about 170 µs.
    P = sum(torch.Size(s).numel() for s in ops.model_param_shapes("resnet50"))
    assert 25.5e6 < P < 25.6e6
    cost = roofline.masked_sgd_step(P, torch.float32)
    assert cost.bytes == 20 * P
    assert roofline.roofline_ms(cost, 3000.0, None) == pytest.approx(0.170, rel=0.01)
    # Alignment fwd+bwd: N·D·(b_x + b_x0 + b_dx) + K·D·b_a bytes, 6NKD FLOPs; bf16 is 2 bytes.
    c = roofline.alignment_loss(65536, 512, 256, torch.bfloat16, "fwd+bwd")
    assert c.bytes == 65536 * 512 * 6 + 256 * 512 * 2 and c.flops == 6 * 65536 * 256 * 512
    # Compute-bound once the FLOP time exceeds the byte time.
    assert roofline.bound(roofline.alignment_loss(65536, 512, 4096, torch.bfloat16, "fwd+bwd"), 4000, 700) == "compute"
    assert roofline.importance_accumulate(10, torch.float32).bytes == 120


def test_loop_peer_matches_the_op():
    """The paper's autograd loop (the ``loop`` peer) takes the same step as the op's reference."""
    torch.manual_seed(0)
    shapes = [(4, 3), (5,), (2, 2, 3)]
    params = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    ref = [p + 0.1 * torch.randn_like(p) for p in params]
    imp = [torch.rand(s) for s in shapes]
    mine = [p.clone().requires_grad_() for p in params]
    sr_loop = ops.sr_loop_step(mine, grads, ref, imp, lr=0.1, lam=2.0)
    theirs = [p.clone() for p in params]
    sr_op = fused.masked_regularized_sgd_step(theirs, grads, ref, imp, lr=0.1, lam=2.0, backend="reference")
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a.detach(), b)
    # The loop returns ½ΣI(ψ−ψ0)² before λ, as the op does (its SR value).
    torch.testing.assert_close(sr_loop, sr_op)


def test_sequential_proxies_stay_in_the_ball():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10)).eval()
    x = torch.rand(6, 3, 4, 4)
    y = torch.randint(0, 10, (6,))
    out = e2e.sequential_proxies(model, x, y, repetitions=2, steps=5, step_size=0.5, eps=0.3, batch_size=4)
    assert out.shape == (12, 3, 4, 4)
    assert out.min() >= 0 and out.max() <= 1
    dist = (out - x.repeat(2, 1, 1, 1)).flatten(1).norm(dim=1)
    assert bool((dist <= 0.3 + 1e-5).all()) and bool((dist > 0).all())
