"""The gates: what fails a compiled launch on a target (PERFORMANCE.md "Static GPU checks").

========== ==============================================================================
gate       fails when
========== ==============================================================================
compile    Triton cannot compile the launch (CompilationError, OutOfResources, ...)
stores     a kernel that writes outputs (``Launch.writes``) issues no global store, reduction or
           atomic: its body was compiled away (triton 3.6 compiled a 64-row fp32 tcgen05 tile on
           sm_100 into a lone trap, 4 registers, no tensor-core instruction)
shared     its shared memory (NVIDIA) / LDS (AMD) exceeds the target's limit a block
           (:attr:`fused._targets.Target.shared_limit`; on the live card, the card's own)
registers  more registers than the target allows: 255 a thread (NVIDIA), 512 VGPRs a lane (AMD;
           the rows also say how many waves a SIMD then holds)
spills     NVIDIA: stack or local bytes, or LDL/STL in the SASS; AMD: a VGPR or SGPR spill,
           scratch memory (``.private_segment_fixed_size``) or a ``scratch_*`` instruction
mma        a matrix kernel (``Launch.kind == "mma"``) issues no tensor-core / matrix-core
           instruction (HMMA, HGMMA, tcgen05; ``v_mfma_*``), in any dtype
wgmma      a matrix kernel with 16-bit operands (``Launch.dot``) on sm_90 issues no HGMMA
vector128  a streaming kernel (``kind == "bandwidth"``) whose full tiles are 16-byte aligned
           (``Launch.aligned``) moves fewer 16-byte vectors than it must: one per 16 bytes a
           thread moves of every operand it reads (LDG.E.128 / ``*_load_dwordx4``) and writes
           (STG.E.128 / ``*_store_dwordx4``), from ``Launch.operands`` and ``Launch.tile``
load       (live card only) the driver refuses to load the compiled kernel
========== ==============================================================================
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

GATES = ("compile", "stores", "shared", "registers", "spills", "mma", "wgmma", "vector128", "load")


def required_vectors(launch, operands: Sequence[Any], warp_size: int) -> Optional[int]:
    """16-byte vectors a thread must move for ``operands`` (:class:`fused._launch.Operand`) in a
    full tile: ``Launch.tile`` elements over ``warp_size · num_warps`` threads; None without a tile."""
    if not launch.tile:
        return None
    per_thread = launch.tile // (warp_size * launch.num_warps)
    return sum(per_thread * o.bytes // 16 for o in operands)


def failed_gates(launch, target, row: Dict[str, Any]) -> List[str]:
    """The gates a compiled launch fails on ``target``; ``row`` holds its analysis (and gets the
    vectors a streaming kernel needs)."""
    failed = []
    if launch.writes and not row.get("stores"):
        failed.append("stores")
    if row["shared"] > row["shared_limit"]:
        failed.append("shared")
    if row["registers"] > target.max_registers:
        failed.append("registers")
    if row["spill_bytes"] > 0 or row["local_bytes"] > 0 or row["spill_instructions"] > 0:
        failed.append("spills")
    if launch.kind == "mma":
        if row["tensor_core"] == "none":
            failed.append("mma")
        elif (not target.is_amd and target.capability == 90 and launch.dot is not None
              and launch.dot.itemsize == 2 and row["tensor_core"] != "HGMMA"):
            failed.append("wgmma")
    if launch.kind == "bandwidth" and launch.aligned and launch.operands:
        reads = [o for o in launch.operands if o.read]
        writes = [o for o in launch.operands if o.written]
        need_ld = required_vectors(launch, reads, target.warp_size)
        need_st = required_vectors(launch, writes, target.warp_size)
        row["ld_vectors_needed"] = max(1, need_ld) if need_ld is not None else 1
        row["st_vectors_needed"] = (max(1, need_st) if need_st is not None else 1) if writes else 0
        if row["ld_vectors"] < row["ld_vectors_needed"] or row["st_vectors"] < row["st_vectors_needed"]:
            failed.append("vector128")
    return failed
