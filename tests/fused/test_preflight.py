"""``python -m fused preflight``: the spec grammar, the command line, bad launches reported as failing
on NVIDIA and AMD targets, the fixes for sm_120 and AMD, and the whole default grid passing on all
nine targets (the CI gate).

The test suite runs under the Triton interpreter (tests/conftest.py), which cannot compile: every
compile runs in a subprocess with TRITON_INTERPRET removed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fused import preflight
from fused._multi_tensor import PARAM_LISTS
from fused._ops import KERNEL_DTYPES, OP_NAMES
from fused._targets import DEFAULT_TARGETS
from fused.preflight import SpecError, format_case, parse_shape

ROOT = Path(__file__).resolve().parents[2]
TARGET_NAMES = tuple(t.name for t in DEFAULT_TARGETS)
# The cold default grid over the nine targets: ~1,100 distinct kernels and ~118,000 case launches,
# ~445 CPU-seconds (README: about 4 minutes on 2 idle cores). The timeout leaves room for a machine
# whose cores other jobs share.
GRID_TIMEOUT_S = 1800


def compiler_env(**extra):
    """The environment of a compiling subprocess: no interpreter, the repo importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def preflight_cli(*args, timeout=600, **env):
    return subprocess.run([sys.executable, "-m", "fused", "preflight", "--no-progress", "--no-live", *args],
                          capture_output=True, text=True, env=compiler_env(**env), cwd=ROOT, timeout=timeout)


# ----------------------------------------------------------------------------- spec grammar


def test_parse_shape_structure_ops():
    op, spec = parse_shape("similarity:N=128,D=512,K=100,dtype=bf16")
    assert op == "similarity" and spec == {"N": 128, "D": 512, "K": 100, "dtype": "bfloat16"}
    op, spec = parse_shape("alignment:N=65536,D=768,K=256,dtype=fp16,grad=x,x_ref")
    assert spec["grad"] == "x,x_ref" and spec["dtype"] == "float16"
    assert parse_shape("alignment:grad=x_ref,x")[1]["grad"] == "x,x_ref"  # either order
    _, spec = parse_shape("alignment:K=4096,grad=none")
    assert spec["N"] == 128 and spec["D"] == 512 and spec["grad"] == "none"  # defaults filled in


def test_parse_shape_multi_tensor_ops():
    _, spec = parse_shape("update:params=resnet50,importance=uint8,mask=bool,momentum=0.9,proximal=1,weight_decay=5e-4")
    assert spec["params"] == "resnet50" and spec["importance"] == "uint8" and spec["mask"] == "bool"
    assert spec["momentum"] == 0.9 and spec["proximal"] is True and spec["weight_decay"] == 5e-4
    _, spec = parse_shape("importance:params=64x3x7x7;64;1000x512,dtype=bf16,grad_dtype=fp32,frozen_head=1")
    assert spec["params"] == [(64, 3, 7, 7), (64,), (1000, 512)] and spec["grad_dtype"] == "float32"
    assert spec["frozen_head"] is True
    _, spec = parse_shape("pgd:B=64,D=150528,per_sample_eps=1,clamp=0")
    assert spec["per_sample_eps"] is True and spec["clamp"] is False
    # module_spec: torch dtypes and shape lists for the op's launches
    import torch

    m = preflight.module_spec("update", parse_shape("update:params=vit_s16,dtype=bf16,importance_dtype=fp32")[1])
    assert m["dtype"] is torch.bfloat16 and m["importance_dtype"] is torch.float32
    assert m["params"] == PARAM_LISTS["vit_s16"] and "grad_dtype" not in m  # the module's default


def test_format_case_round_trips():
    for text in ("alignment:N=1,D=33,K=1000,grad=x,x_ref,dtype=bf16",
                 "update:params=resnet18,importance=bool,mask=uint8,momentum=0.9,proximal=1,weight_decay=0,"
                 "frozen_head=1,dtype=fp16",
                 "pgd:B=1,D=268203,grad_dtype=fp32,per_sample_eps=0,clamp=1,targeted=0,dtype=bf16"):
        op, spec = parse_shape(text)
        assert parse_shape(format_case(op, spec)) == (op, spec)


