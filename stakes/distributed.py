"""Data-parallel unlearning on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs, launched by
``torchrun``): the process-group context of a run and the few collectives the framework needs.

    torchrun --standalone --nproc-per-node=8 -m stakes unlearn --device cuda ...
    torchrun --nnodes=4 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 -m stakes unlearn ...

Inside Python, :func:`stakes.unlearn` runs data-parallel by itself when the default process group
is initialised (``distributed=False`` keeps it on one process). What is split and what is not:

* **proxies** — rank 0 calibrates the radius and broadcasts it; rank r attacks the contiguous
  slice :func:`shard_range` of the R·k (forget image, repetition) pairs and the slices are
  all-gathered, so every rank holds the same proxy set (each proxy's randomness is keyed by its
  index, so the set does not depend on the world size).
* **training** — every global proxy batch (``proxy_batch_size`` is global) is split into
  contiguous per-rank shards; the forget batch is small and every rank computes it whole. The
  gradients are averaged by ``DistributedDataParallel`` and every rank applies the same fused
  update, so the parameters stay identical on every rank (and equal to a single-process run's
  within rounding).
* **importance** — each global batch's gradient goes through the same DDP all-reduce before the
  absolute value is taken.
* **files** — rank 0 alone reads checkpoints and writes results and checkpoints.

``fused`` itself stays per-device.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800.0   # torch's own default for collectives


class DistributedError(RuntimeError):
    """A collective failed: another rank died, or a collective timed out."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in its process group (world size 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    forced: bool = False   # a group of one process that takes the data-parallel path (STAKES_DISTRIBUTED=1)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.forced

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def record(self) -> dict:
        """What a result records: ``{"world_size": N, "backend": ...}``."""
        return {"world_size": self.world_size, "backend": self.backend}

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (:func:`shard_range`; all of them on one process)."""
        return slice(*shard_range(n, self.rank, self.world_size))

    def batches(self, n: int, batch_size: int) -> list:
        """This rank's rows of ``n`` items in slices of ⌈batch_size / W⌉ (``batch_size`` is global)."""
        mine, step = self.rows(n), -(-batch_size // self.world_size)
        return [slice(i, min(i + step, mine.stop)) for i in range(mine.start, mine.stop, step)]


SINGLE = DistContext()


def current() -> DistContext:
    """The context of the initialised default process group, or the single-process one."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                           local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())), backend=dist.get_backend(),
                           forced=forced_by_env())
    return SINGLE


def forced_by_env() -> bool:
    """``STAKES_DISTRIBUTED=1``: under torchrun, form the process group and take the data-parallel
    path even with one process (DDP, SyncBatchNorm and the collectives, NCCL on a GPU), so one GPU
    exercises what a multi-GPU job runs."""
    return os.environ.get("STAKES_DISTRIBUTED") == "1"


def wants_group() -> bool:
    """Whether this process should join a process group: torchrun's environment with a world size
    above 1, or of 1 with ``STAKES_DISTRIBUTED=1``."""
    return launched_by_torchrun() and (int(os.environ.get("WORLD_SIZE", "1")) > 1 or forced_by_env())


def resolve(distributed) -> DistContext:
    """``unlearn(distributed=...)``: None → the default group if initialised, False → one process,
    a :class:`DistContext` as given."""
    if distributed is None or distributed is True:
        ctx = current()
        if distributed is True and not ctx.enabled and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs an initialised process group "
                             "(torch.distributed.init_process_group, or launch with torchrun)")
        return ctx
    if distributed is False:
        return SINGLE
    if isinstance(distributed, DistContext):
        return distributed
    raise TypeError(f"distributed must be None, True, False or a stakes.distributed.DistContext, "
                    f"got {type(distributed).__name__}")


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting the env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def restart_count() -> int:
    """How many times torchrun restarted this job (``--max-restarts``); 0 on the first attempt."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def init_from_env(device: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, backend: Optional[str] = None) -> tuple:
    """Initialise the default process group from torchrun's environment; returns ``(ctx, device)``.

    The backend is NCCL for CUDA devices and gloo otherwise (``backend`` overrides); a CUDA device
    becomes ``cuda:LOCAL_RANK``, one device per process. Without torchrun's environment (or with a
    world size of 1, unless ``STAKES_DISTRIBUTED=1``) nothing is initialised and ``device`` is
    returned as given.
    """
    if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"the collective timeout must be a number of seconds > 0, got {timeout_s!r}")
    if dist.is_available() and dist.is_initialized():
        return current(), device
    if not wants_group():
        return SINGLE, device
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    dev = torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda under torchrun, but this machine has no CUDA device")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                             "device(s): start at most one process per GPU (--nproc-per-node)")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    kwargs = {"device_id": torch.device(device)} if backend == "nccl" else {}
    timeout = datetime.timedelta(seconds=float(timeout_s))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # the rendezvous store, with a prefix per torchrun attempt: torchrun keeps its store across
    # --max-restarts, and a restarted gloo group would otherwise read the dead attempt's addresses
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent and rank == 0, timeout=timeout, multi_tenant=not agent)
    store = dist.PrefixStore(f"stakes/attempt_{restart_count()}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs)
    return current(), device


def shutdown() -> None:
    """Destroy the default process group if this process initialised one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- splitting


def shard_range(n: int, rank: int, world_size: int) -> tuple:
    """``[lo, hi)`` of rank ``rank``'s contiguous share of ``n`` items (sizes differ by at most 1)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def _comm_device(ctx: DistContext, t: Optional[torch.Tensor] = None) -> torch.device:
    """Where a collective's buffer lives: this rank's GPU for NCCL, the CPU for gloo."""
    if ctx.backend == "nccl":
        return t.device if t is not None and t.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _failure_text(err: BaseException, subject: str) -> str:
    """``rank R: SUBJECT failed: another rank died or a collective timed out (the error's first line)``."""
    rank = dist.get_rank() if dist.is_initialized() else "?"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"rank {rank}: {subject} failed: another rank died or a collective timed out "
            f"({type(err).__name__}: {first[:300]})")


