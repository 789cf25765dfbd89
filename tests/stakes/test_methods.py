import copy
import math

import pytest
import torch

from stakes.methods import METHODS, NonFiniteError, Projector, build_proxies, random_projection, unlearn
from stakes.proxy import ProxySet


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_leaves_the_users_model_alone(method, digits, digits_model, digits_anchors,
                                                            forget_set, fast_config):
    before = _params(digits_model)
    ev = {"test": (digits.test_x[:100], digits.test_y[:100])}
    res = unlearn(digits_model, forget_set, method=method, anchors=digits_anchors, config=fast_config(),
                  eval_sets=ev)
    assert res.method == method and res.steps == 4
    assert res.proxies["n"] == 16 and res.proxies["eps"] == 1.0
    steps = [h["step"] for h in res.history]
    assert steps[0] == 0 and steps[-1] == 4 and steps == sorted(steps)
    assert all(0.0 <= h["test_accuracy"] <= 100.0 for h in res.history)
    assert res.history[0]["test_accuracy"] > 90.0   # stable preset: StructGuard starts from the pretrained model
    for p, q in zip(before, digits_model.parameters()):
        assert torch.equal(p, q)
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    logits = res.model(forget_set[0])
    assert logits.shape == (8, 10)
    # the stable preset keeps the warm-started projector fixed, i.e. the identity: no method deploys one
    assert res.model.projector is None


def test_fixed_warm_started_projector_is_left_out_exactly(digits, digits_model, digits_anchors, forget_set,
                                                         fast_config, monkeypatch):
    """projector_lr=0 with the warm start deploys h∘g: the same model as keeping the warm-started
    (identity) projector in place untrained; a trained projector is part of the deployed model (§7)."""
    from stakes.methods.structguard import StructGuard

    ev = {"test": (digits.test_x[:200], digits.test_y[:200])}
    cfg = fast_config(max_steps=6)
    fixed = unlearn(digits_model, forget_set, anchors=digits_anchors, config=cfg, eval_sets=ev)
    with monkeypatch.context() as m:
        m.setattr(StructGuard, "needs_projector", lambda self, run: True)
        kept = unlearn(digits_model, forget_set, anchors=digits_anchors, config=cfg, eval_sets=ev)
    assert fixed.model.projector is None and kept.model.projector is not None
    for p, q in zip(fixed.model.features.parameters(), kept.model.features.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fixed.model(digits.test_x[:50]), kept.model(digits.test_x[:50]), rtol=1e-4, atol=1e-4)
    assert [h["test_accuracy"] for h in fixed.history] == [h["test_accuracy"] for h in kept.history]
    trained = unlearn(digits_model, forget_set, anchors=digits_anchors, config=fast_config(projector_lr=0.009))
    assert trained.model.projector is not None


def test_projector_warm_start_reproduces_the_pretrained_model(digits, digits_model):
    feats = digits_model.features(digits.test_x[:64]).detach()
    assert (feats >= 0).all()
    rp = random_projection(feats.shape[1], 384, seed=0)
    assert torch.allclose(rp.norm(dim=0), torch.ones(384), atol=1e-5)
    proj = Projector(feats.shape[1], 384)
    proj.warm_start()
    proj.train()  # BatchNorm stays frozen after a warm start
    out, z = proj(feats)
    assert torch.allclose(out, feats, atol=1e-5)
    assert z.shape == (64, 384) and torch.allclose(z[:, :128], feats, atol=1e-5)
    assert not proj.bn.training
    # the spare hidden units start silent but receive gradient through fc1's spare rows once fc2 moves
    assert float(proj.fc2.weight[:, 128:].abs().sum()) == 0.0 and float(proj.fc1.weight[128:].abs().sum()) > 0
    with pytest.raises(ValueError, match="hidden width"):
        Projector(128, 64).warm_start()
    wide = Projector(128, 64, hidden_dim=128)   # what the unlearner builds when d_a < d_f
    wide.warm_start()
    assert torch.allclose(wide(feats)[0], feats, atol=1e-5)


def test_warm_started_structguard_starts_at_the_pretrained_accuracy(digits, digits_model, digits_anchors,
                                                                    forget_set, fast_config):
    ev = {"test": (digits.test_x, digits.test_y)}
    res = unlearn(digits_model, forget_set, anchors=digits_anchors, config=fast_config(warm_start=True),
                  eval_sets=ev)
    from stakes.metrics import accuracy

    pre = accuracy(digits_model, digits.test_x, digits.test_y)
    assert math.isclose(res.history[0]["test_accuracy"], pre, abs_tol=0.3)
    assert res.history[0]["forget_accuracy"] == 100.0


