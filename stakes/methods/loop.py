"""The loop that runs every unlearning method (StructGuard, METHOD.md §4-9, the baselines of §10 and
a user's registered ones) under one API and one stopping rule.

    result = stakes.unlearn(model, (forget_x, forget_y), method="structguard", anchors=A)

The loop knows no method names: a method (:mod:`stakes.methods.base`) gives its loss terms,
importance or mask, optimiser groups and options, through the run's
:class:`~stakes.methods.context.UnlearnContext`. Every method runs the same loop (:func:`fit`): an
epoch zips the proxy batches with a cycled forget loader; the update is
:class:`fused.optim.StructureSGD` (the fused masked, regularised step) for every method, so L2UL's
inverted importance, SalUn's saliency mask and StructGuard's structure importance all go through the
same kernel; the run stops at the end of the first epoch where the deployed model misclassifies
every forget image (forget accuracy 0 %), after at most ``max_epochs``.

The jobs around the loop live in their own modules: one process or many (:mod:`.strategy`), the
evaluation at log points (:mod:`.evaluation`), checkpoints (:mod:`.checkpoint`), non-finite losses
(:mod:`.finite`), the model pieces (:mod:`.parts`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from fused.optim import StructureSGD
from stakes import distributed as dist_
from stakes.config import UnlearnConfig, deterministic_algorithms
from stakes.execution import Compiler, Execution, eager_copy, frozen_copy
from stakes.methods.base import Batch, UnlearningMethod, get_method, preset
from stakes.methods.checkpoint import Checkpointer, recipe
from stakes.methods.context import UnlearnContext
from stakes.methods.evaluation import CHUNK as EVAL_CHUNK, Evaluator
from stakes.methods.finite import NonFiniteError, NonFiniteWatch, check_finite_parameters
from stakes.methods.parts import DeployedModel, Projector, random_projection
from stakes.methods.strategy import SingleProcess, strategy_for
from stakes.metrics import accuracy
from stakes.proxy import AttackSettings, ProxySet, calibrate_radius, generate_proxies

__all__ = ["DeployedModel", "NonFiniteError", "Projector", "UnlearnResult", "build_proxies", "fit",
           "random_projection", "unlearn"]


@dataclass
class UnlearnResult:
    """What :func:`unlearn` returns."""

    method: str
    model: nn.Module                  # the deployed model (the user's own type for adapted models, see model_info)
    metrics: dict                     # final forget / retain / test accuracy etc. (percent)
    history: list                     # trajectory entries (step, accuracies, losses, drift)
    config: dict                      # the shared options (UnlearnConfig), with the method_options given
    proxies: Optional[dict] = None    # n, eps, success_rate
    steps: int = 0
    epochs: int = 0
    stopped: str = ""                 # why the run ended
    wall_time_s: float = 0.0
    timings: dict = field(default_factory=dict)
    deployed: Optional[nn.Module] = None   # stakes' view of the deployed model: images in [0, 1] → logits
    model_info: dict = field(default_factory=dict)   # what ``model`` is: type, input normalisation
    distributed: dict = field(default_factory=lambda: dist_.SINGLE.record())   # world_size, backend
    method_config: dict = field(default_factory=dict)   # the method's own options as the run used them
    execution: dict = field(default_factory=dict)   # precision, channels_last, compile, CUDA graphs as resolved


# ----------------------------------------------------------------------------- checks and proxies


def build_proxies(model: nn.Module, forget_x: torch.Tensor, forget_y: torch.Tensor,
                  cfg: UnlearnConfig, *, distributed=None, execution: Optional[Execution] = None,
                  attacked: Optional[nn.Module] = None) -> tuple[ProxySet, dict]:
    """The proxy set of a run with config ``cfg`` (radius calibrated when ``cfg.eps`` is None).

    Exposed so that a comparison can build it once per (k, seed) and share it between methods.
    Returns the proxies and the time spent (``calibration_s``, ``proxies_s``).

    ``distributed`` (None: the default process group if initialised; False: this process alone):
    in a group the ranks share the calibration's attacks (rank 0's radius is broadcast) and the
    pairs' (:func:`stakes.proxy.calibrate_radius`, :func:`stakes.proxy.generate_proxies`); every
    rank returns the same set. ``execution``: the run's execution policy (default: resolved from
    ``cfg`` for this model). The attacks run on a frozen copy of the model (:func:`frozen_classifier`:
    BatchNorm folded with ``cfg.fold_batchnorm``, laid out, weights in the autocast dtype, compiled
    with ``cfg.compile``), or on ``attacked``, a run's own such copy. With ``cfg.proxy_model`` naming
    a method, that method unlearns ``model`` first and its result is attacked.
    """
    ctx = dist_.resolve(distributed)
    device = torch.device(cfg.device)
    clf = _as_parts(model)
    first = None
    if cfg.proxy_model != "pretrained":   # the model a named method unlearned first is attacked (§9a.7)
        clf, first = _first_unlearned(clf, forget_x, forget_y, cfg, ctx)
        attacked = None
    if execution is None:
        execution = Execution.resolve(cfg, clf)
    compiler = None
    if attacked is None:   # never the caller's copy
        attacked = frozen_classifier(clf.to(device) if first is not None else clf, execution, cfg, device)
        compiler = execution.compiler()
        compiler.add("orig.features", attacked.features, frozen=True)
    forget_x, forget_y = forget_x.to(device), forget_y.to(device)
    with compiler.settings() if compiler is not None else contextlib.nullcontext():
        proxies, timings = _attack(attacked, forget_x, forget_y, cfg, ctx, device, execution)
    if first is not None:
        proxies.attacked = first
        timings["proxy_model_s"] = first["wall_time_s"]
    return proxies, timings


def frozen_classifier(clf, execution: Execution, cfg: UnlearnConfig, device) -> nn.Module:
    """The frozen original as its inference-only work uses it (PGD, its structures): an eval-mode
    copy on ``device`` in the run's memory format, its BatchNorm folded into the convolutions with
    ``cfg.fold_batchnorm`` and its convolution and linear weights in the autocast dtype
    (:func:`stakes.execution.frozen_copy`); ``.folded`` says whether a BatchNorm was folded."""
    from stakes.models import Classifier

    features, folded = frozen_copy(clf.features, fold=cfg.fold_batchnorm, dtype=execution.autocast_dtype)
    head, _ = frozen_copy(clf.head, fold=False, dtype=execution.autocast_dtype)
    out = execution.prepare(Classifier(features, head).to(device)).eval()
    out.folded = folded
    return out


def first_run_config(cfg: UnlearnConfig) -> UnlearnConfig:
    """The config of the run whose model ``cfg.proxy_model`` names (the method that unlearns first,
    METHOD.md §9a.7): the run's shared options under the same preset, except the ones that method's
    own preset values set (a baseline's optimiser and radius under ``paper`` / ``authors``), its
    proxies made against the pretrained model, then ``cfg.proxy_model_options`` over all."""
    from stakes.config import PRESETS

    method = get_method(cfg.proxy_model)
    own = {"paper": method.paper_preset, "authors": method.authors_preset}.get(cfg.preset, {})
    skip = set(own) | {"preset", "proxy_model", "proxy_model_options", "method_options"}
    values = {f: getattr(cfg, f) for f in UnlearnConfig.field_names() if f not in skip}
    values.update(proxy_model="pretrained", proxy_model_options={})
    UnlearnConfig._refuse_unknown(cfg.proxy_model_options)
    if cfg.preset in PRESETS:
        first = preset(cfg.preset, method=method, **values)
    else:
        first = UnlearnConfig(**values)
    first = first.replace(**cfg.proxy_model_options)
    if first.proxy_model != "pretrained":
        raise ValueError("config.proxy_model_options cannot name another proxy_model: the first run's proxies are "
                         "made against the pretrained model")
    return first


def _first_unlearned(clf, forget_x, forget_y, cfg: UnlearnConfig, ctx) -> tuple:
    """The model ``cfg.proxy_model`` unlearned first (through :func:`unlearn`, its own proxies made
    against the pretrained model) and what that run was."""
    first_cfg = first_run_config(cfg)
    res = unlearn(eager_copy(clf), (forget_x, forget_y), method=cfg.proxy_model, config=first_cfg,
                  distributed=ctx if ctx.enabled else False)
    info = {"method": cfg.proxy_model, "steps": res.steps, "stopped": res.stopped,
            "forget_accuracy": res.metrics.get("forget_accuracy"), "eps": (res.proxies or {}).get("eps"),
            "wall_time_s": res.wall_time_s}
    return res.deployed.as_classifier(), info


def _attack(clf, forget_x, forget_y, cfg: UnlearnConfig, ctx, device, execution: Execution) -> tuple:
    """:func:`build_proxies` once the attacked model is ready: the radius, then the proxies."""
    n_classes = clf.head.out_features
    attack = AttackSettings.from_config(cfg)
    t0 = _clock(device)
    eps, calibrated = cfg.eps, None
    if eps is None:   # calibrated once, each probe's attacks split over the ranks; rank 0's result broadcast
        eps, calibrated = calibrate_radius(clf, forget_x, forget_y, num_classes=n_classes,
                                           target_success=cfg.target_success, steps=cfg.pgd_steps,
                                           step_size=cfg.pgd_step_size, batch_size=cfg.pgd_batch_size,
                                           seed=cfg.seed, backend=cfg.backend, progress=cfg.progress,
                                           distributed=ctx, execution=execution, attack=attack)
        eps, calibrated = dist_.broadcast_object((eps, calibrated), ctx)
    t1 = _clock(device)
    report: dict = {}
    proxies = generate_proxies(clf, forget_x, forget_y, num_classes=n_classes, repetitions=cfg.repetitions,
                               steps=cfg.pgd_steps, step_size=cfg.pgd_step_size, eps=eps,
                               batch_size=cfg.pgd_batch_size, seed=cfg.seed, backend=cfg.backend,
                               progress=cfg.progress, distributed=ctx, execution=execution, report=report,
                               attack=attack)
    timings = {"calibration_s": t1 - t0 if calibrated is not None else 0.0, "proxies_s": _clock(device) - t1,
               "pgd_batch_size": report.get("batch_size", cfg.pgd_batch_size)}
    return proxies, timings


def _clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work, so that a phase's time
    on a card is its own (one synchronisation per phase boundary; nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _trial(model: nn.Module, x: torch.Tensor, execution: Execution) -> None:
    """One forward and backward of ``model`` on ``x`` in eval mode (compiles graphs now, changes no
    BatchNorm statistics); leaves no gradient behind."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            x = execution.inputs(x).detach().requires_grad_(True)
            with execution.autocast():
                out = model(x)
            out.float().sum().backward()
    finally:
        for m, mode in modes:
            m.training = mode
        for p in model.parameters():
            p.grad = None


def _as_parts(model):
    from stakes.models import as_classifier

    if isinstance(model, (tuple, list)) and len(model) == 2:
        return as_classifier(model[0], model[1])
    return as_classifier(model)


def _check_forget_set(forget_set, num_classes: int, device):
    if not isinstance(forget_set, (tuple, list)) or len(forget_set) != 2:
        raise TypeError("forget_set must be a pair (images [k, C, H, W], labels [k])")
    x, y = forget_set
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError("forget_set images must be a floating tensor [k, C, H, W] in [0, 1]")
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32) or y.shape != (x.shape[0],):
        raise ValueError(f"forget_set labels must be an integer tensor of shape [{x.shape[0]}]")
    if x.shape[0] == 0:
        raise ValueError("forget_set is empty: nothing to unlearn")
    if not torch.isfinite(x).all():
        raise ValueError("forget_set images contain NaN or inf")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"forget_set labels must lie in [0, {num_classes}) (the model's classes), got [{lo}, {hi}]")
    return x.to(device), y.long().to(device)


