"""Where the benchmarks write: a user's run goes to the folder ``--out`` names, else to
``$STAKES_CACHE/benchmarks/<device>/`` (``~/.cache/stakes/benchmarks/<device>/`` without it), never
into the source tree: the committed results under ``benchmarks/results/`` change only when a run
names them. A ``--out`` that cannot be a folder is refused before any work (exit 2, one line naming
it). The same holds for ``whole-run``, ``plot`` and ``gpu_check.sh``.
"""

import hashlib
import os
import subprocess

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import measure, ops, roofline, whole_run
from benchmarks import run as run_mod

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRACKED = os.path.join(ROOT, "benchmarks", "results", "cpu")
CPU = torch.device("cpu")


def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _digest(folder):
    """The committed results' contents (and their names)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        h.update(name.encode())
        with open(os.path.join(folder, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


@pytest.fixture
def home(monkeypatch, tmp_path):
    """A fresh HOME and no STAKES_CACHE: the default is ~/.cache/stakes/benchmarks/<device>."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STAKES_CACHE", raising=False)
    return tmp_path / "home"


@pytest.fixture
def one_case(monkeypatch):
    """run() with one stand-in case and constant ceilings (seconds, not minutes)."""
    monkeypatch.setattr(run_mod, "machine_ceilings",
                        lambda device, quick: {"copy_gbps": 10.0, "matmul_tflops": {"float32": 0.1}})
    cost = roofline.Cost(bytes=16.0, flops=4.0, min_mem_bytes=0.0)
    case = ops.Case("pgd", "paper", "fake", torch.float32,
                    lambda device, providers: [ops.Variant("eager", "step", lambda: torch.ones(4), cost)],
                    cuda_graph=False)
    monkeypatch.setattr(ops, "make_cases", lambda *a, **k: [case])
    return monkeypatch


def test_the_default_folder_is_outside_the_source_tree(home, monkeypatch, tmp_path):
    assert run_mod.default_out_dir(CPU) == str(home / ".cache" / "stakes" / "benchmarks" / "cpu")
    assert whole_run.default_out_dir(CPU) == run_mod.default_out_dir(CPU)
    assert not _inside(run_mod.default_out_dir(CPU), ROOT)
    monkeypatch.setenv("STAKES_CACHE", str(tmp_path / "cache"))
    assert run_mod.default_out_dir(CPU) == str(tmp_path / "cache" / "benchmarks" / "cpu")
    assert measure.default_out_dir("nvidia-h100-80gb-hbm3") == str(tmp_path / "cache" / "benchmarks"
                                                                   / "nvidia-h100-80gb-hbm3")
    monkeypatch.setenv("STAKES_CACHE", "")   # empty = unset, as stakes' own cache
    assert run_mod.default_out_dir(CPU) == str(home / ".cache" / "stakes" / "benchmarks" / "cpu")


def test_a_run_without_out_leaves_the_committed_results_alone(home, one_case, capsys):
    default = run_mod.default_out_dir(CPU)
    assert not _inside(default, ROOT)   # checked first: a failing run must not write into the tree
    before = _digest(TRACKED)
    assert cli.main(["run", "--quick", "--ops", "pgd", "--no-e2e"]) == 0
    assert _digest(TRACKED) == before
    assert sorted(os.listdir(default)) == ["results.csv", "results.json"]
    out = capsys.readouterr().out
    assert f"results go to {default}" in out and f"wrote {os.path.join(default, 'results.json')}" in out


def test_a_run_writes_where_out_says(home, one_case, tmp_path):
    out = tmp_path / "a" / "b"
    assert cli.main(["run", "--quick", "--ops", "pgd", "--no-e2e", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["results.csv", "results.json"]
    assert not os.path.exists(run_mod.default_out_dir(CPU))


def test_plot_reads_the_default_folder(home, one_case, capsys):
    assert not _inside(run_mod.default_out_dir(CPU), ROOT)
    assert cli.main(["run", "--quick", "--ops", "pgd", "--no-e2e"]) == 0
    assert cli.main(["plot"]) == 0
    default = run_mod.default_out_dir(CPU)
    assert "roofline.png" in os.listdir(default)
    assert f"wrote {os.path.join(default, 'roofline.png')}" in capsys.readouterr().out


def test_plot_without_results_names_the_default_folder(home, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["plot"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert f"--in {run_mod.default_out_dir(CPU)}: no results.json in" in err


def test_whole_run_defaults_outside_the_tree(home, monkeypatch):
    seen = {}

    def main(args):
        seen["out"] = args.out
        return 0

    monkeypatch.setattr(whole_run, "main", main)
    assert cli.main(["whole-run", "--quick", "--device", "cpu"]) == 0
    assert seen["out"] == run_mod.default_out_dir(CPU)


@pytest.mark.parametrize("command", [["run", "--quick", "--no-e2e"], ["whole-run", "--quick", "--device", "cpu"],
                                     ["plot", "--in", "."]])
@pytest.mark.parametrize("problem", ["a file", "under a file", "unwritable"])
def test_a_bad_out_is_refused_before_any_work(command, problem, tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(run_mod, "run", boom)
    monkeypatch.setattr(whole_run, "main", boom)
    monkeypatch.setattr("benchmarks.plot.plot", boom)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    if problem == "a file":
        out, why = blocker, f"{blocker} exists and is not a folder"
    elif problem == "under a file":
        out, why = blocker / "sub" / "dir", f"{blocker} is a file, so {blocker / 'sub' / 'dir'} cannot be a folder"
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        if os.geteuid() == 0:   # root writes anywhere: the permission check sees what a user's would
            real = os.access
            monkeypatch.setattr(cli.os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
        out, why = ro / "new", f"{ro} is not writable"
    with pytest.raises(SystemExit) as exc:
        cli.main([*command, "--out", str(out)])
    assert exc.value.code == 2
    assert f"error: --out {out}: {why}" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == sorted(["file"] + (["ro"] if problem == "unwritable" else []))


def test_gpu_check_defaults_outside_the_tree(tmp_path):
    """A dry run without $OUT packs into $STAKES_CACHE/benchmarks/dry-run (a real run: <card>)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "OUT"}
    env.update({"GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_ONLY": "environment", "STAKES_CACHE": str(tmp_path / "c")})
    before = _digest(TRACKED)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    dest = tmp_path / "c" / "benchmarks" / "dry-run"
    assert f"results -> {dest} (DRY RUN)" in proc.stdout
    assert sorted(os.listdir(dest)) == ["gpu_check.tar.gz", "summary.txt"]
    assert _digest(TRACKED) == before
