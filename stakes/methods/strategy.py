"""What differs between a run on one process and a data-parallel run, behind one interface (the
shape of Lightning Fabric's strategies): the loop calls these and never asks which one it has.

* :class:`SingleProcess` — the trivial strategy: the whole batch, ``autograd`` gradients, every
  reduction the identity.
* :class:`DataParallel` — ``torch.distributed`` (NCCL on GPUs, gloo on CPUs), one device per rank:
  each rank takes its contiguous shard of the global proxy batch (and of the forget batch when it
  has an image per rank), the loss goes through ``DistributedDataParallel`` (whose backward
  averages the gradients), the terms that are means over a sharded batch are weighted by the
  shard's share, BatchNorm that trains on shards uses global statistics, and evaluation counts,
  logged terms and the non-finite flag are all-reduced. See :mod:`stakes.distributed`.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Optional, Sequence

import torch

from stakes import distributed as dist_
from stakes.execution import Execution
from stakes.methods.base import Batch


class SingleProcess:
    """One process: every primitive is the identity."""

    def __init__(self, dist_ctx: dist_.DistContext = dist_.SINGLE):
        self.dist = dist_ctx

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def setup(self, ctx, method, execution: Optional[Execution] = None) -> None:
        """Called once the run's modules exist; ``execution``: the run's precision policy (the
        method's loss terms and the importance losses run under its autocast)."""
        self.ctx, self.method, self.execution = ctx, method, execution or Execution()

    # ------------------------------------------------------------------ data
    def rows(self, n: int) -> slice:
        """This process's contiguous rows of a global batch (or evaluation set) of ``n``."""
        return slice(0, n)

    def forget_shard(self, n: int) -> Optional[slice]:
        """This process's rows of a global forget batch of ``n``, or None to compute it whole."""
        return None

    # ------------------------------------------------------------------ gradients
    def loss(self, batch: Batch) -> tuple:
        """``(loss, terms, contributions)`` of one step: the loss to backpropagate, the method's
        terms, and each term's share of its value over the global batch (for logging)."""
        with self.execution.autocast():
            terms = self.method.loss_terms(self.ctx, batch)
        return sum(terms.values()), terms, terms

    def batch_gradient(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                       params: Sequence[torch.Tensor]) -> list:
        with self.execution.autocast():
            loss = loss_fn(x)
        return self.execution.gradients(loss, params)

    # ------------------------------------------------------------------ reductions
    def logged_terms(self, contributions: dict) -> dict:
        """The value of each term over the global batch."""
        return contributions

    def sum(self, values: list) -> list:
        """Element-wise sum of ``values`` (floats) over the processes."""
        return values

    def mean(self, local_mean: float, local_count: int) -> float:
        """The mean over all rows of a quantity whose mean over this process's ``local_count`` rows
        is ``local_mean``."""
        return local_mean

    def first_step(self, local: torch.Tensor) -> int:
        """The smallest of the processes' non-negative step numbers in ``local`` (−1: none)."""
        return int(local)

    # ------------------------------------------------------------------ files and checks
    def broadcast_object(self, obj):
        return obj

    def load_on_main(self, path: str, what: str, *, required: bool, map_location):
        return dist_.load_on_main(path, self.dist, what, required=required, map_location=map_location)

    def check_launch(self, parts: dict, n_pairs: Optional[int], smallest_batch: Optional[int]) -> None:
        """Every process got the same run (digests in ``parts``) and the world fits the work (the
        (image, repetition) pairs and the smallest batch; None: nothing to split)."""

    def maybe_inject_fault(self, epoch: int) -> None:
        dist_.maybe_inject_fault("epoch_end", epoch, self.dist)

    def record(self) -> dict:
        return self.dist.record()


class DataParallel(SingleProcess):
    """Data parallelism over an initialised process group (module docstring)."""

    def __init__(self, dist_ctx: dist_.DistContext, device: torch.device):
        super().__init__(dist_ctx)
        dist_.group_device_ok(dist_ctx, device)
        self.device = device
        self._ddp = None
        self._replicated_checked = False

    def rows(self, n: int) -> slice:
        return self.dist.rows(n)

    def forget_shard(self, n: int) -> Optional[slice]:
        return self.dist.rows(n) if n >= self.dist.world_size else None

    def _module(self):
        """The DistributedDataParallel module whose forward runs a closure over the trainable modules
        (features, head, projector): its all-reduce averages the gradients of training and importance."""
        if self._ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            self._sync_batchnorm()
            ctx = self.ctx
            step = _StepModule(ctx.features, ctx.head, ctx.projector)
            ids = None
            if self.device.type == "cuda":
                ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
            # find_unused_parameters: methods use different parts of the model (importance: the backbone);
            # buffers are never broadcast at forward: the ranks' buffers are equal (or synchronised BatchNorm)
            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                       inspect.signature(DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False})
            self._ddp = DistributedDataParallel(step, device_ids=ids, find_unused_parameters=True, **no_sync)
        return self._ddp

    def _sync_batchnorm(self) -> None:
        """BatchNorm layers that run in training mode on proxy shards use the global batch's statistics
        (torch.nn.SyncBatchNorm on CUDA; an all-reduce version on other devices)."""
        ctx = self.ctx
        targets = [ctx.features] if ctx.config.bn_train_mode else []
        if ctx.projector is not None and not ctx.projector.frozen_bn:
            targets.append(ctx.projector)
        for module in targets:
            dist_.convert_sync_batchnorm(module, self.device)

    def batch_gradient(self, loss_fn, x, params) -> list:
        part = x[self.dist.rows(len(x))]
        share = self.dist.world_size * len(part) / len(x)   # DDP divides the sum by the world size
        ddp = self._module()

        def gradients_of(scale: float) -> list:   # all-reduced: every rank takes the same decisions
            for p in ddp.parameters():
                p.grad = None
            with self.execution.autocast():
                loss = ddp(lambda: loss_fn(part) * (share * scale))
            loss.backward()
            grads = [p.grad for p in params]
            for p in ddp.parameters():
                p.grad = None
            return grads

        return self.execution.unscaled_gradients(gradients_of)

    def loss(self, batch: Batch) -> tuple:
        loss, terms, contrib = self._module()(lambda: self._local_loss(batch))
        if not self._replicated_checked:
            self._check_replicated(terms, batch)
        return loss, terms, contrib

    def _local_loss(self, batch: Batch):
        """This rank's loss (proxy terms weighted by its share of the global batch, W× for DDP's mean),
        the terms, and each term's contribution to the global value (summed over ranks at log points)."""
        with self.execution.autocast():
            terms = self.method.loss_terms(self.ctx, batch)
        w = self.dist.world_size
        shares = self._shares(batch)
        scaled = {n: v * (w * shares[n]) if n in shares else v for n, v in terms.items()}
        contrib = {n: (v * shares[n] if n in shares else v / w) for n, v in terms.items()}
        return sum(scaled.values()), terms, contrib

    def _shares(self, batch: Batch) -> dict:
        """This rank's share of the global batch, for each term that is a mean over a sharded batch
        (the proxy batch always; the forget batch when it is split)."""
        out = {n: batch.proxy_x.shape[0] / batch.n_proxy for n in self.method.proxy_terms}
        if batch.forget_total is not None:
            out.update({n: batch.forget_x.shape[0] / batch.n_forget for n in self.method.forget_terms})
        return out

    def _check_replicated(self, terms: dict, batch: Batch) -> None:
        """At the first step: the terms that are not means over a sharded batch must agree on every rank."""
        self._replicated_checked = True
        sharded = self._shares(batch)
        names = [n for n in terms if n not in sharded]
        if not names:
            return
        mine = [float(torch.as_tensor(terms[n]).detach().double().sum()) for n in names]
        every = dist_.all_gather_object(mine, self.dist)
        bad = [n for j, n in enumerate(names)
               if any(not math.isclose(v[j], every[0][j], rel_tol=1e-5, abs_tol=1e-7) for v in every)]
        if bad:
            raise ValueError(f"method {self.ctx.method!r}: loss term(s) {bad} differ between ranks at the first step "
                             f"({', '.join(f'{n}: ' + str([round(v[names.index(n)], 6) for v in every]) for n in bad)}): "
                             "they depend on the rank's shard of the batch; list them in the method's proxy_terms or "
                             "forget_terms (terms that are means over the proxy or the forget batch) so that the "
                             "data-parallel gradient is the single-process one")

    def logged_terms(self, contributions: dict) -> dict:
        """One all-reduce of the terms' contributions, at log points only."""
        if not contributions:
            return contributions
        names = list(contributions)
        vec = torch.stack([torch.as_tensor(contributions[n]).detach().float().sum() for n in names])
        dist_.all_reduce_(vec, self.dist)
        return dict(zip(names, vec.unbind()))

    def sum(self, values: list) -> list:
        return dist_.all_reduce_(torch.tensor(values, dtype=torch.float64), self.dist).tolist()

    def mean(self, local_mean: float, local_count: int) -> float:
        total, n = self.sum([local_mean * local_count if local_count else 0.0, float(local_count)])
        return total / n if n else float("nan")

    def first_step(self, local: torch.Tensor) -> int:
        big = torch.iinfo(torch.long).max
        first_t = torch.where(local >= 0, local, torch.full_like(local, big))
        first = int(dist_.all_reduce_(first_t.clone(), self.dist, "min"))
        return -1 if first == big else first

    def broadcast_object(self, obj):
        return dist_.broadcast_object(obj, self.dist)

    def load_on_main(self, path: str, what: str, *, required: bool, map_location):
        return dist_.load_on_main(path, self.dist, what, required=required, map_location="cpu")

    def check_launch(self, parts: dict, n_pairs: Optional[int], smallest_batch: Optional[int]) -> None:
        dist_.check_same_across_ranks(parts, self.dist, f"{self.ctx.method} run")
        if n_pairs is not None:
            dist_.world_size_check(n_pairs, smallest_batch, self.dist)


class _StepModule(torch.nn.Module):
    """What DistributedDataParallel wraps: the trainable modules, and a forward that runs a closure
    over them (a step's loss terms, or an importance batch's loss)."""

    def __init__(self, features, head, projector):
        super().__init__()
        self.features, self.head, self.projector = features, head, projector

    def forward(self, fn: Callable):
        return fn()


def strategy_for(dist_ctx: dist_.DistContext, device: torch.device) -> SingleProcess:
    """The strategy of a run: data-parallel inside an initialised process group, else one process."""
    return DataParallel(dist_ctx, device) if dist_ctx.enabled else SingleProcess(dist_ctx)
