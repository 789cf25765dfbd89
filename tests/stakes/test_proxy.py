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


# ----------------------------------------------------------------------------- the authors' attacks (§9a.7)

def _advertorch_start(x0, eps, u):
    """advertorch's L2 rand_init, written out: δ = U(0, 1) − x0, δ·min(1, ε/‖δ‖), then x0 + δ clamped."""
    delta = u - x0
    norm = delta.flatten(1).norm(dim=1).view(-1, *([1] * (x0.dim() - 1)))
    return (x0 + delta * torch.clamp(eps / norm, max=1.0)).clamp(0, 1)


def _advertorch_step(x, x0, g, alpha, eps):
    """advertorch's perturb_iterative for ord=2, one step: δ += α·g/max(‖g‖, 1e-6); δ = clamp(x0 + δ) − x0;
    δ = δ·min(1, ε/‖δ‖) (targeted: g is the gradient of −loss, i.e. minus the loss gradient here)."""
    view = (-1, *([1] * (x.dim() - 1)))
    delta = x - x0
    gn = g.flatten(1).norm(dim=1).clamp_min(1e-6).view(view)
    delta = delta - alpha * g / gn
    delta = (x0 + delta).clamp(0, 1) - x0
    dn = delta.flatten(1).norm(dim=1).view(view)
    return x0 + delta * torch.clamp(eps / dn, max=1.0)


def test_the_authors_random_start_and_step_are_advertorchs():
    from stakes.proxy import _random_start, clamp_then_project, start_seed

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 8, 8, generator=g)
    eps = torch.tensor([0.4, 0.4, 1.0, 2.0, 30.0, 0.1])
    start = _random_start(x0, eps, torch.arange(6), seed=3, kind="box_sphere")
    u = torch.stack([torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(start_seed(3, i))) for i in range(6)])
    torch.testing.assert_close(start, _advertorch_start(x0, eps.view(-1, 1, 1, 1), u))
    radius = (start - x0).flatten(1).norm(dim=1)
    assert torch.allclose(radius[:4], eps[:4], atol=1e-5)   # on the sphere (the box minus x0 is far wider)
    grad = torch.randn(6, 1, 8, 8, generator=g)
    step = clamp_then_project(start, x0, grad, step_size=0.3, eps=eps)
    torch.testing.assert_close(step, _advertorch_step(start, x0, grad, 0.3, eps.view(-1, 1, 1, 1)))
    assert step.min() >= 0 and step.max() <= 1   # the projection of a box point towards x0 stays in the box
    zero = clamp_then_project(start, x0, torch.zeros_like(grad), step_size=0.3, eps=eps)
    torch.testing.assert_close(zero, start)   # a zero gradient: no step, no NaN


def test_the_authors_targets_replace_a_collision_by_half_the_classes():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    y = torch.arange(10).repeat(300)
    t = random_targets(y, 10, g1, kind="collision_half")
    draw = (torch.rand(len(y), generator=g2) * 10).long()
    assert torch.equal(t, torch.where(draw == y, torch.full_like(y, 5), draw))
    assert (t[y == 5] == 5).any() and not (t[y != 5] == y[y != 5]).any()   # class 5 may keep its own label
    share = (t[y != 5] == 5).float().mean()
    assert 0.15 < share < 0.25   # C//2 drawn twice as often: 2/10
    with pytest.raises(ValueError, match="kind"):
        random_targets(y, 10, g1, kind="other")


def test_the_authors_proxy_order_is_per_forget_batch():
    from stakes.proxy import AttackSettings

    model = _linear_model()
    x, y = _forget(n=5)
    attack = AttackSettings(proxy_order="forget_batch", forget_batch=2)
    px = generate_proxies(model, x, y, num_classes=4, repetitions=2, steps=1, eps=1.0, progress=False, attack=attack)
    assert px.source.tolist() == [0, 1, 0, 1, 2, 3, 2, 3, 4, 4]
    plain = generate_proxies(model, x, y, num_classes=4, repetitions=2, steps=1, eps=1.0, progress=False)
    assert plain.source.tolist() == [0, 1, 2, 3, 4] * 2


