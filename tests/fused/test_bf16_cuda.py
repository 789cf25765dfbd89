"""bf16 numerics of every op's Triton path, and fp16/fp32/bf16 at one larger shape per op: GPU only.

Rule (PERFORMANCE.md): max|ours − fp64| ≤ max|torch same dtype − fp64| + tol, tol 5e-4 (fp32),
1e-3 (fp16), 1e-2 (bf16). The fp64 oracles are the ones of the per-op test modules.

The Triton interpreter's bf16 is wrong, so this file only runs on a CUDA device (on the CPU every
test is skipped). Its large cases catch what only a GPU shows: grid limits and 32-bit offset
overflow. The two "beyond 2^31" cases hold tensors of more than 2^31 elements (every element
offset, and every byte offset, overflows int32), checked on the first and last rows:
alignment ~13 GiB (x, x_ref, dx in bf16), PGD ~17 GiB (x, x0, g, out in bf16) of GPU memory; an
H100 80 GB runs both, a smaller card skips them.
"""

import pytest
import torch
import torchvision

from fused.alignment import _structure_alignment_triton, structure_alignment_loss
from fused.importance import accumulate_importance
from fused.pgd import l2_pgd_step
from fused.similarity import anchor_similarity
from fused.update import masked_regularized_sgd_step
from tests.fused.test_alignment import make_inputs as alignment_inputs
from tests.fused.test_alignment import naive_rows, reduce
from tests.fused.test_pgd import _oracle as pgd_oracle
from tests.fused.test_similarity import check_similarity
from tests.fused.test_update import SHAPES as UPDATE_SHAPES
from tests.fused.test_update import clone, expected_fp64, make_case, max_err

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="bf16 Triton numerics need a GPU (the interpreter's bf16 is wrong)"
)

BF16 = torch.bfloat16
TOL = {torch.float32: 5e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}
LARGER_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Sizes of the large cases (module constants, so that a CPU dry run can shrink them).
SIMILARITY_LARGE = (65_536, 1000, 512)  # N, K, D: a 1024 × 8 grid
ALIGNMENT_LARGE = (70_000, 256, 512)  # N, K, D: the PERFORMANCE.md bandwidth regime
BEYOND_INT32 = 2**31 + 2**20  # elements of each tensor in the "beyond 2^31" cases
ALIGNMENT_HUGE_DK = (512, 64)  # D, K of the beyond-2^31 alignment case
PGD_HUGE_D = 3 * 224 * 224  # ImageNet-size samples
PGD_LARGE = (256, 3, 224, 224)


def resnet50_shapes():
    """The 161 parameter shapes of a ResNet-50 (25.6M values, largest tensor 2.4M)."""
    return [tuple(p.shape) for p in torchvision.models.resnet50().parameters()]


def err(a, ref):
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_within_rule(ours, torch_same, ref, dtype, what):
    e_ours, e_torch = err(ours, ref), err(torch_same, ref)
    assert e_ours <= e_torch + TOL[dtype], f"{what}: ours {e_ours:.3g} vs torch {e_torch:.3g} (+{TOL[dtype]})"


def free_bytes_at_least(n_bytes):
    free, _ = torch.cuda.mem_get_info()
    if free < n_bytes:
        pytest.skip(f"needs {n_bytes / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")


# ----------------------------------------------------------------------------- anchor_similarity


@pytest.mark.parametrize("N,K,D", [(1, 1, 33), (5, 1000, 100), (70, 130, 33), (128, 100, 512)])
def test_similarity_bf16(device, N, K, D):
    check_similarity(device, BF16, N, K, D, seed=N + K + D)


@pytest.mark.parametrize("dtype", LARGER_DTYPES)
def test_similarity_larger_shape(device, dtype):
    check_similarity(device, dtype, *SIMILARITY_LARGE, seed=1)


# ----------------------------------------------------------------------------- structure_alignment_loss


def check_alignment(device, dtype, N, K, D, reduction, seed):
    x, x_ref, anchors = alignment_inputs(N, K, D, dtype, device, seed=seed)
    x64 = x.double().requires_grad_()
    ref = reduce(naive_rows(x64, x_ref.double(), anchors.double()), reduction)
    xs = x.clone().requires_grad_()
    same = reduce(naive_rows(xs, x_ref, anchors), reduction)
    xo = x.clone().requires_grad_()
    loss = structure_alignment_loss(xo, x_ref, anchors, reduction=reduction, backend="triton")
    up = torch.rand(ref.shape, device=device) + 0.5  # upstream gradient (one value for "mean")
    ref.backward(up.double())
    same.backward(up.to(dtype))
    loss.backward(up)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert xo.grad.dtype == dtype
    assert_within_rule(loss, same, ref, dtype, f"loss[{reduction}]")
    assert_within_rule(xo.grad, xs.grad, x64.grad, dtype, f"dx[{reduction}]")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("N,K,D", [(1, 1, 33), (5, 1000, 33), (70, 37, 100), (9, 10, 384), (130, 256, 1000)])
