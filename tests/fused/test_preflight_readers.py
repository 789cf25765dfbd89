"""The preflight's readers on canned tool output (NVIDIA: cuobjdump / nvdisasm; AMD: the amdgcn
assembly and its metadata) and its gates on synthetic rows."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fused._launch import Launch, Operand
from fused._targets import BY_NAME
from fused.preflight import amd, nvidia
from fused.preflight.gates import failed_gates, required_vectors

# ----------------------------------------------------------------------------- NVIDIA

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
    assert nvidia.parse_res_usage(RES_USAGE) == {"REG": 255, "STACK": 48, "SHARED": 1024, "LOCAL": 0}
    with pytest.raises(ValueError):
        nvidia.parse_res_usage("Resource usage:\n Common:\n  GLOBAL:0\n")


def test_parse_sass_and_summary():
    ops = nvidia.parse_sass(SASS)
    assert ops["LDG.E.128"] == 2 and ops["LDL.LU"] == 1 and ops["STL"] == 1 and ops["EXIT"] == 1
    assert "LDC" in ops and not any(op.startswith("@") or op.startswith("0x") for op in ops)
    s = nvidia.sass_summary(ops)
    assert s["spill_instructions"] == 2 and s["tensor_core"] == "HGMMA"
    assert s["widest_load"] == 128 and s["widest_store"] == 256
    assert s["ld_vectors"] == 2 and s["st_vectors"] == 2  # a 256-bit store counts as two 16-byte ones
    widths = [nvidia.access_bits(o) for o in ("LDG.E", "LDG.E.U16", "LDG.E.64.CONSTANT", "LDG.E.LTC128B.128")]
    assert widths == [32, 16, 64, 128]
    assert nvidia.sass_summary(Counter({"UTCHMMA.2CTA": 4, "HMMA.16816.F32": 1}))["tensor_core"] == "tcgen05"
    assert nvidia.sass_summary(Counter({"HMMA.1684.F32.TF32": 8}))["tensor_core"] == "HMMA"
    assert nvidia.sass_summary(Counter({"FFMA": 8}))["tensor_core"] == "none"
    # a body the compiler replaced with a trap (triton 3.6, a 64-row fp32 tcgen05 tile on sm_100)
    trapped = nvidia.sass_summary(Counter({"LDC": 1, "BPT.TRAP": 1, "BRA": 1}))
    assert trapped["traps"] == 1 and trapped["stores"] == 0
    assert s["traps"] == 0 and s["stores"] == 2  # STG.E.ENL2.256 and STG.E
    assert [nvidia.raw_arch(c) for c in (80, 90, 120)] == ["SM80", "SM90a", "SM120a"]


# ----------------------------------------------------------------------------- AMD

AMDGCN = """
\t.text
\t.amdgcn_target "amdgcn-amd-amdhsa--gfx942"
\t.globl\t_kernel
_kernel:
; %bb.0:
\ts_load_dwordx2 s[0:1], s[0:1], 0x0
\tglobal_load_dwordx4 v[0:3], v4, s[0:1]
\tbuffer_load_dwordx4 v[4:7], v8, s[4:7], 0 offen
\tbuffer_load_ushort v9, v8, s[4:7], 0 offen
\tglobal_load_short_d16_hi v9, v8, s[0:1]
\tv_mfma_f32_32x32x8_f16 a[0:15], v[0:1], v[2:3], a[0:15]
\tscratch_store_dword off, v1, s33
\tglobal_store_dwordx2 v[0:1], v[2:3], off
\tbuffer_store_dwordx4 v[4:7], v8, s[4:7], 0 offen
\ts_endpgm
\t.section\t.rodata,"a",@progbits
\t.amdhsa_kernel _kernel
\t\t.amdhsa_private_segment_fixed_size 12
\t.end_amdhsa_kernel
\t.amdgpu_metadata
---
amdhsa.kernels:
  - .agpr_count:     16
    .args:
      - .offset:         0
        .size:           8
    .group_segment_fixed_size: 8192
    .private_segment_fixed_size: 12
    .sgpr_count:     41
    .sgpr_spill_count: 0
    .vgpr_count:     160
    .vgpr_spill_count: 3
    .wavefront_size: 64
