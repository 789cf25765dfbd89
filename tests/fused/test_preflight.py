"""``python -m fused preflight``: the spec grammar, the cuobjdump parsers on canned text, a bad launch
reported as failing, and the whole default grid over archs 80-100 passing.

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
from collections import Counter
from pathlib import Path

import pytest

from fused import preflight
from fused.preflight import (
    PARAM_LISTS,
    SpecError,
    access_bits,
    format_case,
    parse_res_usage,
    parse_sass,
    parse_shape,
    sass_summary,
)

ROOT = Path(__file__).resolve().parents[2]
ARCHS = (80, 86, 89, 90, 100)
# The cold default grid: ~250 CPU-seconds over two workers (about 2 minutes on 2 free cores; 8 minutes
# measured with the 2 cores shared at load 8), under a minute warm (Triton's on-disk cache).
GRID_TIMEOUT_S = 900


def compiler_env(**extra):
    """The environment of a compiling subprocess: no interpreter, the repo importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- spec grammar


def test_parse_shape_structure_ops():
    op, spec = parse_shape("similarity:N=128,D=512,K=100,dtype=bf16")
    assert op == "similarity" and spec == {"N": 128, "D": 512, "K": 100, "dtype": "bfloat16"}
    op, spec = parse_shape("alignment:N=65536,D=768,K=256,dtype=fp16,grad=x,x_ref")
    assert spec["grad"] == "x,x_ref" and spec["dtype"] == "float16"
    _, spec = parse_shape("alignment:K=4096,grad=none")
    assert spec["N"] == 128 and spec["D"] == 512 and spec["grad"] == "none"  # defaults filled in


def test_parse_shape_multi_tensor_ops():
    _, spec = parse_shape("update:params=resnet50,importance=uint8,mask=bool,momentum=0.9,proximal=1,weight_decay=5e-4")
    assert spec["params"] == "resnet50" and spec["importance"] == "uint8" and spec["mask"] == "bool"
    assert spec["momentum"] == 0.9 and spec["proximal"] is True and spec["weight_decay"] == 5e-4
    _, spec = parse_shape("importance:params=64x3x7x7;64;1000x512,dtype=bf16,grad_dtype=fp32")
    assert spec["params"] == [(64, 3, 7, 7), (64,), (1000, 512)] and spec["grad_dtype"] == "float32"
    _, spec = parse_shape("pgd:B=64,D=150528,per_sample_eps=1,clamp=0")
    assert spec["per_sample_eps"] is True and spec["clamp"] is False
    # module_spec: torch dtypes and shape lists for preflight_launches
    import torch

    m = preflight.module_spec("update", parse_shape("update:params=vit_s16,dtype=bf16,importance_dtype=fp32")[1])
    assert m["dtype"] is torch.bfloat16 and m["importance_dtype"] is torch.float32
    assert m["params"] == PARAM_LISTS["vit_s16"] and "grad_dtype" not in m  # the module's default


def test_format_case_round_trips():
    for text in ("alignment:N=1,D=33,K=1000,grad=x,x_ref,dtype=bf16",
                 "update:params=resnet18,importance=bool,mask=uint8,momentum=0.9,proximal=1,weight_decay=0,dtype=fp16"):
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


