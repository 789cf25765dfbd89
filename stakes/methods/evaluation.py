"""The evaluation at every log point of a run: forget accuracy, the accuracy on each evaluation set
and the held-out structure drift (METHOD.md §11), through the deployed model.

One code path for one process and many: each process evaluates its rows of each evaluation set
(all of them on one process) and the strategy reduces the counts and the drift (the identity on one
process), so every process holds the same entry. The original model's side of the drift is computed
once per run.
"""

from __future__ import annotations

from typing import Optional

import torch

from stakes.execution import Execution
from stakes.metrics import accuracy, structure_drift

CHUNK = 512   # rows per forward pass


class Evaluator:
    """``evaluator()`` → ``{"forget_accuracy", "<set>_accuracy", ..., "structure_drift"}`` (percent;
    the drift on the "test" set, when the run has anchors and a test set)."""

    def __init__(self, ctx, eval_sets: dict, strategy, execution: Optional[Execution] = None):
        self.ctx, self.strategy, self.execution = ctx, strategy, execution or Execution()
        # this process's rows of each set (all of them on one process)
        self.sets = {name: tuple(t[strategy.rows(len(t))] for t in pair) for name, pair in eval_sets.items()}
        self.sizes = {name: len(pair[1]) for name, pair in eval_sets.items()}
        self.drift_set: Optional[str] = "test" if ctx.anchors is not None and "test" in eval_sets else None
        self._drift_orig: Optional[torch.Tensor] = None   # g_ψ0(x)·R_p of the drift set's rows, fixed for the run

    @torch.no_grad()
    def __call__(self) -> dict:
        with self.execution.autocast():
            return self._evaluate()

    def _evaluate(self) -> dict:
        ctx, exe = self.ctx, self.execution
        ctx.deployed.eval()
        out = {"forget_accuracy": accuracy(ctx.deployed, ctx.forget_x, ctx.forget_y)}
        names, hits = list(self.sets), []
        for name in names:
            x, y = self.sets[name]
            correct = 0.0
            if len(x):
                feats, hit = [], []
                for i in range(0, len(x), CHUNK):   # the deployed model, chunk by chunk (as metrics.predict)
                    f = ctx.features(exe.inputs(x[i:i + CHUNK]))
                    emb = f if ctx.projector is None else ctx.projector(f)[0]
                    hit.append(ctx.head(emb).argmax(1).eq(y[i:i + CHUNK]))
                    feats.append(f)
                correct = float(torch.cat(hit).sum())
                if name == self.drift_set:
                    drift = self._drift(x, torch.cat(feats))
            if name == self.drift_set:
                out["structure_drift"] = self.strategy.mean(drift if len(x) else 0.0, len(x))
            hits.append(correct)
        for name, correct in zip(names, self.strategy.sum(hits)):
            n = self.sizes[name]
            # a float32 mean of the hits, in percent (NaN for an empty set)
            out[f"{name}_accuracy"] = 100.0 * float(torch.tensor(correct, dtype=torch.float32) / n) if n else float("nan")
        ctx.train_mode()
        return out

    def _drift(self, x: torch.Tensor, feats: torch.Tensor) -> float:
        """1 − mean cos(S^ori, S^unl) over this process's rows of the drift set."""
        ctx = self.ctx
        if self._drift_orig is None:
            exe = self.execution
            self._drift_orig = torch.cat([ctx.orig_structure_input(exe.inputs(x[i:i + CHUNK]))
                                          for i in range(0, len(x), CHUNK)])
        return structure_drift(self._drift_orig, feats @ ctx.rp, ctx.anchors)
