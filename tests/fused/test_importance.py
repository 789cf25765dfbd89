"""fused.importance.accumulate_importance: Triton vs reference vs fp64, launches, opcheck, bad input."""

import pytest
import torch

import fused.importance as importance_mod
from fused.importance import accumulate_importance
from tests.fused.test_update import CountingKernel

SHAPES = [(1,), (7,), (33, 65), (3, 5, 7), (1000,), (0,)]
TOL = {torch.float32: 5e-4, torch.float16: 1e-3}


def make(shapes, imp_dtype, grad_dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    imp = [torch.rand(s, generator=gen).to(imp_dtype).to(device) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(grad_dtype).to(device) for s in shapes]
    return imp, grads


def max_err(xs, ys):
    return max([(x.double() - y.double()).abs().max().item() for x, y in zip(xs, ys) if x.numel()] + [0.0])


@pytest.mark.parametrize("imp_dtype,grad_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.float16)])
def test_matches_reference_and_fp64(device, imp_dtype, grad_dtype):
    imp, grads = make(SHAPES, imp_dtype, grad_dtype, device=device)
    ref = [i.clone() for i in imp]
    expected = [i.double() + 0.37 * g.double().abs() for i, g in zip(imp, grads)]
    assert accumulate_importance(imp, grads, 0.37) is None
    accumulate_importance(ref, grads, 0.37, backend="reference")
    assert [i.dtype for i in imp] == [imp_dtype] * len(SHAPES)
    assert max_err(imp, expected) <= max_err(ref, expected) + TOL[imp_dtype]


def test_accumulates_over_batches_with_weights(device):
    """I = (1/N) Σ_B |B|·|g_B| over batches of sizes 3, 5, 2 (METHOD.md §6)."""
    imp = [torch.zeros(s, device=device) for s in SHAPES[:5]]
    total = [torch.zeros(s, dtype=torch.float64, device=device) for s in SHAPES[:5]]
    for seed, size in enumerate((3, 5, 2)):
        _, grads = make(SHAPES[:5], torch.float32, torch.float32, seed=seed, device=device)
        accumulate_importance(imp, grads, weight=size / 10)
        total = [t + size / 10 * g.double().abs() for t, g in zip(total, grads)]
    assert max_err(imp, total) < 1e-5


def test_none_grads_are_skipped(device):
    imp, grads = make(SHAPES[:5], torch.float32, torch.float32, device=device)
    before = [i.clone() for i in imp]
    grads[1] = grads[3] = None
    accumulate_importance(imp, grads)
    assert torch.equal(imp[1], before[1]) and torch.equal(imp[3], before[3])
    assert torch.allclose(imp[2], before[2] + grads[2].abs())


def test_zero_weight_leaves_importance(device):
    imp, grads = make(SHAPES[:3], torch.float32, torch.float32, device=device)
    before = [i.clone() for i in imp]
    accumulate_importance(imp, grads, weight=0)
    assert all(torch.equal(a, b) for a, b in zip(imp, before))


def test_non_dense_misaligned_and_transposed(device):
    imp = [torch.zeros(10, 12, device=device)[:, ::2], torch.zeros(6, 4, device=device).t(), torch.zeros(2050, device=device)[1:]]
    grads = [torch.randn(10, 6, device=device), torch.randn(4, 6, device=device), torch.randn(2050, device=device)[1:]]
    accumulate_importance(imp, grads, 2.0)
    assert all(torch.allclose(i, 2 * g.abs()) for i, g in zip(imp, grads))


def test_one_launch_per_dtype_group(device, monkeypatch):
    counter = CountingKernel(importance_mod._accumulate_importance_kernel)
    monkeypatch.setattr(importance_mod, "_accumulate_importance_kernel", counter)
    imp, grads = make(SHAPES * 3, torch.float32, torch.float32, device=device)
    accumulate_importance(imp, grads)
    assert counter.launches == 1
    grads[2] = grads[2].half()  # (fp32 importance, fp16 grad) is a second group
    accumulate_importance(imp, grads)
    assert counter.launches == 3


def test_opcheck_registered_op(device):
    imp, grads = make([(7,), (33, 5), (0,)], torch.float32, torch.float32, device=device)
    grads[1] = None
    op = torch.ops.fused.accumulate_importance.default
    torch.library.opcheck(op, (imp, grads, 0.5))
    assert op._schema.arguments[0].alias_info.is_write


@pytest.mark.parametrize(
    "args,exc,match",
    [
        (([torch.zeros(3)], [torch.zeros(4)]), ValueError, r"grads\[0\] has shape"),
        (([torch.zeros(3)], []), ValueError, "grads must have 1 entries"),
        (([torch.zeros(3, dtype=torch.bool)], [torch.zeros(3)]), TypeError, r"importance\[0\] must have a floating"),
        (([torch.zeros(3)], [torch.zeros(3, dtype=torch.int32)]), TypeError, r"grads\[0\] must have a floating"),
        (([torch.zeros(3)], [torch.zeros(3)], -1.0), ValueError, "weight must be a finite number >= 0"),
        (([torch.zeros(3)], [torch.zeros(3)], float("inf")), ValueError, "weight must be"),
        (([], []), ValueError, "importance must contain at least one tensor"),
        ((torch.zeros(3), [torch.zeros(3)]), TypeError, "importance must be a list"),
        (([torch.zeros(3)], [torch.zeros(3, device="meta")]), ValueError, r"grads\[0\] is on meta"),
    ],
)
def test_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        accumulate_importance(*args)


# ----------------------------------------------------------------------------- addressing (issue 9)


def test_negative_offsets_mixed_alignment_and_ragged_numels(device):
    # importance slices of one pool, the first at its far end (the others at negative offsets from
    # it, up to ~1M elements), plus an unaligned view (narrow group) and ragged numels.
    n = 1_000_000
    pool = torch.rand(n + 8192, device=device)
    before = pool.clone()
    slots = [(n, 4099), (0, 2049), (4096, 13), (2056, 4 * 7 + 1), (4112, 2048 + 1500)]
    imp = [pool[s : s + m] for s, m in slots] + [torch.rand(2051, device=device)[3:]]
    assert imp[-1].data_ptr() % 16 == 12
    grads = [torch.randn(i.shape, device=device) for i in imp]
    grads[2] = grads[2].half()  # a second (fp32, fp16) group
    plan = importance_mod.plan_accumulate_importance(imp, grads, 0.25, 90)
    groups = {(launch.args[1].dtype, launch.constexprs["ALIGNED"]) for launch in plan}
    assert groups == {(torch.float32, True), (torch.float16, True), (torch.float32, False)}
    aligned32 = next(l for l in plan if l.constexprs["ALIGNED"] and l.args[1].dtype == torch.float32)
    assert aligned32.args[2][:, 0].cpu().tolist() == [0, -n, 2056 - n, 4112 - n]
    expected = [i.double() + 0.25 * g.double().abs() for i, g in zip(imp, grads)]
    accumulate_importance(imp, grads, 0.25)
    assert max_err(imp, expected) < 1e-6
    written = torch.zeros(n + 8192, dtype=torch.bool, device=device)
    for s, m in slots:
        written[s : s + m] = True
    assert torch.equal(pool[~written], before[~written])


def test_preflight_launches_from_a_spec():
    (launch,) = importance_mod.preflight_launches(dict(params=[(4096,), (7, 3)], dtype=torch.bfloat16,
                                                       grad_dtype=torch.float32), 86)
    assert launch.name == "importance.accumulate" and launch.kind == "bandwidth"
    assert [t.dtype for t in launch.args[:2]] == [torch.bfloat16, torch.float32]
    assert all(t.device.type == "meta" for t in launch.args if isinstance(t, torch.Tensor))
    assert launch.grid == (3,) and launch.constexprs["ALIGNED"]
    (default,) = importance_mod.preflight_launches({}, 90)
    assert default.args[0].dtype == default.args[1].dtype == torch.float32
