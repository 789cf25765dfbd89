"""fused.update.masked_regularized_sgd_step: Triton vs reference vs an fp64 evaluation written here."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fused.update as update
from fused.update import masked_regularized_sgd_step, masked_regularized_sgd_step_reference

# Not block-aligned, one spanning two chunks (BLOCK = 2048), one empty.
SHAPES = [(1,), (7,), (33, 65), (3, 5, 7), (1000,), (0,)]
# Cut Cross-Entropy rule: |ours - fp64| <= |torch same dtype - fp64| + tol.
TOL = {torch.float32: 5e-4, torch.float16: 1e-3, torch.float64: 1e-9}


def make_case(shapes, dtype, imp_kind="float", mask_kind=None, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)

    def rand(s, dt=dtype):
        return torch.randn(s, generator=gen).to(dt).to(device)

    params = [rand(s) for s in shapes]
    grads = [rand(s) for s in shapes]
    refs = [p + 0.3 * rand(s) for p, s in zip(params, shapes)]
    if imp_kind == "float":
        imp = [torch.rand(s, generator=gen).to(device) for s in shapes]
    elif imp_kind == "bool":
        imp = [(torch.rand(s, generator=gen) > 0.5).to(device) for s in shapes]
    elif imp_kind == "uint8":  # any nonzero value counts as 1
        imp = [(torch.randint(0, 3, s, generator=gen)).to(torch.uint8).to(device) for s in shapes]
    else:
        imp = None
    if mask_kind == "float":
        masks = [torch.rand(s, generator=gen).to(device) for s in shapes]
    elif mask_kind in ("bool", "uint8"):
        masks = [(torch.rand(s, generator=gen) > 0.3).to(getattr(torch, mask_kind)).to(device) for s in shapes]
    else:
        masks = None
    bufs = [rand(s, torch.float32) for s in shapes]
    return params, grads, refs, imp, masks, bufs


def clone(xs):
    return None if xs is None else [None if x is None else x.clone() for x in xs]


def values64(t):
    """Importance / mask as fp64 numbers (binary dtypes: 1 where nonzero)."""
    if t is None:
        return None
    return (t != 0).double() if t.dtype in (torch.bool, torch.uint8) else t.double()


def expected_fp64(params, grads, refs, imp, masks, bufs, *, lr, lam, momentum, wd, proximal):
    """The step written out in fp64, independently of the library; returns (params, bufs, sr)."""
    out_p, out_b, sr = [], [], 0.0
    for i, p in enumerate(params):
        w = p.double()
        I = values64(imp[i]) if imp is not None else None
        if I is not None:
            sr += 0.5 * (I * (w - refs[i].double()) ** 2).sum().item()
        if grads[i] is None:
            out_p.append(w)
            out_b.append(None if bufs is None else bufs[i].double())
            continue
        u = grads[i].double() * (values64(masks[i]) if masks is not None else 1.0) + wd * w
        if I is not None and not proximal:
            u = u + lam * I * (w - refs[i].double())
        if momentum:
            u = momentum * bufs[i].double() + u
        out_b.append(u if momentum else None)
        if I is not None and proximal:
            a = lr * lam * I
            out_p.append((w - lr * u + a * refs[i].double()) / (1 + a))
        else:
            out_p.append(w - lr * u)
    return out_p, out_b, sr


def max_err(xs, ys):
    return max([(x.double() - y.double()).abs().max().item() for x, y in zip(xs, ys) if x.numel()] + [0.0])


def run(backend, case, **kw):
    params, grads, refs, imp, masks, bufs = case
    return masked_regularized_sgd_step(
        params, grads, refs, imp, grad_masks=masks, momentum_buffers=bufs if kw.get("momentum") else None,
        backend=backend, **kw,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("proximal", [False, True])
@pytest.mark.parametrize("imp_kind,mask_kind", [("float", None), ("bool", "float"), ("uint8", "bool"), ("float", "uint8")])
def test_step_matches_reference_and_fp64(device, dtype, proximal, imp_kind, mask_kind):
    case = make_case(SHAPES, dtype, imp_kind, mask_kind, device=device)
    kw = dict(lr=0.1, lam=0.7, weight_decay=0.01, proximal=proximal)
    exp_p, _, exp_sr = expected_fp64(*case, momentum=0.0, wd=0.01, lr=0.1, lam=0.7, proximal=proximal)
    ours, ref = case, tuple(clone(x) for x in case)
    sr = run("triton", ours, **kw)
    sr_ref = run("reference", ref, **kw)
    assert sr.shape == () and sr.dtype == torch.float32
    # the same-dtype PyTorch reference sets the bar; ours may not be further from fp64
    assert max_err(ours[0], exp_p) <= max_err(ref[0], exp_p) + TOL[dtype]
    assert [p.dtype for p in ours[0]] == [dtype] * len(SHAPES)
    assert sr.item() == pytest.approx(exp_sr, rel=1e-5)
    assert sr_ref.item() == pytest.approx(exp_sr, rel=1e-5)


@pytest.mark.parametrize("proximal", [False, True])
def test_momentum_over_three_steps(device, proximal):
    case = make_case(SHAPES, torch.float32, "float", "float", seed=1, device=device)
    exp = tuple(clone(x) for x in case)
    ref = tuple(clone(x) for x in case)
    kw = dict(lr=0.05, lam=0.5, momentum=0.9, weight_decay=0.02, proximal=proximal)
    for _ in range(3):
        run("triton", case, **kw)
        run("reference", ref, **kw)
        new_p, new_b, _ = expected_fp64(*exp, lr=0.05, lam=0.5, momentum=0.9, wd=0.02, proximal=proximal)
        exp = (new_p, exp[1], exp[2], exp[3], exp[4], new_b)
    assert max_err(case[0], exp[0]) < 1e-5
    assert max_err(case[5], exp[5]) < 1e-5
    assert max_err(case[0], ref[0]) < 1e-6


def test_explicit_step_equals_torch_sgd_on_the_regularised_loss(device):
    """Independent oracle: torch.optim.SGD on L + λ·½ΣI(ψ−ψ0)² differentiated by autograd."""
    params, grads, refs, imp, _, _ = make_case(SHAPES[:5], torch.float32, "float", seed=2, device=device)
    leaves = [p.clone().requires_grad_() for p in params]
    sgd = torch.optim.SGD(leaves, lr=0.1, momentum=0.8, weight_decay=0.03)
    bufs = [torch.zeros_like(p) for p in params]
    for step in range(3):
        g_step = [g * (step + 1) for g in grads]  # a linear loss Σ g·ψ, a different one each step
        sgd.zero_grad()
        loss = sum((g * w).sum() for g, w in zip(g_step, leaves))
        loss = loss + 0.6 * sum(0.5 * (i * (w - r) ** 2).sum() for i, w, r in zip(imp, leaves, refs))
        loss.backward()
        sgd.step()
        masked_regularized_sgd_step(
            params, g_step, refs, imp, lr=0.1, lam=0.6, momentum=0.8, momentum_buffers=bufs, weight_decay=0.03
        )
    assert max_err(params, [w.detach() for w in leaves]) < 1e-5


def test_returned_sr_value_counts_skipped_params(device):
    params, grads, refs, imp, _, _ = make_case(SHAPES, torch.float32, "float", seed=3, device=device)
    grads[2] = None
    grads[4] = None
    before = clone(params)
    expected = sum(0.5 * (i.double() * (p.double() - r.double()) ** 2).sum().item() for p, r, i in zip(params, refs, imp))
    bufs = [torch.randn_like(p) for p in params]
    bufs_before = clone(bufs)
    sr = masked_regularized_sgd_step(params, grads, refs, imp, lr=0.1, momentum=0.5, momentum_buffers=bufs)
    assert sr.item() == pytest.approx(expected, rel=1e-5)
    for i in (2, 4):  # skipped entirely: no update, no decay, no momentum update
        assert torch.equal(params[i], before[i])
        assert torch.equal(bufs[i], bufs_before[i])
    assert not torch.equal(params[3], before[3])


def test_without_importance_is_masked_sgd(device):
    params, grads, _, _, masks, _ = make_case(SHAPES, torch.float32, None, "bool", seed=4, device=device)
    expected = [p - 0.2 * (g * m) for p, g, m in zip(params, grads, masks)]
    sr = masked_regularized_sgd_step(params, grads, None, None, lr=0.2, grad_masks=masks)
    assert sr.item() == 0.0
    assert max_err(params, expected) < 1e-6


def test_mixed_dtypes_in_one_list(device):
    shapes = SHAPES[:5]
    case = make_case(shapes, torch.float32, "float", seed=5, device=device)
    for i in (1, 3):  # fp16 params and grads, fp16 importance for one of them
        case[0][i], case[1][i] = case[0][i].half(), case[1][i].half()
    case[3][3] = case[3][3].half()
    ref = tuple(clone(x) for x in case)
    exp_p, _, exp_sr = expected_fp64(*case, lr=0.1, lam=1.0, momentum=0, wd=0.0, proximal=False)
    sr = masked_regularized_sgd_step(case[0], case[1], case[2], case[3], lr=0.1)
    masked_regularized_sgd_step(ref[0], ref[1], ref[2], ref[3], lr=0.1, backend="reference")
    assert [p.dtype for p in case[0]] == [torch.float32, torch.float16, torch.float32, torch.float16, torch.float32]
    assert max_err(case[0], exp_p) <= max_err(ref[0], exp_p) + 1e-3
    assert sr.item() == pytest.approx(exp_sr, rel=1e-5)


def test_fp64_params_compute_in_fp64(device):
    case = make_case(SHAPES[:5], torch.float64, "float", seed=6, device=device)
    exp_p, _, exp_sr = expected_fp64(*case, lr=0.1, lam=0.5, momentum=0, wd=0.0, proximal=True)
    masked_regularized_sgd_step(case[0], case[1], case[2], case[3], lr=0.1, lam=0.5, proximal=True)
    # lr and lam reach the kernel as fp32 scalars: relative error ~1e-8 of the step
    assert max_err(case[0], exp_p) < 1e-7


def test_non_contiguous_misaligned_and_channels_last_params(device):
    base = torch.randn(9, 13, device=device)
    p_t = base.t()  # dense, transposed: updated in its own element order
    p_cl = torch.randn(2, 3, 5, 4, device=device).to(memory_format=torch.channels_last)
    p_slice = torch.randn(10, 12, device=device)[:, ::2]  # not dense: updated through a copy
    p_off = torch.randn(2050, device=device)[1:]  # 4 bytes past an allocation: unaligned group
    params = [p_t, p_cl, p_slice, p_off]
    grads = [torch.randn(p.shape, device=device) for p in params]  # contiguous grads
    refs = [torch.randn(p.shape, device=device) for p in params]
    imp = [torch.rand(p.shape, device=device) for p in params]
    bufs = [torch.randn(p.shape, device=device).t().contiguous().t() if p.dim() == 2 else torch.randn(p.shape, device=device) for p in params]
    exp_p, exp_b, _ = expected_fp64(clone(params), grads, refs, imp, None, clone(bufs), lr=0.1, lam=1.0, momentum=0.9, wd=0.0, proximal=False)
    masked_regularized_sgd_step(params, grads, refs, imp, lr=0.1, momentum=0.9, momentum_buffers=bufs)
    assert max_err(params, exp_p) < 1e-5
    assert max_err(bufs, exp_b) < 1e-5
    assert p_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(base.t(), p_t)  # the view still aliases its base


def test_proximal_stable_where_explicit_diverges(device):
    params, _, refs, _, _, _ = make_case([(33, 65), (7,)], torch.float32, None, seed=7, device=device)
    imp = [torch.full(p.shape, 3.0, device=device) for p in params]  # lr·lam·I = 3 > 2
    zeros = [torch.zeros_like(p) for p in params]
    explicit, proximal = clone(params), clone(params)
    for _ in range(30):
        masked_regularized_sgd_step(explicit, zeros, refs, imp, lr=1.0)
        masked_regularized_sgd_step(proximal, zeros, refs, imp, lr=1.0, proximal=True)
    gap0 = max_err(params, refs)
    # explicit: ψ−ψ0 is multiplied by (1 − 3) each step; proximal: by 1/(1 + 3)
    assert max_err(explicit, refs) > 1e6 * gap0
    assert all(torch.isfinite(p).all() for p in proximal)
    assert max_err(proximal, refs) < 1e-6


@settings(max_examples=20, deadline=None)
@given(
    lr=st.floats(1e-3, 10.0),
    lam=st.floats(0.0, 10.0),
    n=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_proximal_moves_monotonically_toward_ref(lr, lam, n, seed):
    """g = 0: ψ − ψ0 shrinks by 1/(1 + a) ∈ (0, 1]: never grows, never overshoots ψ0."""
    gen = torch.Generator().manual_seed(seed)
    p, ref = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    imp = torch.rand(n, generator=gen) * 5
    new = p.clone()
    sr = masked_regularized_sgd_step([new], [torch.zeros(n)], [ref], [imp], lr=lr, lam=lam, proximal=True)
    before, after = (p - ref).double(), (new - ref).double()
    assert (after.abs() <= before.abs() + 1e-6).all()
    assert (after * before >= -1e-12).all()  # same side of ψ0
    assert sr.item() == pytest.approx(0.5 * (imp.double() * before**2).sum().item(), rel=1e-5, abs=1e-6)


@settings(max_examples=15, deadline=None)
@given(a_scale=st.floats(1e-6, 1e-2), seed=st.integers(0, 2**16))
def test_explicit_equals_proximal_to_first_order(a_scale, seed):
    """proximal − explicit = a·(lr·u + a·(ψ−ψ0)) / (1 + a): second order in (lr, a)."""
    gen = torch.Generator().manual_seed(seed)
    p, ref, g = (torch.randn(50, generator=gen, dtype=torch.float64) for _ in range(3))
    imp = torch.rand(50, generator=gen, dtype=torch.float64)
    lr = a_scale
    explicit, proximal = p.clone(), p.clone()
    masked_regularized_sgd_step([explicit], [g], [ref], [imp], lr=lr)
    masked_regularized_sgd_step([proximal], [g], [ref], [imp], lr=lr, proximal=True)
    a = lr * imp
    bound = a * (lr * g.abs() + a * (p - ref).abs())
    assert ((proximal - explicit).abs() <= bound * (1 + 1e-6) + 1e-12).all()
    assert (proximal - explicit).abs().max() <= 10 * lr**2


class CountingKernel:
    """Stands in for a jitted kernel and counts launches (kernel[grid](...))."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_one_launch_per_dtype_group(device, monkeypatch):
    counter = CountingKernel(update._masked_sgd_kernel)
    monkeypatch.setattr(update, "_masked_sgd_kernel", counter)
    shapes = SHAPES * 3  # 18 tensors
    params, grads, refs, imp, _, _ = make_case(shapes, torch.float32, "float", device=device)
    masked_regularized_sgd_step(params, grads, refs, imp, lr=0.1)
    assert counter.launches == 1
    params[0], grads[0] = params[0].half(), grads[0].half()  # a second dtype group
    grads[4] = None  # an SR-only group (an empty tensor would need no launch at all)
    masked_regularized_sgd_step(params, grads, refs, imp, lr=0.1)
    assert counter.launches == 1 + 3


