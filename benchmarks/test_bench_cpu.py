"""pytest-benchmark: the CPU-meaningful subset — eager reference ops at modest sizes.

Run with ``pytest benchmarks --benchmark-only`` (plain ``pytest`` collects only ``tests/``).
Triton timings need a GPU: the fused provider is never timed here (the CPU interpreter is a
correctness tool). For the full table use ``python -m benchmarks run``.
"""

import pytest
import torch
import torch.nn.functional as F

import fused
from benchmarks.ops import IMPORTANCE_WEIGHT, LAM, LR, PGD_EPS, PGD_STEP, model_param_shapes

N, D = 1024, 512


def _anchors(K: int) -> torch.Tensor:
    return F.normalize(torch.randn(K, D), dim=1)


@pytest.fixture(scope="module")
def resnet18_lists():
    """Parameter, gradient, original and importance lists shaped like the CIFAR-10 ResNet-18."""
    torch.manual_seed(0)
    shapes = model_param_shapes("resnet18_cifar10")
    params = [torch.randn(s) for s in shapes]
    return {
        "params": params,
        "grads": [torch.randn(s) for s in shapes],
        "ref": [p.clone() for p in params],
        "importance": [torch.rand(s) for s in shapes],
    }


@pytest.mark.benchmark(group="similarity")
@pytest.mark.parametrize("K", [10, 100, 1000])
def test_anchor_similarity_reference(benchmark, K):
    x, anchors = torch.randn(N, D), _anchors(K)
    out = benchmark(fused.anchor_similarity, x, anchors, backend="reference")
    assert out.shape == (N, K)


@pytest.mark.benchmark(group="alignment")
@pytest.mark.parametrize("K", [10, 100, 1000])
def test_alignment_loss_fwd_bwd_reference(benchmark, K):
    x = torch.randn(N, D, requires_grad=True)
    x_ref, anchors = torch.randn(N, D), _anchors(K)

    def step():
        x.grad = None
        loss = fused.structure_alignment_loss(x, x_ref, anchors, backend="reference")
        loss.backward()
        return loss.detach()

    loss = benchmark(step)
    assert 0.0 <= float(loss) <= 2.0 and x.grad is not None


@pytest.mark.benchmark(group="importance")
def test_accumulate_importance_reference(benchmark, resnet18_lists):
    imp = [torch.zeros_like(g) for g in resnet18_lists["grads"]]
    benchmark(fused.accumulate_importance, imp, resnet18_lists["grads"], IMPORTANCE_WEIGHT, backend="reference")
    assert float(imp[0].min()) >= 0.0


@pytest.mark.benchmark(group="update")
def test_masked_sgd_step_reference(benchmark, resnet18_lists):
    L = resnet18_lists
    sr = benchmark(fused.masked_regularized_sgd_step, L["params"], L["grads"], L["ref"], L["importance"],
                   lr=LR, lam=LAM, backend="reference")
    assert sr.dim() == 0 and float(sr) >= 0.0


@pytest.mark.benchmark(group="pgd")
def test_l2_pgd_step_reference(benchmark):
    x_orig = torch.rand(128, 3, 32, 32)
    x, grad = x_orig.clone(), torch.randn_like(x_orig)
    out = benchmark(fused.l2_pgd_step, x, x_orig, grad, step_size=PGD_STEP, eps=PGD_EPS, backend="reference")
    assert out.shape == x.shape