def _capped_eval_set(name, pair, cfg: UnlearnConfig) -> tuple:
    """``(x, y)`` of one trajectory evaluation set, checked, and subsampled to ``cfg.eval_max_samples``
    (a fixed random subset per seed) so that logging stays cheap on large data sets."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(t, torch.Tensor) for t in pair):
        raise ValueError(f"eval_sets[{name!r}] must be a pair (images, labels) of tensors")
    x, y = pair
    if y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"eval_sets[{name!r}]: {x.shape[0]} images but labels of shape {tuple(y.shape)}")
    cap = cfg.eval_max_samples
    if cap is not None and len(y) > cap:
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed + 31337))[:cap]
        x, y = x[keep.to(x.device)], y[keep.to(y.device)]
    return x, y


# ----------------------------------------------------------------------------- a run's pieces


@dataclass
class _Run:
    """A run's private state: its context (what the method sees) and the machinery around it."""

    ctx: UnlearnContext
    method: UnlearningMethod
    work: nn.Module                   # the unlearned copy of the caller's classifier
    strategy: SingleProcess
    evaluator: Evaluator
    checkpointer: Checkpointer
    watch: NonFiniteWatch
    callbacks: list
    model_digest: Optional[str]
    execution: Execution
    compiler: Compiler                # config.compile: the compiled modules, their graphs and fallbacks
    scaler: Optional[object] = None   # fp16: the gradient scaler of the training steps
    opt: Optional[StructureSGD] = None
    importance_at: int = 0            # > 0: the importance is computed during this step of the first epoch
    sr_skipped: bool = False          # the last step left the SR term out (skip_sr_first_steps)
    history: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)


