"""Tests for ``python -m fused validate`` (fused.validate, fused.__main__)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import fused.pgd
from fused import validate


def test_quick_run_passes_every_op_on_every_backend():
    rows = validate.run_validation(quick=True)
    failed = [r for r in rows if not r.passed]
    assert not failed, validate.format_table(failed)
    ops = {r.op.split("[")[0].split(" ")[0] for r in rows}
    assert ops == set(validate.OP_NAMES)
    assert {r.backend for r in rows} == {"reference", "triton"}  # conftest switched the interpreter on
    assert {r.dtype for r in rows} >= {"fp32", "fp16"}
    # Every masked-update variant and both PGD radius forms are covered.
    names = {r.op for r in rows}
    for variant in ("explicit", "proximal", "momentum", "mask"):
        assert f"masked_regularized_sgd_step[{variant}]" in names
    assert any("per-sample eps" in n for n in names) and any("float eps" in n for n in names)
    assert all(r.error is not None and r.error <= r.torch_error + r.tol for r in rows)


def test_broken_kernel_is_reported_and_fails(monkeypatch, capsys, tmp_path):
    honest = fused.pgd.l2_pgd_step

    def broken(*args, backend=None, **kwargs):
        out = honest(*args, backend=backend, **kwargs)
        return out + 3e-3 if backend == "triton" else out  # an error only the Triton path makes

    monkeypatch.setattr(fused.pgd, "l2_pgd_step", broken)
    report = tmp_path / "validate.json"
    code = validate.main(["--quick", "--op", "l2_pgd_step", "--no-progress", "--json", str(report)])
    assert code == 1
    text = capsys.readouterr().out
    assert "FAIL" in text and "FAILED" in text
    rows = json.loads(report.read_text())["rows"]
    assert rows and all(r["op"].startswith("l2_pgd_step") for r in rows)
    for r in rows:
        assert r["status"] == ("FAIL" if r["backend"] == "triton" else "pass"), r
        if r["backend"] == "triton":
            assert r["error"] > r["torch_error"] + r["tol"]
    assert json.loads(report.read_text())["passed"] is False


RULE_ROW = re.compile(r"^(\S+)\s.*\s(reference|triton)\s+(\S+) (<=|>) (\S+) \+ (\S+) = (\S+)\s+(pass|FAIL)$")


def _judged_rows(text):
    """(backend, error, comparator, torch error, tol, bound, status) of every printed table row."""
    rows = []
    for line in text.splitlines():
        m = RULE_ROW.match(line)
        if m:
            _, backend, err, cmp, torch_err, tol, bound, status = m.groups()
            rows.append((backend, float(err), cmp, float(torch_err), float(tol), float(bound), status))
    return rows


def test_each_row_prints_the_bound_it_is_judged_by(monkeypatch, capsys, tmp_path):
    """An error above the dtype's tolerance passes when torch's own fp16 error leaves room for it:
    the row says so with its numbers (error <= torch's error + tol = bound), and the verdict follows
    that bound, not the tolerance alone; a broken Triton path prints '>' and FAIL."""
    monkeypatch.setitem(validate.TOLERANCE, torch.float16, 1e-4)   # below torch's own fp16 error here
    report = tmp_path / "validate.json"
    assert validate.main(["--quick", "--op", "l2_pgd_step", "--no-progress", "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "<= max |torch same-dtype - fp64 truth| + tol" in text and "fp16 1e-04" in text
    rows = _judged_rows(text)
    assert len(rows) == 8   # 2 cases x 2 dtypes x 2 backends, every one judged by its own bound
    fp16 = [r for r in rows if r[4] == 1e-4]
    assert len(fp16) == 4
    for backend, err, cmp, torch_err, tol, bound, status in fp16:
        assert err > tol and cmp == "<=" and status == "pass"   # above tol, within torch's error + tol
        assert bound == pytest.approx(torch_err + tol, rel=1e-2) and err <= bound
    json_rows = json.loads(report.read_text())["rows"]
    for r in json_rows:
        assert r["bound"] == pytest.approx(r["torch_error"] + r["tol"], rel=1e-12)
        assert r["rule"].startswith(f"{r['error']:.2e} <= {r['torch_error']:.2e} + {r['tol']:.0e} = ")

    honest = fused.pgd.l2_pgd_step

    def broken(*args, backend=None, **kwargs):
        out = honest(*args, backend=backend, **kwargs)
        return out + 3e-3 if backend == "triton" else out

    monkeypatch.setattr(fused.pgd, "l2_pgd_step", broken)
    assert validate.main(["--quick", "--op", "l2_pgd_step", "--no-progress"]) == 1
    rows = _judged_rows(capsys.readouterr().out)
    assert len(rows) == 8
    for backend, err, cmp, torch_err, tol, bound, status in rows:
        assert (cmp, status) == (("<=", "pass") if backend == "reference" else (">", "FAIL"))
        assert (err <= bound) == (status == "pass")


def test_the_rule_of_a_row():
    row = validate.Row("op", "3x5", "fp16", "triton", 1.46e-3, 9.77e-4, 1e-3, "pass")
    assert row.bound == pytest.approx(1.977e-3)
    assert row.rule == "1.46e-03 <= 9.77e-04 + 1e-03 = 1.98e-03"
    assert re.search(r"triton +1\.46e-03 <= 9\.77e-04 \+ 1e-03 = 1\.98e-03 +pass$", validate.format_table([row]))
    row = validate.Row("op", "3x5", "fp32", "triton", float("inf"), 1e-7, 5e-4, "FAIL")
    assert row.rule == "inf > 1.00e-07 + 5e-04 = 5.00e-04"
    assert validate.Row("op", "-", "fp32", "triton", None, None, 5e-4, "unavailable (ImportError: x)").rule == "-"
    assert validate.Row("op", "3", "fp32", "triton", None, 1e-7, 5e-4, "error (RuntimeError: x)").rule == \
        "bound 1.00e-07 + 5e-04 = 5.00e-04"


def test_missing_module_is_a_failure(monkeypatch):
    monkeypatch.setitem(sys.modules, "fused.alignment", None)  # import now raises ImportError
    rows = validate.run_validation(quick=True, backends=["reference"], ops=["structure_alignment_loss"])
    assert rows and all(r.status.startswith("unavailable (ImportError") and not r.passed for r in rows)


def test_op_raising_is_a_failure(monkeypatch):
    def raising(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(fused.pgd, "l2_pgd_step", raising)
    rows = validate.run_validation(quick=True, backends=["reference"], ops=["l2_pgd_step"])
    assert rows and all("RuntimeError: kernel exploded" in r.status and not r.passed for r in rows)


def test_bad_usage(monkeypatch):
    with pytest.raises(ValueError, match="ops must be names"):
        validate.run_validation(ops=["softmax"])
    # Asking for a backend this machine cannot run is a usage error (exit code 2).
    monkeypatch.setattr(validate, "triton_available_for", lambda device: False)
    assert validate.main(["--backend", "triton", "--no-progress"]) == 2


def test_nan_output_fails(monkeypatch):
    honest = fused.pgd.l2_pgd_step

    def nan(*args, backend=None, **kwargs):
        out = honest(*args, backend=backend, **kwargs)
        return out * torch.nan if backend == "triton" else out

    monkeypatch.setattr(fused.pgd, "l2_pgd_step", nan)
    rows = validate.run_validation(quick=True, ops=["l2_pgd_step"], backends=["triton"])
    assert rows and all(r.status == "FAIL" for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter switch of python -m fused")
def test_command_line_switches_the_interpreter_on():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "fused", "validate", "--quick", "--op", "l2_pgd_step", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TRITON_INTERPRET=1 was set" in proc.stdout
    assert " triton " in proc.stdout and "FAIL" not in proc.stdout