@contextlib.contextmanager
def _collective(what: str):
    """Turn a failed collective (torch's DistError is a RuntimeError) into a :class:`DistributedError`
    that says what happened."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as err:
        raise DistributedError(_failure_text(err, f"the collective '{what}'")) from err


_FAILURE_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "broken pipe",
                  "distbackend", "process group", "processgroup")


def group_failure(err: BaseException) -> Optional[str]:
    """The message of a :class:`DistributedError` if ``err`` is a failed collective of this job's
    process group (raised inside autograd by DDP's all-reduce, say), else None."""
    if isinstance(err, DistributedError):
        return str(err)
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    text = f"{type(err).__name__} {err}".lower()
    if isinstance(err, getattr(dist, "DistError", ())) or any(w in text for w in _FAILURE_WORDS):
        return _failure_text(err, "the process group")
    return None


def all_gather_rows(part: torch.Tensor, n_total: int, ctx: DistContext) -> torch.Tensor:
    """The whole ``[n_total, ...]`` tensor from every rank's rows :func:`shard_range`."""
    if not ctx.enabled:
        return part
    shares = [DistContext(rank=r, world_size=ctx.world_size).rows(n_total) for r in range(ctx.world_size)]
    mine = shares[ctx.rank].stop - shares[ctx.rank].start
    if part.shape[0] != mine:
        raise ValueError(f"rank {ctx.rank} holds {part.shape[0]} rows, expected {mine} of {n_total}")
    width = -(-n_total // ctx.world_size)   # the largest share
    dtype = part.dtype
    send = part.to(torch.uint8) if dtype == torch.bool else part
    dev = _comm_device(ctx, part)
    buf = torch.zeros((width, *part.shape[1:]), dtype=send.dtype, device=dev)
    buf[:mine] = send.to(dev)
    out = [torch.empty_like(buf) for _ in range(ctx.world_size)]
    with _collective("all_gather"):
        dist.all_gather(out, buf)
    rows = [o[: s.stop - s.start] for o, s in zip(out, shares)]
    full = torch.cat(rows).to(part.device)
    return full.to(torch.bool) if dtype == torch.bool else full


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; for small objects)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.rank == src else None]
    with _collective("broadcast_object"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensor(t: Optional[torch.Tensor], ctx: DistContext, *, device, src: int = 0) -> torch.Tensor:
    """Tensor ``t`` of rank ``src`` on every rank (other ranks pass None), on ``device``."""
    if not ctx.enabled:
        return t
    meta = broadcast_object(None if ctx.rank != src else (tuple(t.shape), str(t.dtype)), ctx, src)
    shape, dtype = meta[0], getattr(torch, meta[1].replace("torch.", ""))
    comm = _comm_device(ctx)
    buf = t.to(comm).contiguous() if ctx.rank == src else torch.empty(shape, dtype=dtype, device=comm)
    if dtype == torch.bool:
        buf = buf.to(torch.uint8)
    with _collective("broadcast"):
        dist.broadcast(buf, src=src)
    return (buf.to(torch.bool) if dtype == torch.bool else buf).to(device)


def all_gather_object(obj: Any, ctx: DistContext) -> list:
    """Every rank's ``obj``, in rank order."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    with _collective("all_gather_object"):
        dist.all_gather_object(out, obj)
    return out


def all_reduce_(t: torch.Tensor, ctx: DistContext, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of ``t`` (``op``: sum, min or max)."""
    if not ctx.enabled:
        return t
    reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    dev = _comm_device(ctx, t)
    buf = t if t.device == dev else t.to(dev)
    with _collective(f"all_reduce({op})"):
        dist.all_reduce(buf, op=reduce_op)
    if buf is not t:
        t.copy_(buf)
    return t


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        with _collective("barrier"):
            dist.barrier()


@contextlib.contextmanager
def main_first(ctx: DistContext):
    """Rank 0 runs the block first (it may pretrain and cache a model, build anchors), then the
    other ranks run it (reading the cache)."""
    if not ctx.is_main:
        barrier(ctx)
    yield
    if ctx.is_main:
        barrier(ctx)


def load_on_main(path: str, ctx: DistContext, what: str, *, required: bool, map_location="cpu"):
    """``torch.load(path)`` on rank 0 alone (the other ranks get None; so does rank 0 for a missing
    file that is not ``required``). A file rank 0 cannot read raises ValueError naming ``what`` on
    every rank."""
    obj, error = None, None
    if ctx.is_main and (required or os.path.exists(path)):
        try:
            obj = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as err:
            error = f"cannot read {what} {path!r}: {err}"
    error = broadcast_object(error, ctx)
    if error:
        raise ValueError(error)
    return obj


# ----------------------------------------------------------------------------- BatchNorm over ranks


class AllReduceBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are the global batch's: the per-channel sums go
    through the differentiable ``torch.distributed.nn`` all-reduce (two passes: mean, then the
    centred second moment). For the devices torch.nn.SyncBatchNorm refuses (CPU / gloo); eval mode
    and a process without a group are plain BatchNorm."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions, got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        total = all_reduce(torch.cat([xf.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = xf - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: torch.nn.Module, device) -> torch.nn.Module:
    """Make ``module``'s BatchNorm layers use the global batch's statistics, in place (the
    parameters and buffers are the same objects): torch.nn.SyncBatchNorm on CUDA,
    :class:`AllReduceBatchNorm` elsewhere."""
    if torch.device(device).type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
                child, (AllReduceBatchNorm, torch.nn.SyncBatchNorm)):
            new = AllReduceBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return module


