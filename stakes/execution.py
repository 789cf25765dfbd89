"""How a run executes the model work on its device: the precision policy (autocast), channels_last,
``torch.compile`` and CUDA graphs for the PGD loop. None of these change what is computed, only
in which dtype and how fast; ``config.precision`` / ``channels_last`` / ``compile`` / ``cuda_graphs``
choose them and :class:`Execution` is what a run resolves them to (recorded in its result).

Defaults (``None``: automatic): bf16 autocast on CUDA cards that have bf16 (sm_80+), fp32 on the
CPU and older cards; channels_last for models with 4-D convolutions (on CUDA, and on the CPU, where
oneDNN's convolutions ran the PGD step 1.3-1.5x and a forward 2x faster in it: ``benchmarks``,
README "A whole run"); CUDA graphs for the PGD
steps on CUDA; compile off. Master weights stay fp32 whatever the precision; the loss reductions run
in fp32 (autocast's policy for cross-entropy and reductions; the fused alignment accumulates in fp32
from 16-bit features); the fused update and importance work on the fp32 parameters and gradients;
fp16 adds a gradient scaler to training steps.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import warnings
import weakref
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn

PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("off", "frozen", "default", "max-autotune")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_FP16_LOSS_SCALE = 2.0 ** 16   # GradScaler's initial scale


def default_precision(device) -> str:
    """bf16 on CUDA cards with bf16 tensor cores (sm_80+), else fp32."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability(device)
        return "bf16" if major >= 8 else "fp32"
    return "fp32"


def has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


@dataclass(frozen=True)
class Execution:
    """A run's resolved execution policy (what its result records)."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: str = "off"
    cuda_graphs: bool = False
    device_type: str = "cpu"
    # fp16: the loss scale the last loss-scaled gradient settled on (unscaled_gradients starts there)
    _loss_scale: list = field(default_factory=lambda: [_FP16_LOSS_SCALE], repr=False, compare=False)

    @classmethod
    def resolve(cls, config, model: Optional[nn.Module] = None) -> "Execution":
        """The policy of ``config`` (its ``None`` fields resolved for its device and ``model``)."""
        device = torch.device(config.device)
        precision = config.precision or default_precision(device)
        if precision not in PRECISIONS:
            raise ValueError(f"config.precision must be one of {PRECISIONS} or None, got {precision!r}")
        channels_last = config.channels_last
        if channels_last is None:   # convolutional models on a card and on the CPU (oneDNN's NHWC kernels)
            channels_last = device.type in ("cuda", "cpu") and model is not None and has_conv2d(model)
        graphs = config.cuda_graphs if config.cuda_graphs is not None else device.type == "cuda"
        if graphs and device.type != "cuda":
            raise ValueError(f"config.cuda_graphs=True needs a CUDA device, the run's is {device}")
        return cls(precision=precision, channels_last=bool(channels_last), compile=config.compile,
                   cuda_graphs=bool(graphs), device_type=device.type)

    # ------------------------------------------------------------------ precision
    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The dtype autocast computes in (None for fp32)."""
        return _DTYPES.get(self.precision)

    def autocast(self):
        """The autocast context of the model work (a no-op for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.precision])

    def grad_scaler(self):
        """A gradient scaler for fp16 training steps (None otherwise)."""
        if self.precision != "fp16":
            return None
        return torch.amp.GradScaler(self.device_type)

    def unscaled_gradients(self, gradients_of):
        """The gradients ``gradients_of(scale)`` returns (those of ``scale`` × the loss), divided
        back by ``scale``. Under fp16 the loss is scaled, from the scale the previous call settled
        on (2**16 at first) down by halves while any gradient overflows (down to 2**-16, then taken
        as they are), so that gradients below fp16's range survive the 16-bit backward (the
        importance pass's |∂L/∂ψ|, which a training step's GradScaler does not cover): a run's
        importance batches pay the halvings once, not once a batch. One host synchronisation a
        call. Otherwise ``gradients_of(1.0)``."""
        if self.precision != "fp16":
            return gradients_of(1.0)
        scale = self._loss_scale[0]
        while True:
            grads = gradients_of(scale)
            present = [g for g in grads if g is not None]
            finite = not present or bool(torch.stack([torch.isfinite(g).all() for g in present]).all())
            if finite or scale <= 1.0 / _FP16_LOSS_SCALE:
                self._loss_scale[0] = scale
                return [None if g is None else g / scale for g in grads]
            scale /= 2.0

    def gradients(self, loss: torch.Tensor, params) -> list:
        """``autograd.grad`` of ``loss`` w.r.t. ``params`` (None for unused ones), loss-scaled under
        fp16 as :meth:`unscaled_gradients` says (a retry reuses the graph: no second forward)."""
        keep = self.precision == "fp16"
        return self.unscaled_gradients(lambda scale: list(torch.autograd.grad(
            loss * scale if scale != 1.0 else loss, params, allow_unused=True, retain_graph=keep)))

    # ------------------------------------------------------------------ layout
    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` in the run's memory format (in place; channels_last for 4-D weights)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images in the run's memory format."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    # ------------------------------------------------------------------ compile
    def compiler(self) -> "Compiler":
        """A run's :class:`Compiler` (it does nothing with ``compile="off"``)."""
        return Compiler(self.compile)

    @contextlib.contextmanager
    def fixed_batches(self, sizes):
        """Inside: a compiled module's batch of fewer rows than one of ``sizes`` (an epoch's last
        proxy batch, a small forget set, the last evaluation chunk) is padded to the smallest of them
        that holds it (copies of its first row, :func:`pad_rows`) and the padding rows' outputs are dropped, so the
        compiled graphs see only these shapes (compile's dynamic shapes avoided without a
        recompilation per odd batch). A module whose forward lets one row change another's output
        (:func:`rows_independent`: a BatchNorm on batch statistics, in training mode or without
        running statistics, or any module a probe finds mixing rows) runs unpadded. Without
        compile, nothing changes."""
        token = _SHAPES.set(tuple(sorted({int(b) for b in sizes if int(b) > 0})) if self.compile != "off" else ())
        try:
            yield
        finally:
            _SHAPES.reset(token)

    def record(self, **extra) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}, **extra}


