"""structure_alignment_loss: Triton vs the PyTorch reference vs a float64 evaluation.

Accuracy rule (PERFORMANCE.md): max|ours − fp64| ≤ max|torch same dtype − fp64| + tol.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fused.alignment as alignment_module
from fused.alignment import (
    ANCHOR_PATH_MAX_K,
    _alignment_blocks,
    _structure_alignment_triton,
    alignment_path,
    structure_alignment_loss,
    structure_alignment_rows_reference,
)

TOL = {torch.float32: 5e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def naive_rows(x, x_ref, anchors):
    """METHOD.md §5 as a user would write it, in the inputs' own dtype."""
    A = F.normalize(anchors, dim=1)
    S = F.normalize(x, dim=1) @ A.T
    S_ref = F.normalize(x_ref, dim=1) @ A.T
    return 1 - F.cosine_similarity(S, S_ref, dim=1, eps=1e-8)


def reduce(rows, reduction):
    return {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]


def err(a, ref):
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


def assert_within_rule(ours, torch_same, ref, dtype, what):
    e_ours, e_torch = err(ours, ref), err(torch_same, ref)
    assert e_ours <= e_torch + TOL[dtype], f"{what}: ours {e_ours:.3g} vs torch {e_torch:.3g} (+{TOL[dtype]})"


