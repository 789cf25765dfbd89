"""The resumable state of a run: what a checkpoint must match (its fingerprint), the state itself,
and the proxy set in a side file written once (it is large and never changes during a run).

Files are written atomically by the main process alone (every process holds the same state);
reading is done by the main process and the state broadcast to the others.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from stakes import distributed as dist_
from stakes._io import atomic_torch_save
from stakes.proxy import ProxySet

# Config fields that may differ between runs of one recipe (they do not change the numbers).
NOT_IN_RECIPE = ("progress", "device", "log_every")


def recipe(config, options) -> dict:
    """The shared options and the method's own, without what may differ between runs of the same recipe."""
    shared = {k: v for k, v in config.to_dict().items() if k not in NOT_IN_RECIPE + ("method_options",)}
    return {**shared, "method_options": options.to_dict()}


class Checkpointer:
    """``path`` holds the state of the run after its last finished epoch; ``path + ".proxies"`` its proxy set."""

    def __init__(self, path: Optional[str], strategy, device: torch.device):
        self.path, self.strategy, self.device = path, strategy, device
        self._proxies_written = False

    @property
    def side(self) -> str:
        return (self.path or "") + ".proxies"

    def save(self, state: Callable[[], dict], proxies: ProxySet) -> None:
        """Write ``state()`` (and, the first time, ``proxies``) atomically, on the main process."""
        if not self.path or not self.strategy.is_main:
            return
        if not self._proxies_written:
            atomic_torch_save(proxies, self.side)
            self._proxies_written = True
        atomic_torch_save(state(), self.path)

    def load(self) -> Optional[dict]:
        """The saved state (None if there is none), on every process."""
        state = self.strategy.load_on_main(self.path, "checkpoint", required=False, map_location=self.device)
        return self.strategy.broadcast_object(state)

    def check(self, state: dict, fingerprint: dict) -> None:
        """The checkpoint belongs to this run (same forget set and recipe), else ValueError."""
        saved = state.get("fingerprint")
        if saved != fingerprint:
            diff = sorted(k for k in fingerprint if (saved or {}).get(k) != fingerprint[k])
            raise ValueError(f"checkpoint {self.path!r} belongs to a different run (differs in {diff}); "
                             "delete it or pass another checkpoint path")

    def load_proxies(self) -> ProxySet:
        """The checkpoint's proxy set: read by the main process, broadcast to the others."""
        proxies = self.strategy.load_on_main(self.side, "the proxy set of the checkpoint", required=True,
                                             map_location=self.device)
        self._proxies_written = True
        ctx = self.strategy.dist
        if not ctx.enabled:
            return proxies
        meta = dist_.broadcast_object(None if not ctx.is_main else
                                      {"eps": proxies.eps, "success_rate": proxies.success_rate}, ctx)
        x, y, src = (dist_.broadcast_tensor(getattr(proxies, name) if ctx.is_main else None, ctx, device="cpu")
                     for name in ("x", "y", "source"))
        return ProxySet(x=x, y=y, source=src, eps=meta["eps"], success_rate=meta["success_rate"])

    def remove(self) -> None:
        """Delete the state and the proxy side file (the run finished)."""
        if not self.path or not self.strategy.is_main:
            return
        for path in (self.path, self.side):
            if os.path.exists(path):
                os.remove(path)