_SHAPES: contextvars.ContextVar = contextvars.ContextVar("stakes_fixed_batches", default=())


def _padded(module: nn.Module, call):
    """``call`` (a compiled module's forward) with its one batch argument padded up to the smallest
    fixed shape of the phase that holds it (:meth:`Execution.fixed_batches`) and every output cut
    back to the real rows, where the module's rows are independent (:func:`rows_independent`)."""

    def forward(*args, **kwargs):
        x = args[0] if len(args) == 1 and not kwargs else None
        n = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() >= 1 else 0
        target = next((b for b in _SHAPES.get() if b >= n), n) if n else 0
        if target == n or not rows_independent(module, x):
            return call(*args, **kwargs)
        return _cut(call(pad_rows(x, target)), n, target)

    return forward


def batch_statistics(module: nn.Module) -> bool:
    """Whether a BatchNorm in ``module`` normalises with the batch's own statistics in its current
    modes: in training mode, or in eval mode too when it keeps no running statistics
    (``track_running_stats=False``)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
               for m in module.modules())


_ROWS_PROBED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # module → {modes: independent?}


def rows_independent(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module``, in its current modes, computes each row of a batch from that row alone, so
    that padding rows cannot change the real rows' outputs (padding a batch to a fixed shape for a
    compiled graph or a CUDA graph relies on it). False for a BatchNorm on batch statistics
    (:func:`batch_statistics`); otherwise probed once per module and modes on ``x``'s first rows: a
    module that mixes rows in a way no type reveals (``x − x.mean(0)``, attention across the batch)
    gives the first rows different outputs beside other rows than alone, and is not padded."""
    if batch_statistics(module):
        return False
    modes = tuple(m.training for m in module.modules())
    seen = _ROWS_PROBED.setdefault(module, {})
    if modes not in seen:
        seen[modes] = _probe_rows(module, x)
    return seen[modes]