def make_inputs(N, K, D, dtype, device, seed, ref_noise=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    x_ref = x + ref_noise * torch.randn(N, D, generator=g)  # a drifted copy, as in unlearning
    anchors = torch.randn(K, D, generator=g)
    return x.to(device, dtype), x_ref.to(device, dtype), anchors.to(device, dtype)


# (N, K, D): no dimension a multiple of the blocks; N=70 with D=100 gives two row blocks.
SHAPES = [(1, 1, 33), (5, 1000, 33), (70, 37, 100), (9, 10, 384), (3, 130, 1000)]


@pytest.fixture(params=["anchors", "gram"])
def path(request, monkeypatch):
    """Run a test on both Triton paths: the one-launch anchor kernel and the tiled Gram path."""
    monkeypatch.setattr(alignment_module, "_FORCE_PATH", request.param)
    return request.param


# Each shape on each Triton path that can serve it: the anchor kernel holds at most
# ANCHOR_PATH_MAX_K anchors; K = 1 stays off the Gram path (ℓ ≡ 0 and its gradient is exactly 0,
# which through M arises from a cancellation inside the GEMM, zero only to the operand rounding;
# the default path for K = 1 is the anchor kernel, where g = 0 is formed exactly).
PATH_SHAPES = [("anchors", *s) for s in SHAPES if s[1] <= ANCHOR_PATH_MAX_K] + [("gram", *s) for s in SHAPES if s[1] > 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("forced,N,K,D", PATH_SHAPES)
def test_triton_matches_fp64(device, dtype, forced, N, K, D, monkeypatch):
    monkeypatch.setattr(alignment_module, "_FORCE_PATH", forced)
    x, x_ref, anchors = make_inputs(N, K, D, dtype, device, seed=N + K + D)
    upstream = torch.rand(N, device=device) + 0.5  # per-row weights for reduction="none"

    x64, r64 = x.double().requires_grad_(), x_ref.double().requires_grad_()
    ref = naive_rows(x64, r64, anchors.double())
    ref.backward(upstream.double())

    xs, rs = x.clone().requires_grad_(), x_ref.clone().requires_grad_()
    same = naive_rows(xs, rs, anchors)
    same.backward(upstream.to(dtype))

    xo, ro = x.clone().requires_grad_(), x_ref.clone().requires_grad_()
    rows = structure_alignment_loss(xo, ro, anchors, reduction="none", backend="triton")
    rows.backward(upstream)

    assert rows.dtype == torch.float32 and rows.shape == (N,)
    assert_within_rule(rows, same, ref, dtype, "loss")
    assert_within_rule(xo.grad, xs.grad, x64.grad, dtype, "dx")
    assert_within_rule(ro.grad, rs.grad, r64.grad, dtype, "dx_ref")
    assert xo.grad.dtype == dtype and ro.grad.dtype == dtype


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_gradients(device, backend, reduction):
    x, x_ref, anchors = make_inputs(23, 11, 48, torch.float32, device, seed=7)
    x64 = x.double().requires_grad_()
    ref = reduce(naive_rows(x64, x_ref.double(), anchors.double()), reduction)
    xo = x.clone().requires_grad_()
    loss = structure_alignment_loss(xo, x_ref, anchors, reduction=reduction, backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    up = torch.linspace(0.5, 2.0, ref.numel(), dtype=torch.float64, device=device).reshape(ref.shape)
    ref.backward(up)
    loss.backward(up.to(device, torch.float32))
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xo.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)


def test_near_identical_rows_keep_gradient_accuracy(device, path):
    # x ≈ x_ref (early unlearning): ∂ℓ/∂s = −(ŝ0 − cŝ)/‖s‖ is a small difference of large terms.
    x, x_ref, anchors = make_inputs(16, 50, 64, torch.float32, device, seed=3, ref_noise=1e-3)
    x64 = x.double().requires_grad_()
    naive_rows(x64, x_ref.double(), anchors.double()).sum().backward()
    xs = x.clone().requires_grad_()
    naive_rows(xs, x_ref, anchors).sum().backward()
    xo = x.clone().requires_grad_()
    structure_alignment_loss(xo, x_ref, anchors, reduction="sum", backend="triton").backward()
    # relative to the (tiny) gradient itself, not to the tolerance
    scale = x64.grad.abs().max().item()
    assert err(xo.grad, x64.grad) <= 2 * err(xs.grad, x64.grad) + 1e-3 * scale


def test_only_x_gets_gradient(device):
    x, x_ref, anchors = make_inputs(6, 5, 20, torch.float32, device, seed=1)
    x.requires_grad_()
    structure_alignment_loss(x, x_ref, anchors, backend="triton").backward()
    assert x.grad is not None and x_ref.grad is None and anchors.grad is None
    assert x.grad.abs().sum() > 0


def test_zero_rows_match_torch(device, path):
    # x row 1 = 0 (F.normalize clamps, gradient 1e12·dx̂); x_ref row 2 = 0 (S_ref row 0: cos = 0).
    x, x_ref, anchors = make_inputs(4, 6, 20, torch.float32, device, seed=5)
    x[1] = 0
    x_ref[2] = 0
    x64 = x.double().requires_grad_()
    ref = naive_rows(x64, x_ref.double(), anchors.double())
    ref.sum().backward()
    for backend in ("triton", "reference"):
        xo = x.clone().requires_grad_()
        rows = structure_alignment_loss(xo, x_ref, anchors, reduction="none", backend=backend)
        rows.sum().backward()
        torch.testing.assert_close(rows.double(), ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xo.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)


def test_clamped_cosine_matches_torch(device, path):
    # 0 < ‖s‖ < 1e-8: x almost orthogonal to both anchors, so cosine_similarity's eps clamp is
    # active and s·∂ℓ/∂s ≠ 0 (the x̂ term of the normalisation backward matters).
    anchors = torch.zeros(2, 20, device=device)
    anchors[0, 0] = anchors[1, 1] = 1.0
    x = torch.randn(3, 20, device=device)
    x[:, 0], x[:, 1] = 3e-9, -2e-9
    x_ref = torch.randn(3, 20, device=device)
    x_ref[2, 0], x_ref[2, 1] = 1e-9, 4e-9  # both clamped in this row
    x64, r64 = x.double().requires_grad_(), x_ref.double().requires_grad_()
    ref = naive_rows(x64, r64, anchors.double())
    ref.sum().backward()
    for backend in ("triton", "reference"):
        xo, ro = x.clone().requires_grad_(), x_ref.clone().requires_grad_()
        rows = structure_alignment_loss(xo, ro, anchors, reduction="none", backend=backend)
        rows.sum().backward()
        torch.testing.assert_close(rows.double(), ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xo.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ro.grad.double(), r64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_empty_batch(device, backend):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    x_ref = torch.randn(0, 8, device=device)
    anchors = torch.randn(5, 8, device=device)
    for reduction, shape in (("mean", ()), ("sum", ()), ("none", (0,))):
        loss = structure_alignment_loss(x, x_ref, anchors, reduction=reduction, backend=backend)
        assert loss.shape == shape and loss.dtype == torch.float32
        assert torch.equal(loss, torch.zeros(shape, device=device))  # mean of nothing is 0, not nan
    structure_alignment_loss(x, x_ref, anchors, backend=backend).backward()
    assert x.grad.shape == (0, 8)


def test_reference_is_chunked_and_matches_autograd():
    # chunk_rows=4 over N=10: three chunks, the last one partial.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 7, dtype=torch.float64, generator=g, requires_grad=True)
    x_ref = torch.randn(10, 7, dtype=torch.float64, generator=g, requires_grad=True)
    anchors = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.rand(10, dtype=torch.float64, generator=g)
    rows = structure_alignment_rows_reference(x, x_ref, anchors, chunk_rows=4)
    ours = torch.autograd.grad(rows, (x, x_ref, anchors), up)
    expected = torch.autograd.grad(naive_rows(x, x_ref, anchors), (x, x_ref, anchors), up)
    torch.testing.assert_close(rows, naive_rows(x, x_ref, anchors))
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)


def test_gradcheck_reference_fp64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 6, dtype=torch.float64, generator=g, requires_grad=True)
    x_ref = torch.randn(7, 6, dtype=torch.float64, generator=g, requires_grad=True)
    anchors = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    fn = lambda a, b, c: structure_alignment_rows_reference(a, b, c, chunk_rows=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, x_ref, anchors))


