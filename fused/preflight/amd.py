"""The AMD reader: what a compiled kernel's AMDGPU assembly says (``CompiledKernel.asm["amdgcn"]``;
Triton compiles for ``GPUTarget("hip", "gfx942", 64)`` on any machine, no ROCm needed).

From the code object metadata (``.amdgpu_metadata``): ``.vgpr_count`` (arch + accumulation
registers a lane), ``.sgpr_count``, ``.agpr_count``, ``.vgpr_spill_count`` / ``.sgpr_spill_count``
(registers spilled) and ``.private_segment_fixed_size`` (scratch bytes a lane: spills or a stack).
From the instructions: matrix-core ops (``v_mfma_*``), scratch accesses (``scratch_*``), and the
width of global accesses, ``global_*`` and ``buffer_*`` forms alike (``dwordx4`` = 128 bits,
``dwordx2`` 64, ``dword`` 32, ``short`` / ``d16`` 16, ``byte`` 8).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Dict

_METADATA_FIELDS = ("vgpr_count", "sgpr_count", "agpr_count", "vgpr_spill_count", "sgpr_spill_count",
                    "private_segment_fixed_size", "group_segment_fixed_size", "wavefront_size")
_INSTRUCTION = re.compile(r"^\s+([a-z][a-z0-9_]*)(?:\s|$)")


def parse_metadata(asm: str) -> Dict[str, int]:
    """The kernel's code object metadata fields (a Triton kernel is one function)."""
    start = asm.find(".amdgpu_metadata")
    if start < 0:
        raise ValueError("no .amdgpu_metadata block in the amdgcn assembly")
    out: Dict[str, int] = {}
    for name, value in re.findall(r"^\s*-?\s*\.(\w+):\s+(\d+)\s*$", asm[start:], re.M):
        if name in _METADATA_FIELDS:
            out[name] = max(out.get(name, 0), int(value))
    if "vgpr_count" not in out:
        raise ValueError("no .vgpr_count in the amdgcn metadata")
    return out


def parse_instructions(asm: str) -> Counter:
    """Opcode counts of the kernel's instructions (directives, labels and comments skipped)."""
    end = asm.find(".amdgpu_metadata")
    text = asm if end < 0 else asm[:end]
    return Counter(m.group(1) for m in map(_INSTRUCTION.match, text.splitlines()) if m)


_WIDTH = {"dwordx4": 128, "b128": 128, "dwordx3": 96, "b96": 96, "dwordx2": 64, "b64": 64, "dword": 32,
          "b32": 32, "short": 16, "ushort": 16, "sshort": 16, "b16": 16, "byte": 8, "ubyte": 8, "sbyte": 8,
          "u8": 8, "i8": 8, "u16": 16, "i16": 16}


def access_bits(opcode: str) -> int:
    """Bits a lane moves with a global/buffer load or store opcode (0 if it is neither):
    ``global_load_dwordx4`` 128, ``buffer_store_short`` 16, ``global_load_short_d16_hi`` 16."""
    m = re.fullmatch(r"(?:global|buffer)_(?:load|store)_(?:lds_)?([a-z0-9]+)(?:_d16(?:_hi)?)?", opcode)
    return _WIDTH.get(m.group(1), 0) if m else 0


def _is_load(opcode: str) -> bool:
    return bool(re.match(r"(?:global|buffer)_load_", opcode))


def _is_store(opcode: str) -> bool:
    return bool(re.match(r"(?:global|buffer)_store_", opcode))


def summary(metadata: Dict[str, int], ops: Counter, target) -> Dict[str, Any]:
    """What the gates read (the same keys as the NVIDIA reader's, plus ``sgprs`` and ``waves``)."""
    loads = {op: n for op, n in ops.items() if _is_load(op) and access_bits(op)}
    stores = {op: n for op, n in ops.items() if _is_store(op) and access_bits(op)}

    def vectors(fam):  # 16-byte accesses
        return sum(n for op, n in fam.items() if access_bits(op) >= 128)

    vgprs = metadata["vgpr_count"]
    return {
        "registers": vgprs,
        "sgprs": metadata.get("sgpr_count", 0),
        "waves": target.waves_per_simd(vgprs),
        "spill_bytes": metadata.get("private_segment_fixed_size", 0),
        "local_bytes": 0,
        "static_shared": metadata.get("group_segment_fixed_size", 0),
        "spill_instructions": (metadata.get("vgpr_spill_count", 0) + metadata.get("sgpr_spill_count", 0)
                               + sum(n for op, n in ops.items() if op.startswith("scratch_"))),
        "tensor_core": "MFMA" if any(op.startswith("v_mfma") for op in ops) else "none",
        "traps": ops.get("s_trap", 0),
        "stores": sum(n for op, n in ops.items()
                      if re.match(r"(?:global|buffer|flat)_(?:store|atomic)_", op)),
        "widest_load": max((access_bits(op) for op in loads), default=0),
        "widest_store": max((access_bits(op) for op in stores), default=0),
        "ld_vectors": vectors(loads),
        "st_vectors": vectors(stores),
    }


class AmdReader:
    """Reads compiled kernels of one AMD target (the assembly text is in the CompiledKernel)."""

    def __init__(self, target, workdir: str):
        self.target = target
        self._done: Dict[str, Dict[str, Any]] = {}

    def add(self, key: str, ck) -> None:
        asm = ck.asm["amdgcn"]
        self._done[key] = summary(parse_metadata(asm), parse_instructions(asm), self.target)

    def analyses(self) -> Dict[str, Dict[str, Any]]:
        return self._done