def _probe_rows(module: nn.Module, x: torch.Tensor) -> bool:
    """The module's eager forward on four rows (``x``'s first, or variants of them), alone and beside
    four other rows, agrees on them (to the rounding of a different batch size; 16-bit outputs to
    2 %). Runs without gradients, with dropout layers in eval mode (they mix no rows, but would draw
    random numbers the run then misses) and the CPU random state restored."""
    rows = torch.cat([x[:4], x[:4].flip(-1), x[:4].flip(0) * 0.5, x[:4].flip(0).flip(-1) * 0.25])[:4]
    others = torch.cat([rows.flip(0) * 0.5, rows.flip(-1)])
    dropouts = [m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training]
    try:
        for m in dropouts:
            m.training = False
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            alone = module._call_impl(rows)
            beside = module._call_impl(torch.cat([rows, others]))
    except Exception:   # a forward that cannot take the probe's batches: do not pad it
        return False
    finally:
        for m in dropouts:
            m.training = True
    return _same_rows(alone, beside, len(rows), len(rows) + len(others))


def _same_rows(alone, beside, n: int, total: int) -> bool:
    """``beside`` (outputs of ``total`` rows) agrees with ``alone`` (outputs of its first ``n``) on them."""
    if isinstance(alone, torch.Tensor):
        if not isinstance(beside, torch.Tensor):
            return False
        if alone.dim() == 0 or alone.shape[0] != n or beside.shape[0] != total:   # not a per-row output
            return alone.shape == beside.shape and torch.equal(alone, beside)
        tol = 2e-2 if alone.dtype in (torch.float16, torch.bfloat16) else 1e-4
        a, b = alone.float(), beside[:n].float()
        return bool(torch.allclose(a, b, rtol=tol, atol=tol * float(a.abs().max().clamp_min(1.0))))
    if isinstance(alone, dict) and isinstance(beside, dict):
        return alone.keys() == beside.keys() and all(_same_rows(alone[k], beside[k], n, total) for k in alone)
    if isinstance(alone, (tuple, list)) and isinstance(beside, (tuple, list)):
        return len(alone) == len(beside) and all(_same_rows(a, b, n, total) for a, b in zip(alone, beside))
    return True


def is_channels_last(t) -> bool:
    """Whether ``t`` is a 4-D tensor laid out NHWC (and not also plain contiguous, as a 1x1 map is)."""
    return isinstance(t, torch.Tensor) and t.dim() == 4 and not t.is_contiguous() and \
        t.is_contiguous(memory_format=torch.channels_last)


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with copies of its first row appended up to ``rows`` rows, in ``t``'s memory format: a
    batch padded to a fixed shape, whose padding rows' results the caller drops."""
    if rows <= len(t):
        return t
    out = torch.cat([t, t[:1].expand(rows - len(t), *t.shape[1:])])   # (cat drops channels_last)
    if is_channels_last(t):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _cut(out, n: int, rows: int):
    """``out`` (a tensor, or tuples / lists / dicts of them) with its padded rows dropped."""
    if isinstance(out, torch.Tensor):
        return out[:n] if out.dim() >= 1 and out.shape[0] == rows else out
    if isinstance(out, dict):
        return type(out)((k, _cut(v, n, rows)) for k, v in out.items())
    if isinstance(out, (tuple, list)):
        parts = [_cut(o, n, rows) for o in out]
        return type(out)(*parts) if hasattr(out, "_fields") else type(out)(parts)   # a namedtuple takes fields
    return out


def eager_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose modules run their own eager forward: the copy of a compiled
    module (``nn.Module.compile``) would keep calling the original's compiled forward, on the
    original's weights."""
    out = copy.deepcopy(module)
    for m in out.modules():
        m._compiled_call_impl = None
    return out


