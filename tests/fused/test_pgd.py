"""Tests for fused.pgd.l2_pgd_step: Triton vs reference vs an fp64 oracle, edge cases, bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fused.pgd import l2_pgd_step, l2_pgd_step_reference

TOL = {torch.float32: 5e-4, torch.float16: 1e-3}
SHAPES = [(1, 3, 8, 8), (5, 1, 8, 8), (3, 100), (2, 9001)]  # 9001 > 8192: the looped three-pass kernel


def _inputs(shape, dtype, device, seed=0, spread=0.3):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=gen, dtype=torch.float64)
    x = (x0 + spread * (torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5)).clamp(0, 1)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (x, x0, g)]


def _per_sample_norm(t):
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1).double(), dim=1)


def _oracle(x, x0, g, **kw):
    """Reference evaluated in fp64 on the (rounded) inputs: the ground truth."""
    eps = kw.pop("eps")
    if isinstance(eps, torch.Tensor):
        eps = eps.double()
    return l2_pgd_step_reference(x.double(), x0.double(), g.double(), eps=eps, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("targeted", [True, False])
def test_matches_fp64_oracle(shape, dtype, targeted, device):
    x, x0, g = _inputs(shape, dtype, device)
    kw = dict(step_size=0.2, eps=0.25, targeted=targeted)
    truth = _oracle(x, x0, g, **kw)
    ours = l2_pgd_step(x, x0, g, backend="triton", **kw)
    ref = l2_pgd_step(x, x0, g, backend="reference", **kw)
    assert ours.dtype == dtype and ours.shape == x.shape
    err_ours = (ours.double() - truth).abs().max().item()
    err_ref = (ref.double() - truth).abs().max().item()
    assert err_ours <= err_ref + TOL[dtype], (err_ours, err_ref)
    # Inputs are untouched (the op is out of place).
    assert torch.equal(x, _inputs(shape, dtype, device)[0])


def test_targeted_descends_untargeted_ascends(device):
    # No projection (huge eps) and no clamp: the step is exactly ∓α·g/‖g‖.
    x, x0, g = _inputs((4, 37), torch.float32, device)
    for targeted, sign in ((True, -1.0), (False, 1.0)):
        out = l2_pgd_step(x, x0, g, step_size=0.1, eps=1e6, targeted=targeted, clamp=None)
        step = out - x
        expected = sign * 0.1 * g / _per_sample_norm(g).float().view(-1, 1)
        torch.testing.assert_close(step, expected, atol=1e-6, rtol=1e-4)
        # Moving along −g lowers the linearised loss <g, x>, along +g raises it.
        assert torch.all(sign * (step * g).sum(1) > 0)


@pytest.mark.parametrize("shape", [(3, 100), (2, 9001)])
def test_projection_binds(shape, device):
    x, x0, g = _inputs(shape, torch.float32, device, spread=2.0)
    eps = 0.05
    assert torch.all(_per_sample_norm(x - x0) > eps)  # the unprojected step is outside the ball
    out = l2_pgd_step(x, x0, g, step_size=1.0, eps=eps, clamp=None)
    norms = _per_sample_norm(out - x0)
    assert torch.all(norms <= eps * (1 + 1e-5))
    torch.testing.assert_close(norms, torch.full_like(norms, eps), atol=1e-6, rtol=1e-5)  # on the sphere


def test_clamp_respected_and_disabled(device):
    x, x0, g = _inputs((3, 8, 8), torch.float32, device)
    out = l2_pgd_step(x, x0, 10 * g, step_size=5.0, eps=3.0, clamp=(0.2, 0.7))
    assert out.min() >= 0.2 and out.max() <= 0.7
    assert out.min() == 0.2 and out.max() == 0.7  # the clamp binds
    free = l2_pgd_step(x, x0, 10 * g, step_size=5.0, eps=3.0, clamp=None)
    assert free.min() < 0.0 and free.max() > 1.0


def test_zero_grad_and_zero_delta_no_nan(device):
    x, x0, g = _inputs((3, 50), torch.float32, device)
    g[1] = 0
    out = l2_pgd_step(x, x0, g, step_size=0.1, eps=1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], x[1].clamp(0, 1))  # zero gradient: no step
    # x = x0 and zero gradient: δ = 0 everywhere.
    out = l2_pgd_step(x0, x0, torch.zeros_like(x0), step_size=0.1, eps=1.0)
    assert torch.isfinite(out).all() and torch.equal(out, x0)


def test_per_sample_eps(device):
    x, x0, g = _inputs((3, 100), torch.float32, device, spread=2.0)
    eps = torch.tensor([0.01, 0.1, 0.5], device=device)
    out = l2_pgd_step(x, x0, g, step_size=1.0, eps=eps, clamp=None)
    torch.testing.assert_close(_per_sample_norm(out - x0), eps.double(), atol=1e-6, rtol=1e-5)
    truth = _oracle(x, x0, g, step_size=1.0, eps=eps, clamp=None)
    assert (out.double() - truth).abs().max() < 1e-5
    # A 0-dim tensor broadcasts like a float.
    same = l2_pgd_step(x, x0, g, step_size=1.0, eps=torch.tensor(0.1, device=device), clamp=None)
    torch.testing.assert_close(same, l2_pgd_step(x, x0, g, step_size=1.0, eps=0.1, clamp=None))


def test_empty_batch(device):
    x = torch.empty(0, 3, 4, 4, device=device)
    out = l2_pgd_step(x, x, x, step_size=0.1, eps=1.0)
    assert out.shape == x.shape and out.dtype == x.dtype


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_out_and_in_place(backend, device):
    x, x0, g = _inputs((4, 300), torch.float32, device)
    kw = dict(step_size=0.1, eps=0.2, backend=backend)
    expected = l2_pgd_step(x, x0, g, **kw)
    buf = torch.empty_like(x)
    assert l2_pgd_step(x, x0, g, out=buf, **kw) is buf
    torch.testing.assert_close(buf, expected, atol=0, rtol=0)
    assert l2_pgd_step(x, x0, g, out=x, **kw) is x  # in-place step
    torch.testing.assert_close(x, expected, atol=0, rtol=0)
    strided = torch.empty(300, 4, device=device).T  # an out of another layout is written through a copy
    l2_pgd_step(x0, x0, g, out=strided, **kw)
    torch.testing.assert_close(strided, l2_pgd_step(x0, x0, g, **kw), atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_not_differentiated(backend, device):
    x, x0, g = _inputs((2, 30), torch.float32, device)
    out = l2_pgd_step(x.requires_grad_(), x0, g, step_size=0.1, eps=0.2, backend=backend)
    assert not out.requires_grad and out.grad_fn is None


def test_channels_last_and_mixed_dtypes(device):
    x, x0, g = _inputs((2, 3, 5, 7), torch.float16, device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    g32 = g.float()  # fp32 gradient with fp16 images (autocast)
    out = l2_pgd_step(x_cl, x0, g32, step_size=0.2, eps=0.3)
    assert out.dtype == torch.float16 and out.is_contiguous(memory_format=torch.channels_last)
    ref = l2_pgd_step(x, x0, g32, step_size=0.2, eps=0.3, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=0)


def test_opcheck(device):
    x, x0, g = _inputs((3, 40), torch.float32, device)
    out = torch.empty_like(x)
    eps = torch.tensor([0.1, 0.2, 0.3], device=device)
    for e_t, e in ((None, 0.2), (eps, 0.0)):
        torch.library.opcheck(
            torch.ops.fused.l2_pgd_step.default,
            (x, x0, g, out, e_t, 0.1, e, -1.0, 0.0, 1.0, True),
        )


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    dim=st.integers(1, 70),
    step=st.floats(1e-3, 3.0),
    eps=st.floats(1e-3, 3.0),
    targeted=st.booleans(),
    use_clamp=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_oracle_and_stays_in_ball(batch, dim, step, eps, targeted, use_clamp, seed):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, x0, g = _inputs((batch, dim), torch.float32, device, seed=seed, spread=1.0)
    clamp = (0.0, 1.0) if use_clamp else None
    kw = dict(step_size=step, eps=eps, targeted=targeted, clamp=clamp)
    out = l2_pgd_step(x, x0, g, backend="triton", **kw)
    truth = _oracle(x, x0, g, **kw)
    assert (out.double() - truth).abs().max() <= 1e-5 * (1 + step + eps)
    assert torch.all(_per_sample_norm(out - x0) <= eps * (1 + 1e-5) + 1e-6)
    if use_clamp:
        assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (dict(grad=torch.zeros(3, 5)), ValueError, "grad must have x's shape"),
        (dict(x_orig=torch.zeros(3, 4, dtype=torch.int64)), TypeError, "x_orig must have a floating dtype"),
        (dict(x=torch.tensor(1.0), x_orig=torch.tensor(1.0), grad=torch.tensor(1.0)), ValueError, "at least 1 dim"),
        (dict(step_size=0.0), ValueError, "step_size must be a finite number > 0"),
        (dict(step_size=-1.0), ValueError, "step_size"),
        (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
        (dict(eps=math.inf), ValueError, "eps"),
        (dict(eps="1"), TypeError, "eps must be a real number"),
        (dict(eps=torch.ones(2)), ValueError, "one radius per sample"),
        (dict(eps=torch.tensor([1.0, -1.0, 1.0])), ValueError, "finite radii > 0"),
        (dict(eps=torch.tensor([1.0, math.nan, 1.0])), ValueError, "finite radii > 0"),
        (dict(clamp=(1.0, 0.0)), ValueError, "lo < hi"),
        (dict(clamp=0.5), TypeError, "clamp must be None or a pair"),
        (dict(clamp=(0.0, "1")), TypeError, r"clamp\[1\] must be a real number"),
        (dict(targeted=1), TypeError, "targeted must be a bool"),
        (dict(out=torch.zeros(3, 4, dtype=torch.float16)), ValueError, "out must match x"),
        (dict(backend="cuda"), ValueError, "backend must be"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(x=torch.rand(3, 4), x_orig=torch.rand(3, 4), grad=torch.rand(3, 4), step_size=0.1, eps=1.0)
    args.update(kwargs)
    x, x0, g = args.pop("x"), args.pop("x_orig"), args.pop("grad")
    with pytest.raises(exc, match=match):
        l2_pgd_step(x, x0, g, **args)


def test_device_mismatch():
    x = torch.rand(3, 4)
    with pytest.raises(ValueError, match="x_orig is on meta"):
        l2_pgd_step(x, x.to("meta"), x, step_size=0.1, eps=1.0)
    with pytest.raises(ValueError, match="eps is on meta"):
        l2_pgd_step(x, x, x, step_size=0.1, eps=torch.ones(3, device="meta"))


def test_preflight_launches_from_a_spec():
    import fused.pgd as pgd

    (launch,) = pgd.preflight_launches(dict(B=4, D=3072, dtype=torch.bfloat16, grad_dtype=torch.float32,
                                            per_sample_eps=True, clamp=False), 89)
    assert launch.name == "pgd.step" and launch.kind == "bandwidth" and launch.grid == (4,)
    assert [t.dtype for t in launch.args[:3]] == [torch.bfloat16, torch.bfloat16, torch.float32]
    assert launch.args[4].shape == (4,) and launch.args[4].device.type == "meta"
    c = launch.constexprs
    assert c["SINGLE_BLOCK"] and c["BLOCK"] == 4096 and c["PER_SAMPLE_EPS"]
    assert launch.args[10] == 0  # clamp: a runtime flag (one kernel for the four variants)
    (loop,) = pgd.preflight_launches(dict(D=3 * 224 * 224), 90)
    assert not loop.constexprs["SINGLE_BLOCK"] and loop.grid == (128,)
    assert pgd.preflight_launches(dict(B=0), 90) == []
