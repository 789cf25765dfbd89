"""The ``authors`` preset, step for step against a deliberately naive loop written here from
METHOD.md §9a (how the authors' CIFAR-10 script runs StructGuard): plain ``torch.optim.SGD``, the SR
term built tensor by tensor and differentiated by autograd, the loop in §9a's order, on the same
inputs (model, forget set, proxies, anchors, projector initialisation). Per step, every loss term
within 1e-5 relative and the parameters (with the BatchNorm buffers) within 1e-6 relative as a
whole, each tensor within 1e-5 (fp32 rounding: stakes' fused alignment and the naive
``F.cosine_similarity`` are two formulas of the same gradient; measured 2e-7 and 5e-8), for 24 steps
(5 epochs of 5 steps), across the first stop check (step 6) and the importance pass (step 2), on a
network without BatchNorm and one with it.

What the naive loop does, item by item of §9a:
  2. no shuffling: the proxies in order, the forget loader in index order, cycled across epochs
     (``itertools.cycle``), zipped with the proxy batches;
  3. no stop check in the first epoch; from the second, after every step, through h∘p∘g in eval mode;
  4. the check leaves the projector in eval mode; each step puts only the backbone in train mode;
  5. the importance at the second step of the first epoch, after its forward: a copy of the projector,
     a train-mode copy of the pretrained model as reference, the live backbone in train mode, the
     unshuffled proxy batches cycled to ≥ |D_r| samples, Σ|B|·|∂L/∂ψ| / samples seen; the head gets 0;
  6. no SR on an epoch's first two steps; BatchNorm in train mode;
  8. SGD on backbone + head and on the projector.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import stakes
from stakes.methods.structguard import StructGuard
from stakes.proxy import ProxySet

SEED, K, R, CLASSES, D = 3, 22, 2, 5, 16
PROXY_BATCH, FORGET_BATCH, RETAIN = 10, 4, 25      # 44 proxies: batches of 10, 10, 10, 10, 4; forget batches 4 × 5 + 2
LR, PROJECTOR_LR, STEPS = 0.02, 0.03, 24


def _network(batchnorm: bool):
    torch.manual_seed(11)
    norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
    features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(),
                             nn.Conv2d(8, D, 3, stride=2, padding=1), norm(D), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = nn.Linear(D, CLASSES)
    if batchnorm:   # "pretrained" running statistics, not the initial 0 / 1
        with torch.no_grad():
            features.train()
            for _ in range(3):
                features(torch.rand(32, 3, 8, 8))
    return features.eval(), head.eval()


def _inputs():
    """A forget set with every class among its labels (so the stop rule, which needs every image
    misclassified, does not fire in these few steps), proxies, anchors."""
    g = torch.Generator().manual_seed(5)
    fx = torch.rand(K, 3, 8, 8, generator=g)
    fy = torch.arange(K) % CLASSES
    px = torch.rand(R * K, 3, 8, 8, generator=g)
    py = torch.randint(0, CLASSES, (R * K,), generator=g)
    anchors = F.normalize(torch.randn(CLASSES, D, generator=g), dim=1)
    proxies = ProxySet(x=px, y=py, source=torch.arange(K).repeat(R), eps=1.0, success_rate=1.0)
    return (fx, fy), proxies, anchors


def _projector():
    """Linear → BatchNorm1d → ReLU → Linear, initialised as stakes initialises its projector (the first
    random draws after ``torch.manual_seed(seed)``)."""
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D), nn.ReLU(), nn.Linear(D, D))


def _structure(v, anchors):
    return F.normalize(v, dim=1) @ anchors.T


def _alignment(z, ref, anchors):
    return 1 - F.cosine_similarity(_structure(ref, anchors), _structure(z, anchors), dim=1).mean()


def naive_authors_loop(features, head, forget, proxies, anchors):
    """METHOD.md §9a, written out plainly. Returns per step: the loss terms and the state after it."""
    features, head = copy.deepcopy(features), copy.deepcopy(head)
    projector = _projector()
    original = copy.deepcopy(features).eval()
    reference = copy.deepcopy(features).train()   # the importance's reference: a train-mode copy
    origin = [p.detach().clone() for p in features.parameters()]
    opt = torch.optim.SGD([{"params": list(features.parameters()) + list(head.parameters()), "lr": LR},
                           {"params": list(projector.parameters()), "lr": PROJECTOR_LR}], lr=LR)
    fx, fy = forget
    proxy_batches = [(proxies.x[i:i + PROXY_BATCH], proxies.y[i:i + PROXY_BATCH])
                     for i in range(0, len(proxies), PROXY_BATCH)]
    forget_batches = itertools.cycle([(fx[i:i + FORGET_BATCH], fy[i:i + FORGET_BATCH]) for i in range(0, K, FORGET_BATCH)])
    importance, records, epoch, stopped = None, [], 0, False
    while not stopped and len(records) < STEPS:
        for i, ((ax, ay), (bx, by)) in enumerate(zip(proxy_batches, forget_batches)):
            features.train()
            head.train()
            opt.zero_grad()
            out = head(features(bx))
            emb = projector(features(ax))
            out_adv = head(emb)
            nf, na = len(bx), len(ax)
            deletion = -F.cross_entropy(out, by) * nf / (nf + na)
            retention = F.cross_entropy(out_adv, ay) * na / (nf + na)
            with torch.no_grad():
                ref = original(ax)
            alignment = _alignment(emb, ref, anchors)
            if i == 1 and importance is None:
                importance = _naive_importance(features, copy.deepcopy(projector), reference, proxy_batches, anchors)
                opt.zero_grad(set_to_none=True)
            sr = torch.zeros(())
            if i > 1 and importance is not None:
                for p, p0, imp in zip(features.parameters(), origin, importance):
                    sr = sr + torch.sum(imp * (p - p0).pow(2)) / 2
            w = head.weight
            cr = 0.001 * (0.99 * w.abs().sum() + 0.5 * (1 - 0.99) * w.pow(2).sum())
            (deletion + retention + alignment + sr + cr).backward()
            opt.step()
            features.eval()
            head.eval()
            records.append({"deletion": float(deletion), "retention": float(retention), "alignment": float(alignment),
                            "classifier_reg": float(cr), "sr": float(sr),
                            "state": _state(features, head, projector)})
            if epoch > 0:   # the stop check, from the second epoch, after every step
                projector.eval()
                with torch.no_grad():
                    acc = (head(projector(features(fx))).argmax(1) == fy).float().mean()
                if acc == 0:
                    stopped = True
                    break
            if len(records) == STEPS:
                break
        epoch += 1
    return records


def _naive_importance(features, projector, reference, proxy_batches, anchors):
    features.train()
    imp = [torch.zeros_like(p) for p in features.parameters()]
    seen = 0
    batches = itertools.cycle(proxy_batches)
    while seen < RETAIN:
        ax, _ = next(batches)
        z = projector(features(ax))
        with torch.no_grad():
            ref = reference(ax)
        loss = _alignment(z, ref, anchors)
        features.zero_grad()
        loss.backward()
        for acc, p in zip(imp, features.parameters()):
            acc += p.grad.abs() * len(ax)
        seen += len(ax)
    return [acc / seen for acc in imp]


def _state(features, head, projector):
    """Parameters and buffers; the projector's by position (the naive Sequential and stakes' Projector
    hold the same tensors in the same order under other names)."""
    out = {f"{name}.{k}": v.detach().clone().float() for name, m in (("features", features), ("head", head))
           for k, v in m.state_dict().items()}
    out.update({f"projector.{i}": v.detach().clone().float() for i, v in enumerate(projector.state_dict().values())})
    return out


class _Recording(StructGuard):
    """StructGuard, recording the state at the start of each step (= after the previous step)."""

    def __init__(self):
        self.states = []

    def loss_terms(self, ctx, batch):
        self.states.append(_state(ctx.features, ctx.head, ctx.projector))
        return super().loss_terms(ctx, batch)


def stakes_authors_run(features, head, forget, proxies, anchors):
    method = _Recording()
    cfg = stakes.preset("authors", method=method, seed=SEED, lr=LR, projector_lr=PROJECTOR_LR,
                        proxy_batch_size=PROXY_BATCH, forget_batch_size=FORGET_BATCH, max_steps=STEPS + 1,
                        log_every=1, backend="reference", progress=False)
    entries = []
    res = stakes.unlearn((features, head), forget, method=method, anchors=anchors, config=cfg, proxies=proxies,
                         retain_size=RETAIN, callbacks=[entries.append])
    final = _state(res.deployed.features, res.deployed.head, res.deployed.projector)
    states = method.states[1:] + [final]   # the state after step t is the one before step t + 1
    return [dict(e, state=s) for e, s in zip([e for e in entries if e["step"] > 0], states)], res


@pytest.mark.parametrize("batchnorm", [False, True], ids=["no-batchnorm", "batchnorm"])
def test_the_authors_preset_runs_the_authors_loop_step_for_step(batchnorm):
    features, head = _network(batchnorm)
    forget, proxies, anchors = _inputs()
    naive = naive_authors_loop(features, head, forget, proxies, anchors)
    ours, res = stakes_authors_run(features, head, forget, proxies, anchors)
    assert len(naive) == STEPS and len(ours) >= STEPS, "a run stopped early: the comparison needs 24 steps"
    assert res.config["stop_check"] == "step" and res.method_config["importance_step"] == 2
    assert ours[5]["forget_accuracy"] > 0   # step 6: the first check ran and did not stop the run
    for step, (a, b) in enumerate(zip(naive, ours), start=1):
        for term in ("deletion", "retention", "alignment", "classifier_reg", "sr"):
            torch.testing.assert_close(float(b[term]), a[term], rtol=1e-5, atol=1e-7,
                                       msg=lambda m, term=term, step=step: f"step {step}, {term}: {m}")
        keys = list(a["state"])
        va = torch.cat([a["state"][k].flatten() for k in keys])
        vb = torch.cat([b["state"][k].flatten() for k in keys])
        assert float((vb - va).norm()) <= 1e-6 * float(va.norm()), f"step {step}: the parameters as a whole"
        for key in keys:   # and each tensor, to fp32 rounding through two formulas of the same gradients
            value, got = a["state"][key], b["state"][key]
            assert float((got - value).norm()) <= 1e-5 * (float(value.norm()) or 1.0), f"step {step}, {key}"
    # the steps moved the weights (a comparison of unmoved weights would prove nothing), and SR was on
    first = naive[0]["state"]["features.0.weight"]
    assert float((naive[-1]["state"]["features.0.weight"] - first).norm()) > 1e-3 * float(first.norm())
    assert naive[2]["sr"] > 0 and naive[5]["sr"] == naive[6]["sr"] == 0 and naive[7]["sr"] > 0   # SR off: an epoch's steps 1-2
