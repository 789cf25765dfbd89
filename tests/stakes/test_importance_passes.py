"""StructGuard's importance with each distinct batch once (``importance_passes="one"``, the
default) against every visit computed (``"all"``): the authors' unshuffled estimator repeats its
⌈N_s/B⌉ batches, and computing each once, weighted by its visits, gives the same importance and,
for a backbone whose BatchNorm trains, the same running statistics (their closed form over the
repeated sequence); the reshuffled estimator's one pass keeps the expectation of the passes it
replaces (each is a random partition of the same proxies)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import stakes
from fused.optim import StructureSGD
from stakes.methods.structguard import importance_plan
from stakes.proxy import ProxySet


def _net(batchnorm=True):
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(6) if batchnorm else nn.Identity()
    features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), norm, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return features.eval(), nn.Linear(6, 4)


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    forget = (torch.rand(4, 3, 6, 6, generator=g), torch.tensor([0, 1, 2, 3]))
    proxies = ProxySet(x=torch.rand(12, 3, 6, 6, generator=g), y=torch.randint(0, 4, (12,), generator=g),
                       source=torch.arange(4).repeat(3), eps=1.0, success_rate=1.0)
    return forget, proxies, F.normalize(torch.randn(4, 6, generator=g), dim=1)


def _importance(passes, order, seed=0, n_tot=41, batchnorm=True, monkeypatch=None):
    features, head = _net(batchnorm)
    forget, proxies, anchors = _case()
    got = {}
    original = StructureSGD.set_importance

    def spy(self, importance):
        got["imp"] = [v.clone() for v in importance.values()] if importance is not None else None
        return original(self, importance)

    monkeypatch.setattr(StructureSGD, "set_importance", spy)
    cfg = stakes.preset("paper", method="structguard", seed=seed, proxy_batch_size=5, max_steps=1, progress=False,
                        backend="reference", bn_train_mode=True, importance_passes=passes, importance_order=order,
                        importance_samples=n_tot)
    res = stakes.unlearn((features, head), forget, anchors=anchors, config=cfg, proxies=proxies)
    buffers = {k: v.clone() for k, v in res.deployed.features.state_dict().items() if "running" in k or "num_b" in k}
    return got["imp"], buffers


def test_the_loaders_repeated_batches_once_each_give_the_same_importance_and_statistics(monkeypatch):
    """12 proxies in batches of 5, 5, 2, cycled to 41 samples: the batches visited 4, 3 and 3 times."""
    batches, visits, seen = importance_plan(12, 5, 41, "loader", "one", torch.Generator())
    assert batches == [slice(0, 5), slice(5, 10), slice(10, 12)] and seen == 41
    assert visits == [0, 1, 2] * 3 + [0]
    one, buf_one = _importance("one", "loader", monkeypatch=monkeypatch)
    every, buf_all = _importance("all", "loader", monkeypatch=monkeypatch)
    for a, b in zip(one, every):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert buf_one.keys() == buf_all.keys() and buf_one
    for k in buf_one:   # the running statistics of ten visits, from three forwards
        torch.testing.assert_close(buf_one[k].float(), buf_all[k].float(), rtol=1e-5, atol=1e-6, msg=k)
    assert int(buf_one["1.num_batches_tracked"]) == 10 + 2   # + the step's two forwards (forget and proxy batches)


def test_one_reshuffled_pass_keeps_the_expectation_of_the_passes(monkeypatch):
    """N_tot = 3·N_s: "all" averages three reshuffled passes, "one" takes one. Over seeds both have
    the same mean (each pass is a random partition of the same proxies) within 4 standard errors."""
    batches, visits, seen = importance_plan(12, 5, 36, "shuffled", "one", torch.Generator().manual_seed(3))
    first, _, _ = importance_plan(12, 5, 36, "shuffled", "all", torch.Generator().manual_seed(3))
    assert seen == 12 and len(batches) == 3 and all(torch.equal(a, b) for a, b in zip(batches, first[:3]))
    ones, alls = [], []
    for seed in range(16):
        ones.append(torch.cat([t.flatten() for t in _importance("one", "shuffled", seed, 36, False, monkeypatch)[0]]))
        alls.append(torch.cat([t.flatten() for t in _importance("all", "shuffled", seed, 36, False, monkeypatch)[0]]))
    ones, alls = torch.stack(ones), torch.stack(alls)
    se = (ones.var(0) / len(ones) + alls.var(0) / len(alls)).sqrt()
    z = ((ones.mean(0) - alls.mean(0)).abs() / se.clamp_min(1e-12))
    assert float(z.mean()) < 1.5 and float(z.max()) < 4.5
    assert float((ones.var(0) - alls.var(0)).mean()) > 0   # fewer passes: more variance, not another mean


def test_with_few_samples_the_reshuffled_estimator_is_unchanged(monkeypatch):
    """N_tot ≤ N_s: one pass was already all there was; the same value bit for bit."""
    one, _ = _importance("one", "shuffled", 0, 8, False, monkeypatch)
    every, _ = _importance("all", "shuffled", 0, 8, False, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(one, every))


def test_the_authors_late_importance_with_repeated_batches_under_a_training_batchnorm():
    """The authors' importance runs during step 2, between that step's forward and its backward; the
    closed-form statistics rewrite the BatchNorm buffers that forward saved for its backward. The run
    must go on (it once raised autograd's "modified by an inplace operation") and end with the
    statistics of every visit, as ``importance_passes="all"`` gives them."""
    runs = {}
    for passes in ("one", "all"):
        features, head = _net(batchnorm=True)
        forget, proxies, anchors = _case()
        cfg = stakes.preset("authors", method="structguard", seed=0, proxy_batch_size=5, max_steps=3,
                            progress=False, backend="reference", importance_passes=passes, importance_samples=41)
        res = stakes.unlearn((features, head), forget, anchors=anchors, config=cfg, proxies=proxies)
        assert res.steps == 3 and res.method_config["importance_step"] == 2
        runs[passes] = res
    for (k, a), b in zip(runs["one"].deployed.features.state_dict().items(),
                         runs["all"].deployed.features.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6, msg=k)
    assert int(runs["one"].deployed.features.state_dict()["1.num_batches_tracked"]) == 10 + 3 * 2