def test_table_cache_hit_gives_same_result(device):
    case = make_case(SHAPES, torch.float32, "float", seed=9, device=device)
    ref = tuple(clone(x) for x in case)
    for _ in range(2):  # the second call reuses the cached pointer table
        run("triton", case, lr=0.1)
        run("reference", ref, lr=0.1)
    assert max_err(case[0], ref[0]) < 1e-6


def test_opcheck_registered_op(device):
    op = torch.ops.fused.masked_regularized_sgd_step.default
    params, grads, refs, imp, masks, bufs = make_case([(7,), (33, 5), (0,)], torch.float32, "float", "bool", device=device)
    grads[1] = None
    torch.library.opcheck(op, (params, grads, refs, imp, bufs, masks, 0.1, 1.0, 0.9, 0.01, False))
    none = [None] * 3
    torch.library.opcheck(op, (params, grads, none, none, [], none, 0.1, 1.0, 0.0, 0.0, True))
    assert op._schema.arguments[0].alias_info.is_write
    assert op._schema.arguments[4].alias_info.is_write


def bad_calls():
    p = [torch.randn(4), torch.randn(3)]
    g = [torch.randn(4), torch.randn(3)]
    r = [torch.randn(4), torch.randn(3)]
    i = [torch.rand(4), torch.rand(3)]
    ok = dict(lr=0.1)
    return [
        ((p, g[:1], r, i), ok, ValueError, "grads must have 2 entries"),
        ((p, [torch.randn(5), g[1]], r, i), ok, ValueError, r"grads\[0\] has shape"),
        ((p, g, r, [torch.rand(4), torch.rand(2)]), ok, ValueError, r"importance\[1\] has shape"),
        (([torch.zeros(4, dtype=torch.int32)], [g[0]], [r[0]], [i[0]]), ok, TypeError, r"params\[0\] must have a floating"),
        ((p, [g[0], torch.ones(3, dtype=torch.int64)], r, i), ok, TypeError, r"grads\[1\] must have a floating"),
        ((p, g, r, [i[0], torch.ones(3, dtype=torch.int32)]), ok, TypeError, r"importance\[1\] must have .*bool or uint8"),
        ((p, g, None, i), ok, ValueError, r"ref_params\[0\] must be a tensor"),
        ((p, g, r, i), dict(lr=0.0), ValueError, "lr must be a finite number > 0"),
        ((p, g, r, i), dict(lr=float("nan")), ValueError, "lr must be a finite number"),
        ((p, g, r, i), dict(lr=0.1, lam=-1.0), ValueError, "lam must be"),
        ((p, g, r, i), dict(lr=0.1, momentum=1.0, momentum_buffers=[torch.zeros(4), torch.zeros(3)]), ValueError, r"momentum must be a finite number in \[0, 1\)"),
        ((p, g, r, i), dict(lr=0.1, momentum=0.5), ValueError, "momentum_buffers must be a list"),
        ((p, g, r, i), dict(lr=0.1, momentum=0.5, momentum_buffers=[torch.zeros(4), torch.zeros(2)]), ValueError, r"momentum_buffers\[1\] has shape"),
        ((p, g, r, i), dict(lr=0.1, weight_decay=-0.1), ValueError, "weight_decay must be"),
        ((p, g, r, i), dict(lr=0.1, proximal=1), TypeError, "proximal must be a bool"),
        ((p, g, r, i), dict(lr=0.1, backend="cuda"), ValueError, "backend must be"),
        ((p[0], g, r, i), ok, TypeError, "params must be a list or tuple"),
        (([], [], [], []), ok, ValueError, "params must contain at least one tensor"),
        ((p, [g[0].to_sparse(), g[1]], r, i), ok, TypeError, r"grads\[0\] must be a dense"),
        ((p, g, r, i), dict(lr=0.1, grad_masks=[torch.ones(4), torch.ones(3, dtype=torch.int16)]), TypeError, r"grad_masks\[1\]"),
        ((p, g, [r[0], r[1].to("meta")], i), ok, ValueError, r"ref_params\[1\] is on meta"),
    ]


