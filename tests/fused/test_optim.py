"""fused.optim.StructureSGD against torch.optim.SGD on the explicitly regularised loss."""

import copy
import io

import pytest
import torch
from torch import nn

from fused.optim import StructureSGD


def make_model(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 33), nn.ReLU(), nn.Linear(33, 5)).to(device)


def batch(seed, device="cpu"):
    gen = torch.Generator().manual_seed(100 + seed)
    return torch.randn(17, 13, generator=gen).to(device), torch.randint(0, 5, (17,), generator=gen).to(device)


def task_loss(model, step, device="cpu"):
    x, y = batch(step, device)
    return nn.functional.cross_entropy(model(x), y)


def groups_of(model, lr_head):
    body, head = list(model[0].parameters()), list(model[2].parameters())
    return [{"params": body}, {"params": head, "lr": lr_head, "lam": 0.5}]


def test_matches_torch_sgd_on_the_regularised_loss(device):
    """Two groups with their own lr/lam, momentum and decay, 3 steps, vs autograd of ½λΣI(ψ−ψ0)²."""
    ours, oracle = make_model(device=device), make_model(device=device)
    refs = [p.detach().clone() for p in oracle.parameters()]
    gen = torch.Generator().manual_seed(1)
    imp = [torch.rand(p.shape, generator=gen).to(device) for p in ours.parameters()]
    # move away from ψ0 first so the SR term is active
    with torch.no_grad():
        for a, b in zip(ours.parameters(), oracle.parameters()):
            noise = 0.1 * torch.randn(a.shape, generator=gen).to(device)
            a.add_(noise)
            b.add_(noise)
    opt = StructureSGD(groups_of(ours, 0.3), refs, imp, lr=0.1, momentum=0.9, weight_decay=0.01)
    sgd = torch.optim.SGD(groups_of(oracle, 0.3), lr=0.1, momentum=0.9, weight_decay=0.01)
    lams = [1.0, 1.0, 0.5, 0.5]  # per param, from its group
    for step in range(3):
        opt.zero_grad()
        task_loss(ours, step, device).backward()
        opt.step()
        sgd.zero_grad()
        sr_terms = [0.5 * (i * (p - r) ** 2).sum() for i, p, r in zip(imp, oracle.parameters(), refs)]
        loss = task_loss(oracle, step, device) + sum(l * t for l, t in zip(lams, sr_terms))
        loss.backward()
        sgd.step()
        expected_sr = sum(t.detach() for t in sr_terms)
        assert opt.last_sr_loss.item() == pytest.approx(expected_sr.item(), rel=1e-5)
    for a, b in zip(ours.parameters(), oracle.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all("momentum_buffer" in opt.state[p] for p in ours.parameters())


def test_without_importance_is_torch_sgd(device):
    ours, oracle = make_model(device=device), make_model(device=device)
    opt = StructureSGD(ours.parameters(), lr=0.05, momentum=0.5, weight_decay=0.1)
    sgd = torch.optim.SGD(oracle.parameters(), lr=0.05, momentum=0.5, weight_decay=0.1)
    for step in range(3):
        for model, o in ((ours, opt), (oracle, sgd)):
            o.zero_grad()
            task_loss(model, step, device).backward()
            o.step()
    assert opt.last_sr_loss.item() == 0.0
    for a, b in zip(ours.parameters(), oracle.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_default_ref_params_are_clones_at_construction(device):
    model = make_model(device=device)
    start = [p.detach().clone() for p in model.parameters()]
    opt = StructureSGD(model.parameters(), lr=0.1)
    for p, s in zip(model.parameters(), start):
        assert torch.equal(opt.state[p]["ref_param"], s)
        assert opt.state[p]["ref_param"].data_ptr() != p.data_ptr()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    # I = 1 everywhere and a zero gradient: the proximal step with lr·lam = 1 halves ψ − ψ0
    opt.set_importance({p: torch.ones_like(p) for p in model.parameters()})
    opt.param_groups[0]["proximal"] = True
    opt.param_groups[0]["lr"] = 1.0
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    opt.step()
    assert opt.last_sr_loss.item() == pytest.approx(0.5 * model[0].weight.numel() * 1.0, rel=1e-6)
    torch.testing.assert_close(model[0].weight, start[0] + 0.5)
    # params without a gradient are not stepped (as in torch.optim.SGD), whatever their importance
    assert torch.equal(model[2].weight, start[2])


def test_state_dict_round_trip(device, tmp_path):
    model = make_model(device=device)
    params = list(model.parameters())
    imp = [torch.rand(p.shape, device=device) for p in params]
    imp[1] = torch.rand(params[1].shape, device=device) > 0.5  # a binary mask keeps its dtype
    masks = {params[2]: (torch.rand(params[2].shape, device=device) > 0.2).to(torch.uint8)}
    opt = StructureSGD(groups_of(model, 0.2), None, imp, lr=0.1, momentum=0.9, grad_masks=masks)
    task_loss(model, 0, device).backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    twin = copy.deepcopy(model)
    opt2 = StructureSGD(groups_of(twin, 0.7), lr=0.5)  # different hyperparameters: all come from the load
    opt2.load_state_dict(saved)
    p2 = list(twin.parameters())
    assert opt2.state[p2[1]]["importance"].dtype == torch.bool
    assert opt2.state[p2[2]]["grad_mask"].dtype == torch.uint8
    assert opt2.param_groups[1]["lr"] == 0.2 and opt2.param_groups[1]["lam"] == 0.5
    for a, b in zip(params, p2):  # the loaded state is its own copy
        assert opt2.state[b]["momentum_buffer"].data_ptr() != opt.state[a]["momentum_buffer"].data_ptr()
        assert torch.equal(opt2.state[b]["ref_param"], opt.state[a]["ref_param"])
    for m, o in ((model, opt), (twin, opt2)):
        o.zero_grad()
        task_loss(m, 1, device).backward()
        o.step()
    for a, b in zip(params, p2):
        assert torch.equal(a, b)
    assert torch.equal(opt.last_sr_loss, opt2.last_sr_loss)


def test_reference_backend_matches_triton(device):
    models = [make_model(device=device), make_model(device=device)]
    opts = [
        StructureSGD(m.parameters(), lr=0.1, proximal=True, momentum=0.5, backend=b)
        for m, b in zip(models, (None, "reference"))
    ]
    for opt, m in zip(opts, models):
        opt.set_importance([torch.full_like(p, 4.0) for p in m.parameters()])
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1.5)
        for step in range(2):
            opt.zero_grad()
            task_loss(m, step, device).backward()
            opt.step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(opts[0].last_sr_loss, opts[1].last_sr_loss)


def test_grad_masks_freeze_gradient_but_not_sr(device):
    model = make_model(device=device)
    params = list(model.parameters())
    opt = StructureSGD(model.parameters(), lr=0.1, lam=0.0)
    opt.set_grad_masks([torch.zeros_like(p) if i == 0 else None for i, p in enumerate(params)])
    before = [p.detach().clone() for p in params]
    task_loss(model, 0, device).backward()
    opt.step()
    assert torch.equal(params[0], before[0])  # masked gradient, lam = 0: unchanged
    assert not torch.equal(params[1], before[1])
    opt.set_grad_masks(None)
    assert all("grad_mask" not in opt.state[p] for p in params)


def test_param_group_added_later_gets_its_reference(device):
    model = make_model(device=device)
    opt = StructureSGD(model[0].parameters(), lr=0.1)
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.01})
    assert torch.equal(opt.state[model[2].weight]["ref_param"], model[2].weight)
    assert opt.param_groups[1]["lam"] == 1.0
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": -1.0})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(lr=0.0), ValueError, "lr must be a finite number > 0"),
        (dict(lr=0.1, lam=-0.5), ValueError, "lam must be"),
        (dict(lr=0.1, momentum=1.0), ValueError, r"momentum must be a finite number in \[0, 1\)"),
        (dict(lr=0.1, weight_decay=-1.0), ValueError, "weight_decay must be"),
        (dict(lr=0.1, proximal="yes"), TypeError, "proximal must be a bool"),
        (dict(lr=0.1, importance=[torch.zeros(3)]), ValueError, "importance must have 4 entries"),
        (dict(lr=0.1, importance=torch.zeros(3)), TypeError, "importance must be a list"),
        (dict(lr=0.1, grad_masks={nn.Parameter(torch.zeros(2)): torch.zeros(2)}), ValueError, "grad_masks has a key"),
        (dict(lr=0.1, ref_params=[torch.zeros(1)] * 4), ValueError, r"ref_params\[0\] has shape"),
    ],
)
def test_bad_input(kwargs, exc, match):
    model = make_model()
    with pytest.raises(exc, match=match):
        StructureSGD(model.parameters(), **kwargs)


def test_set_importance_bad_dtype():
    model = make_model()
    opt = StructureSGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"importance\[0\] must have .*bool or uint8"):
        opt.set_importance([torch.zeros(p.shape, dtype=torch.int32) for p in model.parameters()])
