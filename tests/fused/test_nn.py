"""fused.nn: the module forms hold configuration only and compute exactly the functional ops."""

import pytest
import torch

import fused
from fused.nn import AnchorSimilarity, StructureAlignmentLoss

BACKENDS = ["reference", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_alignment_module_equals_the_functional_op(backend, reduction, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 24, generator=g).to(device).requires_grad_()
    x_ref = torch.randn(37, 24, generator=g).to(device)
    anchors = torch.randn(10, 24, generator=g).to(device)
    mod = StructureAlignmentLoss(anchors, reduction=reduction, backend=backend)
    out = mod(x, x_ref)
    ref = fused.structure_alignment_loss(x.detach().clone().requires_grad_(), x_ref, anchors, reduction=reduction,
                                         backend=backend)
    assert torch.equal(out.detach(), ref.detach())
    assert out.shape == ((37,) if reduction == "none" else ())
    (gx,) = torch.autograd.grad(out.sum(), x)
    x2 = x.detach().clone().requires_grad_()
    (gx2,) = torch.autograd.grad(fused.structure_alignment_loss(x2, x_ref, anchors, reduction=reduction,
                                                                backend=backend).sum(), x2)
    assert torch.equal(gx, gx2) and float(gx.abs().sum()) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_module_equals_the_functional_op(backend, device):
    g = torch.Generator().manual_seed(1)
    x, anchors = torch.randn(19, 40, generator=g).to(device), torch.randn(7, 40, generator=g).to(device)
    S = AnchorSimilarity(anchors, backend=backend)(x)
    assert S.shape == (19, 7)
    assert torch.equal(S, fused.anchor_similarity(x, anchors, backend=backend))
    torch.testing.assert_close(S, torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(anchors, dim=1).T,
                               rtol=1e-5, atol=1e-5)


def test_reachable_as_fused_nn():
    assert fused.nn.StructureAlignmentLoss is StructureAlignmentLoss and "nn" in dir(fused)


def test_anchors_are_a_buffer_copied_saved_and_moved():
    anchors = torch.randn(5, 8)
    mod = StructureAlignmentLoss(anchors)
    assert list(mod.parameters()) == [] and set(mod.state_dict()) == {"anchors"}
    anchors.zero_()                                   # the module holds its own copy
    assert float(mod.anchors.abs().sum()) > 0
    other = StructureAlignmentLoss(torch.zeros(5, 8))
    other.load_state_dict(mod.state_dict())
    assert torch.equal(other.anchors, mod.anchors)
    assert mod.double().anchors.dtype == torch.float64   # follows the module like any buffer
    assert "num_anchors=5, dim=8, reduction='mean', backend=None" in repr(StructureAlignmentLoss(torch.randn(5, 8)))


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match=r"anchors must be a floating tensor \[K, D\], got a tensor of shape \(8,\)"):
        StructureAlignmentLoss(torch.randn(8))
    with pytest.raises(ValueError, match="floating"):
        AnchorSimilarity(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        AnchorSimilarity(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="reduction must be one of"):
        StructureAlignmentLoss(torch.randn(3, 4), reduction="max")
    with pytest.raises(ValueError, match="backend must be"):
        AnchorSimilarity(torch.randn(3, 4), backend="cuda")
