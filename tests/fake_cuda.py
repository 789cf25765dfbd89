"""A CUDA device on a CPU-only machine, with real values: ``with fake_cuda(): ...``.

Inside the context, ``torch.device("cuda")`` works: factories with ``device="cuda"``, ``.to("cuda")``,
``.cuda()`` and ``module.to("cuda")`` give :class:`CudaTensor`s, ordinary CPU tensors that report
``device == cuda:0`` (and ``is_cuda``) to Python and compute on the CPU. What differs from the CPU is
what differs on a card, and raises as it would there:

* an op that meets a CUDA tensor and a CPU tensor with at least one dimension raises "Expected all
  tensors to be on the same device" (0-dim CPU tensors mix, as on a card);
* a CPU ``generator=`` for a CUDA factory raises as torch does there;
* ``.numpy()`` of a CUDA tensor raises ("can't convert cuda:0 device type tensor to numpy").

So a whole stakes run with ``device="cuda"`` executes here, end to end, and any CPU tensor that
meets the model or the data on the card stops it exactly where a card would. Unlike
``FakeTensorMode``, data-dependent code (``.item()``, accuracies, stop rules) runs.

``fake_cuda(devices=2)`` makes two cards, ``cuda:0`` and ``cuda:1``: tensors on different cards
meeting in an op raise as on a machine with two GPUs, ``torch.cuda.device(d)`` switches the current
card (``torch.cuda.current_device()``; what a plain ``"cuda"`` means). The context yields a
:class:`FakeCard` whose ``h2d_copies`` lists every host-to-device copy (a blocking copy on a card:
the host waits for it), and whose ``current`` is the current card's index.

``torch.autocast("cuda", dtype)`` runs the CPU's autocast on the card's (CPU-held) tensors, so a
bf16 run on the fake card computes in bf16 as a card does (by the CPU's autocast policy, close to the
CUDA one: convolutions and matrix products in bf16, reductions and losses in fp32).

What it does not model: speed, streams, memory, CUDA graphs, CUDA RNG streams (CUDA draws come from
the CPU generator), cuDNN, NCCL, and the Triton kernels (``fused`` takes its reference path on these
tensors: :func:`fused._dispatch.triton_available_for` is patched to refuse them).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils._pytree import tree_map
from torch.utils._python_dispatch import TorchDispatchMode

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


class DeviceMismatch(RuntimeError):
    pass


_DEVICE_GET = torch.Tensor.device.__get__
_IS_CUDA_GET = torch.Tensor.is_cuda.__get__


class FakeCard:
    """What ``fake_cuda()`` yields: the cards' count, the current card, and the host-to-device copies."""

    def __init__(self, devices: int):
        self.devices = devices
        self.current = 0
        self.h2d_copies: list = []   # (op, shape) of every copy from the host to a card


_CARD: list = []   # the active FakeCard (one at a time)


def _current_index() -> int:
    return _CARD[-1].current if _CARD else 0


class CudaTensor(torch.Tensor):
    """A CPU tensor (``elem``) that reports ``cuda:<index>``. C++ (autograd, kernels) sees the CPU."""

    elem: torch.Tensor
    index: int

    @staticmethod
    def __new__(cls, elem: torch.Tensor, index: int = 0):
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=CPU, requires_grad=elem.requires_grad)
        r.elem = elem
        r.index = index
        return r

    def __repr__(self):
        return f"CudaTensor({self.elem!r}, device='cuda:{self.index}')"

    def __reduce_ex__(self, protocol):
        # torch.save of a CUDA tensor, loaded with map_location="cpu": a plain CPU tensor
        return self.elem.detach().__reduce_ex__(protocol)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == _DEVICE_GET:
            return torch.device("cuda", args[0].index)
        if func == _IS_CUDA_GET:
            return True
        if func is torch.Tensor.get_device:
            return args[0].index
        if func is torch.Tensor.tolist:
            return args[0].elem.tolist()
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first.")
        if func is torch.Tensor.data_ptr:
            return args[0].elem.data_ptr()
        if func in (torch.Tensor.cpu,):
            return _unwrap_copy(args[0])
        if func is torch.Tensor.to:
            device = _to_device(args[1:], kwargs)
            if device is not None and device.type == "cpu":
                rest = {k: v for k, v in kwargs.items() if k != "device"}
                pos = [a for a in args[1:] if not _is_device_like(a)]
                return _unwrap_copy(args[0]).to(*pos, **rest)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _is_device_like(v) -> bool:
    return isinstance(v, torch.device) or (isinstance(v, str) and v.split(":")[0] in ("cpu", "cuda", "meta"))


