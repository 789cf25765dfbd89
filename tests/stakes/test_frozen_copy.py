"""The frozen original's inference copy (issue 24's work cut for PGD and the original's
structures): BatchNorm folded into the convolutions (exact up to rounding), weights cast once to
the autocast dtype (the values autocast would use), the same results; a network torch.fx cannot
trace is copied unfolded; the authors preset keeps their unfolded network."""

from __future__ import annotations

import torch
import torch.nn as nn

import stakes
from stakes.execution import Execution, frozen_copy
from stakes.models import build_model


def _bn_model():
    torch.manual_seed(0)
    model = build_model("shapes_cnn", 10, in_channels=3, image_size=16).eval()
    with torch.no_grad():   # running statistics far from 0 / 1, so that folding has something to fold
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def test_folded_batchnorm_computes_the_same_outputs_and_input_gradients():
    model = _bn_model()
    frozen, folded = frozen_copy(model)
    assert folded and not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert all(not p.requires_grad for p in frozen.parameters()) and any(p.requires_grad for p in model.parameters())
    x = torch.rand(6, 3, 16, 16, requires_grad=True)
    out = model(x)
    (gx,) = torch.autograd.grad(out.sum(), x)
    x2 = x.detach().requires_grad_(True)
    out2 = frozen(x2)
    (gx2,) = torch.autograd.grad(out2.sum(), x2)
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx2, gx, rtol=1e-4, atol=1e-6)   # PGD's gradient, to rounding


def test_weights_cast_once_give_what_autocast_gives():
    model = _bn_model()
    frozen, _ = frozen_copy(model, fold=False, dtype=torch.bfloat16)
    convs = [m for m in frozen.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    norms = [m for m in frozen.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)   # autocast keeps these fp32: so do we
    x = torch.rand(4, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = model(x), frozen(x)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:   # data-dependent control flow: torch.fx cannot trace it
            return self.bn(self.conv(x))
        return self.conv(x)


def test_an_untraceable_network_is_copied_unfolded():
    frozen, folded = frozen_copy(_Untraceable().eval())
    assert not folded and any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())


def test_a_run_attacks_and_structures_through_the_folded_copy_and_the_authors_do_not():
    from stakes.methods import loop

    model = _bn_model()
    g = torch.Generator().manual_seed(0)
    forget = (torch.rand(3, 3, 16, 16, generator=g), torch.tensor([0, 1, 2]))
    anchors = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1)
    seen = {}
    original = loop._execute

    def spy(run, *a, **k):
        seen[run.ctx.config.preset] = getattr(run.ctx._frozen, "folded", None)
        return original(run, *a, **k)

    loop._execute = spy
    try:
        runs = {}
        for name in ("stable", "authors"):
            cfg = stakes.preset(name, method="structguard", repetitions=2, pgd_steps=3, eps=1.0, max_steps=2,
                                progress=False, backend="reference", proxy_model="pretrained")
            runs[name] = stakes.unlearn(model, forget, anchors=anchors, config=cfg)
    finally:
        loop._execute = original
    assert seen == {"stable": True, "authors": False}
    assert runs["stable"].config["fold_batchnorm"] is True and runs["authors"].config["fold_batchnorm"] is False
    plain = stakes.unlearn(model, forget, anchors=anchors, config=stakes.preset(
        "stable", method="structguard", repetitions=2, pgd_steps=3, eps=1.0, max_steps=2, progress=False,
        backend="reference", fold_batchnorm=False))
    # the folded and the unfolded original attack and structure the same, to rounding
    assert abs(runs["stable"].proxies["checksum"] - plain.proxies["checksum"]) < 1e-3 * abs(plain.proxies["checksum"])
    assert Execution(precision="bf16").autocast_dtype == torch.bfloat16 and Execution().autocast_dtype is None