def test_importance_is_nonnegative_and_zero_off_the_backbone(digits_model, digits_anchors, forget_set, fast_config):
    from tests.stakes.runs import optimizer, prepared

    run = prepared(digits_model, forget_set, "structguard", digits_anchors, fast_config())
    opt = optimizer(run)
    feats = {id(p) for p in run.ctx.features.parameters()}
    n_pos = 0
    for group in opt.param_groups:
        for p in group["params"]:
            imp = opt.state[p].get("importance")
            if id(p) in feats:
                assert imp is not None and (imp >= 0).all()
                n_pos += int((imp > 0).sum())
            else:
                assert imp is None or float(imp.abs().sum()) == 0.0
    assert n_pos > 0


def test_shared_proxies_are_used_as_given(digits_model, digits_anchors, forget_set, fast_config):
    cfg = fast_config()
    proxies, timings = build_proxies(digits_model, *forget_set, cfg)
    assert isinstance(proxies, ProxySet) and len(proxies) == 16 and timings["proxies_s"] >= 0
    res = unlearn(digits_model, forget_set, method="adv", config=cfg, proxies=proxies)
    assert res.proxies == proxies.summary()


def test_stops_when_forget_accuracy_reaches_zero(digits_model, forget_set, fast_config):
    cfg = fast_config(max_steps=None, max_epochs=60, lr=0.1, deletion="ascent", grad_clip=None, log_every=1,
                      stop_warmup_steps=0)
    res = unlearn(digits_model, forget_set, method="neggrad", config=cfg)
    assert res.stopped == "forget_accuracy_zero"
    assert res.history[-1]["forget_accuracy"] == 0.0
    assert res.epochs < 60 and res.steps == res.epochs   # one proxy batch per epoch here
    # the run stopped at the first epoch end with forget accuracy 0 (logged every step here)
    assert all(h["forget_accuracy"] > 0 for h in res.history[:-1])


def test_non_finite_parameters_stop_the_run_with_the_step(digits_model, forget_set, fast_config):
    broken = copy.deepcopy(digits_model)
    with torch.no_grad():
        broken.head.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="step 0"):
        unlearn(broken, forget_set, method="neggrad", config=fast_config())


def test_resume_continues_exactly(tmp_path, digits_model, digits_anchors, forget_set, fast_config):
    cfg = fast_config(max_steps=None, max_epochs=3, warm_start=True)
    full = unlearn(digits_model, forget_set, anchors=digits_anchors, config=cfg)

    ckpt = str(tmp_path / "run.ckpt")
    calls = {"n": 0}

    def interrupt(entry):
        calls["n"] += 1
        if entry["step"] >= 3:   # epoch 1 (steps 0-1) has been checkpointed; die inside epoch 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        unlearn(digits_model, forget_set, anchors=digits_anchors, config=cfg, checkpoint_path=ckpt,
                callbacks=[interrupt])
    assert (tmp_path / "run.ckpt").exists()
    spent = torch.load(ckpt, weights_only=False)["timings"]["loop_s"]
    assert spent > 0
    resumed = unlearn(digits_model, forget_set, anchors=digits_anchors, config=cfg, checkpoint_path=ckpt,
                      resume=True)
    assert resumed.steps == full.steps
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert not (tmp_path / "run.ckpt").exists()  # removed once the run finished
    assert resumed.timings["loop_s"] > spent    # the loop time spent before the interruption is counted


def test_eval_sets_are_capped_and_checked(digits, digits_model, forget_set, fast_config):
    ev = {"test": (digits.test_x[:100], digits.test_y[:100])}
    res = unlearn(digits_model, forget_set, method="neggrad", config=fast_config(eval_max_samples=7), eval_sets=ev)
    for h in res.history:   # accuracies over 7 samples: multiples of 100/7
        assert abs(h["test_accuracy"] * 7 / 100 - round(h["test_accuracy"] * 7 / 100)) < 1e-4
    with pytest.raises(ValueError, match=r"eval_sets\['test'\]: 100 images but labels of shape \(99,\)"):
        unlearn(digits_model, forget_set, method="neggrad", config=fast_config(),
                eval_sets={"test": (digits.test_x[:100], digits.test_y[:99])})
    with pytest.raises(ValueError, match=r"eval_sets\['retain'\] must be a pair"):
        unlearn(digits_model, forget_set, method="neggrad", config=fast_config(), eval_sets={"retain": digits.test_x})


def test_bad_input(digits_model, digits_anchors, forget_set, fast_config):
    x, y = forget_set
    cfg = fast_config()
    with pytest.raises(ValueError, match="unknown method"):
        unlearn(digits_model, forget_set, method="forget-it", config=cfg)
    with pytest.raises(ValueError, match="needs anchors"):
        unlearn(digits_model, forget_set, method="structguard", config=cfg)
    with pytest.raises(ValueError, match="anchors has 9 rows"):
        unlearn(digits_model, forget_set, anchors=digits_anchors[:9], config=cfg)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        unlearn(digits_model, (x, y + 10), anchors=digits_anchors, config=cfg)
    with pytest.raises(ValueError, match="empty"):
        unlearn(digits_model, (x[:0], y[:0]), anchors=digits_anchors, config=cfg)
    with pytest.raises(TypeError, match="config must be"):
        unlearn(digits_model, forget_set, anchors=digits_anchors, config={"lr": 1})
    with pytest.raises(TypeError, match="forget_set"):
        unlearn(digits_model, x, anchors=digits_anchors, config=cfg)
    with pytest.raises(ValueError, match="projector_lr=0 needs warm_start=True"):
        unlearn(digits_model, forget_set, anchors=digits_anchors, config=fast_config(warm_start=False))
    with pytest.raises(ValueError, match="resume=True needs checkpoint_path"):
        unlearn(digits_model, forget_set, anchors=digits_anchors, config=cfg, resume=True)


