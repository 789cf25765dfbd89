"""The NVIDIA reader: what a compiled kernel's cubin says, with the ``cuobjdump`` and ``nvdisasm``
shipped in the triton wheel.

Per kernel (:class:`NvidiaReader`): registers, stack (spill) and local bytes
(``cuobjdump -res-usage``) and from the SASS the spill instructions (LDL/STL), the tensor-core
instruction family (HMMA mma.sync, HGMMA wgmma, tcgen05 UTC*MMA) and the 128-bit global accesses
(LDG.E.128 / STG.E.128; a 256-bit one counts twice). ``cuobjdump -sass`` costs ~0.3 s of start-up a
cubin, as much as a compile, so the instructions of many kernels are disassembled by one
``nvdisasm`` call (:func:`disassemble`).
"""

from __future__ import annotations

import bisect
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections import Counter
from typing import Any, Dict, Optional


def cuobjdump_path() -> str:
    """The cuobjdump shipped in the triton wheel (else the one on PATH)."""
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.isfile(bundled):
        return bundled
    found = shutil.which("cuobjdump")
    if found is None:
        raise RuntimeError("cuobjdump not found (neither in the triton wheel nor on PATH)")
    return found


def nvdisasm_path() -> Optional[str]:
    """The nvdisasm next to cuobjdump (the triton wheel ships both), else the one on PATH."""
    bundled = os.path.join(os.path.dirname(cuobjdump_path()), "nvdisasm")
    return bundled if os.path.isfile(bundled) else shutil.which("nvdisasm")


def parse_res_usage(text: str) -> Dict[str, int]:
    """``cuobjdump -res-usage`` -> {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..} summed over
    the cubin's functions (a Triton cubin holds one)."""
    out: Dict[str, int] = {}
    for line in text.splitlines():
        if "REG:" not in line:
            continue
        for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line):
            out[key] = max(out.get(key, 0), int(value)) if key == "REG" else out.get(key, 0) + int(value)
    if "REG" not in out:
        raise ValueError("no 'REG:' line in the cuobjdump -res-usage output")
    return out


_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")


def parse_sass(text: str) -> Counter:
    """``cuobjdump -sass`` -> Counter of opcodes with their modifiers (``LDG.E.128``), predicates dropped."""
    return Counter(m.group(1) for m in map(_SASS_LINE.search, text.splitlines()) if m)


def access_bits(opcode: str) -> int:
    """Width in bits of a load/store opcode: LDG.E.128 -> 128, LDG.E.U8 -> 8, LDG.E -> 32."""
    bits = 32
    for part in opcode.split(".")[1:]:
        m = re.fullmatch(r"[US]?(8|16|32|64|128|256)", part)
        if m:
            bits = int(m.group(1))
    return bits


# Instructions that write global memory: stores, reductions and atomics, TMA / bulk-copy stores.
GLOBAL_WRITES = ("STG", "ST", "RED", "REDG", "ATOM", "ATOMG", "UTMASTG", "UTMAREDG", "UBLKCP")


