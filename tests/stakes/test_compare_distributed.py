"""``stakes compare`` under torchrun: whole runs spread over 2 gloo ranks, merged by rank 0 into
the report a serial grid writes; reruns skip the runs already finished (serial and distributed)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from stakes.cli import main

GRID = ["--methods", "neggrad,adv", "--k", "4", "--seeds", "0,1", "--set", "repetitions=2", "--set", "pgd_steps=3",
        "--set", "eps=1.0", "--set", "max_steps=4", "--set", "max_epochs=2", "--no-progress", "--encoder", "minilm"]
KEYS = {(m, 4, s) for m in ("neggrad", "adv") for s in (0, 1)}
METRICS = ("test_accuracy", "forget_accuracy", "retain_accuracy", "steps")
TIMEOUT_S = 240


def _env(cache):
    env = dict(os.environ, OMP_NUM_THREADS="1", STAKES_CACHE=str(cache))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "STAKES_FAULT"):
        env.pop(key, None)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def _torchrun(cache, out, *extra, script=None):
    target = [script] if script else ["-m", "stakes", "compare"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *target,
           *GRID, "--cache-dir", str(cache), "--out", str(out), *extra]
    return subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, timeout=TIMEOUT_S)


def _runs(out):
    return {(r["method"], r["k"], r["seed"]): r for r in json.loads((out / "results.json").read_text())["runs"]}


def _serial_compare(cache, out):
    """The grid on this process, on one thread (like each torchrun rank)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["compare", *GRID, "--cache-dir", str(cache), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)



pytestmark = pytest.mark.slow   # torchrun and whole grids: the full suite (-m slow)

