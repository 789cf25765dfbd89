import math

import pytest
import torch
import torch.nn as nn

from stakes.proxy import calibrate_radius, generate_proxies, radius_grid, random_targets


def _linear_model(seed=0, classes=4, dim=12):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(dim, classes))


def _forget(n=5, dim=12, classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 3, 4, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_targets_never_equal_true_label_and_cover_all_others():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(5).repeat(200)
    t = random_targets(y, 5, g)
    assert (t != y).all()
    for c in range(5):
        assert set(t[y == c].tolist()) == set(range(5)) - {c}


def test_proxies_shape_ball_range_and_determinism():
    model = _linear_model()
    x, y = _forget()
    p = generate_proxies(model, x, y, num_classes=4, repetitions=3, steps=10, step_size=0.1, eps=0.5,
                         batch_size=4, seed=0, backend="reference", progress=False)
    assert p.x.shape == (15, 1, 3, 4) and p.y.shape == (15,) and len(p) == 15
    assert (p.y != y[p.source]).all()
    assert torch.equal(p.source, torch.arange(5).repeat(3))
    offsets = (p.x - x[p.source]).flatten(1).norm(dim=1)
    assert float(offsets.max()) <= 0.5 + 1e-5
    assert float(p.x.min()) >= 0.0 and float(p.x.max()) <= 1.0
    again = generate_proxies(model, x, y, num_classes=4, repetitions=3, steps=10, step_size=0.1, eps=0.5,
                             batch_size=16, seed=0, backend="reference", progress=False)
    assert torch.equal(p.y, again.y)
    # each proxy's random start has its own generator: the batch size does not change the proxies
    torch.testing.assert_close(p.x, again.x, rtol=0, atol=1e-6)
    p2 = generate_proxies(model, x, y, num_classes=4, repetitions=3, steps=10, step_size=0.1, eps=0.5,
                          batch_size=4, seed=0, backend="reference", progress=False)
    assert torch.equal(p.x, p2.x)
    other = generate_proxies(model, x, y, num_classes=4, repetitions=3, steps=0, step_size=0.1, eps=0.5,
                             batch_size=4, seed=1, backend="reference", progress=False)
    assert not torch.allclose(other.x, p.x)   # another seed, other starts
    # the model is left as it was
    assert model.training and all(q.requires_grad for q in model.parameters())


def test_attack_succeeds_with_a_large_radius_and_reports_it():
    model = _linear_model()
    x, y = _forget()
    p = generate_proxies(model, x, y, num_classes=4, repetitions=2, steps=60, step_size=0.2, eps=8.0,
                         seed=0, backend="reference", progress=False)
    assert p.success_rate >= 0.9
    logits = model(p.x)
    assert math.isclose(p.success_rate, float((logits.argmax(1) == p.y).float().mean()), abs_tol=1e-6)


def test_calibration_picks_smallest_sufficient_radius():
    model = _linear_model()
    x, y = _forget()
    grid = radius_grid(0.25, 16.0)
    assert grid[0] == 0.25 and math.isclose(grid[4], 0.5) and grid[-1] <= 16.0
    eps, rate = calibrate_radius(model, x, y, num_classes=4, target_success=0.9, steps=40, step_size=0.2,
                                 grid=grid, seed=0, backend="reference")
    assert eps in grid and rate >= 0.9
    smaller = [e for e in grid if e < eps]
    if smaller:  # the next smaller radius really falls short
        _, r_small = calibrate_radius(model, x, y, num_classes=4, target_success=0.9, steps=40, step_size=0.2,
                                      grid=[smaller[-1]], seed=0, backend="reference")
        assert r_small < 0.9


def test_bad_input():
    model = _linear_model()
    x, y = _forget()
    with pytest.raises(ValueError, match="forget labels"):
        generate_proxies(model, x, y + 10, num_classes=4, progress=False)
    with pytest.raises(ValueError, match="empty"):
        generate_proxies(model, x[:0], y[:0], num_classes=4, progress=False)
    with pytest.raises(ValueError, match="eps"):
        generate_proxies(model, x, y, num_classes=4, eps=0.0, progress=False)
    with pytest.raises(ValueError, match="repetitions"):
        generate_proxies(model, x, y, num_classes=4, repetitions=0, progress=False)
    with pytest.raises(ValueError, match="y must be"):
        generate_proxies(model, x, y[:2], num_classes=4, progress=False)
    with pytest.raises(TypeError, match="model"):
        generate_proxies("model", x, y, num_classes=4, progress=False)


def test_calibration_errors():
    model = _linear_model()
    x, y = _forget()
    with pytest.raises(ValueError, match="grid"):
        calibrate_radius(model, x, y, num_classes=4, grid=[])
    with pytest.raises(ValueError, match="target_success"):
        calibrate_radius(model, x, y, num_classes=4, target_success=0.0, grid=[1.0])


def test_unreachable_target_returns_the_largest_radius_and_its_rate():
    model = _linear_model()
    x, y = _forget()
    eps, rate = calibrate_radius(model, x, y, num_classes=4, target_success=1.0, steps=2, step_size=0.01,
                                 grid=[0.01, 0.02], seed=0, backend="reference")
    assert eps == 0.02 and rate < 1.0