@pytest.mark.parametrize("text, words", [
    ("simlarity:N=1", ["unknown op", "similarity"]),
    ("similarity:N=0", ["N must be a positive integer", "'0'"]),
    ("similarity:N=12a", ["N must be a positive integer"]),
    ("similarity:dtype=fp8", ["dtype must be one of fp32, fp16, bf16", "'fp8'"]),
    ("similarity:M=3", ["unknown key 'M'", "N, D, K, dtype"]),
    ("alignment:grad=y", ["grad must be one of", "'x,x_ref'"]),
    ("pgd:clamp=yes", ["clamp must be 0 or 1"]),
    ("update:importance=int8", ["importance must be one of", "'uint8'"]),
    ("update:params=resnet19", ["params must be a parameter list name", "resnet18", "'resnet19'"]),
    ("update:params=64x0", ["params must be", "'64x0'"]),
    ("update:momentum=-1", ["momentum must be a finite number >= 0"]),
    ("similarity:N=1,N=2", ["given twice"]),
    ("similarity:N", ["expected key=value"]),
])
def test_parse_shape_errors_name_the_key(text, words):
    with pytest.raises(SpecError) as info:
        parse_shape(text)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("args, words", [
    (["--shape", "similarity:K=-3"], ["K must be a positive integer"]),
    (["--arch", "gfx1234x"], ["--arch", "not an AMD name like gfx942"]),
    (["--arch", "sm_7"], ["--arch", "neither a CUDA compute capability"]),
    (["--arch", ","], ["--arch must name at least one target"]),
    (["--jobs", "0"], ["--jobs must be >= 1"]),
    (["--only-live"], ["--only-live: no GPU here"]),
])
def test_bad_arguments_exit_2_naming_the_argument(args, words):
    if "--only-live" in args and preflight.live_card() is not None:
        pytest.skip("a GPU is here")
    out = subprocess.run([sys.executable, "-m", "fused", "preflight", "--no-progress", *args], capture_output=True,
                         text=True, env=compiler_env(), cwd=ROOT, timeout=120)
    assert out.returncode == 2, out.stderr
    for word in words:
        assert word in out.stderr
    assert "Traceback" not in out.stderr


def test_parameter_lists_are_model_shaped():
    counts = {name: sum(math.prod(s) for s in shapes) for name, shapes in PARAM_LISTS.items()}
    assert counts["resnet18"] == 11_689_512  # torchvision resnet18, BN weights and biases
    assert counts["resnet50"] == 25_557_032
    assert counts["vit_b16"] == 86_567_656  # timm vit_base_patch16_224
    assert counts["vit_s16"] == 22_050_664


