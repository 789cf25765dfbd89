"""``python -m fused preflight``: compile every kernel of every op for every target card, with no
GPU, and check statically what the card would say (PERFORMANCE.md "Static GPU checks").

For each case (an op and a shape spec) and each arch, the op's own plan code
(``fused.<op>.preflight_launches(spec, arch)``, see :mod:`fused._launch`) gives the launches its
launcher would run on that card, on ``meta`` tensors; each is compiled for the arch (Triton needs no
driver to compile: a stand-in driver names the target) and the compiled kernel is checked:

========== ==============================================================================
gate       fails when
========== ==============================================================================
compile    Triton cannot compile the launch (CompilationError, OutOfResources, ...)
shared     its dynamic shared memory exceeds the arch's per-block opt-in limit
           (:data:`fused._launch.SHARED_LIMIT`; on the live card, the card's own limit)
registers  more than 255 registers a thread (``cuobjdump -res-usage``)
spills     STACK > 0 or LOCAL > 0 in the resource usage, or LDL/STL in the SASS
vector128  a ``kind == "bandwidth"`` kernel of update/importance lacks 128-bit global loads and
           stores: it needs one 16-byte LDG per 16 bytes a thread loads of every operand
           (and the same for STG), counted from ``Launch.config``: ``BLOCK`` elements a program,
           and ``loads`` / ``stores`` (operand dtypes) or the multi-tensor ``dtypes`` string
           (:func:`launch_operands`); else at least one LDG.E.128 and one STG.E.128. A 256-bit
           access (sm_100) counts as two
wgmma      a ``kind == "mma"`` kernel with fp16/bf16 operands (``Launch.config["dot"]``, else the
           spec's dtype) on sm_90 issues no HGMMA
load       (live card only) the driver refuses to load the compiled kernel
========== ==============================================================================

Many shapes share one compiled kernel (Triton specialises on dtypes, constexprs and integer
arguments equal to 1 or divisible by 16, not on sizes): the JIT's in-memory cache compiles each
distinct kernel once per arch, and each distinct compiled kernel (``CompiledKernel.hash``) is
analysed once: its resources with ``cuobjdump -res-usage``, its SASS with one ``nvdisasm`` call
per batch of kernels (:func:`disassemble`). (arch, op) tasks are spread over spawned worker
processes (``--jobs``), which compile with the interpreter off whatever ``TRITON_INTERPRET`` says
here. On a machine with a CUDA card the card's arch is added and compiled with its real driver,
which also loads every kernel (the ``load`` gate).

Cost: the default grid is ~100 distinct kernels an arch, ~230 CPU-seconds cold for five archs
(about 2 minutes on 2 free cores), under a minute from Triton's on-disk cache.

These checks say that a kernel will launch and take the fast instruction paths; only a run on the
card says how fast it is.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

OPS = ("similarity", "alignment", "pgd", "update", "importance")
DEFAULT_ARCHS = (80, 86, 89, 90, 100)
GATES = ("compile", "shared", "registers", "spills", "vector128", "wgmma", "load")
MAX_REGISTERS = 255
BANDWIDTH_GATED_OPS = ("update", "importance")

# ----------------------------------------------------------------------------- parameter lists


def _resnet_shapes(blocks: Sequence[int], bottleneck: bool, classes: int = 1000) -> List[Tuple[int, ...]]:
    """Parameter shapes of a torchvision ResNet (conv weights, BN weight and bias, fc)."""
    shapes: List[Tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    c_in, expansion = 64, 4 if bottleneck else 1
    for stage, n in enumerate(blocks):
        width = 64 * 2**stage
        for b in range(n):
            c_out = width * expansion
            if bottleneck:
                convs = [(width, c_in, 1, 1), (width, width, 3, 3), (c_out, width, 1, 1)]
            else:
                convs = [(width, c_in, 3, 3), (width, width, 3, 3)]
            for conv in convs:
                shapes += [conv, (conv[0],), (conv[0],)]
            if b == 0 and (stage > 0 or bottleneck):  # projection shortcut
                shapes += [(c_out, c_in, 1, 1), (c_out,), (c_out,)]
            c_in = c_out
    return shapes + [(classes, c_in), (classes,)]


def _vit_shapes(dim: int, depth: int, mlp: int, patch: int = 16, image: int = 224, classes: int = 1000):
    """Parameter shapes of a timm / torchvision ViT (patch embedding, tokens, blocks, head)."""
    tokens = (image // patch) ** 2 + 1
    shapes: List[Tuple[int, ...]] = [(dim, 3, patch, patch), (dim,), (1, 1, dim), (1, tokens, dim)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (mlp, dim), (mlp,), (dim, mlp), (dim,)]
    return shapes + [(dim,), (dim,), (classes, dim), (classes,)]


PARAM_LISTS: Dict[str, List[Tuple[int, ...]]] = {
    "resnet18": _resnet_shapes((2, 2, 2, 2), bottleneck=False),
    "resnet50": _resnet_shapes((3, 4, 6, 3), bottleneck=True),
    "vit_b16": _vit_shapes(768, 12, 3072),
    "vit_s16": _vit_shapes(384, 12, 1536),
}

# ----------------------------------------------------------------------------- shape specs


class SpecError(ValueError):
    """A --shape that does not parse or names an unknown op, key or value."""


DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
               "half": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}
SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
BINARY_CHOICES = ("none", "float", "bool", "uint8")
GRAD_CHOICES = ("x", "x,x_ref", "x_ref", "none")


def _positive_int(value: str) -> int:
    if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
        raise ValueError("a positive integer")
    return int(value)


def _dtype_name(value: str) -> str:
    name = DTYPE_NAMES.get(value.lower())
    if name is None:
        raise ValueError("one of fp32, fp16, bf16")
    return name


def _flag(value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError("0 or 1")
    return value == "1"


def _number(value: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise ValueError("a number (0 = off)") from None
    if not math.isfinite(out) or out < 0:
        raise ValueError("a finite number >= 0 (0 = off)")
    return out


def _choice(choices: Sequence[str]):
    def parse(value: str) -> str:
        v = value.replace(" ", "")
        if v == "x_ref,x":
            v = "x,x_ref"
        if v not in choices:
            raise ValueError("one of " + ", ".join(repr(c) for c in choices))
        return v
    return parse


def _params(value: str):
    """``resnet18`` (a named list) or ``64x3x7x7;64;1000x512`` (explicit shapes)."""
    if value in PARAM_LISTS:
        return value
    shapes = []
    for part in value.split(";"):
        dims = part.strip().split("x")
        if not part.strip() or not all(re.fullmatch(r"[0-9]+", d) and int(d) > 0 for d in dims):
            raise ValueError(
                f"a parameter list name ({', '.join(PARAM_LISTS)}) or shapes like 64x3x7x7;64;1000x512 "
                f"(positive sizes joined by x, tensors by ;), bad entry {part!r}"
            )
        shapes.append(tuple(int(d) for d in dims))
    return shapes


# Per op: key -> (parser, default). Defaults are the paper's sizes (METHOD.md); a None default
# leaves the key out, so the op module's own default applies (grad_dtype: dtype, and so on).
SPEC_KEYS: Dict[str, Dict[str, Tuple[Any, Any]]] = {
    "similarity": {"N": (_positive_int, 128), "D": (_positive_int, 512), "K": (_positive_int, 100),
                   "dtype": (_dtype_name, "float32")},
    "alignment": {"N": (_positive_int, 128), "D": (_positive_int, 512), "K": (_positive_int, 100),
                  "dtype": (_dtype_name, "float32"), "grad": (_choice(GRAD_CHOICES), "x"),
                  "path": (_choice(("anchors", "gram")), None)},
    "pgd": {"B": (_positive_int, 128), "D": (_positive_int, 3 * 32 * 32), "dtype": (_dtype_name, "float32"),
            "grad_dtype": (_dtype_name, None), "per_sample_eps": (_flag, False), "clamp": (_flag, True),
            "targeted": (_flag, None)},
    "update": {"params": (_params, "resnet18"), "dtype": (_dtype_name, "float32"), "grad_dtype": (_dtype_name, None),
               "importance": (_choice(BINARY_CHOICES), "float"), "importance_dtype": (_dtype_name, None),
               "mask": (_choice(BINARY_CHOICES), "none"), "mask_dtype": (_dtype_name, None),
               "momentum": (_number, 0.0), "momentum_dtype": (_dtype_name, None), "proximal": (_flag, False),
               "weight_decay": (_number, 0.0), "ref_dtype": (_dtype_name, None)},
    "importance": {"params": (_params, "resnet18"), "dtype": (_dtype_name, "float32"),
                   "grad_dtype": (_dtype_name, None)},
}


def complete_spec(op: str, given: Dict[str, Any]) -> Dict[str, Any]:
    """The spec with every key of ``op`` that has a default (None-default keys only when given)."""
    spec = {key: default for key, (_, default) in SPEC_KEYS[op].items() if default is not None}
    spec.update({k: v for k, v in given.items() if v is not None})
    return spec


def parse_shape(text: str) -> Tuple[str, Dict[str, Any]]:
    """``op:key=val,key=val`` -> (op, complete spec). Raises SpecError naming the bad part.

    A comma-separated piece without ``=`` continues the previous value (``grad=x,x_ref``).
    """
    op, sep, rest = text.partition(":")
    op = op.strip()
    if op not in SPEC_KEYS:
        raise SpecError(f"--shape {text!r}: unknown op {op!r}; expected one of {', '.join(OPS)} "
                        "followed by ':key=val,...'")
    keys = SPEC_KEYS[op]
    pairs: List[List[str]] = []
    for piece in rest.split(",") if sep and rest.strip() else []:
        if "=" in piece:
            key, _, value = piece.partition("=")
            pairs.append([key.strip(), value.strip()])
        elif pairs and piece.strip():
            pairs[-1][1] += "," + piece.strip()
        else:
            raise SpecError(f"--shape {text!r}: expected key=value, got {piece!r}")
    given: Dict[str, Any] = {}
    for key, value in pairs:
        if key not in keys:
            raise SpecError(f"--shape {text!r}: unknown key {key!r} for {op}; expected one of {', '.join(keys)}")
        if key in given:
            raise SpecError(f"--shape {text!r}: key {key!r} given twice")
        try:
            given[key] = keys[key][0](value)
        except ValueError as e:
            raise SpecError(f"--shape {text!r}: {key} must be {e}, got {value!r}") from None
    return op, complete_spec(op, given)


def _params_text(params) -> str:
    if isinstance(params, str):
        return params
    text = ";".join("x".join(map(str, s)) for s in params)
    return text if len(text) <= 60 else f"{len(params)} tensors"


def format_shape(op: str, spec: Dict[str, Any]) -> str:
    """The shape column: the spec's keys other than dtype, in --shape syntax."""
    parts = []
    for key in SPEC_KEYS[op]:
        if key == "dtype" or key not in spec:
            continue
        value = spec[key]
        if key == "params":
            value = _params_text(value)
        elif key.endswith("_dtype"):
            value = SHORT_DTYPE[value]
        elif isinstance(value, bool):
            value = int(value)
        elif isinstance(value, float):
            value = f"{value:g}"
        parts.append(f"{key}={value}")
    return ",".join(parts)