def test_anchor_gradient_dispatch(device):
    x, x_ref, anchors = make_inputs(5, 4, 12, torch.float32, device, seed=2)
    anchors.requires_grad_()
    with pytest.raises(ValueError, match="anchors"):
        structure_alignment_loss(x, x_ref, anchors, backend="triton")
    # backend=None falls back to the reference, which differentiates w.r.t. anchors
    structure_alignment_loss(x, x_ref, anchors).backward()
    a64 = anchors.detach().double().requires_grad_()
    naive_rows(x.double(), x_ref.double(), a64).mean().backward()
    torch.testing.assert_close(anchors.grad.double(), a64.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # no gradient wanted: the Triton path is fine
        structure_alignment_loss(x, x_ref, anchors, backend="triton")


def test_fp64_and_wide_d_dispatch(device):
    x, x_ref, anchors = make_inputs(3, 4, 8, torch.float64, device, seed=4)
    loss = structure_alignment_loss(x, x_ref, anchors)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, naive_rows(x, x_ref, anchors).mean())
    with pytest.raises(ValueError, match="float64"):
        structure_alignment_loss(x, x_ref, anchors, backend="triton")


@pytest.mark.parametrize("K", [3, 300])
def test_wide_d_on_triton(device, K):
    # D above the old 1024 cap (and not a multiple of 16) is tiled over D on both paths: no fallback
    # to the reference. D = 4096 itself is covered by the preflight and the CUDA tests.
    N, D = 3, 1100
    x, x_ref, anchors = make_inputs(N, K, D, torch.float32, device, seed=K)
    x64 = x.double().requires_grad_()
    naive_rows(x64, x_ref.double(), anchors.double()).sum().backward()
    xo = x.clone().requires_grad_()
    rows = structure_alignment_loss(xo, x_ref, anchors, reduction="none", backend="triton")
    rows.sum().backward()
    torch.testing.assert_close(rows.double(), naive_rows(x.double(), x_ref.double(), anchors.double()),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xo.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)


@settings(max_examples=8, deadline=None)
@given(
    N=st.integers(1, 9),
    K=st.integers(1, 20),
    D=st.integers(1, 40),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_properties(N, K, D, scale, seed):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, x_ref, anchors = make_inputs(N, K, D, torch.float32, device, seed=seed, ref_noise=2.0)
    rows = structure_alignment_loss(x, x_ref, anchors, reduction="none", backend="triton")
    assert ((rows >= -1e-6) & (rows <= 2 + 1e-6)).all()
    # invariant to positive scaling of each row of x (and of x_ref)
    row_scale = scale * (torch.rand(N, 1, device=device) + 0.5)
    scaled = structure_alignment_loss(x * row_scale, x_ref / row_scale, anchors, reduction="none", backend="triton")
    torch.testing.assert_close(scaled, rows, rtol=1e-4, atol=1e-5)
    # zero when nothing drifted
    same = structure_alignment_loss(x, x, anchors, reduction="none", backend="triton")
    torch.testing.assert_close(same, torch.zeros_like(same), rtol=0, atol=1e-6)


def test_block_config_is_dot_shaped():
    # What fits a card is the preflight's to say (tests/fused/test_preflight.py); here: every tile
    # dim is a power of two >= 16 (tl.dot on a GPU), and the anchor kernel holds all K anchors.
    for kind in (0, 1, 2):
        for K in (1, 10, 100, 128, 1000, 4096):
            for name, cfg in _alignment_blocks(kind, K, 90).items():
                for key, v in cfg.items():
                    if key.startswith(("BLOCK", "K_PAD")):
                        assert v >= 16 and v & (v - 1) == 0, (name, key, v)
            if alignment_path(K) == "anchors":
                assert _alignment_blocks(kind, K, 90)["anchors"]["K_PAD"] >= K


X_BAD = torch.randn(4, 8)


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(x=torch.randn(8)), ValueError, "x must be 2-D"),
        (dict(x_ref=torch.randn(5, 8)), ValueError, "x_ref"),
        (dict(x_ref=torch.randn(4, 7)), ValueError, "x_ref"),
        (dict(anchors=torch.randn(3, 7)), ValueError, "anchors"),
        (dict(anchors=torch.randn(3)), ValueError, "anchors"),
        (dict(x=torch.ones(4, 8, dtype=torch.int32)), TypeError, "x must"),
        (dict(x_ref=None), TypeError, "x_ref"),
        (dict(anchors=torch.randn(3, 8, device="meta")), ValueError, "anchors"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(backend="gpu"), ValueError, "backend"),
    ],
)
def test_bad_input(kwargs, exc, name):
    args = dict(x=X_BAD, x_ref=X_BAD.clone(), anchors=torch.randn(3, 8))
    args.update(kwargs)
    reduction = args.pop("reduction", "mean")
    backend = args.pop("backend", None)
    with pytest.raises(exc, match=name):
        structure_alignment_loss(args["x"], args["x_ref"], args["anchors"], reduction=reduction, backend=backend)