@pytest.mark.parametrize("projector_lr", [0.0, 0.009])
def test_warm_start_importance_is_not_identically_zero(projector_lr, digits_model, digits_anchors, forget_set,
                                                       fast_config):
    """At a warm start the alignment loss is at its minimum (zero gradient); the importance must still
    rank parameters (structure sensitivity), or the SR term would silently do nothing."""
    from tests.stakes.runs import optimizer, prepared

    cfg = fast_config(warm_start=True, projector_lr=projector_lr)
    run = prepared(digits_model, forget_set, "structguard", digits_anchors, cfg)
    assert (run.ctx.projector is None) == (projector_lr == 0)
    if run.ctx.projector is not None:
        run.ctx.projector.warm_start()
    opt = optimizer(run)
    total = sum(float(opt.state[p]["importance"].sum()) for p in run.ctx.features.parameters())
    assert total > 0


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, digits, digits_model, digits_anchors, forget_set,
                                                   fast_config):
    cfg = fast_config(max_steps=None, max_epochs=3, warm_start=True)
    ckpt = str(tmp_path / "run.ckpt")

    def interrupt(entry):
        if entry["step"] >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        unlearn(digits_model, forget_set, anchors=digits_anchors, config=cfg, checkpoint_path=ckpt,
                callbacks=[interrupt])
    other = (digits.train_x[100:108], digits.train_y[100:108])
    with pytest.raises(ValueError, match="different run"):
        unlearn(digits_model, other, anchors=digits_anchors, config=cfg, checkpoint_path=ckpt, resume=True)
    with pytest.raises(ValueError, match="different run"):
        unlearn(digits_model, forget_set, anchors=digits_anchors, config=cfg.replace(lam=5.0), checkpoint_path=ckpt,
                resume=True)


def test_given_proxies_are_checked(digits_model, forget_set, fast_config):
    cfg = fast_config()
    proxies, _ = build_proxies(digits_model, *forget_set, cfg)
    bad = ProxySet(x=proxies.x[:, :, :4], y=proxies.y, source=proxies.source, eps=1.0, success_rate=1.0)
    with pytest.raises(ValueError, match="proxies must be"):
        unlearn(digits_model, forget_set, method="adv", config=cfg, proxies=bad)
    with pytest.raises(TypeError, match="ProxySet"):
        unlearn(digits_model, forget_set, method="adv", config=cfg, proxies=(proxies.x, proxies.y))


def test_salun_moves_only_masked_weights_even_with_weight_decay(digits_model, forget_set, fast_config):
    cfg = fast_config(weight_decay=1e-2, lr=0.05, max_steps=2)
    res = unlearn(digits_model, forget_set, method="salun", config=cfg)
    before = dict(digits_model.named_parameters())
    after = dict(res.model.named_parameters())
    moved = frozen = 0
    for name, p in after.items():
        changed = (p.detach() != before[name].detach())
        moved += int(changed.sum())
        frozen += int((~changed).sum())
    total = moved + frozen
    # the saliency mask keeps the top 50 % of weights: the other half must not move at all
    assert 0 < moved <= 0.5 * total + 1


class _SalUnZeroLoss(__import__("stakes").methods.salun.SalUn):
    """SalUn whose loss has an exactly zero gradient: one step is then the weight decay alone."""

    def loss_terms(self, ctx, batch):
        return {"random_label": 0.0 * ctx.deployed(batch.forget_x).float().sum()}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_salun_weight_decay_is_applied_at_the_gradients_true_scale(precision, digits_model, forget_set, fast_config):
    """SalUn folds wd·p into the gradients in ``before_update``; under fp16 the step's gradient
    scaler must have unscaled them first, or the decay is wd/scale (2**-16 of it)."""
    lr, wd = 0.1, 0.05
    method = _SalUnZeroLoss()
    cfg = fast_config("salun", precision=precision, lr=lr, weight_decay=wd, max_steps=1, grad_clip=None,
                      method_options={method.key: {"saliency_q": 1.0}})   # the mask lets every weight move
    res = unlearn(digits_model, forget_set, method=method, config=cfg)
    assert res.execution["precision"] == precision
    before = dict(digits_model.named_parameters())
    for name, p in res.deployed.named_parameters():
        p0 = before[name].detach()
        torch.testing.assert_close(p.detach(), p0 * (1 - lr * wd), rtol=1e-6, atol=1e-7, msg=name)
