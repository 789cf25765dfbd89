"""The method registry (a user's method runs by name like the built-ins) and the loop's promise of
no host synchronisation between logging points (issue 9, item 4)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import stakes
from stakes.methods import METHODS, NonFiniteError, UnlearningMethod, _Run, get_method, unlearn
from stakes.methods.base import register_method, unregister_method

SYNC_OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)


class CountSyncs(TorchDispatchMode):
    """Counts the ops a host sync dispatches to: ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``
    and ``if t:`` go to ``_local_scalar_dense`` (``torch.is_nonzero(t)`` to ``is_nonzero``)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_item_float_and_bool():
    t = torch.tensor(2.0)
    with CountSyncs() as c:
        t.item(), float(t), bool(t > 1)
        if t:
            pass
        torch.is_nonzero(t)
        t + 1, t > 0, torch.isfinite(t)   # device ops: no sync
    assert len(c.calls) == 5 and c.calls.count("aten.is_nonzero.default") <= 1


@pytest.fixture
def count_steps(monkeypatch):
    """Run every ``_Run.train_step`` under one sync counter; returns the counter and the step count."""
    counter, steps = CountSyncs(), []
    original = _Run.train_step

    def counted(self, batch):
        with counter:
            out = original(self, batch)
        steps.append(self.step)
        return out

    monkeypatch.setattr(_Run, "train_step", counted)
    return counter, steps


@pytest.mark.parametrize("method", [m for m in METHODS if m != "retrain"])
def test_no_host_sync_inside_the_steps(method, count_steps, digits_model, digits_anchors, forget_set, fast_config):
    counter, steps = count_steps
    cfg = fast_config(max_steps=6, log_every=1000, weight_decay=1e-3 if method == "salun" else 0.0)
    res = unlearn(digits_model, forget_set, method=method, anchors=digits_anchors, config=cfg)
    assert res.steps == 6 and steps == [0, 1, 2, 3, 4, 5]
    assert counter.calls == [], f"{method}: host syncs inside the step: {counter.calls}"


def test_structure_sgd_step_makes_no_host_sync():
    from fused.optim import StructureSGD

    torch.manual_seed(0)
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    ref = [p.detach().clone() + 0.1 for p in params]
    opt = StructureSGD([{"params": params}], ref_params=ref, importance=[torch.rand(5, 3), torch.rand(7)],
                       grad_masks=[torch.rand(5, 3) > 0.5, None], lr=0.1, lam=1.0, momentum=0.9,
                       weight_decay=1e-2, proximal=True, backend="reference")
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    with CountSyncs() as c:
        opt.step()
        opt.step()
    assert c.calls == []
    assert all(not torch.equal(a, b) for a, b in zip(before, params))   # the step did move the weights
    assert float(opt.last_sr_loss) > 0   # ½ΣI(p−p0)², read on the host only here


class _NaNAtStep(UnlearningMethod):
    """Adv's retention, with a deletion term that turns NaN at step ``bad`` (a diverging method)."""

    def __init__(self, bad):
        self.bad = bad

    def loss_terms(self, run, batch):
        logits = run.deployed(batch.forget_x)
        deletion = run.deletion(logits, batch.forget_y)
        if run.step >= self.bad:
            deletion = deletion * float("nan")
        return {"deletion": deletion, "retention": F.cross_entropy(run.deployed(batch.proxy_x), batch.proxy_y)}


def test_a_non_finite_loss_is_reported_with_its_step_and_term(tmp_path, digits_model, forget_set, fast_config):
    cfg = fast_config(max_steps=None, max_epochs=10, log_every=4, proxy_batch_size=4)   # 4 steps an epoch
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 5 \(detected at the trajectory log at step 8, "
                                             r"after steps 4-8; non-finite at that step: deletion\)"):
        unlearn(digits_model, forget_set, method=_NaNAtStep(5), config=cfg, checkpoint_path=str(ckpt))
    # the last checkpoint is the healthy end of epoch 1 (step 4), before the loss went non-finite
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["features"].values())
    ckpt.unlink()
    # between log points, an epoch end reports it (before the checkpoint is written)
    with pytest.raises(NonFiniteError, match=r"step 2 \(detected at the end of epoch 1, after steps 0-4"):
        unlearn(digits_model, forget_set, method=_NaNAtStep(2), config=cfg.replace(log_every=1000),
                checkpoint_path=str(ckpt))
    assert not ckpt.exists()




def test_the_readme_user_method_runs_by_name(digits, digits_model, forget_set, fast_config):
    from tests.stakes.test_readme import user_method_block

    exec(user_method_block(), {})
    try:
        assert "nearest-wrong" in stakes.available_methods() and "nearest-wrong" not in METHODS
        cfg = fast_config(max_steps=None, max_epochs=30, stop_warmup_steps=0, lr=0.05)
        res = stakes.unlearn(digits_model, forget_set, method="nearest-wrong", config=cfg,
                             eval_sets={"test": (digits.test_x, digits.test_y)})
        assert res.method == "nearest-wrong" and res.stopped == "forget_accuracy_zero"
        assert res.metrics["forget_accuracy"] == 0.0 and res.metrics["test_accuracy"] > 30.0
        assert {"relabel", "retention", "loss"} <= set(res.history[1])
    finally:
        unregister_method("nearest-wrong")
    assert "nearest-wrong" not in stakes.available_methods()


def test_registry_errors_name_the_problem():
    class NoLoss(UnlearningMethod):
        pass

    with pytest.raises(TypeError, match="does not define loss_terms"):
        register_method("noloss", NoLoss())
    with pytest.raises(TypeError, match="UnlearningMethod instance or subclass"):
        register_method("fn", lambda run, batch: {})
    with pytest.raises(ValueError, match="already registered"):
        register_method("adv", type(get_method("adv"))())
    with pytest.raises(ValueError, match="lower-case word"):
        register_method("Bad Name", get_method("adv"))
    with pytest.raises(ValueError, match=r"unknown method 'nope'; expected one of \['structguard'"):
        get_method("nope")
    with pytest.raises(ValueError, match="oracle"):
        unlearn(torch.nn.Linear(2, 2), None, method="retrain")
    assert stakes.available_methods(oracles=False) == [m for m in METHODS if m != "retrain"]


def test_a_registered_class_is_instantiated_and_named():
    class Ascent(UnlearningMethod):
        uses_proxies = False

        def loss_terms(self, run, batch):
            return {"deletion": -F.cross_entropy(run.deployed(batch.forget_x), batch.forget_y)}

    m = register_method("ascent-only", Ascent)
    try:
        assert isinstance(m, Ascent) and m.name == "ascent-only" and get_method("ascent-only") is m
        # the paper preset gives a user's method the baselines' optimiser, StructGuard none
        assert stakes.preset("paper", method="ascent-only").momentum == 0.9
        assert stakes.preset("paper", method="structguard").momentum == 0.0
    finally:
        unregister_method("ascent-only")