@pytest.mark.parametrize("args,kwargs,exc,match", bad_calls())
def test_bad_input(args, kwargs, exc, match):
    before = [t.clone() for t in args[0]] if isinstance(args[0], list) else None
    with pytest.raises(exc, match=match):
        masked_regularized_sgd_step(*args, **kwargs)
    if before:  # nothing half-written
        assert all(torch.equal(a, b) for a, b in zip(args[0], before))


def test_reference_is_importable_spec():
    """The reference takes explicit lists (the spec): a quick hand-computed value."""
    p, g, r, i = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.5])
    sr = masked_regularized_sgd_step_reference([p], [g], [r], [i], lr=0.1, lam=2.0)
    # d = 2 + 2·0.5·(1 − 0) = 3;  ψ = 1 − 0.3 = 0.7;  SR = ½·0.5·1² = 0.25
    assert p.item() == pytest.approx(0.7) and sr.item() == pytest.approx(0.25)


def test_torch_compile_keeps_the_in_place_update(device):
    """The op is opaque to the compiler; its declared mutations must survive functionalisation."""
    case = make_case(SHAPES[:4], torch.float32, "float", seed=10, device=device)
    ref = tuple(clone(x) for x in case)

    def step(params, grads, refs, imp, bufs):
        return masked_regularized_sgd_step(params, grads, refs, imp, lr=0.1, momentum=0.9, momentum_buffers=bufs)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        sr = compiled(case[0], case[1], case[2], case[3], case[5])
        sr_ref = run("reference", ref, lr=0.1, momentum=0.9)
    assert max_err(case[0], ref[0]) < 1e-6 and max_err(case[5], ref[5]) < 1e-6
    assert sr.item() == pytest.approx(sr_ref.item(), rel=1e-6)


