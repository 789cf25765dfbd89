"""Multi-tensor launches over a list of tensors (fused.update, fused.importance).

One launch covers every tensor of a group (tensors whose operands share their dtypes and whose
operand addresses are all 16-byte aligned, or not), however many tensors. The grid is flat over the
``BLOCK``-element chunks of all tensors (no idle programs for small tensors), and each program finds
its tensor through a chunk → tensor map (:func:`program_chunk`).

Addressing. Each operand slot of a group (ψ, g, ... of every tensor) has one *base* tensor, passed
as an ordinary pointer argument (the slot's first tensor); a small int64 device table gives, per
tensor, the *element offset* of each of its operands from the slot's base (may be negative), its
numel and its first chunk. Why offsets and not raw addresses: a pointer made from an integer loaded
from memory carries no alignment information, so the compiler emits 32-bit accesses whatever
``tl.multiple_of`` says about the integer. A pointer *argument* is specialised as 16-byte aligned
when it is, and in an aligned group every offset is a multiple of VEC = 16 / element size, so
``base + multiple_of(offset, VEC) + tile`` is provably 16-byte aligned and the full tiles compile to
128-bit loads and stores (LDG.E.128 / STG.E.128) for every operand dtype. A tensor's last, masked
tile stays narrow (its bound comes from memory), as does an unaligned group. Byte operands
(bool / uint8 masks) need 16 elements a thread for a 128-bit access: :func:`tile_config` sizes the
tile per group accordingly.

Tables are cached on (offsets, numels), so a steady training loop copies nothing to the device.

Host side: :class:`MultiTensorGroups` sorts the operands into groups (and lays out non-dense
operands) and gives each group's bases and offsets, :func:`multi_tensor_chunk_table` builds a
group's tables, :class:`MultiTensorPlan` holds an op's launches, :func:`check_layout_and_device`
checks lists of operands. Kernel side (``@triton.jit``): :func:`program_chunk`,
:func:`operand_pointer`, :func:`load_tile`, :func:`store_tile`. Reference side:
:class:`ScratchRows`, the temporaries of the per-tensor reference loops.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fused._dispatch import HAS_TRITON, compute_dtype
from fused._targets import target_of

# Elements per program. 2048 elements over 8 warps = 8 elements a thread and operand (two 16-byte
# vectors in fp32, one in fp16/bf16): enough bytes in flight per SM for bandwidth, and the
# per-program overhead (one table row, 64 B) is < 0.2 % of the 20 B/element the masked update moves.
# Groups with a byte operand run 2048 elements over 4 warps: 16 a thread, one 16-byte vector of
# the byte operand (four of an fp32 one). See tile_config.
BLOCK = 2048
THREADS = 256  # a program (8 elements a thread)
VECTOR_BYTES = 16  # one 128-bit global access


def tile_config(element_sizes: Sequence[int], arch) -> Tuple[int, int, int, Dict[str, int]]:
    """(BLOCK, TAIL, num_warps, options) of a multi-tensor launch whose operands have these element
    sizes on ``arch``. TAIL is the masked sub-tile of a tensor's last chunk (4 elements a thread);
    ``options`` are Triton compile options (:attr:`fused._launch.Launch.options`).

    Every thread must hold at least one whole 16-byte vector of every operand: 16 // size
    consecutive elements of the narrowest. The same 256 threads a program on every target (8 warps
    of 32 lanes, 4 AMD waves of 64): the kernels are bandwidth-bound and the tile fits the registers
    of all of them (checked by the preflight).

    * A group with a byte operand (bool / uint8) thus runs 16 elements a thread. Its fp32/16-bit
      results are stored 16 bytes a thread, in another layout than the loads (one layout change
      through 2-8 KB of shared memory), and ptxas's own register target then sometimes spills a
      few bytes (seen on sm_90: 96 registers, 8 bytes of stack). ``maxnreg=255`` (PTX
      ``.maxnreg``, NVIDIA only) lifts that target: ~100-125 registers, no spills on sm_80 ... sm_120.
    * A group with an fp64 operand keeps 8 elements a thread (16 fp64 values of five operands
      would take ~230 registers a thread); its byte operands then load 8 bytes at a time.
    """
    target = target_of(arch)
    per_thread = max(8, max(VECTOR_BYTES // s for s in element_sizes))
    if max(element_sizes) >= 8:
        per_thread = 8
    threads = THREADS * 8 // per_thread
    num_warps = max(1, threads // target.warp_size)
    options = {"maxnreg": 255} if per_thread > 8 and not target.is_amd else {}
    return per_thread * target.warp_size * num_warps, 4 * target.warp_size * num_warps, num_warps, options


if HAS_TRITON:
    import triton
    import triton.language as tl

    TL_DTYPES = {
        torch.float32: tl.float32,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float64: tl.float64,
        # bool storage is one byte holding 0/1: read it as uint8 and test != 0.
        torch.bool: tl.uint8,
        torch.uint8: tl.uint8,
    }

    @triton.jit
    def program_chunk(rows, chunk_tensor, ROW_LEN: tl.constexpr, BLOCK: tl.constexpr):
        """This program's chunk: (its tensor's table row, first element, the tensor's numel).

        ``rows`` is the int64 [T, ROW_LEN] table of :func:`multi_tensor_chunk_table` (operand
        offsets, then numel, then first chunk); ``chunk_tensor`` maps program → tensor. The chunk
        is elements [start, start + BLOCK) of its tensor; it is *full* when start + BLOCK <= numel.
        Only a tensor's last chunk needs a bounds mask: a mask the compiler cannot prove constant
        over 16 B (numel comes from memory) keeps it from vectorising, so kernels run full chunks
        unmasked as one tile and the last one masked, in narrow sub-tiles of TAIL elements (fewer
        registers: 16 masked elements a thread make ptxas spill on sm_80/86).
        """
        pid = tl.program_id(0)
        row = rows + tl.load(chunk_tensor + pid) * ROW_LEN
        numel = tl.load(row + ROW_LEN - 2)
        start = (pid - tl.load(row + ROW_LEN - 1)) * BLOCK  # int64: tensors > 2^31 elements are fine
        return row, start, numel

    @triton.jit
    def operand_pointer(base, row, column, offs, ALIGNED: tl.constexpr):
        """Pointers to the tile ``offs`` of the operand whose element offset from ``base`` is
        ``row[column]``. ALIGNED (checked on the host: base and every operand of the group
        16-byte aligned) tells the compiler the offset is a multiple of a 16-byte vector, which
        lets it use 128-bit accesses."""
        offset = tl.load(row + column)
        if ALIGNED:
            offset = tl.multiple_of(offset, 128 // base.dtype.element_ty.primitive_bitwidth)
        return base + offset + offs

    @triton.jit
    def load_tile(ptr, inb, MASKED: tl.constexpr):
        if MASKED:
            return tl.load(ptr, mask=inb, other=0)
        else:
            return tl.load(ptr)

    @triton.jit
    def store_tile(ptr, value, inb, MASKED: tl.constexpr):
        if MASKED:
            tl.store(ptr, value, mask=inb)
        else:
            tl.store(ptr, value)


# ----------------------------------------------------------------------------- tables

_TABLE_CACHE: "OrderedDict[tuple, Tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
_TABLE_CACHE_SIZE = 64


def multi_tensor_chunk_table(
    offsets: Sequence[int], numels: Sequence[int], device: torch.device, block: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Device tables for one multi-tensor launch over ``len(numels)`` tensors.

    ``offsets`` holds, tensor after tensor, the same number of operand element offsets (from the
    slot's base, see :meth:`MultiTensorGroups.launch_operands`) for each tensor (0 for an absent
    operand; the kernel must not read it). Returns ``rows``, int64 ``[T, n_operands + 2]`` =
    (offsets..., numel, first chunk), and ``chunk_tensor``, int64 ``[n_chunks]``: the tensor of
    every program, ``ceil(numel / block)`` programs per tensor.

    A table depends only on offsets and numels, so it is cached on them: a training loop whose
    tensors stay put reuses it with no host-to-device copy, which also makes the step CUDA-graph
    capturable. On ``meta`` (the preflight) the tables are meta tensors of the right shapes.
    """
    key = (device, block, tuple(offsets), tuple(numels))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    n_ops = len(offsets) // max(len(numels), 1)
    rows: List[int] = []
    chunk_tensor: List[int] = []
    for t, numel in enumerate(numels):
        rows.extend(offsets[t * n_ops : (t + 1) * n_ops])
        rows.extend((numel, len(chunk_tensor)))
        chunk_tensor.extend([t] * -(-numel // block))
    host = torch.tensor(rows + chunk_tensor, dtype=torch.int64)
    if device.type == "cuda":  # pinned + non_blocking: no host synchronisation
        host = host.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        host = host.to(device)
    tables = (host[: len(rows)].view(-1, n_ops + 2), host[len(rows) :])
    _TABLE_CACHE[key] = tables
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return tables


# ----------------------------------------------------------------------------- grouping and layout


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill numel() consecutive slots in some order."""
    if t.is_contiguous():
        return True
    expected = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.size(d) != 1:
            if t.stride(d) != expected:
                return False
            expected *= t.size(d)
    return True


def _same_element_order(x: torch.Tensor, like: torch.Tensor) -> bool:
    """``x`` lays out its elements in the same memory order as the dense tensor ``like``."""
    return all(xs == ls for xs, ls, n in zip(x.stride(), like.stride(), like.shape) if n != 1)


class MultiTensorGroups:
    """Tensors sorted into multi-tensor launches: one group per tuple of operand dtypes.

    Each :meth:`add` takes one tensor's operands (``ops[0]`` the one that sets the element order;
    ``None`` = absent). The kernel walks all operands linearly in memory, so they must be dense and
    in one element order. Contiguous operands (the usual case) are used as they are; otherwise the
    first operand, if not dense, and any operand in another order are replaced by copies in a
    common order, and the copies of written operands are copied back by :meth:`write_back`.
    (So is an operand whose address is not a multiple of its element size, which no offset in
    elements can reach: only odd hand-made views have one.)

    ``groups`` maps (operand dtypes..., all 16-byte aligned) to (operand lists, numels);
    :meth:`launch_operands` turns a group into kernel bases and table offsets.
    """

    def __init__(self, written: Sequence[int]):
        self.written = frozenset(written)
        self.groups: Dict[tuple, Tuple[List[Sequence[Optional[torch.Tensor]]], List[int]]] = {}
        self._keep_alive: List[torch.Tensor] = []  # copies whose addresses are in a table
        self._write_back: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, ops: Sequence[Optional[torch.Tensor]]) -> None:
        if not all(x is None or (x.is_contiguous() and x.data_ptr() % x.element_size() == 0) for x in ops):
            ops = self._in_common_order(ops)
        # 16-byte aligned operands let the kernel vectorise (fresh allocations are; views may not be)
        aligned = not any(x is not None and x.data_ptr() % 16 for x in ops)
        key = (*(None if x is None else x.dtype for x in ops), aligned)
        entry = self.groups.get(key)
        if entry is None:
            entry = self.groups[key] = ([], [])
        entry[0].append(tuple(ops))
        entry[1].append(ops[0].numel())

    def launch_operands(self, key: tuple) -> Tuple[List[torch.Tensor], List[int], List[int]]:
        """(bases, offsets, numels) of a group: one base tensor per operand slot (the slot's first
        tensor, bool viewed as uint8; the first operand's for an absent slot, never read), and
        the element offset of every operand from its slot's base, tensor after tensor."""
        tensors, numels = self.groups[key]
        bases: List[torch.Tensor] = []
        for j in range(len(tensors[0])):
            base = next((ops[j] for ops in tensors if ops[j] is not None), tensors[0][0])
            bases.append(base.view(torch.uint8) if base.dtype == torch.bool else base)
        base_addr = [b.data_ptr() for b in bases]
        offsets = [
            0 if x is None else (x.data_ptr() - base_addr[j]) // x.element_size()
            for ops in tensors
            for j, x in enumerate(ops)
        ]
        return bases, offsets, numels

    def _in_common_order(self, ops):
        first = ops[0]
        if not _is_dense(first) or first.data_ptr() % first.element_size():
            first = self._copy(0, ops[0], ops[0].clone(memory_format=torch.contiguous_format))
        out = [first]
        for j, x in enumerate(ops[1:], 1):
            if x is not None and (not _same_element_order(x, first) or x.data_ptr() % x.element_size()):
                x = self._copy(j, x, torch.empty_like(first, dtype=x.dtype).copy_(x))
            out.append(x)
        return out

    def _copy(self, j: int, original: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
        self._keep_alive.append(copy)
        if j in self.written:
            self._write_back.append((original, copy))
        return copy

    def write_back(self) -> None:
        """Copy the results in temporary copies back into the caller's tensors."""
        for original, copy in self._write_back:
            original.copy_(copy)


class MultiTensorPlan(list):
    """An op's launches (a ``list`` of :class:`fused._launch.Launch`), plus what the launcher needs
    after running them: the groups (:meth:`write_back` of temporary copies) and ``partials``
    (an op's per-program output buffer, or None)."""

    def __init__(self, launches=(), groups: Optional[MultiTensorGroups] = None,
                 partials: Optional[torch.Tensor] = None):
        super().__init__(launches)
        self.groups = groups
        self.partials = partials

    def write_back(self) -> None:
        if self.groups is not None:
            self.groups.write_back()


def check_layout_and_device(**lists: Sequence[Optional[torch.Tensor]]) -> torch.device:
    """All tensors of the named lists are strided (kernels address memory directly; sparse ones are
    refused) and share one device, which is returned. Like ``_dispatch.check_same_device`` but over
    lists, formatting names only on failure (this runs on every optimizer step)."""
    device, first = None, None
    for name, values in lists.items():
        for i, v in enumerate(values):
            if v is None:
                continue
            if v.layout != torch.strided:
                raise TypeError(f"{name}[{i}] must be a dense (strided) tensor, got layout {v.layout}")
            if device is None:
                device, first = v.device, (name, i)
            elif v.device != device:
                raise ValueError(
                    f"{name}[{i}] is on {v.device} but {first[0]}[{first[1]}] is on {device}: "
                    "all tensors must share one device"
                )
    return device


class ScratchRows:
    """Temporaries for a reference loop over a list of tensors: ``count`` rows per compute dtype
    (fp32, or fp64 for fp64 tensors), each as long as the largest tensor, reused by every tensor.

    On a CPU a fresh full-size temporary per operation costs more than its arithmetic: the allocator
    hands large blocks back to the OS and touching new pages faults. The references therefore
    compute into these rows (``out=`` and in-place ops); a ResNet-18 step runs ~4x faster.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], count: int):
        longest: Dict[torch.dtype, int] = {}
        for t in tensors:
            cd = compute_dtype(t.dtype)
            longest[cd] = max(longest.get(cd, 0), t.numel())
        device = tensors[0].device if tensors else None
        self._rows = {cd: torch.empty((count, n), dtype=cd, device=device) for cd, n in longest.items()}

    def like(self, t: torch.Tensor) -> List[torch.Tensor]:
        """The rows of ``t``'s compute dtype, each viewed with ``t``'s shape (contiguous)."""
        return [row[: t.numel()].view(t.shape) for row in self._rows[compute_dtype(t.dtype)]]


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


# Model parameter lists by name: the multi-tensor ops' preflight specs (``params=resnet50``).
PARAM_LISTS: Dict[str, List[Tuple[int, ...]]] = {
    "resnet18": _resnet_shapes((2, 2, 2, 2), bottleneck=False),
    "resnet50": _resnet_shapes((3, 4, 6, 3), bottleneck=True),
    "vit_b16": _vit_shapes(768, 12, 3072),
    "vit_s16": _vit_shapes(384, 12, 1536),
}
