"""Failures of ``python -m benchmarks run`` are visible: an error row makes the run exit non-zero, a
CUDA-graph fallback is kept in its row, a module that fails to import is an error (not "not
available"), and the op-case budget starts after the end-to-end rows.

These run ``run()`` / ``main()`` in-process with stand-in cases (seconds, not minutes); the CLI
subprocess test of the real cases is ``test_benchmarks_cli.py``.
"""

import json
import sys
import time

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import e2e, measure, ops, roofline
from benchmarks import run as run_mod

COST = roofline.Cost(bytes=16.0, flops=4.0, min_mem_bytes=0.0)


def _boom():
    raise RuntimeError("kernel launch failed: an illegal memory access was encountered")


def _case(op="pgd", shape="fake", fns=None):
    """A stand-in case whose variants are the given ``{provider: fn}``."""
    fns = fns or {"eager": lambda: torch.ones(4) * 2}

    def build(device, providers):
        return [ops.Variant(p, "step", fn, COST) for p, fn in fns.items()]

    return ops.Case(op, "paper", shape, torch.float32, build, cuda_graph=False)


@pytest.fixture
def fast_run(monkeypatch):
    """run() without the machine-ceiling measurements (constants instead: seconds saved)."""
    monkeypatch.setattr(run_mod, "machine_ceilings",
                        lambda device, quick: {"copy_gbps": 10.0, "matmul_tflops": {"float32": 0.1}})
    return monkeypatch


def _rows(out):
    return json.loads((out / "results.json").read_text())["results"]


