"""The method registry (a user's method runs by name like the built-ins) and the loop's promise of
no host synchronisation between logging points (issue 9, item 4)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import stakes
from stakes.methods import METHODS, NonFiniteError, UnlearningMethod, get_method, loop, unlearn
from stakes.methods.base import register_method, unregister_method

SYNC_OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)


class CountSyncs(TorchDispatchMode):
    """Counts the ops a host sync dispatches to: ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``
    and ``if t:`` go to ``_local_scalar_dense`` (``torch.is_nonzero(t)`` to ``is_nonzero``); and, on
    the fake card (``tests.fake_cuda``), every copy from the host to the card (``.to("cuda")`` of a CPU
    tensor, ``cuda_tensor.copy_(cpu_tensor)``): a blocking copy on a card, invisible on the CPU, where
    ``.to()`` of a CPU tensor to the CPU is no copy at all."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.per_step = []   # (the step's index in its epoch, its calls), where a test records them

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self.calls.append(str(func))
        elif _host_to_card(func, args, kwargs):
            self.calls.append(f"{func} (host-to-device copy of {tuple(args[-1 if func is COPY_INTO else 0].shape)})")
        return func(*args, **kwargs)


COPY_INTO = torch.ops.aten.copy_.default


def _host_to_card(func, args, kwargs) -> bool:
    from tests.fake_cuda import CudaTensor

    def on_host(t):
        return isinstance(t, torch.Tensor) and not isinstance(t, CudaTensor)

    if func is COPY_INTO:
        return isinstance(args[0], CudaTensor) and on_host(args[1])
    if func is torch.ops.aten._to_copy.default:
        device = kwargs.get("device")
        return device is not None and torch.device(device).type == "cuda" and on_host(args[0])
    return False


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
    """Run every training step (``loop._train_step``), and every batch drawn within an epoch after its
    first, under one sync counter; returns the counter and the step count."""
    counter, steps = CountSyncs(), []
    original, batches = loop._train_step, loop._batches

    def counted(run, batch):
        before = len(counter.calls)
        with counter:
            out = original(run, batch)
        steps.append(run.ctx.step)
        counter.per_step.append((batch.index, counter.calls[before:]))
        return out

    def counted_batches(run):
        it = batches(run)
        first = next(it, None)   # the epoch's set-up (its orders, copied to the device once) is not counted
        if first is None:
            return
        yield first
        while True:
            with counter:
                batch = next(it, None)
            if batch is None:
                return
            yield batch

    monkeypatch.setattr(loop, "_train_step", counted)
    monkeypatch.setattr(loop, "_batches", counted_batches)
    return counter, steps


@pytest.mark.parametrize("method", METHODS)
def test_no_host_sync_inside_the_steps(method, count_steps, digits_model, digits_anchors, forget_set, fast_config):
    counter, steps = count_steps
    cfg = fast_config(max_steps=6, log_every=1000, weight_decay=1e-3 if method == "salun" else 0.0)
    res = unlearn(digits_model, forget_set, method=method, anchors=digits_anchors, config=cfg)
    assert res.steps == 6 and steps == [0, 1, 2, 3, 4, 5]
    assert counter.calls == [], f"{method}: host syncs inside the step: {counter.calls}"


@pytest.mark.parametrize("method", METHODS)
def test_no_host_sync_inside_the_steps_on_the_card(method, count_steps, digits_model, digits_anchors, forget_set,
                                                   fast_config):
    """On the (fake) card a host-to-device copy inside a step blocks the host as a sync does. None
    between log points, except one copy at an epoch's first step (SalUn's random labels for the
    epoch); the forget orders are copied at the epoch's start, outside the steps. Small proxy
    batches: several steps an epoch, and mid-epoch forget reshuffles."""
    from tests.fake_cuda import fake_cuda

    counter, steps = count_steps
    cfg = fast_config(method, device="cuda", cuda_graphs=False, max_steps=8, log_every=1000, proxy_batch_size=4,
                      forget_batch_size=3, weight_decay=1e-3 if method == "salun" else 0.0)
    with fake_cuda():
        res = unlearn(digits_model, forget_set, method=method, anchors=digits_anchors, config=cfg)
    assert res.steps == 8 and steps == list(range(8)) and res.config["device"] == "cuda"
    assert [index for index, _ in counter.per_step] == [0, 1, 2, 3] * 2   # 16 proxies: 4 steps an epoch
    later = [calls for index, calls in counter.per_step if index > 0]
    assert all(calls == [] for calls in later), f"{method}: host syncs inside the steps: {later}"
    first = [calls for index, calls in counter.per_step if index == 0]
    assert all(len(calls) <= 1 and all("host-to-device" in c for c in calls) for calls in first), first
    assert counter.calls == sum(first, [])   # nothing between the steps either (the batches of the epoch)