def test_default_grid_is_the_full_structure_product():
    """Every op in every dtype; the structure ops over the full N × D × K product (D 1-4096, K 1-4096
    with ImageNet's 1,000 and 21,843) with every gradient; the multi-tensor and PGD variants."""
    from fused._triton_common import STRUCTURE_D, STRUCTURE_K, STRUCTURE_N

    cases = preflight.default_cases()
    assert {(op, spec["dtype"]) for op, spec in cases} == {(op, dt) for op in OP_NAMES for dt in KERNEL_DTYPES}
    assert min(STRUCTURE_D) == 1 and max(STRUCTURE_D) == 4096 and {1000, 21843} <= set(STRUCTURE_K)
    assert min(STRUCTURE_K) == 1 and 4096 in STRUCTURE_K
    # both Triton specialisations of K (a multiple of 16 or not) in every power-of-two bucket to 4096
    for j in range(4, 13):
        bucket = [k for k in STRUCTURE_K if 2 ** (j - 1) < k <= 2 ** j]
        assert any(k % 16 == 0 for k in bucket) and any(k % 16 for k in bucket), j
    sim = {(s["N"], s["D"], s["K"], s["dtype"]) for op, s in cases if op == "similarity"}
    assert {(D, K) for N, D, K, _ in sim if N == 65536} == {(D, K) for D in STRUCTURE_D for K in STRUCTURE_K}
    assert {N for N, *_ in sim} == set(STRUCTURE_N) == {1, 128, 65536}
    align = {(s["N"], s["D"], s["K"], s["dtype"], s["grad"]) for op, s in cases if op == "alignment" and "path" not in s}
    assert len(align) == 4 * len(sim) and {g for *_, g in align} == {"x", "x_ref", "x,x_ref", "none"}
    forced = [s for op, s in cases if op == "alignment" and "path" in s]
    assert {s["path"] for s in forced} == {"gram"} and max(s["K"] for s in forced) <= 128  # tests force it there
    upd = [spec for op, spec in cases if op == "update"]
    assert {s["importance"] for s in upd} == {"none", "float", "bool", "uint8"}
    assert {s["mask"] for s in upd} == {"none", "float", "bool", "uint8"}
    assert all(any(s[k] for s in upd) for k in ("momentum", "proximal", "weight_decay", "frozen_head"))
    pgd = [spec for op, spec in cases if op == "pgd"]
    assert {s["D"] for s in pgd} >= {3 * 32 * 32, 3 * 224 * 224, 3 * 299 * 299}
    assert {(s["dtype"], s.get("grad_dtype", s["dtype"])) for s in pgd} == {
        (a, b) for a in KERNEL_DTYPES for b in KERNEL_DTYPES}
    assert len(cases) == len({repr(sorted(s.items())) + op for op, s in cases})  # each case once


# ----------------------------------------------------------------------------- compiling

BAD_KERNELS = '''
import torch
import triton
import triton.language as tl

from fused._launch import Launch


@triton.jit
def _tile_product(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))


def launch(block, name):
    a = torch.empty((block, block), dtype=torch.float16, device="meta")
    c = torch.empty((block, block), dtype=torch.float32, device="meta")
    return Launch(name, _tile_product, (1,), (a, a, c), dict(M=block, N=block, K=block), num_warps=4,
                  config=dict(BLOCK=block), kind="mma", dot=torch.float16)
'''