# ----------------------------------------------------------------------------- addressing (issue 9)
# The kernel addresses every operand as base + element offset (fused._multi_tensor): the slot's
# first tensor is the base, so the other tensors' offsets may be negative or large; unaligned
# operands go to a narrow group of their own.


def _plan(params, grads, refs, imp, masks=None, bufs=None, momentum=0.0):
    n = len(params)
    return update.plan_masked_sgd(
        params, grads, refs, imp, bufs or [], masks or [None] * n, 0.1, 1.0, momentum, 0.0, False, 90
    )


def test_negative_and_large_offsets_from_the_base(device):
    # One allocation per operand; the first param sits at its far end, so the others lie below the
    # base (negative offsets), one of them ~3M elements (12 MB) away.
    n = 3_000_000
    pool = {k: torch.zeros(n + 4096, device=device) for k in "pgri"}
    for k, v in pool.items():
        v.normal_(generator=torch.Generator(device=device).manual_seed(ord(k))) if k != "i" else v.uniform_()
    slots = [(n, 4096), (0, 2049), (4096, 300)]  # (start, numel): starts 16-byte aligned
    params, grads, refs, imp = ([pool[k][s : s + m] for s, m in slots] for k in "pgri")
    before = pool["p"].clone()
    plan = _plan(params, grads, refs, imp)
    assert len(plan) == 1 and plan[0].constexprs["ALIGNED"]
    rows = plan[0].args[6].cpu()
    assert rows[:, 0].tolist() == [0, -n, 4096 - n]  # ψ offsets from the first ψ
    case = (params, grads, refs, imp, None, None)
    ref = tuple(clone(x) for x in case)
    exp_p, _, exp_sr = expected_fp64(*case, lr=0.1, lam=1.0, momentum=0, wd=0.0, proximal=False)
    sr = run("triton", case, lr=0.1)
    run("reference", ref, lr=0.1)
    assert max_err(params, ref[0]) < 1e-6
    assert max_err(params, exp_p) < 1e-5
    assert sr.item() == pytest.approx(exp_sr, rel=1e-5)
    written = torch.zeros(n + 4096, dtype=torch.bool, device=device)
    for s, m in slots:
        written[s : s + m] = True
    assert torch.equal(pool["p"][~written], before[~written])  # nothing outside the tensors is touched


