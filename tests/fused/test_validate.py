"""Tests for ``python -m fused validate`` (fused.validate, fused.__main__)."""

import json
import os
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