def test_opcheck(device):
    x, x_ref, anchors = make_inputs(5, 7, 33, torch.float32, device, seed=6)
    torch.library.opcheck(_structure_alignment_triton, (x.requires_grad_(), x_ref.requires_grad_(), anchors, True, True))
    torch.library.opcheck(_structure_alignment_triton, (x.detach(), x_ref.detach(), anchors, False, False))


def test_compiled_matches_eager(device):
    def objective(x, x_ref, anchors):
        return structure_alignment_loss(x, x_ref, anchors) + 0.1 * x.square().mean()

    compiled = torch.compile(objective, fullgraph=True)
    x, x_ref, anchors = make_inputs(9, 6, 40, torch.float32, device, seed=8)
    out = {}
    for name, fn in (("eager", objective), ("compiled", compiled)):
        xi = x.clone().requires_grad_()
        loss = fn(xi, x_ref, anchors)
        loss.backward()
        out[name] = (loss.detach(), xi.grad)
    torch.testing.assert_close(out["compiled"], out["eager"])


def test_mixed_and_bf16_dtypes(device):
    x, x_ref, anchors = make_inputs(12, 9, 40, torch.float32, device, seed=9)
    # fp32 x with an fp16 reference branch: fp32 operands in-kernel
    rows = structure_alignment_loss(x, x_ref.half(), anchors, reduction="none", backend="triton")
    assert rows.dtype == torch.float32
    ref_half = naive_rows(x.double(), x_ref.half().double(), anchors.double())
    torch.testing.assert_close(rows.double(), ref_half, rtol=1e-5, atol=1e-6)
    # bf16 on the reference path (bf16 is wrong in the Triton interpreter): fp32 accumulation
    xb = x.bfloat16().requires_grad_()
    rows_b = structure_alignment_loss(xb, x_ref.bfloat16(), anchors.bfloat16(), reduction="none", backend="reference")
    assert rows_b.dtype == torch.float32
    x64 = x.bfloat16().double().requires_grad_()
    ref_b = naive_rows(x64, x_ref.bfloat16().double(), anchors.bfloat16().double())
    xs = x.bfloat16().requires_grad_()
    same = naive_rows(xs, x_ref.bfloat16(), anchors.bfloat16())
    assert_within_rule(rows_b, same, ref_b, torch.bfloat16, "bf16 loss")
    for r in (rows_b, same, ref_b):
        r.sum().backward()
    assert xb.grad.dtype == torch.bfloat16
    assert_within_rule(xb.grad, xs.grad, x64.grad, torch.bfloat16, "bf16 dx")


def test_gram_cache_follows_the_anchors(device, monkeypatch):
    # The Gram path caches Â and M = ÂᵀÂ per anchors tensor: an in-place change of the anchors
    # (version counter) or another tensor must not reuse them.
    monkeypatch.setattr(alignment_module, "_FORCE_PATH", "gram")
    x, x_ref, anchors = make_inputs(6, 140, 40, torch.float32, device, seed=11)

    def check(a):
        xo = x.clone().requires_grad_()
        rows = structure_alignment_loss(xo, x_ref, a, reduction="none", backend="triton")
        rows.sum().backward()
        x64 = x.double().requires_grad_()
        ref = naive_rows(x64, x_ref.double(), a.double())
        ref.sum().backward()
        torch.testing.assert_close(rows.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xo.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)

    check(anchors)
    anchors.mul_(torch.linspace(0.1, 3.0, 40, device=device))  # same tensor, new values
    check(anchors)
    check(torch.randn_like(anchors))  # a different tensor