def test_an_error_row_makes_run_exit_nonzero(fast_run, tmp_path, capsys):
    fast_run.setattr(ops, "make_cases", lambda *a, **k: [_case(fns={"eager": lambda: torch.ones(4),
                                                                      "compile": _boom})])
    out = tmp_path / "res"
    rc = cli.main(["run", "--quick", "--ops", "pgd", "--no-e2e", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "1 of 2 rows failed" in err and "illegal memory access" in err and "pgd paper fake" in err
    rows = _rows(out)
    assert [r["status"] for r in rows] == ["ok", "error: RuntimeError: kernel launch failed: an illegal memory "
                                                 "access was encountered"]


def test_a_run_without_errors_exits_zero(fast_run, tmp_path, capsys):
    fast_run.setattr(ops, "make_cases", lambda *a, **k: [_case()])
    assert cli.main(["run", "--quick", "--ops", "pgd", "--no-e2e", "--out", str(tmp_path)]) == 0
    assert "benchmarks: 1 rows: 1 ok, 0 errors, 0 skipped, 0 not available, 0 CUDA-graph fallbacks" in \
        capsys.readouterr().out


def test_an_e2e_error_row_fails_the_run(fast_run, tmp_path):
    fast_run.setattr(ops, "make_cases", lambda *a, **k: [_case()])
    fast_run.setattr(e2e, "run_e2e", lambda device, quick: [
        {"op": "structguard", "regime": "e2e", "status": "error: RuntimeError: CUDA error: device-side assert"}])
    assert cli.main(["run", "--quick", "--ops", "pgd", "--out", str(tmp_path)]) == 1


def _slow_e2e(seconds):
    def run_e2e(device, quick):
        time.sleep(seconds)
        return [{"op": "structguard", "regime": "e2e", "shape": "k=1", "dtype": "float32", "provider": "reference",
                 "pass": "e2e", "median_ms": 1.0, "status": "ok"}]

    return run_e2e


def test_op_budget_starts_after_the_e2e_rows(fast_run, tmp_path):
    """--max-minutes is the op cases' budget: slow end-to-end rows must not use it up (they did)."""
    fast_run.setattr(e2e, "run_e2e", _slow_e2e(6.0))
    fast_run.setattr(ops, "make_cases", lambda *a, **k: [_case(shape="first"), _case(shape="second")])
    out = tmp_path / "res"
    # 5 s, less than the e2e rows, and room for both quick cases on a loaded machine
    run_mod.run(["pgd"], ["paper"], str(out), quick=True, max_minutes=5.0 / 60)
    rows = _rows(out)
    assert [(r["op"], r["shape"], r["status"]) for r in rows] == [
        ("structguard", "k=1", "ok"), ("pgd", "first", "ok"), ("pgd", "second", "ok")]
    meta = json.loads((out / "results.json").read_text())["metadata"]
    assert meta["e2e_s"] >= 6.0


def test_op_budget_skips_the_cases_after_it(fast_run, tmp_path):
    def slow():
        time.sleep(0.7)

    fast_run.setattr(e2e, "run_e2e", _slow_e2e(0.0))
    fast_run.setattr(ops, "make_cases", lambda *a, **k: [_case(shape="first", fns={"eager": slow}),
                                                         _case(shape="second")])
    out = tmp_path / "res"
    run_mod.run(["pgd"], ["paper"], str(out), quick=True, max_minutes=0.5 / 60)
    rows = _rows(out)
    assert rows[1]["status"] == "ok"
    assert rows[2]["status"].startswith("skipped: op-case budget of ")
    # a skipped case is not an error: the CLI exit status counts errors only
    assert not run_mod.is_error(rows[2]) and run_mod.status_kind(rows[2]) == "skipped"


def test_deadline_counts_the_e2e_rows(fast_run, tmp_path):
    fast_run.setattr(e2e, "run_e2e", _slow_e2e(1.2))
    fast_run.setattr(ops, "make_cases", lambda *a, **k: [_case(shape="first")])
    out = tmp_path / "res"
    run_mod.run(["pgd"], ["paper"], str(out), quick=True, deadline_minutes=1.0 / 60)
    rows = _rows(out)
    assert rows[0]["status"] == "ok"  # the e2e rows themselves are never cut
    assert rows[1]["status"].startswith("skipped: deadline of ")


def test_cli_rejects_a_nonpositive_budget(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--deadline-minutes", "0"])
    assert exc.value.code == 2 and "--deadline-minutes must be > 0" in capsys.readouterr().err


def test_cudagraph_fallback_is_kept_in_the_row(monkeypatch, capsys):
    """A failed CUDA-graph capture is timed with do_bench and says so in its row (timer and note)."""
    import triton.testing

    def capture(fn, **kw):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", capture)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, rep, quantiles: [0.5, 0.4, 0.6])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    timing = measure.time_cuda(lambda: None, cuda_graph=True)
    assert timing["timer"] == "do_bench (cudagraph capture failed)"
    assert timing["fallback"] == ("cudagraph capture failed (RuntimeError: CUDA error: operation not permitted when "
                                  "stream is capturing); timed with do_bench, launch overhead included")
    # and measure_variant keeps it in the row's note; the summary prints it and counts it
    monkeypatch.setattr(measure, "time_call", lambda fn, device, cuda_graph, quick: timing)
    monkeypatch.setattr(measure, "peak_memory_mb", lambda fn, device: {"peak_mem_mb": 0.0, "mem_method": "x"})
    case = _case(op="alignment")
    variant = case.build(torch.device("cpu"), ["eager"])[0]
    row = run_mod.measure_variant(case, variant, torch.device("cpu"),
                                  {"copy_gbps": 10.0, "matmul_tflops": {"float32": 0.1}}, quick=True)
    assert row["status"] == "ok" and row["note"] == timing["fallback"] and row["median_ms"] == 0.5
    run_mod.print_summary([row])
    assert "[cudagraph capture failed (RuntimeError" in capsys.readouterr().out
    assert run_mod.tally([row]).endswith("1 CUDA-graph fallbacks")


def test_a_module_that_fails_to_import_is_an_error(monkeypatch, tmp_path):
    (tmp_path / "broken_op_mod.py").write_text("raise ImportError(\"cannot import name 'Target'\")\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(run_mod.OP_MODULES, "pgd", "broken_op_mod")
    monkeypatch.setitem(run_mod.OP_MODULES, "update", "no_such_op_mod")
    sys.modules.pop("broken_op_mod", None)
    assert run_mod._op_available("pgd") == ("error: broken_op_mod failed to import (ImportError: cannot import "
                                            "name 'Target')")
    assert run_mod._op_available("update") == "not available: no_such_op_mod does not exist yet"


def test_a_resnet_fallback_is_noted(monkeypatch):
    import stakes.models

    def broken(*a, **k):
        raise TypeError("build_model() got an unexpected keyword argument 'image_size'")

    monkeypatch.setattr(stakes.models, "build_model", broken)
    model, arch, note = e2e.build_classifier(torch.device("cpu"), prefer_resnet=True)
    assert arch == "small_cnn" and isinstance(model, e2e.SmallCNN)
    assert note == ("resnet18 failed to build (TypeError: build_model() got an unexpected keyword argument "
                    "'image_size'); small CNN instead")
    assert e2e.build_classifier(torch.device("cpu"), prefer_resnet=False)[2] == ""
