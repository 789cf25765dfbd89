"""The cards the kernels are planned for, with the limits a launch must respect on each: one table.

A :class:`Target` is what every ``plan_*`` function of an op takes (as ``arch``): the launcher
passes its device's (:func:`device_target`), ``python -m fused preflight`` every entry of
:data:`TARGETS`. Plans read the vendor, the warp size and the fp32 ``tl.dot`` precision from it, so
one code path chooses what runs on a card and what the preflight checks for it.

Limits (what the driver or the hardware refuses, checked by the preflight):

* NVIDIA: the per-block shared-memory opt-in limit the driver checks at load time, and 255
  registers a thread (PTX's cap; more is a compile error or spills).
* AMD Instinct (CDNA, wave64): LDS a workgroup (64 KiB on gfx90a/gfx942, 160 KiB on gfx950) and
  512 VGPRs a lane (256 arch + 256 accumulation registers, one unified file of 512 a SIMD lane: a
  wave of v VGPRs leaves room for ⌊512 / ⌈v⌉₈⌋ waves on its SIMD, at most 8).

fp32 products on the matrix units: NVIDIA uses "tf32x3" (three tf32 products, ≈ fp32 accuracy).
AMD's Triton takes "ieee", "bf16x3", "bf16x6" everywhere and "tf32" (xf32) on gfx942 only, never
"tf32x3"; "ieee" runs on the fp32 MFMA instructions (``v_mfma_f32_*_f32``) of all three targets
and rounds nothing, so the Triton interpreter's fp32 products (it ignores ``input_precision``) and
the fp64 tests bound its error exactly as they bound tf32x3's. tf32 would lose ~3 decimal digits
that no CPU test could see.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch


@dataclass(frozen=True)
class Target:
    """One card family: ``name`` (``sm_90``, ``gfx942``), ``vendor`` (``nvidia`` / ``amd``), ``arch``
    as Triton's ``GPUTarget`` takes it (90, "gfx942"), ``warp_size`` (32, or 64 for a CDNA wave),
    ``shared_limit`` (bytes of shared memory / LDS a block), ``max_registers`` (a thread / a lane),
    ``fp32_dot`` (the ``input_precision`` of fp32 ``tl.dot``), ``products`` (names people know)."""

    name: str
    vendor: str
    arch: Union[int, str]
    warp_size: int
    shared_limit: int
    max_registers: int
    fp32_dot: str
    products: str
    default: bool = True  # checked by ``python -m fused preflight`` without --arch

    @property
    def is_amd(self) -> bool:
        return self.vendor == "amd"

    @property
    def capability(self) -> int:
        """The CUDA compute capability as 10·major + minor (0 for an AMD target)."""
        return self.arch if isinstance(self.arch, int) else 0

    def gpu_target(self):
        """Triton's ``GPUTarget`` for this card (compiles with no GPU and no ROCm)."""
        from triton.backends.compiler import GPUTarget

        return GPUTarget("hip" if self.is_amd else "cuda", self.arch, self.warp_size)

    def waves_per_simd(self, vgprs: int) -> int:
        """AMD: waves of ``vgprs`` VGPRs a lane that one SIMD holds (granule 8, at most 8)."""
        return min(8, AMD_VGPRS_PER_SIMD_LANE // max(8, -(-vgprs // 8) * 8))

    def __str__(self) -> str:
        return self.name


AMD_VGPRS_PER_SIMD_LANE = 512
_NV = dict(vendor="nvidia", warp_size=32, max_registers=255, fp32_dot="tf32x3")
_AMD = dict(vendor="amd", warp_size=64, max_registers=512, fp32_dot="ieee")

TARGETS: Tuple[Target, ...] = (
    Target("sm_80", arch=80, shared_limit=166_912, products="A100, A30", **_NV),
    Target("sm_86", arch=86, shared_limit=101_376, products="RTX 30xx, RTX A6000, A10, A40", **_NV),
    Target("sm_87", arch=87, shared_limit=166_912, products="Jetson AGX Orin", default=False, **_NV),
    Target("sm_89", arch=89, shared_limit=101_376, products="RTX 40xx, RTX 6000 Ada, L4, L40S", **_NV),
    Target("sm_90", arch=90, shared_limit=232_448, products="H100, H200, GH200", **_NV),
    Target("sm_100", arch=100, shared_limit=232_448, products="B200, GB200", **_NV),
    Target("sm_103", arch=103, shared_limit=232_448, products="B300, GB300", default=False, **_NV),
    Target("sm_120", arch=120, shared_limit=101_376, products="RTX 50xx, RTX PRO 6000 Blackwell", **_NV),
    Target("gfx90a", arch="gfx90a", shared_limit=65_536, products="MI210, MI250, MI250X", **_AMD),
    Target("gfx942", arch="gfx942", shared_limit=65_536, products="MI300X, MI300A, MI325X", **_AMD),
    Target("gfx950", arch="gfx950", shared_limit=163_840, products="MI350X, MI355X", **_AMD),
)
BY_NAME: Dict[str, Target] = {t.name: t for t in TARGETS}
DEFAULT_TARGETS: Tuple[Target, ...] = tuple(t for t in TARGETS if t.default)
# The configuration planned under the CPU interpreter (numerics do not depend on it).
INTERPRETER_TARGET = BY_NAME["sm_90"]

ArchLike = Union[Target, int, str]


def target_of(arch: ArchLike) -> Target:
    """``arch`` as a :class:`Target`: a Target, a compute capability (``90``, ``"90"``, ``"sm_90"``,
    ``"sm_90a"``) or an AMD name (``"gfx942"``, ``"gfx942:sramecc+:xnack-"``). A CUDA capability that
    is not in the table gets the smallest NVIDIA limits (a conservative plan)."""
    if isinstance(arch, Target):
        return arch
    if isinstance(arch, bool) or not isinstance(arch, (int, str)):
        raise TypeError(f"arch must be a Target, a compute capability or an AMD gfx name, got {arch!r}")
    text = str(arch).strip().lower().split(":")[0]
    if text.startswith("gfx"):
        if text in BY_NAME:
            return BY_NAME[text]
        if not re.fullmatch(r"gfx[0-9]{2,4}[0-9a-f]?", text):
            raise ValueError(f"arch {arch!r} is not an AMD name like gfx942; known: "
                             + ", ".join(t.name for t in TARGETS if t.is_amd))
        # A card outside the table (a live RDNA card: wave32): the smallest LDS, not a default target.
        wave = 32 if int(re.match(r"gfx([0-9]+)", text).group(1)[:-2] or 0) >= 10 else 64
        return Target(text, arch=text, shared_limit=65_536, products="", default=False,
                      **dict(_AMD, warp_size=wave))
    digits = text.removeprefix("sm_").removesuffix("a").removesuffix("f")
    if not digits.isdigit() or not 50 <= int(digits) <= 200:
        raise ValueError(f"arch {arch!r} is neither a CUDA compute capability like 90 / sm_90 nor an AMD "
                         f"name like gfx942; known: {', '.join(t.name for t in TARGETS)}")
    cc = int(digits)
    known = BY_NAME.get(f"sm_{cc}")
    if known is not None:
        return known
    smallest = min(t.shared_limit for t in TARGETS if not t.is_amd)
    return Target(f"sm_{cc}", arch=cc, shared_limit=smallest, products="", default=False, **_NV)


def amd_arch_name(gcn_arch_name: str) -> str:
    """``gfx942:sramecc+:xnack-`` (``torch.cuda.get_device_properties().gcnArchName``) -> ``gfx942``."""
    return gcn_arch_name.split(":")[0].strip().lower()


def device_target(device: torch.device) -> Target:
    """The target a launch on ``device`` is planned for: the card's own (a ROCm build of torch
    reports AMD cards as ``cuda`` devices: their gfx name decides), or the interpreter's on the CPU."""
    if device.type != "cuda":
        return INTERPRETER_TARGET
    if getattr(torch.version, "hip", None):
        return target_of(amd_arch_name(torch.cuda.get_device_properties(device).gcnArchName))
    major, minor = torch.cuda.get_device_capability(device)
    return target_of(10 * major + minor)


def live_target(name: str, shared_limit: Optional[int]) -> Target:
    """The table's entry for a local card, with the card's own shared-memory limit when it says one."""
    base = target_of(name)
    if not shared_limit or shared_limit == base.shared_limit:
        return base
    from dataclasses import replace

    return replace(base, shared_limit=int(shared_limit))