def test_the_counter_sees_a_copy_to_the_card():
    from tests.fake_cuda import fake_cuda

    with fake_cuda():
        on_card = torch.zeros(3, device="cuda")
        with CountSyncs() as c:
            torch.ones(3).to("cuda")
            on_card.copy_(torch.ones(3))
            on_card + 1
            on_card.to("cuda")
    assert len(c.calls) == 2 and all("host-to-device" in call for call in c.calls)


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

    def loss_terms(self, ctx, batch):
        logits = ctx.deployed(batch.forget_x)
        deletion = ctx.deletion(logits, batch.forget_y)
        if ctx.step >= self.bad:
            deletion = deletion * float("nan")
        return {"deletion": deletion, "retention": F.cross_entropy(ctx.deployed(batch.proxy_x), batch.proxy_y)}


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
    with pytest.raises(ValueError, match="unknown method 'retrain'"):   # the oracle is a comparison job
        unlearn(torch.nn.Linear(2, 2), None, method="retrain")
    assert stakes.available_methods() == list(METHODS)
    with pytest.raises(TypeError, match="already shared options"):
        class Clash(UnlearningMethod):
            config_class = _options_with("lr")

            def loss_terms(self, ctx, batch):
                return {}

        register_method("clash", Clash())


def test_a_registered_class_is_instantiated_and_named():
    class Ascent(UnlearningMethod):
        uses_proxies = False

        def loss_terms(self, ctx, batch):
            return {"deletion": -F.cross_entropy(ctx.deployed(batch.forget_x), batch.forget_y)}

    m = register_method("ascent-only", Ascent)
    try:
        assert isinstance(m, Ascent) and m.name == "ascent-only" and get_method("ascent-only") is m
        # the paper preset gives a user's method the baselines' optimiser, StructGuard none
        assert stakes.preset("paper", method="ascent-only").momentum == 0.9
        assert stakes.preset("paper", method="structguard").momentum == 0.0
    finally:
        unregister_method("ascent-only")


def _options_with(name):
    """A MethodConfig subclass with one option ``name``."""
    import dataclasses

    from stakes.config import MethodConfig

    return dataclasses.make_dataclass("Options", [(name, float, 1.0)], bases=(MethodConfig,))


class _Boom(UnlearningMethod):
    uses_proxies = False

    def loss_terms(self, ctx, batch):
        raise RuntimeError("boom at step %d" % ctx.step)


def test_compare_records_a_failed_run_and_exits_with_status_1(tmp_path, stakes_cache, digits_model, monkeypatch):
    from stakes.cli import main

    monkeypatch.setenv("STAKES_CACHE", str(stakes_cache))
    register_method("boom", _Boom())
    try:
        rc = main(["compare", "--methods", "boom,neggrad", "--k", "4", "--seeds", "0", "--out", str(tmp_path),
                   "--no-progress", "--encoder", "prototype", "--set", "max_steps=2", "--set", "repetitions=1",
                   "--set", "pgd_steps=2", "--set", "eps=1.0", "--set", "backend=reference"])
    finally:
        unregister_method("boom")
    assert rc == 1   # the grid went on (neggrad ran) and the report was written, but a run failed
    runs = {r["method"]: r for r in __import__("json").loads((tmp_path / "results.json").read_text())["runs"]}
    assert runs["boom"]["status"] == "failed" and runs["boom"]["error"] == "RuntimeError: boom at step 0"
    assert runs["neggrad"]["status"] == "ok" and (tmp_path / "summary.md").exists()


def test_methods_written_against_the_old_run_object(digits_model, forget_set, fast_config):
    """Old hooks keep working through the context's deprecated names; private ones fail clearly."""
    seen = {}

    class OldStyle(UnlearningMethod):
        def loss_terms(self, run, batch):
            seen["lr"], seen["k"] = run.cfg.lr, len(run.fx)   # earlier names: config, forget set
            seen["align"] = run.cfg.align_weight if hasattr(run.options, "align_weight") else None
            return {"deletion": run.deletion(run.deployed(batch.forget_x), batch.forget_y)}

    with pytest.warns(DeprecationWarning, match=r"UnlearnContext.cfg is deprecated; use ctx.config"):
        unlearn(digits_model, forget_set, method=OldStyle(), config=fast_config(method=OldStyle(), max_steps=1))
    assert seen == {"lr": 0.005, "k": 8, "align": None}

    class Private(UnlearningMethod):
        def before_update(self, run):
            run.opt.zero_grad()

        def loss_terms(self, ctx, batch):
            return {"deletion": ctx.deletion(ctx.deployed(batch.forget_x), batch.forget_y)}

    with pytest.raises(AttributeError, match=r"no attribute 'opt' \(the optimiser's groups: ctx.param_groups\): "
                                             r"a method's hooks may use deployed, features"):
        unlearn(digits_model, forget_set, method=Private(), config=fast_config(method=Private(), max_steps=1))


def test_the_context_gives_the_documented_surface(digits_model, digits_anchors, forget_set, fast_config):
    from stakes.methods.context import _PUBLIC, UnlearnContext
    from tests.stakes.runs import prepared

    run = prepared(digits_model, forget_set, "structguard", digits_anchors, fast_config())
    ctx = run.ctx
    assert isinstance(ctx, UnlearnContext)
    for name in _PUBLIC:
        if name != "param_groups":
            getattr(ctx, name)
    with pytest.raises(RuntimeError, match="does not exist yet"):
        ctx.param_groups
    assert ctx.options.warm_start is True and ctx.config.lr == 0.005 and ctx.method == "structguard"
    assert torch.equal(ctx.forget_x, forget_set[0]) and len(ctx.proxies) == 16