def test_mixed_alignment_list_goes_to_two_groups(device):
    gen = torch.Generator().manual_seed(11)
    full = torch.randn(4100, generator=gen).to(device)
    params = [torch.randn(2049, generator=gen).to(device), full[1:4097], torch.randn(13, generator=gen).to(device)]
    assert params[1].data_ptr() % 16 == 4  # a view 4 bytes into its allocation
    grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
    refs = [p + 0.1 for p in params]
    imp = [torch.rand(p.shape, generator=gen).to(device) for p in params]
    masks = [torch.rand(p.shape, generator=gen).to(device) > 0.5 for p in params]
    plan = _plan(params, grads, refs, imp, masks)
    assert sorted(launch.constexprs["ALIGNED"] for launch in plan) == [False, True]
    case = (params, grads, refs, imp, masks, None)
    ref = tuple(clone(x) for x in case)
    before = full.clone()
    run("triton", case, lr=0.1, lam=0.5)
    run("reference", ref, lr=0.1, lam=0.5)
    assert max_err(params, ref[0]) < 1e-6
    assert full[0] == before[0] and torch.equal(full[4097:], before[4097:])  # outside the view


@pytest.mark.parametrize("mask_kind", ["bool", "uint8"])
@pytest.mark.parametrize("imp_kind", ["bool", "uint8", "float"])
def test_byte_operands_and_ragged_numels(device, imp_kind, mask_kind):
    # numels that are neither multiples of BLOCK nor of a 16-byte vector (4 fp32 / 16 bytes); last
    # chunks of 1 element up to several masked sub-tiles (TAIL = 512 here)
    shapes = [(2049,), (4097,), (13,), (16 * 3 + 1,), (5, 3), (2048,), (2048 + 1500,), (1999,)]
    case = make_case(shapes, torch.float32, imp_kind, mask_kind, seed=12, device=device)
    plan = _plan(*case[:4], case[4])
    assert len(plan) == 1
    block, warps = plan[0].constexprs["BLOCK"], plan[0].num_warps
    assert block // (32 * warps) == 16  # a byte operand: 16 elements (one 16-byte vector) a thread
    assert plan[0].constexprs["TAIL"] == 512
    kw = dict(lr=0.1, lam=0.7, momentum=0.9, weight_decay=0.01)
    ref = tuple(clone(x) for x in case)
    exp_p, exp_b, exp_sr = expected_fp64(*case, lr=0.1, lam=0.7, momentum=0.9, wd=0.01, proximal=False)
    sr = run("triton", case, **kw)
    run("reference", ref, **kw)
    assert max_err(case[0], ref[0]) < 1e-6
    assert max_err(case[5], ref[5]) < 1e-6
    assert max_err(case[0], exp_p) < 1e-5
    assert sr.item() == pytest.approx(exp_sr, rel=1e-5)


