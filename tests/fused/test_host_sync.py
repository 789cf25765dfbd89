"""No host synchronisation in any fused op (issue 9, PERFORMANCE.md "no host syncs").

A host sync is what ``.item()``, ``float(t)``, ``int(t)`` and ``if t:`` do: they dispatch to
``aten._local_scalar_dense`` (``aten.item`` below the autograd key, ``if t:`` through
``aten.is_nonzero``). On a GPU each one stalls the CPU until the queue drains and breaks CUDA-graph
capture. :class:`SyncCounter`, a ``TorchDispatchMode``, records every such call with the Python
frames that made it, and also the other ops that synchronise on a GPU: ``torch.equal``,
``nonzero`` (a data-dependent size) and copies from a CUDA tensor to the host (``.cpu()``,
``.tolist()`` of a CUDA tensor; on the CPU ``.tolist()`` dispatches nothing and cannot be seen).

Custom ops (``fused::…``) are opaque to a dispatch mode: their bodies run below the Python
dispatch key, where the mode is not active. The counter therefore runs a fused op's Python body
itself, with the mode pushed again (:meth:`SyncCounter.__torch_dispatch__`), so a sync inside an
op's launcher counts too.

Every op runs on both backends where possible: the reference, and Triton (under the CPU
interpreter here, which adds ops of its own but no syncs; on a CUDA machine, on the card).
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fused._dispatch import triton_available_for

SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.item.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.nonzero.default,
}
COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


def _device_to_host(func, args, kwargs) -> bool:
    """A copy from a CUDA tensor into host memory (it waits for the queue)."""
    if func not in COPIES or not args or not isinstance(args[0], torch.Tensor):
        return False
    if func == torch.ops.aten.copy_.default:
        src, dst = args[1], args[0]
        return isinstance(src, torch.Tensor) and src.device.type == "cuda" and dst.device.type == "cpu"
    target = kwargs.get("device")
    return args[0].device.type == "cuda" and target is not None and torch.device(target).type == "cpu"


class SyncCounter(TorchDispatchMode):
    """Counts host syncs; ``calls`` holds (op, the innermost frames outside torch) for each."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.opaque = []  # fused ops whose body could not be entered (their syncs would be missed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS or _device_to_host(func, args, kwargs):
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            self.calls.append((str(func), frames[-4:]))
        if func.namespace == "fused":
            from torch._library.custom_ops import OPDEFS

            opdef = OPDEFS.get(func._schema.name)
            if opdef is not None:
                with self:  # the op's body, with this mode active again
                    return opdef._init_fn(*args, **kwargs)
            self.opaque.append(str(func))
        return func(*args, **kwargs)

    def report(self) -> str:
        lines = []
        for op, frames in self.calls:
            where = " <- ".join(f"{f.filename.rsplit('/', 2)[-2:][-1]}:{f.lineno} {f.name}" for f in reversed(frames))
            lines.append(f"{op} at {where}")
        return "\n".join(lines)

    def assert_none(self):
        assert not self.opaque, f"fused ops not entered: {self.opaque}"
        assert not self.calls, f"{len(self.calls)} host sync(s):\n{self.report()}"


def backends(device):
    out = ["reference"]
    if triton_available_for(device):
        out.append("triton")
    return out


@pytest.fixture(params=["reference", "triton"])
def backend(request, device):
    if request.param not in backends(device):
        pytest.skip("Triton is not available for this device (no GPU and no interpreter)")
    return request.param


def test_counter_sees_item_and_bool():
    t = torch.ones(3)
    with SyncCounter() as c:
        t.sum().item()
        float(t[0])
        if t.any():
            pass
    assert len(c.calls) == 3


def test_counter_sees_syncs_inside_a_fused_op():
    """The counter enters custom ops: a sync planted in a launcher is caught."""
    import fused.importance as importance_mod

    imp, grads = [torch.zeros(5)], [torch.ones(5)]
    original = importance_mod.check_layout_and_device

    def syncing(**lists):
        lists["importance"][0].sum().item()
        return original(**lists)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importance_mod, "check_layout_and_device", syncing)
        with SyncCounter() as c:
            importance_mod.accumulate_importance(imp, grads, 1.0, backend="reference")
    assert len(c.calls) == 1


def test_counter_enters_custom_ops(device):
    """A sync planted in the Triton launcher (inside the ``fused::`` custom op) is caught."""
    if not triton_available_for(device):
        pytest.skip("Triton is not available for this device")
    import fused.importance as importance_mod

    imp, grads = [torch.zeros(5, device=device)], [torch.ones(5, device=device)]
    original = importance_mod.plan_accumulate_importance

    def syncing(importance, grads, weight, arch):
        importance[0].sum().item()
        return original(importance, grads, weight, arch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importance_mod, "plan_accumulate_importance", syncing)
        with SyncCounter() as c:
            importance_mod.accumulate_importance(imp, grads, 1.0, backend="triton")
    assert len(c.calls) == 1 and not c.opaque
    assert torch.equal(imp[0], torch.ones(5, device=device))


# ----------------------------------------------------------------------------- the ops