def sass_summary(ops: Counter) -> Dict[str, Any]:
    """What the gates read off the SASS: spill instructions, tensor-core kind, global access widths."""
    def family(prefix):
        return {op: n for op, n in ops.items() if op.split(".")[0] == prefix}

    loads, stores = family("LDG"), family("STG")
    if any(op.startswith("UTC") and "MMA" in op.split(".")[0] for op in ops):
        tensor_core = "tcgen05"
    elif family("HGMMA"):
        tensor_core = "HGMMA"
    elif family("HMMA"):
        tensor_core = "HMMA"
    else:
        tensor_core = "none"

    def vectors(fam):  # 16-byte accesses (a 256-bit one counts twice)
        return sum(n * (access_bits(op) // 128) for op, n in fam.items() if access_bits(op) >= 128)

    return {
        "spill_instructions": sum(n for op, n in ops.items() if op.split(".")[0] in ("LDL", "STL")),
        "traps": sum(n for op, n in ops.items() if op.startswith("BPT.TRAP")),
        "stores": sum(n for op, n in ops.items() if op.split(".")[0] in GLOBAL_WRITES),
        "tensor_core": tensor_core,
        "widest_load": max((access_bits(op) for op in loads), default=0),
        "widest_store": max((access_bits(op) for op in stores), default=0),
        "ld_vectors": vectors(loads),
        "st_vectors": vectors(stores),
    }


def cubin_text(cubin: bytes) -> bytes:
    """The instructions of a cubin: its ``.text.*`` sections (ELF64), concatenated."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        raise ValueError("not an ELF64 cubin")
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]
    text = b""
    for name_at, _, _, _, offset, size, *_ in headers:
        name = cubin[names + name_at: cubin.index(b"\0", names + name_at)]
        if name.startswith(b".text."):
            text += cubin[offset: offset + size]
    if not text:
        raise ValueError("no .text section in the cubin")
    return text


def raw_arch(capability: int) -> str:
    """nvdisasm's --binary name of what Triton compiles for a capability (SM80, SM90a, SM120a)."""
    return f"SM{capability}a" if capability >= 90 else f"SM{capability}"


def _run_on_cubin(tool: str, flag: str, cubin: bytes, workdir: str) -> str:
    fd, path = tempfile.mkstemp(suffix=".cubin", dir=workdir)
    with os.fdopen(fd, "wb") as f:
        f.write(cubin)
    try:
        return subprocess.run([tool, flag, path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


def disassemble(cubins: Dict[str, bytes], capability: int, workdir: str) -> Dict[str, Counter]:
    """Opcode counts of many cubins of one arch (key -> Counter).

    The kernels' instructions are concatenated into one raw binary that nvdisasm decodes in one
    call, and the listing is split back by instruction offset. Falls back to one cuobjdump per cubin.
    """
    keys = list(cubins)
    out: Dict[str, Counter] = {k: Counter() for k in keys}
    nvdisasm = nvdisasm_path()
    try:
        if nvdisasm is None:
            raise RuntimeError("no nvdisasm")
        starts, blob = [], bytearray()
        for k in keys:
            starts.append(len(blob))
            blob += cubin_text(cubins[k])
        fd, path = tempfile.mkstemp(suffix=".bin", dir=workdir)
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(blob))
        try:
            listing = subprocess.run([nvdisasm, "--binary", raw_arch(capability), "-ndf", path],
                                     capture_output=True, text=True, check=True).stdout
        finally:
            os.unlink(path)
        for line in listing.splitlines():
            m = _SASS_LINE.search(line)
            if m:
                at = int(m.group(0)[2:m.group(0).index("*/")], 16)
                out[keys[bisect.bisect_right(starts, at) - 1]][m.group(1)] += 1
        if any(not c for c in out.values()):
            raise RuntimeError("nvdisasm listed no instructions for a kernel")
        return out
    except (RuntimeError, ValueError, subprocess.CalledProcessError, OSError):
        cuobjdump = cuobjdump_path()
        for k in keys:
            out[k] = parse_sass(_run_on_cubin(cuobjdump, "-sass", cubins[k], workdir))
        return out


class NvidiaReader:
    """Reads compiled kernels of one NVIDIA target: resources at once, SASS in batches."""

    BATCH = 64  # kernels a disassembly batch (bounds the cubins held in memory)

    def __init__(self, target, workdir: str):
        self.capability = target.capability
        self.workdir = workdir
        self.cuobjdump = cuobjdump_path()
        self._pending: Dict[str, bytes] = {}
        self._done: Dict[str, Dict[str, Any]] = {}

    def add(self, key: str, ck) -> None:
        """Record a CompiledKernel under ``key`` (its hash)."""
        cubin = ck.asm["cubin"]
        usage = parse_res_usage(_run_on_cubin(self.cuobjdump, "-res-usage", cubin, self.workdir))
        self._done[key] = {"registers": usage["REG"], "spill_bytes": usage.get("STACK", 0),
                           "local_bytes": usage.get("LOCAL", 0), "static_shared": usage.get("SHARED", 0),
                           "waves": None}
        self._pending[key] = cubin
        if len(self._pending) >= self.BATCH:
            self._disassemble()

    def _disassemble(self) -> None:
        if self._pending:
            for key, ops in disassemble(self._pending, self.capability, self.workdir).items():
                self._done[key].update(sass_summary(ops))
            self._pending = {}

    def analyses(self) -> Dict[str, Dict[str, Any]]:
        """Every recorded kernel's analysis (disassembling what is pending)."""
        self._disassemble()
        return self._done