def _checked_anchors(anchors, num_classes: int, method: UnlearningMethod, device) -> Optional[torch.Tensor]:
    if anchors is None:
        if method.needs_anchors:
            raise ValueError(f"method {method.key!r} needs anchors: pass anchors=stakes.anchors.build_anchors(...)")
        return None
    if not isinstance(anchors, torch.Tensor) or anchors.dim() != 2 or not anchors.is_floating_point():
        raise ValueError("anchors must be a floating tensor [num_classes, d_a]")
    if anchors.shape[0] != num_classes:
        raise ValueError(f"anchors has {anchors.shape[0]} rows but the model has {num_classes} classes")
    if not torch.isfinite(anchors).all():
        raise ValueError("anchors contain NaN or inf")
    return F.normalize(anchors.detach().float(), dim=1).to(device)


def _checked_proxies(proxies, ctx: UnlearnContext) -> ProxySet:
    """A given proxy set must match the forget images' shape and the model's classes; moved to the device."""
    if not isinstance(proxies, ProxySet):
        raise TypeError(f"proxies must be a stakes.proxy.ProxySet, got {type(proxies).__name__}")
    fx = ctx.forget_x
    if proxies.x.shape[1:] != fx.shape[1:] or proxies.x.shape[0] != proxies.y.shape[0] or len(proxies) == 0:
        raise ValueError(f"proxies must be non-empty images of shape [N, {', '.join(map(str, fx.shape[1:]))}] "
                         f"with N labels, got images {tuple(proxies.x.shape)} and labels {tuple(proxies.y.shape)}")
    if int(proxies.y.min()) < 0 or int(proxies.y.max()) >= ctx.num_classes:
        raise ValueError(f"proxy labels must lie in [0, {ctx.num_classes})")
    return ProxySet(x=proxies.x.to(ctx.device), y=proxies.y.to(ctx.device), source=proxies.source.to(ctx.device),
                    eps=proxies.eps, success_rate=proxies.success_rate, steps=proxies.steps)