def format_case(op: str, spec: Dict[str, Any]) -> str:
    """The --shape argument that reproduces this case."""
    return f"{op}:{format_shape(op, spec)},dtype={SHORT_DTYPE[spec['dtype']]}"


def module_spec(op: str, spec: Dict[str, Any]) -> Dict[str, Any]:
    """The spec as ``preflight_launches`` takes it: dtypes as torch dtypes, params as shape lists."""
    import torch

    out = dict(spec)
    for key, value in spec.items():
        if (key == "dtype" or key.endswith("_dtype")) and isinstance(value, str):
            out[key] = getattr(torch, value)
    if isinstance(out.get("params"), str):
        out["params"] = list(PARAM_LISTS[out["params"]])
    return out


# ----------------------------------------------------------------------------- the default grid

DTYPES = ("float32", "float16", "bfloat16")
STRUCTURE_N = (1, 128, 65536)
STRUCTURE_D = (1, 33, 384, 512, 768, 1024, 2048, 4096)
STRUCTURE_K = (1, 10, 100, 256, 1000, 4096)
PGD_SAMPLES = {"digits": 8 * 8, "cifar": 3 * 32 * 32, "imagenet": 3 * 224 * 224}


def _structure_shapes() -> List[Tuple[int, int, int, str]]:
    """(N, D, K, grad) of the structure ops' default grid.

    Triton specialises integer arguments only as 1 / divisible by 16 / other, so the D × K product
    is taken where the launchers' block choices differ (the large regime, N = 65536, over every D
    multiple of 16 and every K) and the other classes are crossed with a few K: D = 1 on both
    alignment paths (K = 10: one anchor launch, K = 1000: scalars + Gram), D = 33 (odd strides, no
    vector access: the slowest compiles) on the anchor path at the paper's K = 100, N = 1 on both
    paths, and both gradients (x, x_ref) on both paths at D = 512, N = 65536 and the paper's N = 128.
    """
    shapes = [(65536, D, K, "x") for D in STRUCTURE_D if D % 16 == 0 for K in STRUCTURE_K]
    shapes += [(128, D, K, "x") for D in (512, 768) for K in (10, 100, 1000)]
    shapes += [(65536, 1, K, "x") for K in (10, 1000)] + [(65536, 33, 100, "x")]
    shapes += [(1, 512, K, "x") for K in (10, 1000)]
    shapes += [(N, 512, K, "x,x_ref") for N in (65536, 128) for K in (100, 1000)]
    return shapes


