"""What an unlearning method is, and the registry that names them (timm's ``@register_model``
shape: adding a method never touches the loop that runs methods).

A method is one :class:`UnlearningMethod`: its loss terms (the only required part), and, when it
needs them, its importance or gradient mask, its optimiser groups and options, its own options
(a :class:`~stakes.config.MethodConfig` subclass with presets), a check of them, whether it trains
a projector, and the ablation variants a comparison may add. Every hook receives the run's
:class:`~stakes.methods.context.UnlearnContext` (``stakes.UnlearnContext``), the documented surface of
a run, and nothing else. The loop (:mod:`stakes.methods.loop`) calls these hooks and knows no method
names; every method shares its batches, its fused update (:class:`fused.optim.StructureSGD`), its
stop rule, metrics and reports.

    class MyMethod(stakes.UnlearningMethod):
        def loss_terms(self, ctx, batch):
            return {"retention": F.cross_entropy(ctx.deployed(batch.proxy_x), batch.proxy_y)}

    stakes.register_method("mine", MyMethod())
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from stakes import config as config_
from stakes.config import MethodConfig, UnlearnConfig

# The paper's baselines use their own optimiser settings under the `paper` preset (METHOD.md §10).
PAPER_BASELINE_VALUES = dict(lr=0.001, momentum=0.9, weight_decay=1e-4, eps=4.0)
# ... and under `authors` also the authors' loop for them: the stop check after every step from the
# first epoch (their Adv and L2UL loops have no first-epoch exemption).
AUTHORS_BASELINE_VALUES = dict(PAPER_BASELINE_VALUES, stop_start_epoch=0)


@dataclass
class Batch:
    """One optimisation step's data: a forget batch (cycled) and a proxy batch.

    ``index`` is the step's position within its epoch (0, 1, ...). In a data-parallel run
    (:mod:`stakes.distributed`) ``proxy_x``/``proxy_y`` are this rank's shard of the global proxy
    batch, whose size is ``proxy_total``, and ``forget_x``/``forget_y`` this rank's shard of the
    global forget batch (rows ``forget_offset`` …, of ``forget_total``) when it has at least one
    image per rank (else every rank holds it whole). :attr:`n_proxy` and :attr:`n_forget` are the
    global sizes in both cases (what batch-size weights must use)."""

    forget_x: torch.Tensor
    forget_y: torch.Tensor
    proxy_x: torch.Tensor
    proxy_y: torch.Tensor
    index: int = 0
    proxy_total: Optional[int] = None
    forget_total: Optional[int] = None
    forget_offset: int = 0
    proxy_rows: object = None   # the proxies' rows in ctx.proxies (a slice or an index tensor), when known

    @property
    def n_forget(self) -> int:
        """The global forget batch size (this rank's shard is ``forget_x``)."""
        return self.forget_x.shape[0] if self.forget_total is None else self.forget_total

    @property
    def forget_rows(self) -> slice:
        """This rank's rows of the global forget batch (all of them on one process)."""
        return slice(self.forget_offset, self.forget_offset + self.forget_x.shape[0])

    @property
    def n_proxy(self) -> int:
        """The global proxy batch size (this rank's shard is ``proxy_x``)."""
        return self.proxy_x.shape[0] if self.proxy_total is None else self.proxy_total


@dataclass(frozen=True)
class Variant:
    """An ablation of a method that a comparison runs next to it: a label for the reports and the
    changes to the method's own options."""

    label: str
    options: dict = field(default_factory=dict)


class UnlearningMethod:
    """Base class of a method; override :meth:`loss_terms`, and the other hooks where needed.

    Each hook gets the run's :class:`~stakes.methods.context.UnlearnContext` (``ctx``): the models
    (``deployed``, ``features``, ``head``, ``projector``, ``orig``), the anchors and projection
    (``anchors``, ``rp``, ``orig_structure_input``), the shared options (``config``) and this
    method's own (``options``, an instance of :attr:`config_class`), the data (``forget_x``,
    ``forget_y``, ``proxies``, ``retain_size``), the progress (``step``, ``epoch``), and the shared
    helpers ``deletion(logits, y)``, ``loss_weights(batch)``, ``batch_gradient(loss_fn, x, params)``,
    ``train_mode()`` and, once the optimiser exists, ``param_groups``.

    Class attributes:
        config_class: the method's own options, a :class:`~stakes.config.MethodConfig` dataclass
            with its presets (``PRESETS``); ``--set NAME.option=value`` on the command line.
        paper_preset: shared config values this method gets under ``preset("paper")`` (the
            baselines: the paper's baseline optimiser).
        authors_preset: shared config values this method gets under ``preset("authors")`` (the
            baselines: the paper's baseline optimiser and the authors' loop for them).
        ablation_names: the ablations :meth:`ablation` builds (``stakes compare --ablate NAME``).
        needs_anchors: refuse to run without anchors.
        uses_proxies: trains on the proxy set (a comparison charges the proxies' time to it).
        proxy_terms, forget_terms: the names of the loss terms that are means over the proxy batch
            and over the forget batch. In a data-parallel run each rank computes every term on its
            shard of the batches; these terms are weighted by the shard's share of the global batch
            (so the all-reduced gradient is the single-process one), every other term (a penalty on
            the parameters, say) counts once. A term that is not listed but differs between ranks is
            reported at the first step. A term whose per-sample randomness is drawn in the step must
            draw it for the global batch and take its rows (``batch.forget_rows``; see SalUn).
    """

    name: Optional[str] = None          # set by register_method
    config_class: type = MethodConfig
    paper_preset: dict = PAPER_BASELINE_VALUES
    authors_preset: dict = AUTHORS_BASELINE_VALUES
    ablation_names: tuple = ()
    needs_anchors: bool = False
    uses_proxies: bool = True
    proxy_terms: tuple = ("retention", "alignment")
    forget_terms: tuple = ("deletion", "random_label")

    # ------------------------------------------------------------------ the loss
    def loss_terms(self, ctx, batch: Batch) -> dict:
        """The named loss terms of one step (summed into the loss; each is logged)."""
        raise NotImplementedError(f"{type(self).__name__} must define loss_terms(ctx, batch)")

    # ------------------------------------------------------------------ options
    @property
    def key(self) -> str:
        """The name its options go under (``config.method_options``): the registered name."""
        return self.name or type(self).__name__

    def options_for(self, cfg: UnlearnConfig) -> MethodConfig:
        """This method's own options in a run with ``cfg``: its preset ``cfg.preset``, then
        ``cfg.method_options[self.key]``; a ValueError names a bad or unknown option."""
        given = cfg.method_options.get(self.key, {})
        try:
            return self.config_class.for_preset(cfg.preset, **given)
        except ValueError as err:
            raise ValueError(f"method {self.key!r}: {err}") from None

    def ablation(self, name: str, options: MethodConfig) -> Variant:
        """The ablation ``name`` (one of :attr:`ablation_names`) of a run whose options are
        ``options``; ValueError if it does not apply to them."""
        raise ValueError(f"method {self.key!r} has no ablation {name!r} (it has {list(self.ablation_names)})")

    # ------------------------------------------------------------------ optional hooks
    def check(self, ctx) -> None:
        """Raise ValueError for a run this method cannot do (called before anything is trained)."""

    def needs_projector(self, ctx) -> bool:
        """Whether the run puts a trainable projector between features and head (METHOD.md §7)."""
        return False

    def param_groups(self, ctx) -> list:
        """Optimiser groups: the features at ``lr``, the head at ``head_lr`` (0 = frozen), the
        projector (if any) at the method's ``projector_lr`` (0 = fixed)."""
        cfg = ctx.config
        groups = [{"params": list(ctx.features.parameters()), "name": "features", "lr": cfg.lr}]
        head_lr = cfg.lr if cfg.head_lr is None else cfg.head_lr
        if head_lr > 0:
            groups.append({"params": list(ctx.head.parameters()), "name": "head", "lr": head_lr})
        else:  # a frozen head: the deletion has to go through the representation
            for p in ctx.head.parameters():
                p.requires_grad_(False)
        projector_lr = getattr(ctx.options, "projector_lr", 0.0)
        if ctx.projector is not None and projector_lr > 0:
            groups.append({"params": list(ctx.projector.parameters()), "name": "projector", "lr": projector_lr})
        elif ctx.projector is not None:  # a fixed projector (with warm start: the identity on features)
            for p in ctx.projector.parameters():
                p.requires_grad_(False)
        return groups

    def optimizer_options(self, ctx) -> dict:
        """Keyword arguments of :class:`fused.optim.StructureSGD` (lr, lam, momentum, weight decay,
        proximal, backend)."""
        cfg = ctx.config
        return dict(lr=cfg.lr, lam=cfg.lam, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    proximal=cfg.proximal, backend=cfg.backend)

    def importance(self, ctx) -> Optional[dict]:
        """Per-parameter importance I for the SR term (dict parameter → tensor), or None."""
        return None

    def importance_step(self, ctx) -> int:
        """When :meth:`importance` runs: 0 before the first step (the default), or s > 0 during step
        s, after that step's forward and before its backward (the SR term applies from then on)."""
        return 0

    def grad_masks(self, ctx) -> Optional[dict]:
        """Per-parameter gradient masks (dict parameter → tensor), or None."""
        return None

    def before_update(self, ctx) -> None:
        """Called after ``loss.backward()``, before gradient clipping and the update, with the
        gradients at their true scale (under fp16 the step's gradient scaler has already divided
        them back), so a hook may add terms such as ``wd·p`` to them."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ----------------------------------------------------------------------------- shared loss pieces


def ce_bounded(logits: torch.Tensor, y: torch.Tensor, bound: float) -> torch.Tensor:
    """mean_i min(CE_i, B): a sample with CE > ln C is already misclassified, so stop pushing it (§12)."""
    return F.cross_entropy(logits, y, reduction="none").clamp(max=bound).mean()


def margin_deletion(logits: torch.Tensor, y: torch.Tensor, margin: float) -> torch.Tensor:
    """mean_i relu(z_{y_i} − max_{j≠y_i} z_j + m) [ours]: the smallest push that misclassifies.

    A forget sample stops contributing once another class beats its true class by ``margin``;
    unlike −CE its gradient does not vanish on a saturated model, and unlike ascent it never
    pushes a sample further than needed.
    """
    logits = logits.float()   # in fp32 under a 16-bit autocast too (a no-op for fp32 logits)
    true = logits.gather(1, y[:, None]).squeeze(1)
    is_true = torch.arange(logits.shape[1], device=logits.device) == y[:, None]   # one_hot would sync (range check)
    others = logits.masked_fill(is_true, float("-inf")).amax(1)
    return F.relu(true - others + margin).mean()


def minmax_invert(t: torch.Tensor) -> torch.Tensor:
    """L2UL's Ω̂ = 1 − (Ω − min)/(max − min), per tensor (a constant tensor gets Ω̂ = 1)."""
    lo, hi = t.min(), t.max()
    span = hi - lo
    return torch.where(span > 0, 1.0 - (t - lo) / span.clamp_min(1e-30), torch.ones_like(t))


def topq_mask(tensors: Sequence[torch.Tensor], q: float) -> list:
    """Binary mask of the global top-q fraction of the entries of ``tensors`` (SalUn-style)."""
    flat = torch.cat([t.flatten().float() for t in tensors])
    if flat.numel() == 0:
        return [torch.zeros_like(t, dtype=torch.bool) for t in tensors]
    n_keep = max(1, int(round(q * flat.numel())))
    threshold = torch.topk(flat, n_keep, sorted=False).values.min()
    return [t >= threshold for t in tensors]


def finish_importance(imp: dict, kind: str, topq: float) -> dict:
    """``config.importance``: the dense importance as is, its top-q binary mask, or L2UL's inversion."""
    if kind == "topq":
        masks = topq_mask(list(imp.values()), topq)
        return {p: m.float() for p, m in zip(imp, masks)}
    if kind == "inverted":
        return {p: minmax_invert(v) for p, v in imp.items()}
    return imp


# ----------------------------------------------------------------------------- the registry

_REGISTRY: dict = {}
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_+-.")


def register_method(name: str, method, *, replace: bool = False):
    """Register ``method`` (an :class:`UnlearningMethod` instance or subclass) under ``name``.

    Registered methods run by name in :func:`stakes.unlearn`, ``stakes unlearn --method`` and
    ``stakes compare --methods`` (the command line loads a user's module with ``--plugin``).
    Returns the registered instance. A name already taken is an error unless ``replace=True``.
    """
    if not isinstance(name, str) or not name or not set(name) <= _NAME_CHARS or name[0] in "+-.":
        raise ValueError(f"register_method: name must be a non-empty lower-case word (letters, digits, _ + - .), "
                         f"got {name!r}")
    if inspect.isclass(method) and issubclass(method, UnlearningMethod):
        method = method()
    if not isinstance(method, UnlearningMethod):
        raise TypeError(f"register_method({name!r}, ...): method must be a stakes.UnlearningMethod instance or "
                        f"subclass, got {type(method).__name__}")
    if type(method).loss_terms is UnlearningMethod.loss_terms:
        raise TypeError(f"register_method({name!r}, ...): {type(method).__name__} does not define loss_terms(ctx, batch)")
    if not (inspect.isclass(method.config_class) and issubclass(method.config_class, MethodConfig)):
        raise TypeError(f"register_method({name!r}, ...): config_class must be a stakes.config.MethodConfig "
                        f"subclass, got {method.config_class!r}")
    clash = sorted(set(method.config_class.field_names()) & set(UnlearnConfig.field_names()))
    if clash:
        raise TypeError(f"register_method({name!r}, ...): options {clash} of {method.config_class.__name__} are "
                        "already shared options of stakes.UnlearnConfig; rename them")
    if name in _REGISTRY and not replace and _REGISTRY[name] is not method:
        raise ValueError(f"method {name!r} is already registered ({_REGISTRY[name]!r}); pass replace=True to "
                         "replace it")
    method.name = name
    _REGISTRY[name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method (a user's; the built-ins can be removed too, for a test)."""
    if name not in _REGISTRY:
        raise ValueError(f"no method {name!r} is registered; registered: {available_methods()}")
    del _REGISTRY[name]


def available_methods(*, oracles: bool = True) -> list:
    """Names of the registered methods, in registration order (built-ins first). (``oracles`` is
    accepted for compatibility: the retrain oracle is a comparison job, not a method.)"""
    _load_builtins()
    return list(_REGISTRY)


def get_method(name: str) -> UnlearningMethod:
    """The registered method ``name`` (ValueError naming the registered ones otherwise)."""
    _load_builtins()
    method = _REGISTRY.get(name) if isinstance(name, str) else None
    if method is None:
        valid = available_methods()
        raise ValueError(f"unknown method {name!r}; expected one of {valid} (register your own with "
                         f"stakes.register_method(name, method))")
    return method


def _load_builtins() -> None:
    """Import the built-in method modules (each registers itself) once."""
    import stakes.methods  # noqa: F401  (its __init__ imports every built-in module)


# ----------------------------------------------------------------------------- presets and options


def preset(name: str = "stable", method="structguard", **overrides) -> UnlearnConfig:
    """The config of preset ``name`` ("stable", "paper" or "authors") for ``method`` (a registered name or an
    :class:`UnlearningMethod`), with ``overrides``.

    Under ``paper`` each method adds its own ``paper_preset`` shared values (the baselines: the
    paper's baseline optimiser, SGD lr 0.001, momentum 0.9, weight decay 1e-4, PGD ε 4.0;
    StructGuard: none); under ``stable`` every method shares the same values. An override that is
    not a shared option is one of the method's own (``config.method_options``), checked here.
    """
    m = method if isinstance(method, UnlearningMethod) else get_method(method)
    shared, own = route_options(overrides, [m])
    values = {**{"paper": m.paper_preset, "authors": m.authors_preset}.get(name, {}), **shared}
    cfg = config_.preset(name, **values)
    if own.get(m.key):
        cfg = cfg.with_method_options(m.key, **own[m.key])
        m.options_for(cfg)   # checked now, not when the run starts
    return cfg


def route_options(values: dict, methods: Sequence[UnlearningMethod]) -> tuple:
    """Split option values into ``(shared, {method key: options})``.

    ``"NAME.option"`` goes to method NAME (one of ``methods``); a plain name is a shared option when
    :class:`~stakes.config.UnlearnConfig` has it, else the option of the one method of ``methods``
    that has it. ValueError for a name no method has, one that several have (say which), or a
    method that is not among ``methods``."""
    shared: dict = {}
    own: dict = {}
    by_key = {m.key: m for m in methods}
    shared_names = set(UnlearnConfig.field_names())
    for name, value in values.items():
        if "." in name:
            key, _, option = name.partition(".")
            m = by_key.get(key)
            if m is None:
                raise ValueError(f"{name}: {key!r} is not a method of this run (its methods: {sorted(by_key)})")
            if option not in m.config_class.field_names():
                raise ValueError(f"{name}: method {key!r} has no option {option!r} (its options: "
                                 f"{sorted(m.config_class.field_names())})")
            own.setdefault(key, {})[option] = value
        elif name in shared_names:
            shared[name] = value
        else:
            having = [m.key for m in methods if name in m.config_class.field_names()]
            if len(having) == 1:
                own.setdefault(having[0], {})[name] = value
            elif having:
                raise ValueError(f"{name} is an option of several methods here ({having}); say which: "
                                 + " or ".join(f"{k}.{name}" for k in having))
            else:
                elsewhere = [k for k in available_methods() if name in get_method(k).config_class.field_names()]
                where = f"an option of {elsewhere}, not of {sorted(by_key)}" if elsewhere else "not an option"
                raise ValueError(f"unknown option {name!r}: {where}; shared options: {sorted(shared_names)}")
    return shared, own