# ----------------------------------------------------------------------------- launch checks


def digest(obj: Any) -> str:
    """A short sha256 of tensors (their bytes), lists, dicts and JSON-able values."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(json.dumps(x, sort_keys=True, default=str).encode())

    feed(obj)
    return h.hexdigest()[:16]


def check_same_across_ranks(parts: dict, ctx: DistContext, what: str = "run") -> None:
    """Raise ValueError unless every rank has the same ``parts`` (name → digest): a launch whose
    ranks were given different configs, models, forget sets or anchors."""
    if not ctx.enabled:
        return
    every = all_gather_object(parts, ctx)
    bad = sorted({name for p in every for name in set(p) | set(parts) if p.get(name) != every[0].get(name)})
    if bad:
        detail = "; ".join(f"{name}: " + ", ".join(f"rank {r} {p.get(name)}" for r, p in enumerate(every))
                           for name in bad)
        raise ValueError(f"mismatched launch: the ranks of this {what} were given different {', '.join(bad)} "
                         f"(digests {detail}); every rank must run the same command on the same files")


def world_size_check(n_pairs: int, smallest_batch: int, ctx: DistContext, batch_name: str = "proxy_batch_size") -> None:
    """A data-parallel run needs at least one (forget image, repetition) pair and one proxy of every
    global batch per rank."""
    if not ctx.enabled:
        return
    if ctx.world_size > n_pairs:
        raise ValueError(f"world size {ctx.world_size} > {n_pairs} (forget image, repetition) pairs: every rank "
                         f"attacks a share of the pairs; use at most {n_pairs} processes or more repetitions / a "
                         "larger forget set")
    if ctx.world_size > smallest_batch:
        raise ValueError(f"world size {ctx.world_size} > {smallest_batch}, the smallest global proxy batch of an "
                         f"epoch: every rank trains on a share of each batch; use at most {smallest_batch} processes "
                         f"or a {batch_name} that leaves every batch at least {ctx.world_size} proxies")


# ----------------------------------------------------------------------------- fault injection (tests)


def maybe_inject_fault(where: str, epoch: int, ctx: DistContext) -> None:
    """A test hook: ``STAKES_FAULT=RANK:EPOCH[:hang]`` makes rank RANK exit with status 17 (or hang)
    at the end of epoch EPOCH, on the first attempt of a torchrun job only (so that a restarted job
    runs through). Unset in normal use."""
    spec = os.environ.get("STAKES_FAULT")
    if not spec or where != "epoch_end" or restart_count() > 0:
        return
    fields = spec.split(":")
    try:
        rank, at = int(fields[0]), int(fields[1])
    except (ValueError, IndexError):
        raise ValueError(f"STAKES_FAULT must be RANK:EPOCH[:hang], got {spec!r}") from None
    if ctx.rank != rank or epoch != at:
        return
    import sys
    import time

    if len(fields) > 2 and fields[2] == "hang":
        print(f"stakes: STAKES_FAULT: rank {rank} hangs at the end of epoch {epoch}", file=sys.stderr, flush=True)
        time.sleep(3600)
    print(f"stakes: STAKES_FAULT: rank {rank} exits at the end of epoch {epoch}", file=sys.stderr, flush=True)
    os._exit(17)


def group_device_ok(ctx: DistContext, device: torch.device) -> None:
    """NCCL needs CUDA tensors; refuse a CPU run on an NCCL group with a clear error."""
    if ctx.enabled and ctx.backend == "nccl" and device.type != "cuda":
        raise ValueError(f"the process group uses NCCL but the run's device is {device}; use --device cuda "
                         "(one GPU per process) or a gloo group for CPU runs")


def contiguous_chunks(items: Sequence, world_size: int) -> list:
    """``items`` split into ``world_size`` contiguous, near-equal chunks (some may be empty)."""
    return [list(items[DistContext(rank=r, world_size=world_size).rows(len(items))]) for r in range(world_size)]