def default_cases() -> List[Tuple[str, Dict[str, Any]]]:
    """The paper and large-benchmark regimes of every op, in every dtype (see the helpers)."""
    cases: List[Tuple[str, Dict[str, Any]]] = []
    for dt in DTYPES:
        for N, D, K, grad in _structure_shapes():
            if grad == "x":
                cases.append(("similarity", complete_spec("similarity", dict(N=N, D=D, K=K, dtype=dt))))
            cases.append(("alignment", complete_spec("alignment", dict(N=N, D=D, K=K, dtype=dt, grad=grad))))
    # PGD: the method's step (per-sample radii, clamped to the image range) on digits, CIFAR and
    # ImageNet samples (one block / looped); the four (per-sample, clamp) variants on CIFAR.
    for dt in DTYPES:
        for name, D in PGD_SAMPLES.items():
            variants = [(True, True)]
            if name == "cifar":
                variants += [(True, False), (False, True), (False, False)]
            for B in (1, 512) if name == "cifar" else (512,):
                for per_sample, clamp in variants:
                    cases.append(("pgd", complete_spec("pgd", dict(
                        B=B, D=D, dtype=dt, per_sample_eps=per_sample, clamp=clamp))))
    cases.append(("pgd", complete_spec("pgd", dict(B=512, D=3072, dtype="float32", grad_dtype="bfloat16"))))
    # Multi-tensor ops: every parameter list at the method's configuration (the kernel does not
    # depend on the list, only its grid does), then every importance and every mask kind at least
    # once more per dtype, with momentum, proximal and weight decay on and off among them.
    lists = tuple(PARAM_LISTS)
    # (importance, mask); momentum on at odd places, proximal at 2-3, weight decay at 4-5
    square = [("bool", "bool"), ("none", "float"), ("float", "none"), ("uint8", "none"), ("uint8", "float"),
              ("none", "bool")]
    for dt in DTYPES:
        for name in lists:
            cases.append(("importance", complete_spec("importance", dict(params=name, dtype=dt))))
            cases.append(("update", complete_spec("update", dict(
                params=name, dtype=dt, importance="float", mask="uint8", momentum=0.9, weight_decay=5e-4))))
        if dt != "float32":  # 16-bit gradients into fp32 importance
            cases.append(("importance", complete_spec("importance", dict(params="resnet50", dtype="float32",
                                                                         grad_dtype=dt))))
        for i, (imp, mask) in enumerate(square):
            cases.append(("update", complete_spec("update", dict(
                params=lists[i % len(lists)], dtype=dt, importance=imp, mask=mask,
                importance_dtype="float32" if imp == "float" else None,  # fp32 importance, any params
                momentum=0.9 if i % 2 else 0.0, proximal=bool((i // 2) % 2),
                weight_decay=5e-4 if (i // 4) % 2 else 0.0))))
        if dt != "float32":  # fp32 master weights with 16-bit gradients
            cases.append(("update", complete_spec("update", dict(
                params="resnet50", dtype="float32", grad_dtype=dt, mask="bool", momentum=0.9))))
    return cases


# ----------------------------------------------------------------------------- cuobjdump output


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
        "tensor_core": tensor_core,
        "widest_load": max((access_bits(op) for op in loads), default=0),
        "widest_store": max((access_bits(op) for op in stores), default=0),
        "ldg_vectors": vectors(loads),
        "stg_vectors": vectors(stores),
        "ldgsts": sum(family("LDGSTS").values()),
        "tma": sum(n for op, n in ops.items() if op.startswith("UTMALDG") or op.startswith("UBLKCP")),
    }


def nvdisasm_path() -> Optional[str]:
    """The nvdisasm next to cuobjdump (the triton wheel ships both), else the one on PATH."""
    bundled = os.path.join(os.path.dirname(cuobjdump_path()), "nvdisasm")
    return bundled if os.path.isfile(bundled) else shutil.which("nvdisasm")


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


def _raw_arch(arch: int) -> str:
    """nvdisasm's --binary name of what Triton compiles for ``arch`` (sm_90a, sm_100a, ...)."""
    return f"SM{arch}a" if arch >= 90 else f"SM{arch}"


def disassemble(cubins: Dict[str, bytes], arch: int, workdir: str) -> Dict[str, Counter]:
    """Opcode counts of many cubins of one arch (key -> Counter).

    ``cuobjdump -sass`` takes one cubin and ~0.3 s of start-up each, as long as a compile; so the
    kernels' instructions are concatenated into one raw binary that nvdisasm decodes in one call,
    and the listing is split back by instruction offset. Falls back to one cuobjdump per cubin.
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
            listing = subprocess.run([nvdisasm, "--binary", _raw_arch(arch), "-ndf", path],
                                     capture_output=True, text=True, check=True).stdout
        finally:
            os.unlink(path)
        import bisect

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


def _run_on_cubin(tool: str, flag: str, cubin: bytes, workdir: str) -> str:
    fd, path = tempfile.mkstemp(suffix=".cubin", dir=workdir)
    with os.fdopen(fd, "wb") as f:
        f.write(cubin)
    try:
        return subprocess.run([tool, flag, path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


def resource_usage(cubin: bytes, workdir: str, cuobjdump: Optional[str] = None) -> Dict[str, int]:
    """``cuobjdump -res-usage`` of one cubin: registers, stack (spill) bytes, static shared, local."""
    usage = parse_res_usage(_run_on_cubin(cuobjdump or cuobjdump_path(), "-res-usage", cubin, workdir))
    return {"registers": usage["REG"], "stack": usage.get("STACK", 0), "local": usage.get("LOCAL", 0),
            "static_shared": usage.get("SHARED", 0)}


# ----------------------------------------------------------------------------- gates


DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
               "uint8": 1, "int8": 1, "bool": 1}


def _dtype_bytes(d) -> int:
    name = str(d).replace("torch.", "").replace("tl.", "")
    name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int1": "bool"}.get(name, name)
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown operand dtype {d!r} in Launch.config")
    return DTYPE_BYTES[name]


# Written operand slots of the multi-tensor kernels, whose Launch.config names the operand dtypes
# as "dtypes" = "a/b/..." ("-" for an absent operand), in the kernels' operand order.
WRITTEN_SLOTS = {"update": (0, 5), "importance": (0,)}  # ψ, g, ψ0, I, m, b / I, g


def launch_operands(op: str, launch) -> Tuple[Optional[List[str]], Optional[List[str]]]:
    """(loaded, stored) operand dtypes of a bandwidth launch, from ``Launch.config``: its ``loads``
    and ``stores`` lists if given, else its ``dtypes`` string with the op's written slots."""
    config = launch.config or {}
    if "loads" in config or "stores" in config:
        return config.get("loads"), config.get("stores")
    dtypes = config.get("dtypes")
    if not isinstance(dtypes, str) or op not in WRITTEN_SLOTS:
        return None, None
    slots = dtypes.split("/")
    loads = [d for d in slots if d != "-"]
    stores = [slots[i] for i in WRITTEN_SLOTS[op] if i < len(slots) and slots[i] != "-"]
    if op == "update" and len(slots) > 1 and slots[1] == "-":  # no gradient: ψ is read, not written
        stores = []
    return loads, stores


def required_vectors(launch, operands: Optional[Sequence[Any]]) -> Optional[int]:
    """16-byte vectors a thread must move for ``operands`` (dtypes) in the full tile: ``BLOCK``
    elements a program over ``32·num_warps`` threads; None when the config does not say BLOCK."""
    config = launch.config or {}
    block = config.get("BLOCK", config.get("block"))
    if block is None or operands is None:
        return None
    per_thread = int(block) // (32 * launch.num_warps)
    try:
        return sum(per_thread * _dtype_bytes(d) // 16 for d in operands)
    except ValueError:  # an operand dtype this table does not know: fall back to "some 128-bit access"
        return None


def _uses_16bit_operands(launch, spec: Dict[str, Any]) -> bool:
    config = launch.config or {}
    for key in ("dot", "operand_dtype", "dot_dtype"):
        if key in config:
            try:
                return _dtype_bytes(config[key]) == 2
            except ValueError:
                break
    return spec.get("dtype") in ("float16", "bfloat16")


def failed_gates(op: str, spec: Dict[str, Any], launch, arch: int, row: Dict[str, Any]) -> List[str]:
    """The gates (module docstring) a compiled launch fails; ``row`` holds its analysis."""
    failed = []
    if row["shared"] > row["shared_limit"]:
        failed.append("shared")
    if row["registers"] > MAX_REGISTERS:
        failed.append("registers")
    if row["spill_bytes"] > 0 or row["local_bytes"] > 0 or row["spill_instructions"] > 0:
        failed.append("spills")
    if launch.kind == "bandwidth" and op in BANDWIDTH_GATED_OPS:
        loads, stores = launch_operands(op, launch)
        need_ld, need_st = required_vectors(launch, loads), required_vectors(launch, stores)
        row["ldg_vectors_needed"] = max(1, need_ld) if need_ld is not None else 1
        # a launch that stores nothing (update with no gradient) needs no STG
        row["stg_vectors_needed"] = (max(1, need_st) if stores else 0) if need_st is not None else 1
        if row["ldg_vectors"] < row["ldg_vectors_needed"] or row["stg_vectors"] < row["stg_vectors_needed"]:
            failed.append("vector128")
    if launch.kind == "mma" and arch == 90 and _uses_16bit_operands(launch, spec) and row["tensor_core"] != "HGMMA":
        failed.append("wgmma")
    return failed


# ----------------------------------------------------------------------------- compiling


class StandInDriver:
    """Enough of a Triton driver to compile for ``arch`` with no GPU: the target, and a device id
    distinct per arch (the JIT caches kernels per device)."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


def require_compiler() -> None:
    """Refuse to run under the Triton interpreter (kernels would be interpreted functions)."""
    if interpreter_on():
        raise RuntimeError(
            "the preflight compiles kernels, which the Triton interpreter cannot: unset TRITON_INTERPRET "
            "before importing the kernel modules (python -m fused preflight does this in its workers)"
        )


class ArchChecker:
    """Compiles and checks launches for one arch (a stand-in driver, or the live card's own).

    :meth:`check` compiles (the JIT caches each distinct kernel) and reads the resource usage;
    the SASS of new kernels is disassembled in batches (:func:`disassemble`) and the rows are
    gated in :meth:`finish`.
    """

    BATCH = 64  # kernels a disassembly batch (bounds the cubins held in memory)

    def __init__(self, arch: int, live: Optional[Dict[str, Any]] = None):
        from fused._launch import shared_limit

        require_compiler()
        self.arch = arch
        self.live = live if live and live.get("arch") == arch else None
        self.shared_limit = self.live["shared_limit"] if self.live else shared_limit(arch)
        self.cuobjdump = cuobjdump_path()
        self.analyses: Dict[str, Dict[str, Any]] = {}  # CompiledKernel.hash -> analysis
        self._cubins: Dict[str, bytes] = {}  # hashes waiting for their SASS
        self._rows: List[Tuple[Dict[str, Any], str, Dict[str, Any], Any]] = []
        self.compiled = 0
        self.compile_s = 0.0

    def __enter__(self):
        from triton.runtime import driver

        self.workdir = tempfile.mkdtemp(prefix="fused-preflight-")
        self._previous = driver._active  # None when no driver was made yet (no GPU: none can be)
        if self.live is None:
            driver.set_active(StandInDriver(self.arch))
        else:
            driver.reset_active()  # the card's own driver
        return self

    def __exit__(self, *exc):
        from triton.runtime import driver

        driver._active = self._previous
        shutil.rmtree(self.workdir, ignore_errors=True)
        return False

    def _row(self, op: str, spec: Dict[str, Any], kernel: str, config: str = "", kind: str = "") -> Dict[str, Any]:
        dtype = spec.get("dtype")
        return {"op": op, "shape": format_shape(op, spec) if op in SPEC_KEYS else "",
                "dtype": SHORT_DTYPE.get(dtype, dtype), "arch": self.arch, "live": self.live is not None,
                "kernel": kernel, "config": config, "kind": kind,
                "case": format_case(op, spec) if op in SPEC_KEYS else "", "hash": None}

    def failure(self, op: str, spec: Dict[str, Any], kernel: str, error: BaseException) -> None:
        """A case whose launches could not be planned: a failing 'compile' row."""
        row = self._row(op, spec, kernel)
        row.update(verdict="compile", failed=["compile"], error=_one_line(error))
        self._rows.append((row, op, spec, None))

    def no_launch(self, op: str, spec: Dict[str, Any]) -> None:
        """A case the launcher runs no kernel for (a passing row, so the case is accounted for)."""
        row = self._row(op, spec, "(no launch)")
        row.update(verdict="ok", failed=[], error=None)
        self._rows.append((row, op, spec, None))

    def check(self, op: str, spec: Dict[str, Any], launch) -> None:
        """Compile ``launch`` (cached by the JIT), read its resources (cached by hash); gated in finish()."""
        row = self._row(op, spec, launch.name, launch.describe(), launch.kind)
        t0 = time.perf_counter()
        try:
            ck = launch.compile()
        except Exception as e:  # noqa: BLE001 - any compile failure is a verdict, not a crash
            self.compile_s += time.perf_counter() - t0
            row.update(verdict="compile", failed=["compile"], error=_one_line(e))
            self._rows.append((row, op, spec, None))
            return
        seconds = time.perf_counter() - t0
        self.compile_s += seconds
        if ck.hash not in self.analyses:
            self.compiled += 1
            cubin = ck.asm["cubin"]
            analysis = resource_usage(cubin, self.workdir, self.cuobjdump)
            analysis.update(shared=int(ck.metadata.shared), compile_s=round(seconds, 3),
                            load_error=self._load(ck) if self.live else None)
            self.analyses[ck.hash] = analysis
            self._cubins[ck.hash] = cubin
            if len(self._cubins) >= self.BATCH:
                self._disassemble()
        row["hash"] = ck.hash
        self._rows.append((row, op, spec, launch))

    def _disassemble(self) -> None:
        if self._cubins:
            for h, ops in disassemble(self._cubins, self.arch, self.workdir).items():
                self.analyses[h].update(sass_summary(ops))
            self._cubins = {}

    def finish(self) -> List[Dict[str, Any]]:
        """Every row so far, gated."""
        self._disassemble()
        rows = []
        for row, op, spec, launch in self._rows:
            if launch is not None:
                a = self.analyses[row["hash"]]
                row.update(
                    registers=a["registers"], spill_bytes=a["stack"], local_bytes=a["local"],
                    spill_instructions=a["spill_instructions"], shared=a["shared"],
                    static_shared=a["static_shared"], shared_limit=self.shared_limit,
                    tensor_core=a["tensor_core"], widest_load=a["widest_load"], widest_store=a["widest_store"],
                    ldg_vectors=a["ldg_vectors"], stg_vectors=a["stg_vectors"], compile_s=a["compile_s"],
                    error=a["load_error"],
                )
                failed = failed_gates(op, spec, launch, self.arch, row)
                if a["load_error"]:
                    failed.append("load")
                row["failed"] = failed
                row["verdict"] = "ok" if not failed else ",".join(failed)
            rows.append(row)
        self._rows = []
        return rows

    @staticmethod
    def _load(ck) -> Optional[str]:
        """On the live card: let the driver load the kernel (it checks shared memory and registers)."""
        try:
            ck._init_handles()
        except Exception as e:  # noqa: BLE001
            return _one_line(e)
        return None


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:400]


def check_launches(launches: Iterable, arch: int, op: str = "custom", spec: Optional[Dict[str, Any]] = None,
                   live: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """Compile and check ``launches`` (fused._launch.Launch) for ``arch``: one row each."""
    spec = spec or {}
    with ArchChecker(arch, live) as checker:
        for launch in launches:
            checker.check(op, spec, launch)
        return checker.finish()


def _op_launches(op: str):
    return importlib.import_module(f"fused.{op}").preflight_launches


def run_cases(arch: int, cases: Sequence[Tuple[str, Dict[str, Any]]], live=None, progress=None):
    """Every case on one arch -> (rows, distinct kernels compiled, seconds compiling)."""
    with ArchChecker(arch, live) as checker:
        for op, spec in cases:
            try:
                launches = list(_op_launches(op)(module_spec(op, spec), arch))
            except Exception as e:  # noqa: BLE001 - a plan that cannot be built fails its case
                checker.failure(op, spec, "(plan)", e)
            else:
                if not launches:
                    checker.no_launch(op, spec)
                for launch in launches:
                    checker.check(op, spec, launch)
            if progress is not None:
                progress(1)
        return checker.finish(), checker.compiled, checker.compile_s


# ----------------------------------------------------------------------------- worker processes

_QUEUE = None


def _worker_init(queue) -> None:
    global _QUEUE
    _QUEUE = queue
    os.environ.pop("TRITON_INTERPRET", None)


def _worker(arch: int, cases, live):
    def progress(n):
        if _QUEUE is not None:
            _QUEUE.put(n)

    t0 = time.perf_counter()
    rows, compiled, compile_s = run_cases(arch, cases, live, progress)
    return rows, compiled, compile_s, time.perf_counter() - t0


# Tasks: one per (arch, op group), the costliest first, so that the pool stays balanced (an arch's
# ops share no kernel, so splitting them compiles nothing twice).
TASK_GROUPS = (("alignment",), ("similarity",), ("update", "importance", "pgd"))


def live_card() -> Optional[Dict[str, Any]]:
    """The local CUDA card (arch, name, shared-memory opt-in limit), or None."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)
        from fused._launch import shared_limit

        arch = 10 * props.major + props.minor
        limit = getattr(props, "shared_memory_per_block_optin", None) or shared_limit(arch)
        return {"arch": arch, "name": props.name, "shared_limit": int(limit)}
    except Exception:  # noqa: BLE001 - no usable card: static checks only
        return None


def run(archs: Sequence[int], cases, jobs: int, live=None, show_progress: bool = True):
    """All cases on all archs over ``jobs`` spawned worker processes -> (rows, per-arch stats)."""
    import multiprocessing as mp
    import threading
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    total = len(cases) * len(archs)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="preflight", unit="case", file=sys.stderr, dynamic_ncols=True)

    def pump():
        while True:
            n = queue.get()
            if n is None:
                return
            if bar is not None:
                bar.update(n)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    saved = os.environ.pop("TRITON_INTERPRET", None)  # spawned workers inherit the environment
    tasks = []  # (arch, [(case index, case)])
    for group in TASK_GROUPS + (tuple(op for op in OPS if not any(op in g for g in TASK_GROUPS)),):
        for arch in sorted(archs, key=lambda a: -a):
            chosen = [(i, c) for i, c in enumerate(cases) if c[0] in group]
            if chosen:
                tasks.append((arch, chosen))
    done: Dict[int, List[Tuple[int, List[Dict[str, Any]]]]] = defaultdict(list)
    stats = {arch: {"kernels_compiled": 0, "compile_s": 0.0, "wall_s": 0.0} for arch in archs}
    try:
        with ProcessPoolExecutor(max_workers=max(1, min(jobs, len(tasks))), mp_context=ctx,
                                 initializer=_worker_init, initargs=(queue,)) as pool:
            futures = {pool.submit(_worker, arch, [c for _, c in chosen], live): (arch, chosen)
                       for arch, chosen in tasks}
            for future in as_completed(futures):
                arch, chosen = futures[future]
                try:
                    rows, compiled, compile_s, wall = future.result()
                except Exception as e:  # noqa: BLE001 - a crashed worker fails its cases, not the run
                    rows = [{"op": op, "shape": format_shape(op, spec), "dtype": SHORT_DTYPE.get(spec.get("dtype")),
                             "arch": arch, "live": False, "kernel": "(worker)", "config": "", "kind": "",
                             "case": format_case(op, spec), "hash": None, "verdict": "compile",
                             "failed": ["compile"], "error": _one_line(e)} for _, (op, spec) in chosen]
                    compiled, compile_s, wall = 0, 0.0, 0.0
                by_case = {format_case(*c): i for i, c in chosen}
                done[arch].extend((by_case.get(r["case"], -1), r) for r in rows)
                stats[arch]["kernels_compiled"] += compiled
                stats[arch]["compile_s"] = round(stats[arch]["compile_s"] + compile_s, 2)
                stats[arch]["wall_s"] = round(stats[arch]["wall_s"] + wall, 2)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
        queue.put(None)
        reader.join(timeout=5)
        if bar is not None:
            bar.close()
    # rows in case order per arch (sorted() is stable: a case's launches keep their order)
    rows = [r for arch in archs for _, r in sorted(done[arch], key=lambda ir: ir[0])]
    return rows, stats


# ----------------------------------------------------------------------------- output


def _fmt_bits(bits: int) -> str:
    return f"{bits}b" if bits else "-"


def distinct_rows(rows: Sequence[Dict[str, Any]]) -> List[Tuple[Dict[str, Any], int]]:
    """One row per (op, arch, kernel, compiled kernel or error) with the number of cases it stands for."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for row in rows:
        compiled = row.get("hash") or row.get("error") or row["config"]
        key = (row["op"], row["arch"], row["kernel"], row["dtype"], compiled)
        groups.setdefault(key, []).append(row)
    return [(group[0], len(group)) for group in groups.values()]


def format_table(rows: Sequence[Dict[str, Any]], all_rows: bool = False) -> str:
    """The table: one line per distinct compiled kernel (the first case it serves, and how many
    more), or every row with ``all_rows``."""
    items = [(r, 1) for r in rows] if all_rows else distinct_rows(rows)
    header = ("op", "shape", "dtype", "arch", "kernel", "config", "regs", "spill", "shared/limit", "tc",
              "ld/st", "verdict")
    lines = [header]
    for row, count in items:
        shape = row["shape"] + (f" (+{count - 1})" if count > 1 else "")
        arch = f"{row['arch']}{'*' if row.get('live') else ''}"
        if row.get("hash") is None:
            lines.append((row["op"], shape, row["dtype"], arch, row["kernel"], row["config"], "-", "-", "-", "-",
                          "-", row["verdict"] + (f": {row['error'][:120]}" if row.get("error") else "")))
            continue
        spill = str(row["spill_bytes"]) + (f"/{row['spill_instructions']}i" if row["spill_instructions"] else "")
        lines.append((
            row["op"], shape, row["dtype"], arch, row["kernel"], row["config"], str(row["registers"]), spill,
            f"{row['shared']}/{row['shared_limit']}", row["tensor_core"],
            f"{_fmt_bits(row['widest_load'])}/{_fmt_bits(row['widest_store'])}", row["verdict"],
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line[:-1], widths)) + "  " + line[-1] for line in lines)


def summarise(rows: Sequence[Dict[str, Any]], n_cases: int, stats: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
    problems: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))  # gate -> "op@arch" -> rows
    kernels: Dict[str, set] = defaultdict(set)  # gate -> distinct failing kernels
    for row in rows:
        for gate in row["failed"]:
            problems[gate][f"{row['op']}@sm_{row['arch']}"] += 1
            kernels[gate].add((row["arch"], row.get("hash") or row.get("error")))
    failing = sum(1 for row in rows if row["failed"])
    return {
        "cases": n_cases, "rows": len(rows), "failing_rows": failing,
        "kernels_compiled": sum(s["kernels_compiled"] for s in stats.values()),
        "per_arch": {str(a): s for a, s in stats.items()},
        "problems": {g: dict(sorted(problems[g].items())) for g in GATES if g in problems},
        "failing_kernels": {g: len(kernels[g]) for g in GATES if g in kernels},
    }


def format_summary(summary: Dict[str, Any], seconds: float) -> str:
    lines = [
        f"preflight: {summary['cases']} cases x archs -> {summary['rows']} rows, "
        f"{summary['kernels_compiled']} distinct kernels compiled or loaded from the Triton cache, "
        f"{summary['failing_rows']} failing rows, "
        f"{seconds:.0f} s"
    ]
    for arch, s in summary["per_arch"].items():
        lines.append(f"  sm_{arch}: {s['kernels_compiled']} kernels, {s['compile_s']:.0f} s compiling, "
                     f"{s['wall_s']:.0f} s in all")
    if not summary["problems"]:
        lines.append("  no problems: every kernel compiles, fits, does not spill and takes its fast paths")
    for gate, where in summary["problems"].items():
        detail = ", ".join(f"{k} {v}" for k, v in where.items())
        lines.append(f"  {gate}: {sum(where.values())} rows ({summary['failing_kernels'][gate]} kernels): {detail}")
    return "\n".join(lines)


def write_json(path: str, payload: Dict[str, Any]) -> None:
    """Atomically: a temporary file next to ``path``, then os.replace."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".preflight-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- command line


def _archs(text: str) -> List[int]:
    try:
        archs = [int(a.strip().replace("sm_", "")) for a in text.split(",") if a.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--arch must be comma-separated compute capabilities like 80,90, got {text!r}") from None
    if not archs or any(a < 70 or a > 200 for a in archs):
        raise argparse.ArgumentTypeError(f"--arch must be compute capabilities like 80,86,89,90,100, got {text!r}")
    return sorted(set(archs))


def _shape_help() -> str:
    lines = ["--shape keys (default in brackets; dtypes fp32/fp16/bf16, flags 0/1):"]
    for op, keys in SPEC_KEYS.items():
        parts = []
        for key, (_, default) in keys.items():
            if default is None:
                parts.append(f"{key}")
            else:
                shown = SHORT_DTYPE.get(default, default) if isinstance(default, str) else default
                parts.append(f"{key} [{int(shown) if isinstance(shown, bool) else shown}]")
        lines.append(f"  {op}: " + ", ".join(parts))
    lines.append(f"  params: {' | '.join(PARAM_LISTS)} | shapes like 64x3x7x7;64;1000x512")
    lines.append("Exit status: 0 when every row passes, 1 when one fails, 2 for bad arguments.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fused preflight", epilog=_shape_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile every kernel at its launcher's configuration for each arch (no GPU needed)\n"
                    "and check shared memory, registers, spills, 128-bit accesses and wgmma statically.",
    )
    parser.add_argument("--arch", type=_archs, default=list(DEFAULT_ARCHS),
                        help="comma-separated archs (default 80,86,89,90,100); a local CUDA card is added")
    parser.add_argument("--shape", action="append", default=[], metavar="OP:KEY=VAL,...",
                        help="a case instead of the default grid, e.g. similarity:N=128,D=512,K=100,dtype=bf16 "
                             "or update:params=resnet50,importance=uint8,momentum=0.9 (repeatable)")
    parser.add_argument("--json", metavar="FILE", help="write every row, with versions, date and archs")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (default 2)")
    parser.add_argument("--all-rows", action="store_true", help="print every row, not one per distinct kernel")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--no-live", action="store_true", help="do not add the local CUDA card")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cases = [parse_shape(s) for s in args.shape] if args.shape else default_cases()
    except SpecError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if args.jobs < 1:
        parser.exit(2, f"{parser.prog}: error: --jobs must be >= 1\n")
    if interpreter_on():
        print("note: TRITON_INTERPRET is set here; the preflight compiles in worker processes without it",
              file=sys.stderr)
    archs = list(args.arch)
    live = None if args.no_live else live_card()
    if live is not None and live["arch"] not in archs:
        archs.append(live["arch"])
    t0 = time.perf_counter()
    rows, stats = run(archs, cases, args.jobs, live, show_progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    summary = summarise(rows, len(cases), stats)
    summary["seconds"] = round(seconds, 1)
    print(format_table(rows, all_rows=args.all_rows))
    if live is not None:
        print(f"* live card: {live['name']} (sm_{live['arch']}), compiled with its own driver")
    print(format_summary(summary, seconds))
    if args.json:
        import torch
        import triton

        write_json(args.json, {
            "triton": triton.__version__, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "archs": archs, "live": live, "shared_limits": {str(a): (live["shared_limit"] if live and live["arch"] == a
                                                                     else _shared_limit(a)) for a in archs},
            "summary": summary, "rows": rows,
        })
        print(f"rows -> {args.json}")
    return 1 if summary["failing_rows"] else 0


def _shared_limit(arch: int) -> int:
    from fused._launch import shared_limit

    return shared_limit(arch)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