def _to_device(args, kwargs):
    if "device" in kwargs and kwargs["device"] is not None:
        return torch.device(kwargs["device"])
    for a in args:
        if _is_device_like(a):
            return torch.device(a)
        if isinstance(a, torch.Tensor):   # .to(other): other's device
            return a.device
    return None


def _unwrap_copy(t: "CudaTensor") -> torch.Tensor:
    """The device-to-host copy: a plain CPU tensor, attached to the graph like torch's copy."""
    return _CopyToHost.apply(t)


class _CopyToHost(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        ctx.index = t.index if isinstance(t, CudaTensor) else 0
        return t.elem.clone() if isinstance(t, CudaTensor) else t.clone()

    @staticmethod
    def backward(ctx, grad):
        return CudaTensor(grad, ctx.index)


def _run(func, args, kwargs):
    on_cuda, on_cpu = [], []

    def unwrap(t):
        if isinstance(t, CudaTensor):
            on_cuda.append(t)
            return t.elem
        if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() > 0:
            on_cpu.append(t)
        return t

    uargs, ukwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
    device = ukwargs.get("device")
    to_cuda = bool(on_cuda)
    index = on_cuda[0].index if on_cuda else _current_index()
    explicit = None   # the card an explicit device= names (a copy to it may cross cards)
    if device is not None:
        device = torch.device(device)
        # a CudaTensor's own "cpu" (what C++ fills in, e.g. for .to(memory_format=...)) keeps it on the
        # card: the explicit moves to the CPU (.cpu(), .to("cpu")) never get here (__torch_function__)
        to_cuda = device.type == "cuda" or bool(on_cuda)
        if device.type == "cuda":
            explicit = device.index if device.index is not None else _current_index()
        if to_cuda:
            ukwargs["device"] = CPU
            gen = ukwargs.get("generator")
            if gen is not None and gen.device.type != "cuda":
                raise RuntimeError(f"Expected a 'cuda' device type for generator but found '{gen.device.type}'")
    is_copy = func in _COPY_OPS
    if func in _INDEX_OPS and isinstance(args[0], CudaTensor) and not any(t is args[0] for t in on_cpu):
        on_cpu = [t for t in on_cpu if t is args[0]]   # a CUDA tensor indexed with CPU indices: allowed
    if on_cuda and on_cpu and not is_copy:
        raise DeviceMismatch(
            f"Expected all tensors to be on the same device, but found at least two devices, cuda:{index} and cpu! "
            f"(in {func}; a CPU tensor of shape {tuple(on_cpu[0].shape)} met a CUDA tensor)")
    cards = sorted({t.index for t in on_cuda})
    if len(cards) > 1 and not is_copy:
        raise DeviceMismatch(f"Expected all tensors to be on the same device, but found at least two devices, "
                             f"cuda:{cards[0]} and cuda:{cards[1]}! (in {func})")
    if func is torch.ops.aten.copy_.default and not isinstance(args[0], CudaTensor):
        to_cuda = False   # copy into a CPU tensor
    if func is torch.ops.aten.copy_.default and isinstance(args[0], CudaTensor):
        index = args[0].index   # a copy into a card's tensor stays on that card
        if not isinstance(args[1], CudaTensor) and isinstance(args[1], torch.Tensor):
            _log_h2d(func, args[1])
    elif is_copy and explicit is not None:
        index = explicit
        if not on_cuda and isinstance(args[0], torch.Tensor):
            _log_h2d(func, args[0])
    elif not on_cuda and explicit is not None:
        index = explicit   # a factory on a named card
    out = func(*uargs, **ukwargs)
    if func is torch.ops.aten.copy_.default and isinstance(args[0], CudaTensor):
        return args[0]
    if not to_cuda:
        return out
    return tree_map(lambda t: CudaTensor(t, index) if isinstance(t, torch.Tensor) and not isinstance(t, CudaTensor)
                    else t, out)


def _log_h2d(func, src: torch.Tensor) -> None:
    if _CARD:
        _CARD[-1].h2d_copies.append((str(func), tuple(src.shape)))


_COPY_OPS = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten._copy_from.default,
             torch.ops.aten._copy_from_and_resize.default)