def test_weight_gradients_during_pgd_change_nothing_but_the_work():
    """advertorch backpropagates into a model whose weights require grad: each PGD step also computes
    the weights' gradients (the authors' cost), the proxies are the same, and no gradient is left."""
    from stakes.proxy import AttackSettings

    model = _linear_model()
    x, y = _forget(n=4)
    seen = []
    hook = model[1].weight.register_hook(lambda g: seen.append(g.shape))
    with_grads = generate_proxies(model, x, y, num_classes=4, repetitions=2, steps=3, eps=1.0, progress=False,
                                  attack=AttackSettings(weight_grads=True))
    hook.remove()
    plain = generate_proxies(model, x, y, num_classes=4, repetitions=2, steps=3, eps=1.0, progress=False)
    assert len(seen) == 3 and torch.equal(with_grads.x, plain.x)
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())


def test_the_attacked_model_is_the_one_a_named_method_unlearned_first(digits, digits_model):
    """``proxy_model="l2ul"`` (the authors' StructGuard attacks their L2UL result): L2UL runs first
    through stakes.unlearn, with its own preset values (the baselines' radius and optimiser under
    `authors`) and its proxies against the pretrained model; the proxies attack its result."""
    import stakes
    from stakes.data import sample_forget_indices
    from stakes.methods import build_proxies
    from stakes.methods.loop import first_run_config

    cfg = stakes.preset("authors", method="structguard", eps=0.4, repetitions=2, pgd_steps=5, max_epochs=2,
                        progress=False, backend="reference", proxy_model_options={"eps": 0.6, "max_epochs": 1})
    assert cfg.proxy_model == "l2ul"
    first = first_run_config(cfg)
    assert (first.proxy_model, first.eps, first.max_epochs, first.lr, first.momentum) == ("pretrained", 0.6, 1, 0.001, 0.9)
    assert first.stop_start_epoch == 0 and first.pgd_start == "box_sphere" and first.preset == "authors"
    idx = sample_forget_indices(digits.train_y, 6, 0)
    fx, fy = digits.train_x[idx], digits.train_y[idx]
    px, timings = build_proxies(digits_model, fx, fy, cfg)
    attacked = px.summary()["attacked_model"]
    assert attacked["method"] == "l2ul" and attacked["eps"] == 0.6 and attacked["steps"] > 0
    assert timings["proxy_model_s"] > 0
    direct, _ = build_proxies(digits_model, fx, fy, cfg.replace(proxy_model="pretrained"))
    assert "attacked_model" not in direct.summary() and not torch.equal(direct.x, px.x)
    with pytest.raises(ValueError, match="unknown config field"):
        first_run_config(cfg.replace(proxy_model_options={"not_an_option": 1}))


def test_the_random_starts_depend_on_the_seed():
    """Each proxy's start is drawn from a generator keyed by (run seed, its index). torch's CPU
    generator keeps 32 bits of a seed: ``(seed << 32) | index`` gave every run seed the same starts."""
    from stakes.proxy import _random_start

    x0 = torch.full((4, 1, 8, 8), 0.5)
    eps = torch.full((4,), 1.0)
    for kind in ("ball", "box_sphere"):
        a = _random_start(x0, eps, torch.arange(4), seed=0, kind=kind)
        b = _random_start(x0, eps, torch.arange(4), seed=1, kind=kind)
        again = _random_start(x0[1:3], eps[1:3], torch.arange(1, 3), seed=0, kind=kind)
        assert not torch.equal(a, b) and not torch.equal(a[0], a[1])   # seeds and places differ
        assert torch.equal(again, a[1:3])   # the same seed and place: the same start, whatever the batch


