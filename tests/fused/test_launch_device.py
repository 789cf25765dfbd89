"""Every kernel launches on its tensors' device, whichever device is current (``Launch.run``)."""

import contextlib

import pytest
import torch

import fused
import fused._launch as launch_mod
from fused._launch import Launch, device_guard


@pytest.fixture
def entered(monkeypatch):
    """Records the device each launch enters (``fused._launch.device_guard``)."""
    seen = []

    def recording_guard(device):
        seen.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(launch_mod, "device_guard", recording_guard)
    return seen


def _all_ops(device):
    x, anchors = torch.randn(6, 40, device=device), torch.randn(5, 40, device=device)
    fused.anchor_similarity(x, anchors, backend="triton")
    fused.structure_alignment_loss(x.requires_grad_(), torch.randn(6, 40, device=device), anchors,
                                   backend="triton").backward()
    x0 = torch.rand(2, 50, device=device)
    fused.l2_pgd_step(x0.clone(), x0, torch.randn(2, 50, device=device), step_size=0.1, eps=0.5, backend="triton")
    params = [torch.randn(7, device=device), torch.randn(3, 4, device=device)]
    grads = [torch.randn_like(p) for p in params]
    imp = [torch.zeros_like(p) for p in params]
    fused.accumulate_importance(imp, grads, backend="triton")
    fused.masked_regularized_sgd_step(params, grads, [p.clone() for p in params], imp, lr=0.1, backend="triton")


def test_every_op_launches_under_its_tensors_device(device, entered):
    if device.type == "cpu" and not fused._dispatch.interpreter_enabled():
        pytest.skip("the Triton path needs a GPU or the interpreter")
    _all_ops(device)
    # similarity, alignment, pgd, importance, update: at least one launch each, all on `device`
    assert len(entered) >= 5
    assert all(d == device for d in entered), entered


def test_device_guard_enters_the_cuda_device_of_the_tensors(monkeypatch):
    entered = []

    class Recording:
        def __init__(self, device):
            entered.append(torch.device(device))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recording)
    with device_guard(torch.device("cuda:1")):
        pass
    with device_guard(torch.device("cpu")), device_guard(torch.device("meta")), device_guard(None):
        pass
    assert entered == [torch.device("cuda:1")]


def test_launch_device_is_its_first_tensor_argument():
    t = torch.empty(3, device="meta")
    launch = Launch("x", None, (1,), (4, t, torch.empty(2)), {}, 1)
    assert launch.device == torch.device("meta")
    assert Launch("x", None, (1,), (4, 5.0), {}, 1).device is None
