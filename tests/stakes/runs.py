"""A run prepared up to its first step, for tests of the pieces a run is built from (importance,
optimiser groups) without running the loop."""

from stakes import distributed as dist_
from stakes.methods import get_method
from stakes.methods import loop


def prepared(model, forget_set, method, anchors, cfg, *, proxies=None, retain_size=100, distributed=None):
    """The run's private state (``run.ctx`` is what the method's hooks see), with its proxy set."""
    method = get_method(method) if isinstance(method, str) else method
    run = loop._prepare(model, forget_set, method, anchors, cfg, None, proxies, (), None, retain_size,
                        dist_.resolve(distributed))
    if run.ctx.proxies is None:
        run.ctx.proxies, _ = loop.build_proxies(run.ctx.orig, run.ctx.forget_x, run.ctx.forget_y, cfg,
                                                distributed=run.strategy.dist)
    return run


def optimizer(run):
    """The run's optimiser with the method's importance and masks (as the loop builds it)."""
    run.opt = loop._build_optimizer(run)
    run.ctx._optimizer = run.opt
    return run.opt