def _prepare(model, forget_set, method: UnlearningMethod, anchors, cfg: UnlearnConfig, eval_sets, proxies,
             callbacks, checkpoint_path, retain_size, dist_ctx) -> _Run:
    """Everything a run needs before its first step (not the proxies, the importance or the optimiser)."""
    device = torch.device(cfg.device)
    strategy = strategy_for(dist_ctx, device)
    options = method.options_for(cfg)
    torch.manual_seed(cfg.seed)
    clf = _as_parts(model)
    execution = Execution.resolve(cfg, clf)
    fx, fy = _check_forget_set(forget_set, clf.head.out_features, device)
    fx = execution.inputs(fx)   # the forget images in the models' memory format before any model meets them
    # the frozen original, and the copy that is unlearned (the caller's model is never modified)
    orig = execution.prepare(eager_copy(clf).to(device)).eval()
    for p in orig.parameters():
        p.requires_grad_(False)
    frozen = frozen_classifier(orig, execution, cfg, device)   # PGD's and the structures' original
    work = execution.prepare(eager_copy(clf).to(device))
    for p in work.parameters():
        p.requires_grad_(True)
    eval_sets = {name: tuple(t.to(device) for t in _capped_eval_set(name, pair, cfg))
                 for name, pair in (eval_sets or {}).items()}
    a_hat = _checked_anchors(anchors, clf.head.out_features, method, device)
    feature_dim = work.head.in_features
    anchor_dim = a_hat.shape[1] if a_hat is not None else feature_dim
    ctx = UnlearnContext(method=method.key, config=cfg, options=options, orig=orig, features=work.features,
                         head=work.head, projector=None, deployed=DeployedModel(work.features, work.head), anchors=a_hat,
                         rp=random_projection(feature_dim, anchor_dim, cfg.seed).to(device), forget_x=fx,
                         forget_y=fy, retain_size=retain_size, device=device, strategy=strategy, frozen=frozen)
    method.check(ctx)
    if method.needs_projector(ctx):
        hidden = max(anchor_dim, feature_dim) if getattr(options, "warm_start", False) else anchor_dim
        ctx.projector = Projector(feature_dim, anchor_dim, hidden).to(device)
        ctx.deployed = DeployedModel(work.features, work.head, ctx.projector)
    strategy.setup(ctx, method, execution)
    if proxies is not None:
        ctx.proxies = _checked_proxies(proxies, ctx)
    return _Run(ctx=ctx, method=method, work=work, strategy=strategy,
                evaluator=Evaluator(ctx, eval_sets, strategy, execution),
                checkpointer=Checkpointer(checkpoint_path, strategy, device),
                watch=NonFiniteWatch(method.key, device, strategy), callbacks=list(callbacks or ()),
                model_digest=dist_.digest(clf.state_dict()) if dist_ctx.enabled else None, execution=execution,
                compiler=execution.compiler(), scaler=execution.grad_scaler())


def _compile(run: _Run) -> None:
    """``config.compile``: the backbones compiled (the frozen original's, for PGD and its
    structures, and the trained one; the head and projector are a linear layer and a small MLP and
    stay eager), and compiled now on one forward and backward at the training batch shape. A
    module that fails to compile, now or later, runs eagerly (``run.compiler`` records it)."""
    ctx, exe, compiler = run.ctx, run.execution, run.compiler
    if not compiler.enabled:
        return
    compiler.add("orig.features", ctx._frozen.features, frozen=True)
    compiler.add("features", ctx.features)
    with _fixed_batches(run):   # compiled at the training batch shape
        _trial(ctx._frozen, ctx.forget_x[:1], exe)
        _trial(ctx.deployed, ctx.forget_x[:1], exe)


