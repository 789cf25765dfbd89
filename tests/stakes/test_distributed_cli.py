"""`torchrun -m stakes unlearn` on 2 CPU processes (gloo) against the same command on one process:
the whole digits run equal at the stop (on one node, and on two nodes through a c10d rendezvous), a rank killed mid-run and resumed by torchrun
--max-restarts, a dead rank without restarts and a hung rank (collective timeout) stopping the job
with a clear message, and a launch with more ranks than proxy pairs refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo"),
              pytest.mark.slow]   # torchrun subprocesses: the full suite (-m slow)

# the README's main job on another seed; a single thread per process, so that 1 and 2 processes
# do the same arithmetic per sample
JOB = ["unlearn", "--dataset", "digits", "--method", "structguard", "--k", "8", "--seed", "2", "--no-progress"]


def _env(cache, **extra):
    # the user's environment: not the test session's Triton interpreter, no fault or torchrun leftovers
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STAKES_FAULT", "TORCHELASTIC", "TRITON_INTERPRET"))}
    env.update(STAKES_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


def _stakes(cache, args, *, nproc=None, torchrun_args=(), timeout=300, **env):
    if nproc is None:
        cmd = [sys.executable, "-m", "stakes", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               *torchrun_args, "-m", "stakes", *args]
    return subprocess.run(cmd, env=_env(cache, **env), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def single_run(stakes_cache, digits_model, digits_anchors, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "r.json"
    proc = _stakes(stakes_cache, [*JOB, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _same_result(a: dict, b: dict):
    assert a["proxies"]["eps"] == b["proxies"]["eps"] and a["proxies"]["n"] == b["proxies"]["n"]
    assert a["proxies"]["checksum"] == pytest.approx(b["proxies"]["checksum"], rel=1e-6)
    assert a["steps"] == b["steps"] and a["epochs"] == b["epochs"] and a["stopped"] == b["stopped"]
    for key in ("forget_accuracy", "test_accuracy", "retain_accuracy"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert [e["step"] for e in a["history"]] == [e["step"] for e in b["history"]]
    for ea, eb in zip(a["history"], b["history"]):
        assert ea["test_accuracy"] == pytest.approx(eb["test_accuracy"], abs=1e-6)
        if "loss" in ea:
            assert ea["loss"] == pytest.approx(eb["loss"], rel=1e-4, abs=1e-6)


def test_two_processes_equal_one_at_the_stop(single_run, stakes_cache, tmp_path):
    out = tmp_path / "r.json"
    proc = _stakes(stakes_cache, [*JOB, "--out", str(out)], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    _same_result(rec, single_run)
    assert rec["forget_accuracy"] == 0.0 and rec["stopped"] == "forget_accuracy_zero"
    assert rec["distributed"] == {"world_size": 2, "backend": "gloo", "restarts": 0}
    assert single_run["distributed"]["world_size"] == 1
    for stage in ("calibration_s", "proxies_s", "importance_s", "loop_s", "eval_s", "evaluation_s"):
        assert rec["timings"][stage] >= 0.0, stage
    assert proc.stdout.count("stakes unlearn —") == 1   # rank 0 alone prints
    assert not os.path.exists(str(out) + ".ckpt")


def test_one_process_takes_the_data_parallel_path_when_asked(single_run, stakes_cache, tmp_path):
    """STAKES_DISTRIBUTED=1 forms the process group at world size 1 and runs DDP and the collectives
    (what one GPU can check of an NCCL job); without it a single torchrun process runs alone."""
    out = tmp_path / "r.json"
    proc = _stakes(stakes_cache, [*JOB, "--out", str(out)], nproc=1, STAKES_DISTRIBUTED="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    _same_result(rec, single_run)
    assert rec["distributed"] == {"world_size": 1, "backend": "gloo", "restarts": 0}
    assert single_run["distributed"] == {"world_size": 1, "backend": None, "restarts": 0}


def test_two_nodes_through_the_c10d_rendezvous(single_run, stakes_cache, tmp_path):
    """Two torchrun agents (--nnodes=2, one process each) meeting at a c10d rendezvous endpoint, as
    on two machines."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "r.json"
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={n}",
                                "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                                "--rdzv-id=stakes-test", "-m", "stakes", *JOB, "--out", str(out)],
                               env=_env(stakes_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for n in (0, 1)]
    try:
        outputs = [a.communicate(timeout=300) for a in agents]
    finally:
        for a in agents:
            a.kill()
    assert all(a.returncode == 0 for a in agents), [o[1][-2000:] for o in outputs]
    rec = json.loads(out.read_text())
    assert rec["distributed"]["world_size"] == 2
    _same_result(rec, single_run)


def test_killed_rank_resumes_under_max_restarts(single_run, stakes_cache, tmp_path):
    out = tmp_path / "r.json"
    proc = _stakes(stakes_cache, [*JOB, "--out", str(out)], nproc=2, torchrun_args=["--max-restarts=1"],
                   STAKES_FAULT="1:3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 exits at the end of epoch 3" in proc.stderr
    rec = json.loads(out.read_text())
    assert rec["distributed"]["restarts"] == 1
    _same_result(rec, single_run)


def test_dead_rank_stops_the_job_with_a_message(stakes_cache, tmp_path):
    out = tmp_path / "r.json"
    proc = _stakes(stakes_cache, [*JOB, "--out", str(out)], nproc=2, STAKES_FAULT="1:2", timeout=120)
    assert proc.returncode != 0
    assert "rank 1 exits at the end of epoch 2" in proc.stderr
    assert "exitcode  : 17" in proc.stderr          # torchrun names the rank that died
    assert not out.exists() and os.path.exists(str(out) + ".ckpt")   # nothing written but the checkpoint
    # the checkpoint resumes on one process, to the result of an uninterrupted run
    again = _stakes(stakes_cache, [*JOB, "--out", str(out), "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(out.read_text())["distributed"]["world_size"] == 1


def test_hung_rank_times_out(stakes_cache, tmp_path):
    out = tmp_path / "r.json"
    # a fixed radius: rank 0 calibrates alone while the others wait, longer than a 20 s timeout under load
    proc = _stakes(stakes_cache, [*JOB, "--out", str(out), "--dist-timeout", "20", "--set", "eps=2.0"], nproc=2,
                   STAKES_FAULT="1:2:hang", timeout=180)
    assert proc.returncode != 0
    assert "rank 0: the process group failed: another rank died or a collective timed out" in proc.stderr
    assert not out.exists()


def test_more_ranks_than_pairs_is_refused(stakes_cache, tmp_path):
    out = tmp_path / "r.json"
    proc = _stakes(stakes_cache, ["unlearn", "--k", "1", "--set", "repetitions=1", "--set", "eps=1.0",
                                  "--no-progress", "--out", str(out)], nproc=2, timeout=120)
    assert proc.returncode != 0
    assert "world size 2 > 1 (forget image, repetition) pairs" in proc.stderr
    assert not out.exists()


def test_single_process_commands_refuse_torchrun(stakes_cache, tmp_path):
    proc = _stakes(stakes_cache, ["pretrain", "--out", str(tmp_path / "m.pt")], nproc=2, timeout=120)
    assert proc.returncode != 0 and "runs on one process" in proc.stderr
