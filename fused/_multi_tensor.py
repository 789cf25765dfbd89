"""Multi-tensor launches over a list of tensors (fused.update, fused.importance).

One launch covers every tensor of a group (tensors whose operands share their dtypes), however
many tensors. A small int64 device table gives, per tensor, the addresses of its operands, its
numel and its first chunk; the grid is flat over the ``BLOCK``-element chunks of all tensors (no
idle programs for small tensors), and each program finds its tensor through a chunk → tensor map
(:func:`program_chunk`). Tables are cached on (addresses, numels), so a steady training loop copies
nothing to the device.

Host side: :class:`MultiTensorGroups` sorts the operands into groups (and lays out non-dense
operands), :func:`multi_tensor_chunk_table` builds a group's tables, :func:`check_layout_and_device`
checks lists of operands. Kernel side (``@triton.jit``): :func:`program_chunk`,
:func:`operand_pointer`, :func:`load_tile`, :func:`store_tile`. Reference side:
:class:`ScratchRows`, the temporaries of the per-tensor reference loops.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fused._dispatch import HAS_TRITON, compute_dtype

# Elements per program. 2048 fp32 over 8 warps = 8 elements (two 16-byte vectors) per thread and
# operand: enough bytes in flight per SM for bandwidth, and per-program overhead (one table row,
# 64 B) is < 0.2 % of the 20 B/element the masked update moves.
BLOCK = 2048
NUM_WARPS = 8

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
        """This program's chunk: (its tensor's table row, element offsets, bounds mask, full tile?).

        ``rows`` is the int64 [T, ROW_LEN] table of :func:`multi_tensor_chunk_table` (operand
        addresses, then numel, then first chunk); ``chunk_tensor`` maps program → tensor.
        """
        pid = tl.program_id(0)
        row = rows + tl.load(chunk_tensor + pid) * ROW_LEN
        numel = tl.load(row + ROW_LEN - 2)
        start = (pid - tl.load(row + ROW_LEN - 1)) * BLOCK  # int64: tensors > 2^31 elements are fine
        offs = start + tl.arange(0, BLOCK)
        # Only a tensor's last tile needs the bounds mask; a mask the compiler cannot prove
        # constant over 16 B (numel comes from memory) would keep it from vectorising.
        return row, offs, offs < numel, start + BLOCK <= numel

    @triton.jit
    def operand_pointer(row, column, T: tl.constexpr, ALIGNED: tl.constexpr):
        """Address ``row[column]`` as a ``T*``. Addresses come from memory, so the compiler knows
        nothing of their alignment; ALIGNED (checked on the host) tells it they are 16-byte
        multiples, which lets it vectorise the loads (128-bit accesses)."""
        address = tl.load(row + column)
        if ALIGNED:
            address = tl.multiple_of(address, 16)
        return address.to(tl.pointer_type(T))

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


def device_guard(device: torch.device):
    """Launch on ``device`` (its CUDA device; nothing to do on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------- tables

_TABLE_CACHE: "OrderedDict[tuple, Tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
_TABLE_CACHE_SIZE = 64


def multi_tensor_chunk_table(
    addresses: Sequence[int], numels: Sequence[int], device: torch.device, block: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Device tables for one multi-tensor launch over ``len(numels)`` tensors.

    ``addresses`` holds, tensor after tensor, the same number of operand addresses for each tensor
    (0 = absent; the kernel must not read it). Returns ``rows``, int64 ``[T, n_operands + 2]`` =
    (addresses..., numel, first chunk), and ``chunk_tensor``, int64 ``[n_chunks]``: the tensor of
    every program, ``ceil(numel / block)`` programs per tensor.

    A table depends only on addresses and numels, so it is cached on them: a training loop whose
    tensors stay put reuses it with no host-to-device copy, which also makes the step CUDA-graph
    capturable. (If memory is freed and reused, a hit still describes those same addresses.)
    """
    key = (device, block, tuple(addresses), tuple(numels))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    n_ops = len(addresses) // max(len(numels), 1)
    rows: List[int] = []
    chunk_tensor: List[int] = []
    for t, numel in enumerate(numels):
        rows.extend(addresses[t * n_ops : (t + 1) * n_ops])
        rows.extend((numel, len(chunk_tensor)))
        chunk_tensor.extend([t] * -(-numel // block))
    host = torch.tensor(rows + chunk_tensor, dtype=torch.int64)
    if device.type == "cuda":  # pinned + non_blocking: no host synchronisation
        host = host.pin_memory().to(device, non_blocking=True)
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

    ``groups`` maps (operand dtypes..., all 16-byte aligned) to (addresses, numels), the arguments
    of :func:`multi_tensor_chunk_table`.
    """

    def __init__(self, written: Sequence[int]):
        self.written = frozenset(written)
        self.groups: Dict[tuple, Tuple[List[int], List[int]]] = {}  # key -> (addresses, numels)
        self._keep_alive: List[torch.Tensor] = []  # copies whose addresses are in a table
        self._write_back: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, ops: Sequence[Optional[torch.Tensor]]) -> None:
        if not all(x is None or x.is_contiguous() for x in ops):
            ops = self._in_common_order(ops)
        addresses = [0 if x is None else x.data_ptr() for x in ops]
        # 16-byte aligned operands let the kernel vectorise (fresh allocations are; views may not be)
        key = (*(None if x is None else x.dtype for x in ops), not any(a % 16 for a in addresses))
        entry = self.groups.get(key)
        if entry is None:
            entry = self.groups[key] = ([], [])
        entry[0].extend(addresses)
        entry[1].append(ops[0].numel())

    def _in_common_order(self, ops):
        first = ops[0]
        if not _is_dense(first):
            first = self._copy(0, ops[0], ops[0].contiguous())
        out = [first]
        for j, x in enumerate(ops[1:], 1):
            if x is not None and not _same_element_order(x, first):
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