def test_fp16_byte_group_ragged(device):
    case = make_case([(4099,), (7,), (8 * 5 + 3,)], torch.float16, "uint8", "bool", seed=13, device=device)
    ref = tuple(clone(x) for x in case)
    exp_p, _, _ = expected_fp64(*case, lr=0.1, lam=1.0, momentum=0, wd=0.0, proximal=True)
    run("triton", case, lr=0.1, proximal=True)
    run("reference", ref, lr=0.1, proximal=True)
    assert max_err(case[0], exp_p) <= max_err(ref[0], exp_p) + TOL[torch.float16]


def test_steady_loop_reuses_tables(device):
    case = make_case(SHAPES, torch.float32, "float", "bool", seed=14, device=device)
    first = _plan(*case[:4], case[4])
    again = _plan(*case[:4], case[4])
    assert [launch.args[6] for launch in first] == [launch.args[6] for launch in again]  # same table objects
    assert all(a.args[6] is b.args[6] and a.args[7] is b.args[7] for a, b in zip(first, again))


def test_preflight_launches_from_a_spec():
    import fused._launch as launch_mod

    spec = dict(params=[(4096,), (33, 65), (3,)], dtype=torch.bfloat16, grad_dtype=torch.float32,
                importance="float", importance_dtype=torch.float32, mask="uint8", momentum=0.9,
                proximal=True, weight_decay=0.01)
    (launch,) = update.preflight_launches(spec, 80)
    assert isinstance(launch, launch_mod.Launch)
    assert launch.name == "update.masked_sgd" and launch.kind == "bandwidth"
    assert all(t.device.type == "meta" for t in launch.args if isinstance(t, torch.Tensor))
    assert [t.dtype for t in launch.args[:6]] == [torch.bfloat16, torch.float32, torch.bfloat16, torch.float32,
                                                 torch.uint8, torch.bfloat16]
    c = launch.constexprs
    assert c["ALIGNED"] and c["HAS_MOMENTUM"] and c["PROXIMAL"] and c["BINARY_MASK"] and not c["BINARY_IMP"]
    assert launch.grid == (2 + 2 + 1,)  # ceil(numel / 2048) chunks per tensor
    assert "BLOCK=2048" in launch.describe()
    # defaults: one fp32 param of 4096 with float importance
    (default,) = update.preflight_launches({}, 90)
    assert default.constexprs["HAS_IMP"] and not default.constexprs["HAS_MASK"]
    sr_only = update.preflight_launches(dict(importance="bool", mask="bool"), 90)
    assert sr_only[0].constexprs["BINARY_IMP"]


