"""anchor_similarity: Triton vs the PyTorch reference vs a float64 evaluation.

Accuracy rule (PERFORMANCE.md): max|ours − fp64| ≤ max|torch same dtype − fp64| + tol.
"""

import pytest
import torch
import torch.nn.functional as F

from fused.similarity import _anchor_similarity_triton, anchor_similarity

TOL = {torch.float32: 5e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # bf16: tests/fused/test_bf16_cuda.py


def naive(x, anchors):
    """The formula as a user would write it, in the inputs' own dtype."""
    return F.normalize(x, dim=1) @ F.normalize(anchors, dim=1).T


def err(a, ref):
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_within_rule(ours, torch_same, ref, dtype, what):
    e_ours, e_torch = err(ours, ref), err(torch_same, ref)
    assert e_ours <= e_torch + TOL[dtype], f"{what}: ours {e_ours:.3g} vs torch {e_torch:.3g} (+{TOL[dtype]})"


SHAPES = [(1, 1, 33), (5, 1000, 100), (37, 7, 384), (70, 130, 33), (3, 17, 16)]


def check_similarity(device, dtype, N, K, D, seed):
    """Triton forward and backward vs fp64 under the accuracy rule; returns (x, anchors, same, ref)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(device, dtype)
    anchors = torch.randn(K, D, generator=g).to(device, dtype)
    grad = torch.randn(N, K, generator=g).to(device, dtype)

    x64, a64 = x.double().requires_grad_(), anchors.double().requires_grad_()
    ref = naive(x64, a64)
    ref.backward(grad.double())

    xs, as_ = x.clone().requires_grad_(), anchors.clone().requires_grad_()
    same = naive(xs, as_)
    same.backward(grad)

    xo, ao = x.clone().requires_grad_(), anchors.clone().requires_grad_()
    S = anchor_similarity(xo, ao, backend="triton")
    S.backward(grad)

    assert S.dtype == dtype and S.shape == (N, K)
    assert_within_rule(S, same, ref, dtype, "S")
    assert_within_rule(xo.grad, xs.grad, x64.grad, dtype, "dx")
    assert_within_rule(ao.grad, as_.grad, a64.grad, dtype, "danchors")
    return x, anchors, same, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,K,D", SHAPES)
def test_forward_and_backward_match_fp64(device, dtype, N, K, D):
    x, anchors, same, ref = check_similarity(device, dtype, N, K, D, seed=N * 1000 + K + D)
    # The reference (fp32 accumulation) obeys the same rule.
    assert_within_rule(anchor_similarity(x, anchors, backend="reference"), same, ref, dtype, "reference S")


def test_values_are_cosines(device):
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]], device=device)
    anchors = torch.tensor([[2.0, 0.0], [0.0, 5.0]], device=device)
    expected = torch.tensor([[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]], device=device)
    for backend in ("triton", "reference"):
        torch.testing.assert_close(anchor_similarity(x, anchors, backend=backend), expected)


def test_zero_row_gradient_matches_torch(device):
    # F.normalize clamps the norm at 1e-12 with no gradient below it: dx = dx̂ / 1e-12.
    x = torch.randn(3, 20, device=device)
    x[1] = 0
    anchors = torch.randn(4, 20, device=device)
    xo, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    anchor_similarity(xo, anchors, backend="triton").sum().backward()
    naive(x64, anchors.double()).sum().backward()
    torch.testing.assert_close(xo.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


def test_empty_batch(device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    anchors = torch.randn(5, 8, device=device, requires_grad=True)
    S = anchor_similarity(x, anchors, backend="triton")
    assert S.shape == (0, 5)
    S.sum().backward()
    assert x.grad.shape == (0, 8) and torch.equal(anchors.grad, torch.zeros_like(anchors))


def test_gradcheck_reference_fp64():
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    anchors = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: anchor_similarity(a, b, backend="reference"), (x, anchors))


def test_fp64_dispatch(device):
    x = torch.randn(4, 8, dtype=torch.float64, device=device)
    anchors = torch.randn(3, 8, dtype=torch.float64, device=device)
    S = anchor_similarity(x, anchors)  # backend=None: reference for fp64
    assert S.dtype == torch.float64
    torch.testing.assert_close(S, naive(x, anchors))
    with pytest.raises(ValueError, match="float64"):
        anchor_similarity(x, anchors, backend="triton")


@pytest.mark.parametrize(
    "x,anchors,exc,name",
    [
        (torch.randn(8), torch.randn(3, 8), ValueError, "x"),
        (torch.randn(4, 8), torch.randn(3, 8, 1), ValueError, "anchors"),
        (torch.randn(4, 8), torch.randn(3, 7), ValueError, "anchors"),
        (torch.ones(4, 8, dtype=torch.int64), torch.randn(3, 8), TypeError, "x"),
        (torch.randn(4, 8), [[1.0] * 8], TypeError, "anchors"),
        (torch.randn(4, 8), torch.randn(3, 8, device="meta"), ValueError, "anchors"),
    ],
)
def test_bad_input(x, anchors, exc, name):
    with pytest.raises(exc, match=name):
        anchor_similarity(x, anchors)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        anchor_similarity(torch.randn(2, 4), torch.randn(3, 4), backend="cuda")


def test_opcheck(device):
    x = torch.randn(5, 33, device=device, requires_grad=True)
    anchors = torch.randn(7, 33, device=device, requires_grad=True)
    torch.library.opcheck(_anchor_similarity_triton, (x, anchors))


def test_compiled_matches_eager(device):
    def structure_energy(x, anchors):
        return anchor_similarity(x, anchors).square().sum()

    compiled = torch.compile(structure_energy, fullgraph=True)
    x = torch.randn(9, 40, device=device)
    anchors = torch.randn(6, 40, device=device)
    out = {}
    for name, fn in (("eager", structure_energy), ("compiled", compiled)):
        xi = x.clone().requires_grad_()
        loss = fn(xi, anchors)
        loss.backward()
        out[name] = (loss.detach(), xi.grad)
    torch.testing.assert_close(out["compiled"], out["eager"])


def test_mixed_dtypes(device):
    # fp16 x with fp32 anchors: fp32 operands in-kernel, output in x's dtype.
    x = torch.randn(6, 50, device=device, dtype=torch.float16)
    anchors = torch.randn(9, 50, device=device)
    S = anchor_similarity(x, anchors, backend="triton")
    assert S.dtype == torch.float16
    ref = naive(x.double(), anchors.double())
    assert err(S, ref) <= 1e-3  # one fp16 rounding of values in [-1, 1]
    torch.testing.assert_close(S, anchor_similarity(x, anchors, backend="reference"))