def frozen_copy(module: nn.Module, *, fold: bool = True, dtype: Optional[torch.dtype] = None) -> tuple:
    """An eval-mode copy of a frozen network for its inference-only work (PGD on the original, the
    original's structures), and whether its BatchNorm was folded: with ``fold`` every BatchNorm that
    follows a convolution or linear layer folded into it (``torch.fx``'s ``fuse``: W' = W·γ/σ,
    b' = (b − μ)·γ/σ + β, exact up to rounding; one pass over the activations instead of two), and
    with ``dtype`` (the run's autocast dtype) the convolution and linear weights cast once, where
    autocast would cast them on every call (the same values). A network ``torch.fx`` cannot trace is
    copied unfolded. Parameters do not require gradients."""
    out = eager_copy(module).eval()
    folded = False
    if fold and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in out.modules()):
        try:
            from torch.fx.experimental.optimization import fuse

            out, folded = fuse(out, inplace=True), True
        except Exception:   # not traceable by torch.fx (data-dependent control flow, ...): unfolded
            pass
    if dtype is not None and dtype != torch.float32:
        for m in out.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                m.to(dtype)
    for p in out.parameters():
        p.requires_grad_(False)
    return out, folded


# ----------------------------------------------------------------------------- torch.compile

# The inductor mode each config.compile value is compiled with. Never one that turns on inductor's
# own CUDA graphs ("max-autotune" does): their outputs are overwritten by the next replay (the
# evaluation keeps successive outputs of the compiled features), and the PGD step is already
# captured in stakes' own CUDA graph, which must not record inductor's graphs inside it.
INDUCTOR_MODES = {"frozen": "default", "default": "default", "max-autotune": "max-autotune-no-cudagraphs"}

# What dynamo and inductor raise when they cannot compile (a backend failure, an unsupported
# construct, the recompile limit): the module falls back to its eager forward.
try:
    from torch._dynamo.exc import FailOnRecompileLimitHit as _LimitHit, TorchDynamoException as _DynamoError
    _COMPILE_ERRORS: tuple = (_DynamoError, _LimitHit)
except ImportError:   # pragma: no cover  (older torch)
    _COMPILE_ERRORS = (RuntimeError,)

# Cache entries a run allows each compiled code object: every compiled module goes through
# nn.Module._call_impl, one code object whose cache all of a run's modules share (dynamo's default
# of 8 is spent by a few shapes × grad mode × train/eval); running over it is an error here (a
# fallback with its reason), never the silent eager run dynamo makes of it.
RECOMPILE_LIMIT = 256