def test_bad_shape_on_the_command_line_exits_2():
    out = subprocess.run([sys.executable, "-m", "fused", "preflight", "--shape", "similarity:K=-3"],
                         capture_output=True, text=True, env=compiler_env(), cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert "K must be a positive integer" in out.stderr and "Traceback" not in out.stderr


def test_parameter_lists_are_model_shaped():
    counts = {name: sum(math.prod(s) for s in shapes) for name, shapes in PARAM_LISTS.items()}
    assert counts["resnet18"] == 11_689_512  # torchvision resnet18, BN weights and biases
    assert counts["resnet50"] == 25_557_032
    assert counts["vit_b16"] == 86_567_656  # timm vit_base_patch16_224
    assert counts["vit_s16"] == 22_050_664


def test_default_grid_covers_every_op_and_dtype():
    cases = preflight.default_cases()
    seen = {(op, spec["dtype"]) for op, spec in cases}
    assert seen == {(op, dt) for op in preflight.OPS for dt in preflight.DTYPES}
    align = [spec for op, spec in cases if op == "alignment"]
    assert {s["D"] for s in align} >= {1, 4096} and {s["K"] for s in align} >= {1, 4096}
    assert {s["grad"] for s in align} == {"x", "x,x_ref"}
    upd = [spec for op, spec in cases if op == "update"]
    assert {s["importance"] for s in upd} == {"none", "float", "bool", "uint8"}
    assert {s["mask"] for s in upd} == {"none", "float", "bool", "uint8"}
    assert any(s["momentum"] for s in upd) and any(s["proximal"] for s in upd) and any(s["weight_decay"] for s in upd)
    assert {s["D"] for op, s in cases if op == "pgd"} >= {3 * 32 * 32, 3 * 224 * 224}


# ----------------------------------------------------------------------------- cuobjdump parsers

RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:16
 Function _structure_alignment_kernel:
  REG:255 STACK:48 SHARED:1024 LOCAL:0 CONSTANT[0]:624 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
\tcode for sm_90a
\t\tFunction : _kernel
\t.headerflags\t@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                  /* 0x00000a00ff017b82 */
                                                                                           /* 0x000e220000000800 */
        /*02b0*/               @P1 LDG.E.128 R64, desc[UR10][R10.64] ;                     /* 0x0000000a0a401981 */
        /*02c0*/              @!P1 LDG.E.128 R60, desc[UR10][R12.64] ;                     /* 0x0000000a0a3c1981 */
        /*02d0*/                   LDG.E.U8 R3, desc[UR6][R4.64] ;                         /* 0x0000000604037981 */
        /*02e0*/                   LDG.E.64 R2, desc[UR6][R40.64+0x38] ;                   /* 0x0000380628027981 */
        /*1390*/                   STL [R1+0xc], R90 ;                                     /* 0x00000c5a01007387 */
        /*13a0*/                   LDL.LU R89, [R1+0x8] ;                                  /* 0x0000085901007387 */
        /*4d70*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;    /* 0x0000002c3c3c723c */
        /*4d80*/                   HMMA.16816.F32.BF16 R40, R40, R32, RZ ;                 /* 0x000000202828723c */
        /*5000*/                   STG.E.ENL2.256 desc[UR4][R2.64], R4, R12 ;              /* 0x0000000402007986 */
        /*5010*/                   STG.E desc[UR4][R2.64], R4 ;                            /* 0x0000000402007986 */
        /*5020*/                   EXIT ;                                                  /* 0x000000000000794d */
"""


def test_parse_res_usage():
    assert parse_res_usage(RES_USAGE) == {"REG": 255, "STACK": 48, "SHARED": 1024, "LOCAL": 0}
    with pytest.raises(ValueError):
        parse_res_usage("Resource usage:\n Common:\n  GLOBAL:0\n")


def test_parse_sass_and_summary():
    ops = parse_sass(SASS)
    assert ops["LDG.E.128"] == 2 and ops["LDL.LU"] == 1 and ops["STL"] == 1 and ops["EXIT"] == 1
    assert "LDC" in ops and not any(op.startswith("@") or op.startswith("0x") for op in ops)
    s = sass_summary(ops)
    assert s["spill_instructions"] == 2 and s["tensor_core"] == "HGMMA"
    assert s["widest_load"] == 128 and s["widest_store"] == 256
    assert s["ldg_vectors"] == 2 and s["stg_vectors"] == 2  # a 256-bit store counts as two 16-byte ones
    widths = [access_bits(o) for o in ("LDG.E", "LDG.E.U16", "LDG.E.64.CONSTANT", "LDG.E.LTC128B.128")]
    assert widths == [32, 16, 64, 128]
    assert sass_summary(Counter({"UTCHMMA.2CTA": 4, "HMMA.16816.F32": 1}))["tensor_core"] == "tcgen05"
    assert sass_summary(Counter({"HMMA.1684.F32.TF32": 8}))["tensor_core"] == "HMMA"
    assert sass_summary(Counter({"FFMA": 8}))["tensor_core"] == "none"


def test_bandwidth_operands_from_the_launch_config():
    from fused._launch import Launch

    upd = Launch("update.masked_sgd", None, (1,), (), {}, num_warps=8,
                 config=dict(dtypes="float32/float32/float32/uint8/-/float32", BLOCK=2048), kind="bandwidth")
    loads, stores = preflight.launch_operands("update", upd)
    assert loads == ["float32", "float32", "float32", "uint8", "float32"] and stores == ["float32", "float32"]
    # 8 elements a thread: 2 vectors per fp32 operand, none for the uint8 one (8 bytes)
    assert preflight.required_vectors(upd, loads) == 8 and preflight.required_vectors(upd, stores) == 4
    imp = Launch("importance.accumulate", None, (1,), (), {}, num_warps=4,
                 config=dict(dtypes="bfloat16/float16", BLOCK=1024), kind="bandwidth")
    assert preflight.launch_operands("importance", imp) == (["bfloat16", "float16"], ["bfloat16"])
    assert preflight.required_vectors(imp, ["bfloat16", "float16"]) == 2
    assert preflight.required_vectors(Launch("x", None, (1,), (), {}, num_warps=4), ["float32"]) is None


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
                  config=dict(BLOCK=block), kind="mma")
'''

CHECK_BAD = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import bad_kernels
from fused.preflight import check_launches
launches = [bad_kernels.launch(64, "small"), bad_kernels.launch(256, "huge"), bad_kernels.launch(48, "ragged")]
rows = check_launches(launches, arch=int(sys.argv[2]), op="test")
print(json.dumps(rows))
'''


def test_bad_launches_are_failing_rows(tmp_path):
    """A tile that cannot fit (256³ fp16: 256 KiB of operands in shared memory, a 256×256 fp32
    accumulator over 128 threads) fails its gates; a block that does not compile is a failing row,
    not a crash; a sane tile passes."""
    (tmp_path / "bad_kernels.py").write_text(BAD_KERNELS)
    (tmp_path / "check_bad.py").write_text(CHECK_BAD)
    out = subprocess.run([sys.executable, str(tmp_path / "check_bad.py"), str(tmp_path), "90"],
                         capture_output=True, text=True, env=compiler_env(TRITON_CACHE_DIR=str(tmp_path / "cache")),
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    small, huge, ragged = json.loads(out.stdout.strip().splitlines()[-1])
    assert small["verdict"] == "ok", small
    assert small["tensor_core"] == "HGMMA" and small["spill_bytes"] == 0
    assert "shared" in huge["failed"] and huge["shared"] > huge["shared_limit"] == 232_448
    assert huge["verdict"] != "ok"
    assert ragged["failed"] == ["compile"] and ragged["hash"] is None and "arange" in ragged["error"]


def test_check_launches_refuses_the_interpreter():
    # this process runs with TRITON_INTERPRET=1 (conftest) unless a GPU is present
    if not preflight.interpreter_on():
        pytest.skip("the interpreter is off here")
    with pytest.raises(RuntimeError, match="interpreter"):
        preflight.check_launches([], arch=90)


def test_default_grid_passes_on_every_arch(tmp_path):
    """The CI gate: every kernel of every op, at its launcher's configuration for sm_80-sm_100, in every
    dtype, compiles, fits, does not spill and takes the fast paths."""
    dest = tmp_path / "preflight.json"
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "fused", "preflight", "--arch", ",".join(map(str, ARCHS)), "--no-progress",
         "--no-live", "--json", str(dest)],
        capture_output=True, text=True, env=compiler_env(), cwd=ROOT, timeout=GRID_TIMEOUT_S,
    )
    seconds = time.perf_counter() - t0
    summary = "\n".join(out.stdout.splitlines()[-12:])
    payload = json.loads(dest.read_text())
    rows = payload["rows"]
    assert payload["archs"] == list(ARCHS) and payload["triton"] and payload["date"].startswith("20")
    for op in preflight.OPS:
        for arch in ARCHS:
            for dt in ("fp32", "fp16", "bf16"):
                assert any(r["op"] == op and r["arch"] == arch and r["dtype"] == dt and r.get("hash")
                           for r in rows), (op, arch, dt)
    failing = [f"{r['case']} sm_{r['arch']} {r['kernel']}: {r['verdict']} {r.get('error') or ''}"
               for r in rows if r["failed"]]
    assert not failing, f"{len(failing)} failing rows, e.g.\n" + "\n".join(failing[:20]) + "\n" + summary
    assert all(r["spill_bytes"] == 0 and r["spill_instructions"] == 0 for r in rows if r.get("hash"))
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"default grid: {len(rows)} rows in {seconds:.0f} s\n{summary}")


def test_summary_and_table_count_problems_by_gate():
    base = dict(shape="N=1,D=512,K=10", dtype="bf16", live=False, kernel="similarity.forward", config="warps=4",
                kind="mma", case="similarity:N=1,D=512,K=10,dtype=bf16", registers=96, spill_bytes=0,
                spill_instructions=0, shared=1024, shared_limit=232_448, tensor_core="HGMMA", widest_load=128,
                widest_store=32, error=None)
    rows = [dict(base, op="similarity", arch=90, hash="a", failed=[], verdict="ok"),
            dict(base, op="similarity", arch=90, hash="a", failed=[], verdict="ok"),
            dict(base, op="alignment", arch=86, hash="b", spill_bytes=48, failed=["spills", "shared"],
                 verdict="spills,shared"),
            dict(base, op="alignment", arch=86, hash=None, failed=["compile"], verdict="compile",
                 error="OutOfResources: out of resource: shared memory")]
    stats = {90: {"kernels_compiled": 1, "compile_s": 1.0, "wall_s": 2.0},
             86: {"kernels_compiled": 1, "compile_s": 1.0, "wall_s": 2.0}}
    summary = preflight.summarise(rows, 3, stats)
    assert summary["failing_rows"] == 2 and summary["kernels_compiled"] == 2
    assert summary["problems"] == {"compile": {"alignment@sm_86": 1}, "shared": {"alignment@sm_86": 1},
                                   "spills": {"alignment@sm_86": 1}}
    text = preflight.format_summary(summary, 4.0)
    assert "spills: 1 rows (1 kernels): alignment@sm_86 1" in text
    table = preflight.format_table(rows).splitlines()
    assert len(table) == 1 + 3  # header + one line per distinct kernel (the two similarity rows are one)
    assert "(+1)" in table[1] and "OutOfResources" in table[3]
    assert len(preflight.format_table(rows, all_rows=True).splitlines()) == 1 + 4