_INDEX_OPS = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
              torch.ops.aten._index_put_impl_.default)


class _FactoryMode(TorchDispatchMode):
    """Routes ops with no tensor argument (factories: ``torch.zeros(..., device="cuda")``) and
    host-to-device copies through :func:`_run`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


class _CardAutocast(torch.autocast):
    """``torch.autocast("cuda", ...)`` on the fake card: the CPU's autocast (its tensors are CPU tensors)."""

    def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        super().__init__("cpu" if device_type == "cuda" else device_type, dtype=dtype, enabled=enabled,
                         cache_enabled=cache_enabled)


class _DeviceGuard:
    """``torch.cuda.device(d)`` on the fake cards: the current card inside, restored after."""

    def __init__(self, device=None):
        self.index = None if device is None else (device if isinstance(device, int) else torch.device(device).index)

    def __enter__(self):
        self.before = _CARD[-1].current
        if self.index is not None:
            _CARD[-1].current = self.index
        return self

    def __exit__(self, *exc):
        _CARD[-1].current = self.before
        return False


@contextlib.contextmanager
def fake_cuda(monkeypatch=None, devices: int = 1) -> Iterator[FakeCard]:
    """Inside: ``devices`` cards (``cuda:0`` …) that compute on the CPU (module docstring). Patches
    ``torch.cuda``'s availability, device count, current device and ``torch.cuda.device``,
    capability (sm_90), synchronisation and memory statistics, and keeps ``fused`` on its
    reference path for these tensors. Yields the :class:`FakeCard`."""
    import fused._dispatch as dispatch

    card = FakeCard(devices)
    patches = contextlib.ExitStack()

    def patch(obj, name, value):
        old = getattr(obj, name)
        setattr(obj, name, value)
        patches.callback(setattr, obj, name, old)

    patch(torch.cuda, "_lazy_init", lambda: None)
    patch(torch.cuda, "is_available", lambda: True)
    patch(torch.cuda, "device_count", lambda: devices)
    patch(torch.cuda, "current_device", lambda: card.current)
    patch(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    patch(torch.cuda, "get_device_name", lambda device=None: "fake CUDA (CPU)")
    patch(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    patch(torch.cuda, "synchronize", lambda device=None: None)
    patch(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    patch(torch.cuda, "max_memory_allocated", lambda device=None: 0)
    patch(torch.cuda, "memory_allocated", lambda device=None: 0)
    patch(torch.cuda, "manual_seed", lambda seed: None)
    patch(torch.cuda, "manual_seed_all", lambda seed: None)
    patch(torch.cuda, "set_device", lambda device: None)
    patch(torch.cuda, "device", _DeviceGuard)
    original = dispatch.triton_available_for
    patch(dispatch, "triton_available_for", lambda device: False if device.type == "cuda" else original(device))
    torch._C._ensureCUDADeviceGuardSet()
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    patches.callback(torch.__future__.set_swap_module_params_on_conversion, swap)
    patch(torch, "autocast", _CardAutocast)
    _CARD.append(card)
    patches.callback(_CARD.remove, card)
    try:
        with patches, _FactoryMode():
            yield card
    finally:
        patches.close()