def test_alignment_bf16(device, N, K, D, reduction):
    check_alignment(device, BF16, N, K, D, reduction, seed=N + K + D)


def test_alignment_bf16_gradient_for_x_ref(device):
    x, x_ref, anchors = alignment_inputs(40, 50, 96, BF16, device, seed=11)
    r64 = x_ref.double().requires_grad_()
    naive_rows(x.double(), r64, anchors.double()).sum().backward()
    rs = x_ref.clone().requires_grad_()
    naive_rows(x, rs, anchors).sum().backward()
    ro = x_ref.clone().requires_grad_()
    structure_alignment_loss(x, ro, anchors, reduction="sum", backend="triton").backward()
    assert_within_rule(ro.grad, rs.grad, r64.grad, BF16, "dx_ref")


@pytest.mark.parametrize("dtype", LARGER_DTYPES)
def test_alignment_larger_shape(device, dtype):
    N, K, D = ALIGNMENT_LARGE if dtype == BF16 else (8192, 256, 768)
    # "none": per-row gradients of order one (with "mean" they are O(1/N), below the tolerance)
    check_alignment(device, dtype, N, K, D, "none", seed=2)


def test_alignment_beyond_int32_offsets(device):
    """x, x_ref and dx of more than 2^31 elements: the rows past 2^31 are right (64-bit offsets)."""
    D, K = ALIGNMENT_HUGE_DK
    N = -(-BEYOND_INT32 // D)
    if device.type == "cuda":
        free_bytes_at_least(3 * N * D * 2 + 2**30)
    gen = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(N, D, device=device, dtype=BF16, generator=gen)
    x_ref = torch.randn(N, D, device=device, dtype=BF16, generator=gen)
    anchors = torch.randn(K, D, device=device, dtype=BF16, generator=gen)
    rows, dx, _ = _structure_alignment_triton(x, x_ref, anchors, True, False)  # per-row ℓ_i and ∂ℓ_i/∂x_i
    for sl in (slice(0, 64), slice(N - 64, N)):
        x64 = x[sl].double().requires_grad_()
        ref = naive_rows(x64, x_ref[sl].double(), anchors.double())
        ref.sum().backward()
        xs = x[sl].clone().requires_grad_()
        same = naive_rows(xs, x_ref[sl], anchors)
        same.sum().backward()
        assert_within_rule(rows[sl], same, ref, BF16, f"loss rows {sl}")
        assert_within_rule(dx[sl], xs.grad, x64.grad, BF16, f"dx rows {sl}")


# ----------------------------------------------------------------------------- accumulate_importance


def check_importance(device, shapes, imp_dtype, grad_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    imp = [torch.rand(s, generator=gen).to(device, imp_dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device, grad_dtype) for s in shapes]
    grads[1] = None  # skipped
    ref = clone(imp)
    expected = [i.double() + (0 if g is None else 0.37 * g.double().abs()) for i, g in zip(imp, grads)]
    accumulate_importance(imp, grads, 0.37, backend="triton")
    accumulate_importance(ref, grads, 0.37, backend="reference")
    assert [i.dtype for i in imp] == [imp_dtype] * len(shapes)
    assert torch.equal(imp[1], ref[1])
    assert max_err(imp, expected) <= max_err(ref, expected) + TOL[imp_dtype]


@pytest.mark.parametrize("imp_dtype", [torch.float32, BF16])
def test_importance_bf16_grads(device, imp_dtype):
    check_importance(device, UPDATE_SHAPES, imp_dtype, BF16, seed=4)


@pytest.mark.parametrize("imp_dtype,grad_dtype", [(d, d) for d in LARGER_DTYPES] + [(torch.float32, BF16)])
def test_importance_resnet50_list(device, imp_dtype, grad_dtype):
    check_importance(device, resnet50_shapes(), imp_dtype, grad_dtype, seed=5)


# ----------------------------------------------------------------------------- masked_regularized_sgd_step


def update_case(shapes, dtype, mask_kind, seed, device):
    """params and grads in ``dtype``; ψ0, importance and momentum buffers in fp32 (the usual AMP setup)."""
    params, grads, refs, imp, masks, bufs = make_case(shapes, dtype, "float", mask_kind, seed=seed, device=device)
    return params, grads, [r.float() for r in refs], imp, masks, bufs


def check_update(device, shapes, dtype, *, proximal, momentum, mask_kind, seed, steps=1):
    case = update_case(shapes, dtype, mask_kind, seed, device)
    case[1][2] = None  # one param without a gradient: SR only
    exp, ref = tuple(clone(x) for x in case), tuple(clone(x) for x in case)
    kw = dict(lr=0.1, lam=0.7, weight_decay=0.01, proximal=proximal, momentum=momentum)
    for _ in range(steps):
        new_p, new_b, exp_sr = expected_fp64(*exp, lr=0.1, lam=0.7, momentum=momentum, wd=0.01, proximal=proximal)
        exp = (new_p, exp[1], exp[2], exp[3], exp[4], new_b)
        outs = []
        for backend, (params, grads, refs, imp, masks, bufs) in (("triton", case), ("reference", ref)):
            outs.append(masked_regularized_sgd_step(
                params, grads, refs, imp, grad_masks=masks, momentum_buffers=bufs if momentum else None,
                backend=backend, **kw,
            ))
        sr, sr_ref = outs
        assert sr.dtype == torch.float32
        assert sr.item() == pytest.approx(exp_sr, rel=1e-4)
        assert sr_ref.item() == pytest.approx(exp_sr, rel=1e-4)
    assert [p.dtype for p in case[0]] == [dtype] * len(shapes)
    assert max_err(case[0], exp[0]) <= max_err(ref[0], exp[0]) + TOL[dtype]
    if momentum:
        with_grad = [i for i, g in enumerate(case[1]) if g is not None]
        assert max_err([case[5][i] for i in with_grad], [exp[5][i] for i in with_grad]) <= max_err(
            [ref[5][i] for i in with_grad], [exp[5][i] for i in with_grad]
        ) + TOL[torch.float32]


@pytest.mark.parametrize("proximal", [False, True])
@pytest.mark.parametrize("momentum,mask_kind", [(0.0, None), (0.9, "bool")])
def test_update_bf16_params(device, proximal, momentum, mask_kind):
    check_update(device, UPDATE_SHAPES, BF16, proximal=proximal, momentum=momentum, mask_kind=mask_kind,
                 seed=6, steps=3)


@pytest.mark.parametrize("dtype", LARGER_DTYPES)
@pytest.mark.parametrize("proximal", [False, True])
def test_update_resnet50_list(device, dtype, proximal):
    check_update(device, resnet50_shapes(), dtype, proximal=proximal, momentum=0.9, mask_kind="uint8", seed=7)


# ----------------------------------------------------------------------------- l2_pgd_step


def pgd_inputs(shape, dtype, device, seed, spread=0.3):
    gen = torch.Generator(device=device).manual_seed(seed)
    x0 = torch.rand(shape, device=device, dtype=dtype, generator=gen)
    # in place: the beyond-2^31 case holds no full-size temporary
    x = torch.rand(shape, device=device, dtype=dtype, generator=gen).sub_(0.5).mul_(spread).add_(x0).clamp_(0, 1)
    g = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    return x, x0, g


def check_pgd_rows(out, x, x0, g, rows, dtype, kw, what):
    sl = (rows,)
    truth = pgd_oracle(x[sl], x0[sl], g[sl], **kw)
    same = l2_pgd_step(x[sl], x0[sl], g[sl], backend="reference", **kw)
    assert_within_rule(out[sl], same, truth, dtype, what)


@pytest.mark.parametrize("targeted", [True, False])
@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (5, 1, 8, 8), (3, 100), (2, 9001), (128, 3, 32, 32)])
def test_pgd_bf16(device, shape, targeted):
    x, x0, g = pgd_inputs(shape, BF16, device, seed=8)
    kw = dict(step_size=0.2, eps=0.25, targeted=targeted)
    out = l2_pgd_step(x, x0, g, backend="triton", **kw)
    assert out.dtype == BF16 and out.shape == x.shape
    check_pgd_rows(out, x, x0, g, slice(None), BF16, kw, "pgd")


@pytest.mark.parametrize("dtype", LARGER_DTYPES)
def test_pgd_larger_shape(device, dtype):
    x, x0, g = pgd_inputs(PGD_LARGE, dtype, device, seed=9)
    kw = dict(step_size=0.5, eps=1.0, targeted=True)
    out = l2_pgd_step(x, x0, g, backend="triton", **kw)
    check_pgd_rows(out, x, x0, g, slice(None), dtype, kw, "pgd")


def test_pgd_beyond_int32_offsets(device):
    """x, x0, g and out of more than 2^31 elements: the samples past 2^31 are right."""
    B = -(-BEYOND_INT32 // PGD_HUGE_D)
    if device.type == "cuda":
        free_bytes_at_least(4 * B * PGD_HUGE_D * 2 + 2**30)
    x, x0, g = pgd_inputs((B, PGD_HUGE_D), BF16, device, seed=10)
    kw = dict(step_size=0.5, eps=1.0, targeted=False)
    out = l2_pgd_step(x, x0, g, backend="triton", **kw)
    for rows in (slice(0, 4), slice(B - 4, B)):
        check_pgd_rows(out, x, x0, g, rows, BF16, kw, f"pgd samples {rows}")
