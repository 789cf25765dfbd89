"""Non-finite losses and parameters: a run stops with :class:`NonFiniteError`, naming the first bad
step and what was non-finite, and writes nothing.

Between log points a step makes no host synchronisation: a non-finite loss is only recorded in a
flag on the device (:class:`NonFiniteWatch`), read at the next log point, epoch end or the end of
the run (on several processes with one all-reduce, so that every process stops at the same point).
"""

from __future__ import annotations

import torch


class NonFiniteError(RuntimeError):
    """A loss or parameter became NaN/inf; the run is stopped and nothing is written."""


class NonFiniteWatch:
    """The first step whose loss was non-finite, and which terms were, kept on the device."""

    def __init__(self, method: str, device: torch.device, strategy):
        self.method, self.strategy = method, strategy
        self._bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self._bad_terms: dict = {}
        self.checked_step = 0

    def record(self, step: int, terms: dict, loss: torch.Tensor) -> None:
        """Device-side bookkeeping of one step (no host synchronisation)."""
        first = ~torch.isfinite(loss.detach()) & (self._bad_step < 0)   # this step is the first bad one
        self._bad_step = torch.where(first, step, self._bad_step)
        for name, value in terms.items():   # the terms that were non-finite at that first step
            flag = first & ~torch.isfinite(torch.as_tensor(value).detach()).all()
            prev = self._bad_terms.get(name)
            self._bad_terms[name] = flag if prev is None else prev | flag

    def check(self, where: str, step: int) -> None:
        """Raise :class:`NonFiniteError` if a loss since the last check was non-finite (one host sync)."""
        first = self.strategy.first_step(self._bad_step)
        if first >= 0:
            names = [n for n, flag in self._bad_terms.items() if bool(flag)]
            raise NonFiniteError(
                f"{self.method}: non-finite loss at step {first} (detected at the {where}, after steps "
                f"{self.checked_step}-{step}; non-finite at that step: {', '.join(names) or 'the sum only'}); "
                "the run was stopped and no model was written")
        self.checked_step = step


def check_finite_parameters(ctx, where: str) -> None:
    """Raise :class:`NonFiniteError` naming the first non-finite parameter (one host sync if none)."""
    named = [(f"{name}.{pname}", p) for name, module in
             (("features", ctx.features), ("head", ctx.head), ("projector", ctx.projector))
             if module is not None for pname, p in module.named_parameters()]
    if not named:
        return
    finite = torch.stack([torch.isfinite(p).all() for _, p in named])
    if bool(finite.all()):
        return
    bad = next(n for (n, _), ok in zip(named, finite.tolist()) if not ok)
    raise NonFiniteError(f"{ctx.method}: parameter {bad} became non-finite at step {ctx.step} ({where}); "
                         "the run was stopped and no model was written")