def test_anchor_similarity_forward_backward(device, backend):
    from fused.similarity import anchor_similarity

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 32, generator=gen).to(device).requires_grad_()
    anchors = torch.randn(16, 32, generator=gen).to(device)
    weight = torch.randn(8, 16, generator=gen).to(device)
    with SyncCounter() as c:
        S = anchor_similarity(x, anchors, backend=backend)
        (S * weight).sum().backward()
    c.assert_none()
    assert x.grad is not None


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("ref_grad", [False, True])
def test_structure_alignment_loss_forward_backward(device, backend, reduction, ref_grad):
    from fused.alignment import structure_alignment_loss

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 32, generator=gen).to(device).requires_grad_()
    x_ref = torch.randn(8, 32, generator=gen).to(device).requires_grad_(ref_grad)
    anchors = torch.randn(16, 32, generator=gen).to(device)
    with SyncCounter() as c:
        loss = structure_alignment_loss(x, x_ref, anchors, reduction=reduction, backend=backend)
        loss.sum().backward()
    c.assert_none()
    assert x.grad is not None and (x_ref.grad is not None) == ref_grad


def test_accumulate_importance(device, backend):
    from fused.importance import accumulate_importance

    imp = [torch.zeros(s, device=device) for s in [(7,), (33, 5), (2049,)]]
    imp.append(torch.zeros(2051, device=device)[1:])  # unaligned: a second, narrow group
    grads = [torch.randn(i.shape, device=device) for i in imp]
    grads[1] = grads[1].half()
    grads.append(None)
    imp.append(torch.zeros(4, device=device))
    with SyncCounter() as c:
        for _ in range(2):  # the second call hits the cached tables
            accumulate_importance(imp, grads, 0.5, backend=backend)
    c.assert_none()


@pytest.mark.parametrize("proximal", [False, True])
def test_masked_regularized_sgd_step(device, backend, proximal):
    from fused.update import masked_regularized_sgd_step

    shapes = [(7,), (33, 5), (2049,), (0,)]
    params = [torch.randn(s, device=device) for s in shapes]
    params.append(torch.randn(2051, device=device)[1:])  # unaligned view
    params.append(torch.randn(6, 4, device=device).t())  # transposed: a copy in the kernel's order
    grads = [torch.randn(p.shape, device=device) for p in params]
    grads[2] = None  # SR term only
    refs = [p.detach().clone() + 0.1 for p in params]
    imp = [torch.rand(p.shape, device=device) for p in params]
    imp[1] = imp[1] > 0.5  # bool importance: another group
    masks = [torch.rand(p.shape, device=device) > 0.3 for p in params]
    masks[0] = masks[0].to(torch.uint8)
    bufs = [torch.zeros_like(p) for p in params]
    with SyncCounter() as c:
        for _ in range(2):
            sr = masked_regularized_sgd_step(params, grads, refs, imp, lr=0.1, lam=0.5, momentum=0.9,
                                             momentum_buffers=bufs, grad_masks=masks, weight_decay=0.01,
                                             proximal=proximal, backend=backend)
    c.assert_none()
    assert sr.shape == ()


def test_l2_pgd_step_float_eps(device, backend):
    from fused.pgd import l2_pgd_step

    x0 = torch.rand(4, 3, 8, 8, device=device)
    x = (x0 + 0.01 * torch.randn_like(x0)).clamp(0, 1)
    g = torch.randn_like(x0)
    with SyncCounter() as c:
        out = l2_pgd_step(x, x0, g, step_size=0.1, eps=0.5, backend=backend)
        l2_pgd_step(out, x0, g, step_size=0.1, eps=0.5, targeted=False, clamp=None, out=out, backend=backend)
    c.assert_none()


def test_l2_pgd_step_tensor_eps(device, backend):
    """Per-sample radii: the only sync allowed is the documented value check of a CPU eps tensor
    (``_check_eps``: finite and > 0, CPU tensors only, so a CUDA call never synchronises)."""
    from fused.pgd import l2_pgd_step

    x0 = torch.rand(4, 3, 8, 8, device=device)
    g = torch.randn_like(x0)
    eps = torch.tensor([0.1, 0.2, 0.3, 0.4], device=device)
    with SyncCounter() as c:
        l2_pgd_step(x0.clone(), x0, g, step_size=0.1, eps=eps, backend=backend)
    assert not c.opaque
    outside = [(op, frames) for op, frames in c.calls if not any(f.name == "_check_eps" for f in frames)]
    assert not outside, c.report()
    assert len(c.calls) == (1 if device.type == "cpu" else 0)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_structure_sgd_step(device, backend, momentum):
    from torch import nn

    from fused.optim import StructureSGD

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)
    opt = StructureSGD(model.parameters(), lr=0.05, momentum=momentum, weight_decay=0.01, backend=backend)
    params = list(model.parameters())
    opt.set_importance([torch.rand_like(p) for p in params[:-1]] + [None])
    opt.set_grad_masks([torch.rand_like(p) > 0.2 for p in params])
    x, y = torch.randn(5, 12, device=device), torch.randint(0, 3, (5,), device=device)
    with SyncCounter() as c:
        for _ in range(2):  # the first step creates the momentum buffers
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    c.assert_none()
    assert opt.last_sr_loss.shape == ()