STATIC_CHECK = r"""
import os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

class StandIn:  # compile for an arch with no GPU (a device id per arch: the JIT caches per device)
    def __init__(self, arch): self.arch = arch
    def get_current_device(self): return self.arch
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", self.arch, 32)

import fused.importance, fused.update
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
cases = [  # (module, spec, 16-byte loads and stores a thread needs in a full chunk)
    (fused.update, dict(params=[(8192,)], importance="float", mask="uint8", momentum=0.9), 4 * 5 + 1, 4 * 2),
    (fused.update, dict(params=[(8192,)], dtype=torch.bfloat16, importance="bool", mask="none"), 2 * 3 + 1, 2),
    (fused.update, dict(params=[(8192,)], dtype=torch.float16, importance="none", mask="bool"), 2 * 2 + 1, 2),
    (fused.importance, dict(params=[(8192,)], dtype=torch.float16), 2, 1),
]
for arch in (86, 90):
    driver.set_active(StandIn(arch))
    for module, spec, need_ld, need_st in cases:
        (launch,) = module.preflight_launches(spec, arch)
        path = os.path.join(tempfile.mkdtemp(), "k.cubin")
        open(path, "wb").write(launch.compile().asm["cubin"])
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        ld, st = len(re.findall(r"LDG\.E\.128", sass)), len(re.findall(r"STG\.E\.128", sass))
        spills = re.findall(r"\b(LDL|STL)\b", sass) or int(re.search(r"STACK:(\d+)", res).group(1))
        print(arch, spec, ld, st, spills)
        assert ld >= need_ld and st >= need_st and not spills, (arch, spec, ld, st, spills)
print("OK")
"""


def test_full_tiles_compile_to_128_bit_accesses_without_spills():
    """Static check (no GPU, sm_86 and sm_90): the offset tables give 128-bit loads and stores for
    every operand of a full chunk, byte masks included (16 elements a thread), and nothing spills
    (the masked last chunk runs in narrow sub-tiles: 16 masked elements a thread spilled on sm_86)."""
    import os
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("the triton wheel has no cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", STATIC_CHECK], capture_output=True, text=True, env=env,
                          cwd=root, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout + done.stderr[-3000:]