amdhsa.target:   amdgcn-amd-amdhsa--gfx942
\t.end_amdgpu_metadata
"""


def test_amd_metadata_and_instructions():
    meta = amd.parse_metadata(AMDGCN)
    assert meta == {"agpr_count": 16, "group_segment_fixed_size": 8192, "private_segment_fixed_size": 12,
                    "sgpr_count": 41, "sgpr_spill_count": 0, "vgpr_count": 160, "vgpr_spill_count": 3,
                    "wavefront_size": 64}
    ops = amd.parse_instructions(AMDGCN)
    assert ops["global_load_dwordx4"] == 1 and ops["v_mfma_f32_32x32x8_f16"] == 1 and ops["s_endpgm"] == 1
    assert not any(op.startswith(".") or op.endswith(":") for op in ops) and "amdhsa" not in "".join(ops)
    s = amd.summary(meta, ops, BY_NAME["gfx942"])
    assert s["registers"] == 160 and s["sgprs"] == 41 and s["waves"] == 3  # ⌊512 / 160⌋ waves a SIMD
    assert s["spill_bytes"] == 12 and s["spill_instructions"] == 3 + 1  # 3 VGPRs spilled, 1 scratch store
    assert s["tensor_core"] == "MFMA" and s["static_shared"] == 8192 and s["traps"] == 0 and s["stores"] == 2
    trapped = amd.summary(meta, Counter({"s_trap": 1, "s_endpgm": 1}), BY_NAME["gfx942"])
    assert trapped["traps"] == 1 and trapped["stores"] == 0
    assert s["widest_load"] == 128 and s["widest_store"] == 128
    assert s["ld_vectors"] == 2 and s["st_vectors"] == 1  # dwordx4 loads (global + buffer), one store
    assert [amd.access_bits(o) for o in ("global_load_dwordx4", "buffer_store_dwordx2", "buffer_load_ubyte",
                                         "global_load_short_d16_hi", "global_load_lds_dwordx4", "v_mfma_f32",
                                         "ds_read_b128")] == [128, 64, 8, 16, 128, 0, 0]
    with pytest.raises(ValueError, match="amdgpu_metadata"):
        amd.parse_metadata("\tv_add_f32 v0, v1, v2\n")


def test_waves_a_simd_from_vgprs():
    t = BY_NAME["gfx942"]
    assert [t.waves_per_simd(v) for v in (1, 64, 65, 128, 160, 256, 512)] == [8, 8, 7, 4, 3, 2, 1]


# ----------------------------------------------------------------------------- gates


def _row(**kw):
    row = dict(shared=1024, shared_limit=65_536, registers=128, spill_bytes=0, local_bytes=0, spill_instructions=0,
               tensor_core="MFMA", ld_vectors=0, st_vectors=0, stores=4)
    row.update(kw)
    return row


def _stream(num_warps, tile, aligned=True):
    ops = (Operand("param", torch.float32, written=True), Operand("grad", torch.bfloat16),
           Operand("mask", torch.uint8), Operand("out", torch.float32, read=False, written=True))
    return Launch("update.masked_sgd", None, (1,), (), {}, num_warps, kind="bandwidth", operands=ops, tile=tile,
                  aligned=aligned)


def test_vectors_a_thread_from_typed_operands():
    # 2048 elements over 2 AMD waves = 16 a lane: fp32 4 vectors, bf16 2, uint8 1
    launch = _stream(num_warps=2, tile=2048)
    reads = [o for o in launch.operands if o.read]
    writes = [o for o in launch.operands if o.written]
    assert required_vectors(launch, reads, 64) == 4 + 2 + 1 and required_vectors(launch, writes, 64) == 8
    # the same tile over 4 NVIDIA warps of 32 lanes: 16 a thread as well
    assert required_vectors(_stream(num_warps=4, tile=2048), reads, 32) == 7
    assert required_vectors(_stream(num_warps=2, tile=0), reads, 64) is None


def test_gates_on_amd_rows():
    gfx = BY_NAME["gfx942"]
    mma = Launch("similarity.forward", None, (1,), (), {}, 4, kind="mma", dot=torch.float32, writes=(2,))
    assert failed_gates(mma, gfx, _row()) == []
    assert failed_gates(mma, gfx, _row(registers=512)) == []
    assert failed_gates(mma, gfx, _row(registers=513)) == ["registers"]
    assert failed_gates(mma, gfx, _row(shared=65_537)) == ["shared"]
    assert failed_gates(mma, gfx, _row(spill_instructions=2)) == ["spills"]
    assert failed_gates(mma, gfx, _row(spill_bytes=4)) == ["spills"]
    assert failed_gates(mma, gfx, _row(tensor_core="none")) == ["mma"]
    # compiled away (a lone trap): writes nothing, multiplies nothing
    assert failed_gates(mma, gfx, _row(tensor_core="none", registers=4, traps=1, stores=0)) == ["stores", "mma"]
    stream = _stream(num_warps=2, tile=2048)
    row = _row(tensor_core="none", ld_vectors=7, st_vectors=8)
    assert failed_gates(stream, gfx, row) == [] and row["ld_vectors_needed"] == 7 and row["st_vectors_needed"] == 8
    assert failed_gates(stream, gfx, _row(ld_vectors=6, st_vectors=8)) == ["vector128"]
    assert failed_gates(stream, gfx, _row(ld_vectors=7, st_vectors=7)) == ["vector128"]
    # unaligned tiles cannot vectorise: not gated
    assert failed_gates(_stream(num_warps=2, tile=2048, aligned=False), gfx, _row(ld_vectors=0)) == []


def test_gates_on_nvidia_rows():
    sm90, sm80 = BY_NAME["sm_90"], BY_NAME["sm_80"]
    half = Launch("alignment.anchors", None, (1,), (), {}, 4, kind="mma", dot=torch.bfloat16)
    single = Launch("alignment.anchors", None, (1,), (), {}, 4, kind="mma", dot=torch.float32)
    assert failed_gates(half, sm90, _row(tensor_core="HGMMA", shared_limit=232_448)) == []
    assert failed_gates(half, sm90, _row(tensor_core="HMMA", shared_limit=232_448)) == ["wgmma"]
    assert failed_gates(single, sm90, _row(tensor_core="HMMA", shared_limit=232_448)) == []  # tf32x3: any MMA
    assert failed_gates(half, sm80, _row(tensor_core="HMMA")) == []
    assert failed_gates(half, sm80, _row(tensor_core="HMMA", registers=256)) == ["registers"]
    assert failed_gates(half, sm80, _row(tensor_core="HMMA", local_bytes=8)) == ["spills"]