CHECK_BAD = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import bad_kernels
from fused.preflight import check_launches
launches = [bad_kernels.launch(64, "small"), bad_kernels.launch(256, "huge"), bad_kernels.launch(48, "ragged")]
rows = check_launches(launches, arch=sys.argv[2], op="test")
print(json.dumps(rows))
'''


@pytest.mark.parametrize("arch, limit, tensor_core", [("90", 232_448, "HGMMA"), ("gfx942", 65_536, "MFMA")])
def test_bad_launches_are_failing_rows(tmp_path, arch, limit, tensor_core):
    """A tile that cannot fit (256³ fp16: 256 KiB of operands in shared memory / LDS, a 256×256 fp32
    accumulator over 4 warps) fails its gates; a block that does not compile is a failing row, not a
    crash; a sane tile passes, with the vendor's matrix instructions."""
    (tmp_path / "bad_kernels.py").write_text(BAD_KERNELS)
    (tmp_path / "check_bad.py").write_text(CHECK_BAD)
    out = subprocess.run([sys.executable, str(tmp_path / "check_bad.py"), str(tmp_path), arch],
                         capture_output=True, text=True, env=compiler_env(TRITON_CACHE_DIR=str(tmp_path / "cache")),
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    small, huge, ragged = json.loads(out.stdout.strip().splitlines()[-1])
    assert small["verdict"] == "ok", small
    assert small["tensor_core"] == tensor_core and small["spill_bytes"] == 0 and small["shared_limit"] == limit
    assert huge["verdict"] != "ok"
    assert "shared" in huge["failed"] or "spills" in huge["failed"] or huge["failed"] == ["compile"], huge
    if huge["hash"]:
        assert huge["shared"] > limit or huge["spill_bytes"] > 0
    assert ragged["failed"] == ["compile"] and ragged["hash"] is None and "arange" in ragged["error"]


def test_check_launches_refuses_the_interpreter():
    # this process runs with TRITON_INTERPRET=1 (conftest) unless a GPU is present
    if not preflight.interpreter_on():
        pytest.skip("the interpreter is off here")
    with pytest.raises(RuntimeError, match="interpreter"):
        preflight.check_launches([], arch=90)


def _rows(payload, **where):
    return [r for r in payload["rows"] if all(r[k] == v for k, v in where.items())]


def test_amd_fp32_matrix_kernels_compile_with_mfma(tmp_path):
    """Triton's AMD backend has no tf32x3 (every fp32 similarity / alignment kernel failed to compile
    for gfx90a/942/950 with it): fp32 dots run 'ieee' there, on the fp32 MFMA instructions."""
    dest = tmp_path / "amd.json"
    out = preflight_cli("--arch", "gfx90a,gfx942,gfx950", "--json", str(dest),
                        "--shape", "similarity:N=65536,D=512,K=256,dtype=fp32",
                        "--shape", "alignment:N=65536,D=768,K=100,dtype=fp32,grad=x,x_ref",
                        "--shape", "alignment:N=65536,D=768,K=1000,dtype=fp32,grad=x",
                        TRITON_CACHE_DIR=str(tmp_path / "cache"))
    payload = json.loads(dest.read_text())
    rows = payload["rows"]
    assert {r["arch"] for r in rows} == {"gfx90a", "gfx942", "gfx950"}
    assert {r["kernel"] for r in rows} == {"similarity.forward", "alignment.anchors", "alignment.scalars",
                                           "alignment.gram_grad"}
    for r in rows:
        assert r["verdict"] == "ok" and r["tensor_core"] == "MFMA", r
        assert r["registers"] <= 512 and r["waves"] >= 1 and r["shared"] <= r["shared_limit"]
    assert {t["name"]: t["shared_limit"] for t in payload["targets"]} == {
        "gfx90a": 65_536, "gfx942": 65_536, "gfx950": 163_840}
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_sm120_gram_path_does_not_spill(tmp_path):
    """sm_120 (consumer Blackwell) multiplies with mma.sync like sm_8x: it takes sm_8x's tiles, not
    sm_90's (with those, the fp32 Gram path spilled 520 B a thread at K = 1000, D = 768)."""
    dest = tmp_path / "sm120.json"
    out = preflight_cli("--arch", "120", "--json", str(dest),
                        "--shape", "alignment:N=1000,D=768,K=1000,dtype=fp32,grad=x,x_ref",
                        "--shape", "alignment:N=4096,D=2048,K=4096,dtype=fp32",
                        "--shape", "alignment:N=65536,D=768,K=128,dtype=bf16,grad=x,x_ref",
                        TRITON_CACHE_DIR=str(tmp_path / "cache"))
    rows = json.loads(dest.read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"alignment.scalars", "alignment.gram_grad", "alignment.anchors"}
    for r in rows:
        assert r["arch"] == "sm_120" and r["shared_limit"] == 101_376
        assert r["verdict"] == "ok" and r["spill_bytes"] == 0 and r["spill_instructions"] == 0, r
        assert r["tensor_core"] == "HMMA"
    assert out.returncode == 0, out.stdout[-3000:]


@pytest.mark.slow
def test_default_grid_passes_on_every_arch(tmp_path):
    """The CI gate: every kernel of every op, at its launcher's configuration for all nine targets
    (sm_80 … sm_120, gfx90a, gfx942, gfx950), over the full default grid in every dtype, compiles,
    fits, does not spill and takes the fast paths."""
    dest = tmp_path / "preflight.json"
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "fused", "preflight", "--no-progress", "--no-live", "--json", str(dest)],
        capture_output=True, text=True, env=compiler_env(), cwd=ROOT, timeout=GRID_TIMEOUT_S,
    )
    seconds = time.perf_counter() - t0
    summary = "\n".join(out.stdout.splitlines()[-14:])
    payload = json.loads(dest.read_text())
    rows = payload["rows"]
    assert payload["archs"] == list(TARGET_NAMES) and payload["triton"] and payload["date"].startswith("20")
    assert len(TARGET_NAMES) == 9
    for op in OP_NAMES:
        for arch in TARGET_NAMES:
            for dt in ("fp32", "fp16", "bf16"):
                assert any(r["op"] == op and r["arch"] == arch and r["dtype"] == dt and r.get("hash")
                           for r in rows), (op, arch, dt)
    failing = [f"{r['cases'][0]} {r['arch']} {r['kernel']}: {r['verdict']} {r.get('error') or ''} "
               f"(+{len(r['cases']) - 1} cases)" for r in rows if r["failed"]]
    assert not failing, f"{len(failing)} failing kernels, e.g.\n" + "\n".join(failing[:20]) + "\n" + summary
    assert all(r["spill_bytes"] == 0 and r["spill_instructions"] == 0 for r in rows if r.get("hash"))
    assert all(r["tensor_core"] != "none" for r in rows if r["kind"] == "mma")
    assert payload["summary"]["rows"] == sum(r["count"] for r in rows) > 100_000
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"default grid: {payload['summary']['rows']} rows, {payload['summary']['distinct_kernels']} kernels "
          f"in {seconds:.0f} s\n{summary}")


def test_summary_and_table_count_problems_by_gate():
    base = dict(shape="N=1,D=512,K=10", dtype="bf16", live=False, kernel="similarity.forward", config="warps=4",
                kind="mma", case="similarity:N=1,D=512,K=10,dtype=bf16", registers=96, waves=None, spill_bytes=0,
                spill_instructions=0, shared=1024, shared_limit=232_448, tensor_core="HGMMA", widest_load=128,
                widest_store=32, error=None)
    rows = [dict(base, op="similarity", arch="sm_90", hash="a", failed=[], verdict="ok"),
            dict(base, op="similarity", arch="sm_90", hash="a", failed=[], verdict="ok"),
            dict(base, op="alignment", arch="gfx942", hash="b", spill_bytes=48, waves=2, registers=256,
                 failed=["spills", "shared"], verdict="spills,shared", case="alignment:K=100,dtype=fp16"),
            dict(base, op="alignment", arch="gfx942", hash="b", spill_bytes=48, waves=2, registers=256,
                 failed=["spills", "shared"], verdict="spills,shared", case="alignment:K=65,dtype=fp16"),
            dict(base, op="alignment", arch="sm_86", hash=None, failed=["compile"], verdict="compile",
                 error="OutOfResources: out of resource: shared memory")]
    grouped = preflight.group_rows(rows)
    assert [g["count"] for g in grouped] == [2, 2, 1]
    assert grouped[0]["cases"] == [base["case"]]  # a passing group keeps its first case
    assert grouped[1]["cases"] == ["alignment:K=100,dtype=fp16", "alignment:K=65,dtype=fp16"]  # a failing one all
    stats = {"sm_90": {"kernels_compiled": 1, "compile_s": 1.0, "wall_s": 2.0},
             "gfx942": {"kernels_compiled": 1, "compile_s": 1.0, "wall_s": 2.0},
             "sm_86": {"kernels_compiled": 0, "compile_s": 1.0, "wall_s": 2.0}}
    summary = preflight.summarise(grouped, 4, stats)
    assert summary["rows"] == 5 and summary["failing_rows"] == 3 and summary["distinct_kernels"] == 2
    assert summary["problems"] == {"compile": {"alignment@sm_86": 1}, "shared": {"alignment@gfx942": 2},
                                   "spills": {"alignment@gfx942": 2}}
    assert summary["per_target"]["gfx942"]["failing_rows"] == 2 and summary["per_target"]["sm_90"]["rows"] == 2
    text = preflight.format_summary(summary, 4.0)
    assert "spills: 2 rows (1 kernels): alignment@gfx942 2" in text
    table = preflight.format_table(grouped).splitlines()
    assert len(table) == 1 + 3
    assert "(+1)" in table[1] and "  2  " in table[2] and "OutOfResources" in table[3]  # waves column on AMD