def _fixed_batches(run: _Run):
    """The context of the training phases (importance, steps, evaluation): under compile, batches
    smaller than the rows the compiled modules see there — the forget and proxy batches (whole, and
    each process's share) and the evaluation chunk — are padded to them."""
    cfg, world = run.ctx.config, run.strategy.world_size
    nf = min(cfg.forget_batch_size, len(run.ctx.forget_y))
    return run.execution.fixed_batches(
        (nf, cfg.proxy_batch_size, -(-nf // world), -(-cfg.proxy_batch_size // world), EVAL_CHUNK))


def _check_launch(run: _Run) -> None:
    """A data-parallel run: every rank has the same method, config, forget set, model, anchors (and
    given proxies), and the world size fits the pairs and the smallest proxy batch."""
    ctx, cfg = run.ctx, run.ctx.config
    if not run.strategy.dist.enabled:
        return
    parts = {"method": ctx.method, "config": dist_.digest({**recipe(cfg, ctx.options), "retain_size": ctx.retain_size}),
             "forget_set": dist_.digest([ctx.forget_x, ctx.forget_y]), "model": run.model_digest,
             "anchors": dist_.digest(ctx.anchors) if ctx.anchors is not None else "none"}
    if ctx.proxies is not None:
        parts["proxies"] = dist_.digest([ctx.proxies.x, ctx.proxies.y])
    n_s = len(ctx.proxies) if ctx.proxies is not None else cfg.repetitions * len(ctx.forget_y)
    smallest = n_s % cfg.proxy_batch_size or cfg.proxy_batch_size   # an epoch's last batch
    split = ctx.proxies is None or run.method.uses_proxies
    run.strategy.check_launch(parts, n_s if split else None, (smallest if run.method.uses_proxies else n_s))


def _build_optimizer(run: _Run) -> StructureSGD:
    """The optimiser with the method's importance (SR term) and gradient masks, timed. An importance
    the method computes during a later step (:meth:`UnlearningMethod.importance_step`) is left to
    :func:`_late_importance`."""
    ctx, method = run.ctx, run.method
    opt = StructureSGD(method.param_groups(ctx), **method.optimizer_options(ctx))
    run.importance_at = method.importance_step(ctx)
    t0 = _clock(ctx.device)
    with run.execution.autocast():   # the hooks' model work; their gradients stay fp32 (the parameters')
        importance = method.importance(ctx) if run.importance_at == 0 else None
        masks = method.grad_masks(ctx)
    if importance is not None:
        opt.set_importance(importance)
    if masks is not None:
        opt.set_grad_masks(masks)
    run.timings["importance_s"] = _clock(ctx.device) - t0
    if run.importance_at > math.ceil(len(ctx.proxies) / ctx.config.proxy_batch_size):
        warnings.warn(f"{ctx.method}: the importance is computed during step {run.importance_at} of the first epoch "
                      f"(importance_step), but an epoch has {math.ceil(len(ctx.proxies) / ctx.config.proxy_batch_size)}"
                      " step(s): it is never computed and the SR term stays off (as in the authors' script)",
                      stacklevel=3)
    return opt


def _late_importance(run: _Run) -> None:
    """The importance during step ``run.importance_at`` of the first epoch, after that step's forward
    and before its backward (the authors' order, METHOD.md §9a.5); the SR term applies from then on."""
    ctx = run.ctx
    t0 = _clock(ctx.device)
    with run.execution.autocast():
        importance = run.method.importance(ctx)
    if importance is not None:
        run.opt.set_importance(importance)
    run.importance_at = 0
    run.timings["importance_s"] = run.timings.get("importance_s", 0.0) + _clock(ctx.device) - t0


def _fingerprint(run: _Run) -> dict:
    """What a checkpoint must match to be resumed by this run: the forget set and the recipe."""
    ctx = run.ctx
    return {"method": ctx.method, "k": len(ctx.forget_y), "forget_shape": list(ctx.forget_x.shape),
            "forget_labels": ctx.forget_y.tolist(), "forget_sum": float(ctx.forget_x.double().sum()),
            "config": recipe(ctx.config, ctx.options)}


def _state(run: _Run) -> dict:
    ctx = run.ctx
    return {
        "fingerprint": _fingerprint(run), "step": ctx.step, "epoch": ctx.epoch,
        "features": ctx.features.state_dict(), "head": ctx.head.state_dict(),
        "projector": None if ctx.projector is None else ctx.projector.state_dict(),
        "projector_frozen_bn": None if ctx.projector is None else ctx.projector.frozen_bn,
        "projector_left_eval": ctx._projector_left_eval,
        "optimizer": run.opt.state_dict(), "history": run.history, "timings": run.timings,
        "scaler": None if run.scaler is None else run.scaler.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if ctx.device.type == "cuda" else None,
    }


def _restore(run: _Run, state: dict) -> None:
    """Continue from a checkpoint's ``state`` (the proxies from its side file)."""
    ctx = run.ctx
    run.checkpointer.check(state, _fingerprint(run))
    ctx.features.load_state_dict(state["features"])
    ctx.head.load_state_dict(state["head"])
    if ctx.projector is not None:
        ctx.projector.load_state_dict(state["projector"])
        ctx.projector.frozen_bn = bool(state.get("projector_frozen_bn"))
        ctx.projector.train(ctx.projector.training)
    ctx._projector_left_eval = bool(state.get("projector_left_eval", False))
    ctx.proxies = _checked_proxies(run.checkpointer.load_proxies(), ctx)
    run.opt = StructureSGD(run.method.param_groups(ctx), **run.method.optimizer_options(ctx))
    run.opt.load_state_dict(state["optimizer"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    ctx.step, ctx.epoch = state["step"], state["epoch"]
    run.history = list(state["history"])
    run.timings = dict(state["timings"])
    torch.set_rng_state(state["rng"].cpu())
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda_rng"]])


def _deployed_info(run: _Run) -> dict:
    """What :attr:`UnlearnResult.model` is: the user's own type (an adapted timm / torchvision /
    Hugging Face model, inputs normalised as before), or stakes' DeployedModel."""
    adapter = getattr(run.work, "adapter", None)
    projector = run.ctx.projector
    if adapter is None:
        form = "h∘p∘g" if projector is not None else "h∘g"
        return {"type": "stakes.methods.DeployedModel", "form": form, "input": "images in [0, 1]"}
    info = {"source": adapter.kind, "normalization": dict(adapter.normalization)}
    if projector is None:
        info.update(type=adapter.model_type, form="h∘g",
                    input="as the model passed in (its own normalisation, not images in [0, 1])")
    else:
        info.update(type="stakes.methods.DeployedModel", form="h∘p∘g",
                    input="images in [0, 1] (the normalisation layer is inside)",
                    note=f"a trained projector sits between the features and the head, so the deployed model "
                         f"is stakes' own module, not a {adapter.model_type}")
    return info


# ----------------------------------------------------------------------------- the loop


@torch.no_grad()
def _log(run: _Run, losses: dict) -> dict:
    """Evaluate, append a trajectory entry (every process the same one) and call the callbacks (main only)."""
    ctx = run.ctx
    t0 = _clock(ctx.device)
    entry = {"step": ctx.step, "epoch": ctx.epoch, **run.evaluator()}
    entry.update({k: float(v) for k, v in losses.items()})
    check_finite_parameters(ctx, f"trajectory log at step {ctx.step}")
    run.history.append(entry)
    run.timings["eval_s"] = run.timings.get("eval_s", 0.0) + _clock(ctx.device) - t0
    for cb in (run.callbacks if run.strategy.is_main else ()):
        cb(entry)
    return entry


def _batches(run: _Run):
    """One epoch's steps: shuffled proxy batches zipped with a cycled, reshuffled forget loader
    (one generator per epoch, so a resumed run draws exactly what an uninterrupted one would);
    each process's shard of them. ``config.shuffle=False``: :func:`_batches_in_order`."""
    if not run.ctx.config.shuffle:
        yield from _batches_in_order(run)
        return
    ctx, cfg, strategy = run.ctx, run.ctx.config, run.strategy
    n_s, k, size = len(ctx.proxies), len(ctx.forget_y), cfg.proxy_batch_size
    nf = min(cfg.forget_batch_size, k)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + ctx.epoch)
    # the epoch's proxy order and every forget order it reshuffles to, drawn on the host in the
    # generator's order and copied to the device in one go (a copy mid-epoch would block the host)
    reshuffles, pos = 0, 0
    for _ in range(0, n_s, size):   # the forget loader's positions, as the loop below walks them
        if pos + nf > k:
            reshuffles, pos = reshuffles + 1, 0
        pos += nf
    draws = [torch.randperm(n_s, generator=g)] + [torch.randperm(k, generator=g) for _ in range(1 + reshuffles)]
    orders = torch.cat(draws).to(ctx.device)
    order, f_orders = orders[:n_s], orders[n_s:].view(-1, k)
    f_index, f_pos = 0, 0
    for i in range(0, n_s, size):
        ia = order[i:i + size]
        n_a = len(ia)
        ia = ia[strategy.rows(n_a)]
        if f_pos + nf > k:
            f_index, f_pos = f_index + 1, 0
        jf = f_orders[f_index, f_pos:f_pos + nf]
        f_pos += nf
        mine = strategy.forget_shard(nf)   # None: every process computes the forget batch whole
        if mine is not None:
            jf = jf[mine]
        yield Batch(ctx.forget_x[jf], ctx.forget_y[jf], ctx.proxies.x[ia], ctx.proxies.y[ia], index=i // size,
                    proxy_total=n_a, forget_total=None if mine is None else nf,
                    forget_offset=0 if mine is None else mine.start, proxy_rows=ia)


def _batches_in_order(run: _Run):
    """One epoch's steps in index order (the authors' unshuffled loaders, METHOD.md §9a.2): the proxy
    batches in proxy order, zipped with the forget loader's batches in index order (the last one
    partial), which cycles on across epochs: step t of the run takes forget batch t mod ⌈k/B_f⌉."""
    ctx, cfg, strategy = run.ctx, run.ctx.config, run.strategy
    n_s, k, size = len(ctx.proxies), len(ctx.forget_y), cfg.proxy_batch_size
    fb = cfg.forget_batch_size
    n_fb = -(-k // fb)
    first = ctx.step   # the run's step count at the epoch's start (a resumed run starts at an epoch's start)
    for i in range(0, n_s, size):
        n_a = min(size, n_s - i)
        rows = strategy.rows(n_a)
        ia = slice(i + rows.start, i + rows.stop)
        b = (first + i // size) % n_fb
        f0, nf = b * fb, min(fb, k - b * fb)
        mine = strategy.forget_shard(nf)   # None: every process computes the forget batch whole
        jf = slice(f0, f0 + nf) if mine is None else slice(f0 + mine.start, f0 + mine.stop)
        yield Batch(ctx.forget_x[jf], ctx.forget_y[jf], ctx.proxies.x[ia], ctx.proxies.y[ia], index=i // size,
                    proxy_total=n_a, forget_total=None if mine is None else nf,
                    forget_offset=0 if mine is None else mine.start, proxy_rows=ia)


def _train_step(run: _Run, batch: Batch) -> tuple:
    """Loss terms, backward, the method's gradient hook, clipping and the fused update; returns the
    terms' contributions and the loss as device tensors (no host synchronisation)."""
    ctx, cfg, opt = run.ctx, run.ctx.config, run.opt
    opt.zero_grad(set_to_none=True)
    late = run.importance_at and ctx.epoch == 0 and batch.index == run.importance_at - 1
    if late and run.strategy.dist.enabled:   # DDP allows no second forward before a step's backward: the
        _late_importance(run)                 # same parameters, BatchNorm statistics updated in another order
    loss, terms, contributions = run.strategy.loss(batch)
    if late and not run.strategy.dist.enabled:
        _late_importance(run)
    run.watch.record(ctx.step, terms, loss)
    scaler = run.scaler
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:   # fp16: the gradients at their true scale before any hook, clipping or update sees them
        scaler.unscale_(opt)
    run.method.before_update(ctx)
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], cfg.grad_clip)
    skip_sr = cfg.skip_sr_first_steps and batch.index < 2   # the reference code's quirk
    saved = [grp["lam"] for grp in opt.param_groups]
    if skip_sr:
        for grp in opt.param_groups:
            grp["lam"] = 0.0
    if scaler is not None:   # skips the update of a step whose gradients overflowed
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    for grp, lam in zip(opt.param_groups, saved):
        grp["lam"] = lam
    run.sr_skipped = skip_sr
    return contributions, loss


def fit(run: _Run) -> tuple:
    """Train until the forget set is misclassified (checked after every epoch, or every step with
    ``stop_check="step"``, from epoch ``stop_start_epoch`` on: METHOD.md §9, §9a.3) or the epoch /
    step budget ends; returns ``(why it stopped, seconds in the loop)``."""
    ctx, cfg, strategy = run.ctx, run.ctx.config, run.strategy
    steps_per_epoch = max(1, math.ceil(len(ctx.proxies) / cfg.proxy_batch_size))
    total = min(cfg.max_epochs * steps_per_epoch, cfg.max_steps or math.inf)
    bar = tqdm(total=total, initial=min(ctx.step, total), leave=False,
               desc=f"unlearn [{ctx.method}]" + (f" ({strategy.world_size} ranks)" if strategy.dist.enabled else ""),
               disable=not cfg.progress or not strategy.is_main)
    stopped = "max_epochs"
    t0, before = _clock(ctx.device), run.timings.get("loop_s", 0.0)   # a resumed run carries its loop time
    run.watch.checked_step = ctx.step
    ctx.train_mode()
    if not run.history and cfg.log_every:   # a trajectory starts at step 0
        _log(run, {})
    while ctx.epoch < cfg.max_epochs and ctx.step < total:
        cleared = False
        for batch in _batches(run):
            if ctx.step >= total:
                break
            terms, loss = _train_step(run, batch)
            ctx.step += 1
            bar.update(1)
            if cfg.log_every and ctx.step % cfg.log_every == 0:
                run.watch.check(f"trajectory log at step {ctx.step}", ctx.step)
                terms = strategy.logged_terms(terms)
                loss = sum(terms.values()) if strategy.dist.enabled else loss
                sr = run.opt.last_sr_loss   # ½ΣI(ψ−ψ0)² of the step; 0 where the step left the SR term out
                entry = _log(run, {**terms, "loss": loss, "sr": sr if sr is not None and not run.sr_skipped else 0.0})
                bar.set_postfix(forget=f"{entry['forget_accuracy']:.1f}",
                                test=f"{entry.get('test_accuracy', float('nan')):.1f}")
            if cfg.stop_check == "step" and _stop_due(run) and _forget_cleared(run):   # mid-epoch (§9a.3)
                cleared = True
                break
        ctx.epoch += 1
        run.watch.check(f"end of epoch {ctx.epoch}", ctx.step)
        check_finite_parameters(ctx, f"end of epoch {ctx.epoch}")
        if cleared or (cfg.stop_check == "epoch" and _stop_due(run, ended=True) and _forget_cleared(run)):
            stopped = "forget_accuracy_zero"
            break
        run.timings["loop_s"] = before + _clock(ctx.device) - t0
        if run.checkpointer.path:
            check_finite_parameters(ctx, "before writing the checkpoint")
            run.checkpointer.save(lambda: _state(run), ctx.proxies)
        strategy.maybe_inject_fault(ctx.epoch)
    else:
        stopped = "max_steps" if ctx.step >= total and ctx.epoch < cfg.max_epochs else "max_epochs"
    bar.close()
    run.watch.check("end of the run", ctx.step)
    if not run.history or run.history[-1]["step"] != ctx.step:
        _log(run, {})
    return stopped, before + _clock(ctx.device) - t0


def _stop_due(run: _Run, ended: bool = False) -> bool:
    """Whether the stop rule is checked now: in epoch ``stop_start_epoch`` or later (``ended``: at the
    end of the epoch just counted) and after ``stop_warmup_steps`` steps."""
    ctx, cfg = run.ctx, run.ctx.config
    epoch = ctx.epoch - 1 if ended else ctx.epoch
    return epoch >= cfg.stop_start_epoch and ctx.step >= cfg.stop_warmup_steps


def _forget_cleared(run: _Run) -> bool:
    """The stop rule: every forget image misclassified by the deployed model, in eval mode. With
    ``projector_eval_after_check`` the projector stays in eval mode afterwards (the authors' loop
    puts only the backbone back in training mode, METHOD.md §9a.4)."""
    ctx = run.ctx
    ctx.deployed.eval()
    with run.execution.autocast():
        forget_acc = accuracy(ctx.deployed, ctx.forget_x, ctx.forget_y)
    if ctx.config.projector_eval_after_check:
        ctx._projector_left_eval = True
    ctx.train_mode()
    return forget_acc == 0.0


def unlearn(model, forget_set, *, method="structguard", anchors: Optional[torch.Tensor] = None,
            config: Optional[UnlearnConfig] = None, eval_sets: Optional[dict] = None,
            proxies: Optional[ProxySet] = None, retain_size: Optional[int] = None,
            callbacks: Iterable[Callable[[dict], None]] = (), checkpoint_path: Optional[str] = None,
            resume: bool = False, keep_checkpoint: bool = False, distributed=None) -> UnlearnResult:
    """Unlearn ``forget_set`` from ``model``.

    Args:
        model: anything :func:`stakes.models.as_classifier` accepts: a ``Classifier``, a
            ``(features, head)`` pair, a timm, torchvision or Hugging Face image classifier (its
            input normalisation taken from its config, see ``as_classifier``). It is not modified.
        forget_set: ``(images [k, C, H, W] in [0, 1], labels [k])``.
        method: a registered method name (:func:`stakes.available_methods`) or an
            :class:`UnlearningMethod` instance.
        anchors: ``[num_classes, d_a]`` semantic anchors (required by StructGuard; used by every
            method for structure-drift logging when given).
        config: an :class:`UnlearnConfig`; default ``stakes.preset("stable", method=method)``. The
            method's own options: its preset for ``config.preset`` with ``config.method_options``.
        eval_sets: ``{"test": (x, y), "retain": (x, y), ...}`` evaluated along the trajectory
            (evaluation only: never used for training).
        proxies: a precomputed :class:`ProxySet` (shared between methods of one comparison).
        retain_size: |D_r| for the importance sample count N_tot (METHOD.md §6).
        callbacks: called with every trajectory entry (a dict).
        checkpoint_path: where to write the resumable state after every epoch (atomically).
        resume: continue from ``checkpoint_path`` if it exists (it must belong to the same forget
            set and config, else ValueError).
        keep_checkpoint: keep the checkpoint after the run finished (the CLI removes it only once
            the result file is written); by default it is removed.
        distributed: None (default) runs data-parallel over the default process group when one is
            initialised (``torchrun``, or ``torch.distributed.init_process_group``), else on this
            process; False always runs on this process alone (a grid of whole runs per rank). In a
            group every rank calls ``unlearn`` with the same arguments and its own ``config.device``
            (one device per rank); batch sizes are global, so the run matches the single-process
            one within rounding; rank 0 alone reads and writes the checkpoint and alone calls
            ``callbacks``; every rank returns the same result. See :mod:`stakes.distributed`.
    """
    method_def = method if isinstance(method, UnlearningMethod) else get_method(method)
    cfg = config if config is not None else preset("stable", method=method_def)
    if not isinstance(cfg, UnlearnConfig):
        raise TypeError(f"config must be a stakes.UnlearnConfig, got {type(cfg).__name__}")
    cfg.validate()
    with deterministic_algorithms(cfg.deterministic):
        start = time.perf_counter()
        run = _prepare(model, forget_set, method_def, anchors, cfg, eval_sets, proxies, callbacks,
                       checkpoint_path, retain_size, dist_.resolve(distributed))
        if resume and not checkpoint_path:
            raise ValueError("resume=True needs checkpoint_path")
        with run.compiler.settings():   # torch.compile's settings for the run's model work (none without it)
            return _execute(run, start, resume=resume, keep_checkpoint=keep_checkpoint)


def _execute(run: _Run, start: float, *, resume: bool, keep_checkpoint: bool) -> UnlearnResult:
    """:func:`unlearn` once its run is prepared: checks, compile, proxies (or the checkpoint), the
    importance and the optimiser, the loop, the result."""
    ctx, cfg = run.ctx, run.ctx.config
    _check_launch(run)
    _compile(run)
    state = run.checkpointer.load() if resume else None   # the main process reads, every process gets it
    if state is not None:
        _restore(run, state)
    elif ctx.proxies is None:
        ctx.proxies, timings = build_proxies(ctx.orig, ctx.forget_x, ctx.forget_y, cfg, distributed=run.strategy.dist,
                                             execution=run.execution, attacked=ctx._frozen)
        run.timings.update(timings)
    # the proxies in the models' memory format, once, before the importance or any step meets them
    ctx.proxies = dataclasses.replace(ctx.proxies, x=run.execution.inputs(ctx.proxies.x))
    if state is None:
        if ctx.projector is not None and getattr(ctx.options, "warm_start", False):
            ctx.projector.warm_start(generator=torch.Generator().manual_seed(cfg.seed + 17))
        with _fixed_batches(run):
            run.opt = _build_optimizer(run)
    ctx._optimizer = run.opt
    with _fixed_batches(run):
        stopped, loop_s = fit(run)
    run.timings["loop_s"] = loop_s
    run.timings["step_ms"] = 1000.0 * loop_s / max(ctx.step, 1)
    check_finite_parameters(ctx, "end of run")
    metrics = {k: v for k, v in run.history[-1].items() if k.endswith("_accuracy") or k == "structure_drift"}
    deployed = ctx.deployed.eval()
    if run.execution.channels_last:   # the model comes back in PyTorch's default layout, as a reloaded copy has it
        deployed.to(memory_format=torch.contiguous_format)
    model_out = deployed
    if getattr(run.work, "adapter", None) is not None and ctx.projector is None:
        model_out = run.work.adapter.rebuild(ctx.features, ctx.head).eval()
    result = UnlearnResult(
        method=ctx.method, model=model_out, metrics=metrics, history=run.history, config=cfg.to_dict(),
        proxies=ctx.proxies.summary(), steps=ctx.step, epochs=ctx.epoch, stopped=stopped,
        wall_time_s=time.perf_counter() - start, timings=run.timings, deployed=deployed,
        model_info=_deployed_info(run), distributed=run.strategy.record(), method_config=ctx.options.to_dict(),
        execution=run.execution.record(**run.compiler.record()),
    )
    if not keep_checkpoint:
        run.checkpointer.remove()   # the run finished: the resumable state is no longer needed
    return result