class Compiler:
    """A run's ``torch.compile``: its modules compiled in place, each behind a guard, and counted.

    :meth:`add` compiles a module (``nn.Module.compile``, ``dynamic=False``: one graph per batch
    shape, grad mode and train/eval, no symbolic shapes) with the inductor mode of
    ``config.compile`` (:data:`INDUCTOR_MODES`). A failure to compile, whenever it happens (the
    first call, a training-mode graph, a new PGD shape, a module SyncBatchNorm converted, the
    recompile limit), falls back to the module's eager forward for the rest of the run, with a
    one-line warning, and is recorded. :meth:`settings` is the dynamo configuration the run's model
    work must run in; :meth:`record` what the result records, per module: graphs compiled,
    recompiles (graphs compiled at a module's later calls: a new shape, grad mode or train/eval),
    calls through the compiled forward, executions of compiled graphs (fewer than the calls: some
    ran eagerly), and fallbacks."""

    def __init__(self, mode: str = "off"):
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
        self.mode = mode
        self.modules: dict = {}     # name → module
        self.graphs: dict = {}      # name → graphs compiled
        self.recompiles: dict = {}  # name → graphs compiled after the module's first call
        self.calls: dict = {}       # name → calls through the compiled forward
        self.graph_runs: dict = {}  # name → executions of its compiled graphs
        self.fallbacks: dict = {}   # name → why it runs eagerly

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def settings(self):
        """The dynamo settings of the run's model work (a no-op without compile): a recompile limit
        that fits a run, raising when it is hit (a fallback, not a silent eager run), and backward
        graphs compiled with their forward (so that a failure surfaces where it is caught)."""
        if not self.enabled:
            return contextlib.nullcontext()
        import torch._dynamo
        import torch._functorch.config

        stack = contextlib.ExitStack()
        stack.enter_context(torch._dynamo.config.patch(
            recompile_limit=RECOMPILE_LIMIT, accumulated_recompile_limit=max(RECOMPILE_LIMIT * 4, 1024),
            fail_on_recompile_limit_hit=True))
        stack.enter_context(torch._functorch.config.patch(force_non_lazy_backward_lowering=True))
        return stack

    def add(self, name: str, module: Optional[nn.Module], *, frozen: bool = False) -> None:
        """Compile ``module`` in place under ``name`` (nothing with compile off or no module; with
        ``compile="frozen"`` only the frozen original's inference copy, ``frozen=True``: PGD and the
        original's structures, where the compiled graph fuses the bias, ReLU and residual additions
        of the folded network into single kernels)."""
        if not self.enabled or module is None or (self.mode == "frozen" and not frozen):
            return
        for key in ("graphs", "recompiles", "calls", "graph_runs"):
            getattr(self, key).setdefault(name, 0)
        self.modules[name] = module
        try:
            _compile(module, INDUCTOR_MODES[self.mode], self._backend(name))
        except Exception as err:
            self._fall_back(name, module, err)
            return
        module._compiled_call_impl = self._guarded(name, module, _padded(module, module._compiled_call_impl))

    def _backend(self, name: str):
        """Inductor with the run's mode, counting the graphs it compiles and runs for ``name``."""
        inductor = torch._TorchCompileInductorWrapper(INDUCTOR_MODES[self.mode], None, False)

        def backend(gm, example_inputs):
            self.graphs[name] += 1
            if self.calls[name] > 1:
                self.recompiles[name] += 1
            compiled = inductor(gm, example_inputs)

            def run(*args):
                self.graph_runs[name] += 1
                return compiled(*args)

            run._boxed_call = getattr(compiled, "_boxed_call", False)
            return run

        return backend

    def _guarded(self, name: str, module: nn.Module, call):
        def forward(*args, **kwargs):
            self.calls[name] += 1
            try:
                return call(*args, **kwargs)
            except _COMPILE_ERRORS as err:
                self._fall_back(name, module, err)
                return module._call_impl(*args, **kwargs)

        return forward

    def _fall_back(self, name: str, module: nn.Module, err: BaseException) -> None:
        module._compiled_call_impl = None   # the eager forward from now on
        inner = getattr(err, "inner_exception", None)   # BackendCompilerFailed: what the backend raised
        reason = f"{type(err).__name__}: {_first_line(err)}"
        if inner is not None:
            reason = f"{type(err).__name__} ({type(inner).__name__}: {_first_line(inner)})"
        reason = reason[:300]
        self.fallbacks[name] = reason
        warnings.warn(f"torch.compile failed for {name}, running it eagerly ({reason})", stacklevel=3)

    def fallback(self) -> Optional[str]:
        """None, or the modules that run eagerly and why, in one line."""
        return "; ".join(f"{name}: {why}" for name, why in self.fallbacks.items()) or None

    def record(self) -> dict:
        return {"compile_fallback": self.fallback(), "compile_fallbacks": dict(self.fallbacks),
                "compiled_graphs": dict(self.graphs), "recompiles": dict(self.recompiles),
                "compiled_calls": dict(self.calls), "compiled_graph_runs": dict(self.graph_runs)}


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def _compile(module: nn.Module, mode: str, backend) -> None:
    """``module.compile(...)``: its forward compiled in place by ``backend`` (inductor in ``mode``);
    tests replace this to force a failure or to record what is compiled."""
    module.compile(backend=backend, dynamic=False)