class _RowCounter(nn.Module):
    """A model that counts the rows its forwards see (the attacks' work)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.inner(x)


def test_early_exit_keeps_each_proxys_first_successful_iterate_and_does_less_work():
    """Against the oracle of the full attack stopped after t steps (the same starts): each proxy of
    the early-exit attack is the first of its iterates x_0, x_1, … the model classifies as its target,
    or x_steps if none of x_0 … x_{steps−1} is; its steps are that index. The batch compacts, so the
    forwards see fewer rows than steps × proxies."""
    from stakes.proxy import AttackSettings

    model = _RowCounter(_linear_model(seed=3))
    x, y = _forget(n=7)
    kw = dict(num_classes=4, repetitions=3, step_size=0.05, eps=1.5, batch_size=8, seed=0, backend="reference",
              progress=False)
    steps = 12
    iterates = [generate_proxies(model, x, y, steps=t, **kw).x for t in range(steps + 1)]
    generate_proxies(model, x, y, steps=steps, attack=AttackSettings(early_exit=True), **kw)   # probes rows once
    model.rows = 0
    early = generate_proxies(model, x, y, steps=steps, attack=AttackSettings(early_exit=True), **kw)
    work = model.rows
    with torch.no_grad():
        hit = torch.stack([model.inner(it).argmax(1) for it in iterates[:steps]]) == early.y   # [steps, N]
    first = torch.where(hit.any(0), hit.int().argmax(0), torch.full_like(early.y, steps))
    assert 0 < int((first < steps).sum()) < len(first), "the case must mix rows that exit and rows that do not"
    assert torch.equal(early.steps, first.to(torch.int32))
    expected = torch.stack([iterates[int(t)][i] for i, t in enumerate(first)])
    torch.testing.assert_close(early.x, expected, rtol=0, atol=1e-6)
    full = generate_proxies(model, x, y, steps=steps, **kw)
    assert full.steps is None and "mean_pgd_steps" not in full.summary()
    assert early.summary()["mean_pgd_steps"] == pytest.approx(float(first.double().mean()))
    # every row of a success check, plus one forward per step per row still in the batch
    assert work == len(first) + int(torch.clamp(first + 1, max=steps).sum())
    assert early.success_rate >= float((first < steps).float().mean()) - 1e-9


def test_early_exit_refuses_a_model_that_mixes_rows():
    from stakes.proxy import AttackSettings

    class Centred(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = _linear_model()

        def forward(self, x):
            return self.lin(x - x.mean(0, keepdim=True))

    x, y = _forget()
    with pytest.raises(ValueError, match="pgd_early_exit needs an attacked model whose rows are independent"):
        generate_proxies(Centred(), x, y, num_classes=4, repetitions=2, steps=3, eps=1.0, backend="reference",
                         progress=False, attack=AttackSettings(early_exit=True))


def test_early_exit_through_the_config_and_a_run(digits, digits_model):
    """``config.pgd_early_exit``: build_proxies runs the early-exit attack (a mean step count under 100
    is recorded), and a run given those proxies keeps the count in its result's proxy summary."""
    import stakes
    from stakes.data import sample_forget_indices
    from stakes.methods import build_proxies

    idx = sample_forget_indices(digits.train_y, 4, 0)
    fx, fy = digits.train_x[idx], digits.train_y[idx]
    cfg = stakes.preset("stable", method="adv", eps=1.5, repetitions=2, pgd_steps=40, max_epochs=1,
                        progress=False, backend="reference", pgd_early_exit=True)
    px, _ = build_proxies(digits_model, fx, fy, cfg)
    mean = px.summary()["mean_pgd_steps"]
    assert 0 <= mean < 40 and px.steps.shape == (8,)
    plain, _ = build_proxies(digits_model, fx, fy, cfg.replace(pgd_early_exit=False))
    assert plain.steps is None and not torch.equal(plain.x, px.x)
    res = stakes.unlearn(digits_model, (fx, fy), method="adv", config=cfg, proxies=px)
    assert res.proxies["mean_pgd_steps"] == pytest.approx(mean)
    with pytest.raises(ValueError, match="pgd_early_exit"):
        cfg.replace(pgd_early_exit="yes")