@pytest.fixture(scope="module")
def serial(tmp_path_factory, stakes_cache, digits_model):
    """The grid on one process (one thread, like each torchrun rank)."""
    out = tmp_path_factory.mktemp("compare_serial")
    _serial_compare(stakes_cache, out)
    return out


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, stakes_cache, serial):
    out = tmp_path_factory.mktemp("compare_dist")
    proc = _torchrun(stakes_cache, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_serial_records_name_rank_0(serial):
    runs = _runs(serial)
    assert set(runs) == KEYS
    assert all(r["status"] == "ok" and r["rank"] == 0 for r in runs.values())
    assert all(r["distributed"]["world_size"] == 1 and "grid" not in r["distributed"] for r in runs.values())
    meta = json.loads((serial / "results.json").read_text())["meta"]
    assert meta["distributed"] == {"world_size": 1, "backend": None}
    assert not (serial / "parts").exists()


def test_time_with_proxies_adds_seconds_only(serial):
    """A method that trains on the shared proxies is charged their calibration and generation
    seconds, and nothing else the proxy phase records (its PGD batch size once counted as 1024 s)."""
    for (method, _, _), r in _runs(serial).items():
        t = r["timings"]
        assert t["shared_pgd_batch_size"] >= 1
        extra = t["shared_calibration_s"] + t["shared_proxies_s"] if method == "adv" else 0.0
        assert r["wall_time_with_proxies_s"] == pytest.approx(r["wall_time_s"] + extra, abs=1e-9), method


def test_torchrun_grid_matches_the_serial_one(serial, distributed):
    out, proc = distributed
    runs, ref = _runs(out), _runs(serial)
    assert set(runs) == KEYS
    assert {r["rank"] for r in runs.values()} == {0, 1}
    # contiguous chunks in (k, seed, method) order: seed 0 on rank 0, seed 1 on rank 1 (one proxy set each)
    assert all(r["rank"] == r["seed"] for r in runs.values())
    for key, r in runs.items():
        assert r["status"] == "ok", r.get("error")
        assert r["distributed"]["world_size"] == 1   # each run is whole on its rank
        assert r["distributed"]["grid"] == {"world_size": 2, "backend": "gloo"}
        for m in METRICS:
            assert r[m] == pytest.approx(ref[key][m], abs=1e-6), (key, m)
        assert [e.get("forget_accuracy") for e in r["history"]] == \
            pytest.approx([e.get("forget_accuracy") for e in ref[key]["history"]], abs=1e-6)
    payload = json.loads((out / "results.json").read_text())
    assert [(r["k"], r["seed"], r["method"]) for r in payload["runs"]] == \
        [(4, 0, "neggrad"), (4, 0, "adv"), (4, 1, "neggrad"), (4, 1, "adv")]
    meta, ref_meta = payload["meta"], json.loads((serial / "results.json").read_text())["meta"]
    assert meta["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert meta["radius"] == ref_meta["radius"] and meta["settings"] == ref_meta["settings"]
    assert not (out / "parts").exists()   # merged, then removed
    summary = (out / "summary.md").read_text()
    assert summary.split("## k = 4")[1].split("| time s |")[0] == \
        (serial / "summary.md").read_text().split("## k = 4")[1].split("| time s |")[0]
    for png in ("trajectories.png", "test_vs_k.png", "drift.png"):
        assert (out / png).stat().st_size > 1000
    assert proc.stdout.count("report ->") == 1   # rank 0 alone prints


def test_serial_rerun_skips_the_finished_runs(tmp_path, serial, stakes_cache, capsys):
    out = tmp_path / "resume"
    out.mkdir()
    payload = json.loads((serial / "results.json").read_text())
    kept = [r for r in payload["runs"] if r["seed"] == 0]
    failed = {"method": "neggrad", "k": 4, "seed": 1, "status": "failed", "error": "RuntimeError: boom"}
    (out / "results.json").write_text(json.dumps({"meta": payload["meta"], "runs": kept + [failed]}))
    _serial_compare(stakes_cache, out)
    text = capsys.readouterr().out
    assert "2 of 4 runs already finished" in text and "running the other 2" in text
    runs = _runs(out)
    assert set(runs) == KEYS and all(r["status"] == "ok" for r in runs.values())   # the failed run was rerun
    for r in kept:   # kept as they were
        assert json.dumps(runs[(r["method"], r["k"], r["seed"])], sort_keys=True) == json.dumps(r, sort_keys=True)
    ref = _runs(serial)
    for key in ((m, 4, 1) for m in ("neggrad", "adv")):
        for m in METRICS:
            assert runs[key][m] == pytest.approx(ref[key][m], abs=1e-6)
    # a report written with other settings is not reused
    assert main(["compare", *GRID, "--set", "lr=0.001", "--methods", "neggrad", "--seeds", "0",
                 "--cache-dir", str(stakes_cache), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "other settings" in text and "already finished" not in text


def test_torchrun_rerun_of_an_interrupted_grid(tmp_path, distributed, stakes_cache):
    """An interrupted distributed grid leaves results.json and parts/rank*.json; the rerun runs the rest."""
    done, _ = distributed
    payload = json.loads((done / "results.json").read_text())
    runs = payload["runs"]
    out = tmp_path / "interrupted"
    (out / "parts").mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"meta": payload["meta"], "runs": [runs[0]]}))
    (out / "parts" / "rank1.json").write_text(json.dumps({"meta": {**payload["meta"], "rank": 1},
                                                          "runs": [runs[2]]}))
    proc = _torchrun(stakes_cache, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 of 4 runs already finished" in proc.stdout and "running the other 2" in proc.stdout
    again = _runs(out)
    assert set(again) == KEYS and not (out / "parts").exists()
    for r in (runs[0], runs[2]):   # kept byte for byte
        assert json.dumps(again[(r["method"], r["k"], r["seed"])], sort_keys=True) == json.dumps(r, sort_keys=True)
    new = [again[(r["method"], r["k"], r["seed"])] for r in (runs[1], runs[3])]
    assert sorted(r["rank"] for r in new) == [0, 1]   # the two remaining runs, one per rank
    for r in new:
        ref = next(x for x in runs if (x["method"], x["seed"]) == (r["method"], r["seed"]))
        for m in METRICS:
            assert r[m] == pytest.approx(ref[m], abs=1e-6)


def test_ranks_given_different_grids_are_refused(tmp_path, stakes_cache, serial):
    script = tmp_path / "mismatch.py"
    script.write_text("import os, sys\nfrom stakes.cli import main\n"
                      "argv = ['compare'] + sys.argv[1:]\n"
                      "if os.environ['RANK'] == '1':\n"
                      "    argv[argv.index('--seeds') + 1] = '0,2'\n"
                      "sys.exit(main(argv))\n")
    out = tmp_path / "never"
    proc = _torchrun(stakes_cache, out, script=str(script))
    assert proc.returncode != 0
    assert "mismatched launch" in proc.stderr and "seeds" in proc.stderr
    assert not (out / "results.json").exists()
