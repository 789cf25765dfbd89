"""How a run executes the model work on its device: the precision policy (autocast), channels_last,
``torch.compile`` and CUDA graphs for the PGD loop. None of these change what is computed, only
in which dtype and how fast; ``config.precision`` / ``channels_last`` / ``compile`` / ``cuda_graphs``
choose them and :class:`Execution` is what a run resolves them to (recorded in its result).

Defaults (``None``: automatic): bf16 autocast on CUDA cards that have bf16 (sm_80+), fp32 on the
CPU and older cards; channels_last for models with 4-D convolutions on CUDA; CUDA graphs for the PGD
steps on CUDA; compile off. Master weights stay fp32 whatever the precision; the loss reductions run
in fp32 (autocast's policy for cross-entropy and reductions; the fused alignment accumulates in fp32
from 16-bit features); the fused update and importance work on the fp32 parameters and gradients;
fp16 adds a gradient scaler to training steps.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn

PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("off", "default", "max-autotune")
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
        if channels_last is None:
            channels_last = device.type == "cuda" and model is not None and has_conv2d(model)
        graphs = config.cuda_graphs if config.cuda_graphs is not None else device.type == "cuda"
        if graphs and device.type != "cuda":
            raise ValueError(f"config.cuda_graphs=True needs a CUDA device, the run's is {device}")
        return cls(precision=precision, channels_last=bool(channels_last), compile=config.compile,
                   cuda_graphs=bool(graphs), device_type=device.type)

    # ------------------------------------------------------------------ precision
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
    def compile_modules(self, modules, trial) -> Optional[str]:
        """Compile ``modules`` in place (``nn.Module.compile``, ``dynamic=False``: one graph per batch
        shape, no symbolic shapes) and run ``trial()`` (a forward and backward) to compile them now;
        returns None, or the one-line reason why compilation failed, in which case the modules run
        eagerly (a warning says so). Inside :meth:`fixed_batches` their batches are padded to the
        phase's fixed shapes."""
        if self.compile == "off":
            return None
        modules = [m for m in modules if m is not None]
        try:
            for m in modules:
                _compile(m, None if self.compile == "default" else self.compile)
                m._compiled_call_impl = _padded(m, m._compiled_call_impl)
            trial()
            return None
        except Exception as err:
            for m in modules:
                m._compiled_call_impl = None   # back to the eager forward
            reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"[:300]
            warnings.warn(f"torch.compile failed, running eagerly ({reason})", stacklevel=2)
            return reason

    @contextlib.contextmanager
    def fixed_batches(self, sizes):
        """Inside: a compiled module's batch of fewer rows than one of ``sizes`` (an epoch's last
        proxy batch, a small forget set, the last evaluation chunk) is padded to the smallest of them
        that holds it (copies of its first row, :func:`pad_rows`) and the padding rows' outputs are dropped, so the
        compiled graphs see only these shapes (compile's dynamic shapes avoided without a
        recompilation per odd batch). Rows are independent in such a forward unless a BatchNorm runs
        in training mode (its batch statistics would see the padding): that module runs unpadded.
        Without compile, nothing changes."""
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
    back to the real rows."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def forward(*args, **kwargs):
        x = args[0] if len(args) == 1 and not kwargs else None
        n = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() >= 1 else 0
        target = next((b for b in _SHAPES.get() if b >= n), n) if n else 0
        if target == n or any(m.training for m in norms):
            return call(*args, **kwargs)
        return _cut(call(pad_rows(x, target)), n, target)

    return forward


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with copies of its first row appended up to ``rows`` rows, in ``t``'s memory format: a
    batch padded to a fixed shape, whose padding rows' results the caller drops."""
    if rows <= len(t):
        return t
    out = torch.cat([t, t[:1].expand(rows - len(t), *t.shape[1:])])   # (cat drops channels_last)
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
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


def _compile(module: nn.Module, mode: Optional[str]) -> None:
    """``module.compile(...)`` (its forward compiled in place); tests replace this to force a failure."""
    module.compile(mode=mode, dynamic=False)
