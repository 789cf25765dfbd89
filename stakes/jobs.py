"""The jobs the command line runs, described by dataclasses the command line fills once from its
arguments (nothing below it sees argparse): the data set (:class:`DataSpec`), the model
(:class:`ModelSpec`), the anchors (:class:`AnchorSpec`), how runs are configured (:class:`RunSpec`);
and the pieces they are built from: data, model, anchors, config, one unlearning run with its full
evaluation. ``stakes.cli`` (the command line) and ``stakes.compare`` (the grid) both build on this
module; nothing here imports them.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from stakes._io import atomic_torch_save
from stakes.config import UnlearnConfig
from stakes.data import load_dataset, sample_forget_indices
from stakes.execution import Execution
from stakes.methods import UnlearningMethod, get_method, preset, route_options, unlearn
from stakes.anchors import BUNDLED_DESCRIPTIONS, build_anchors, load_anchors, prototype_anchors
from stakes.metrics import (ResourceMeter, evaluate_model, forgotten_retrieval_rate, identification_accuracy,
                            membership_inference, model_device, pairwise_cosine_change, retrieval_metrics)
from stakes.models import Classifier, as_classifier
from stakes.pretrain import CHECKPOINT_FORMAT, default_cache_dir, load_checkpoint, pretrained_model


class UsageError(ValueError):
    """Bad command-line input."""


@dataclass
class DataSpec:
    """The data set: a bundled one (digits, shapes) or one read from ``root``."""

    dataset: str = "digits"
    root: Optional[str] = None


@dataclass
class ModelSpec:
    """The model to unlearn: ``path`` (a stakes checkpoint, a whole pickled model, or a state dict
    with ``arch``), ``arch`` alone (``hf:DIR`` with its own weights), or neither (the cached
    default of digits / shapes). ``normalization``: "config" or ``(mean, std)`` per channel."""

    path: Optional[str] = None
    arch: Optional[str] = None
    model_args: dict = field(default_factory=dict)
    normalization: Union[str, tuple] = "config"
    cache_dir: Optional[str] = None
    progress: bool = True


@dataclass
class AnchorSpec:
    """The anchors: a saved file (``path``), class-mean ``prototype`` anchors, or a text encoder
    over the descriptions (bundled for the data set unless given)."""

    encoder: str = "minilm"
    descriptions: Optional[str] = None
    path: Optional[str] = None
    clip_arch: str = "ViT-B-32"
    clip_checkpoint: Optional[str] = None
    clip_random: bool = False
    cache_dir: Optional[str] = None


@dataclass
class RunSpec:
    """How a job's runs are configured: the preset, the ``--set`` values (shared options, and
    methods' own as ``NAME.option`` or a plain name where unambiguous), device and progress bars."""

    preset: str = "stable"
    overrides: dict = field(default_factory=dict)
    device: str = "cpu"
    progress: bool = True


# ----------------------------------------------------------------------------- shared helpers


def save_deployed_model(path: str, model: torch.nn.Module, meta: dict) -> None:
    """Save the deployed model (whole module + meta) atomically; never a non-finite one."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"refusing to save a model with non-finite parameter {name!r}")
    atomic_torch_save({"model": model, "meta": meta}, path)


_WORDS = {"true": True, "false": False, "none": None, "null": None}


def parse_overrides(items) -> dict:
    """``--set key=value`` pairs; values are Python literals (numbers, None, True), the words
    true/false/none in any case, or strings."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise UsageError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        if raw.strip().lower() in _WORDS:
            value = _WORDS[raw.strip().lower()]
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
        out[key.strip()] = value
    return out


def make_config(run: RunSpec, method: str, *, seed: int, grid: Sequence[str] = ()) -> UnlearnConfig:
    """The config of one run of ``method`` with ``seed``: the preset for the method, the shared
    ``--set`` values, and those of the method's own options that the values give it. ``grid``: the
    methods of the whole job (a plain option name must be unambiguous among them)."""
    methods = [get_method(m) for m in dict.fromkeys([*grid, method])]
    try:
        shared, own = route_options(run.overrides, methods)
        values = dict(seed=seed, device=run.device, progress=run.progress)
        values.update(shared)
        m = get_method(method)
        cfg = preset(run.preset, method=m, **values)
        if own.get(m.key):
            cfg = cfg.with_method_options(m.key, **own[m.key])
            m.options_for(cfg)
    except ValueError as err:
        raise UsageError(f"--set: {err}") from None
    return cfg


def load_data(spec: DataSpec):
    return load_dataset(spec.dataset, root=spec.root, seed=0)


def load_model(spec: ModelSpec, data):
    """The pretrained model as a :class:`stakes.models.Classifier` (images in [0, 1]) and its meta.

    ``spec.path`` is a stakes checkpoint (``stakes pretrain``), a whole pickled model
    (``torch.save(model)``, or a ``--save-model`` file), or a state dict together with ``spec.arch``
    (``timm:NAME | torchvision:NAME | hf:LOCAL_DIR``; ``hf:DIR`` alone loads the folder's own
    weights). A user's model is split by :func:`stakes.models.as_classifier`, with
    ``spec.normalization`` in front. Without either, the cached/pretrained default of digits and shapes."""
    if spec.path or spec.arch:
        model, meta = _user_model(spec, data)
        if isinstance(model, Classifier) and spec.normalization != "config":
            raise UsageError("--mean/--std are for timm / torchvision / Hugging Face models; a stakes model "
                             "normalises its input itself")
        clf = as_classifier(model, normalization=spec.normalization)
        if clf.num_classes != data.num_classes:
            raise UsageError(f"--model has {clf.num_classes} classes but data set {data.name!r} has "
                             f"{data.num_classes}")
        was = clf.training
        try:
            with torch.no_grad():
                out = clf.eval()(data.train_x[:2])
        except Exception as err:
            raise UsageError(f"the model cannot take the images of data set {data.name!r} (shape "
                             f"{tuple(data.train_x.shape[1:])}): {type(err).__name__}: {err}") from None
        clf.train(was)
        if out.shape != (min(2, len(data.train_x)), data.num_classes):
            raise UsageError(f"the model maps images to shape {tuple(out.shape)}, expected [N, {data.num_classes}]")
        if getattr(clf, "adapter", None) is not None:
            meta = {**meta, "type": clf.adapter.model_type, "normalization": clf.normalization}
        return clf, meta
    if data.name not in ("digits", "shapes"):
        raise UsageError(f"--model is required for data set {data.name!r} (pretrain one with `stakes pretrain`)")
    return pretrained_model(data.name, data=data, cache_dir=spec.cache_dir, progress=spec.progress)


def float_list(name: str, text):
    """Comma-separated numbers (one per channel), with a UsageError naming ``name`` otherwise."""
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{name} expects comma-separated numbers (one per channel), got {text!r}") from None
    if not values:
        raise UsageError(f"{name} expects at least one number")
    return values


def _user_model(spec: ModelSpec, data):
    """The user's ``nn.Module`` from ``--model`` and/or ``--arch`` (see :func:`load_model`)."""
    arch, path = spec.arch, spec.path
    payload = None
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--model: no checkpoint at {path}")
        try:   # a user's own file: whole pickled models need the full unpickler
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ValueError(f"--model {path} is not a readable torch file: {err}") from None
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        if arch:
            raise UsageError(f"--model {path} is a stakes checkpoint (it names its architecture); drop --arch")
        return load_checkpoint(path)[0], {"source": path}
    if isinstance(payload, dict) and isinstance(payload.get("model"), torch.nn.Module):   # a --save-model file
        payload = payload["model"]
    if isinstance(payload, torch.nn.Module):
        if arch:
            raise UsageError(f"--model {path} is a whole model; drop --arch (it is for state dicts)")
        return payload.eval(), {"source": path}
    if payload is not None and not (isinstance(payload, dict) and all(isinstance(v, torch.Tensor)
                                                                      for v in payload.values())):
        raise ValueError(f"--model {path}: expected a stakes checkpoint, a pickled model or a state dict, got "
                         f"{type(payload).__name__}")
    if not arch:
        raise UsageError(f"--model {path} is a state dict: say what it belongs to with --arch timm:NAME, "
                         "torchvision:NAME or hf:LOCAL_DIR")
    model = build_user_arch(arch, data, model_args=spec.model_args, load_weights=payload is None)
    if payload is not None:
        if arch.startswith("authors:"):   # their wrappers' keys (model.…, 1.…) mapped to the network's
            from stakes.authors import authors_state_dict

            payload = authors_state_dict(payload)
        misfit = state_dict_misfit(model, payload)
        if misfit:
            raise ValueError(f"--model {path} does not fit --arch {arch}: {misfit}")
        model.load_state_dict(payload, strict=True)
    return model.eval(), {"source": path or arch, "arch": arch}


def state_dict_misfit(model: torch.nn.Module, state: dict) -> Optional[str]:
    """Why ``state`` does not load into ``model`` with ``strict=True`` (the first missing key, the
    first unexpected one, the first shape that differs, with counts), or None when it does."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]

    def first(keys, what):
        more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
        return f"{what} {keys[0]!r}{more}"

    parts = []
    if missing:
        parts.append(first(missing, "missing key"))
    if unexpected:
        parts.append(first(unexpected, "unexpected key"))
    if shapes:
        k = shapes[0]
        more = f" (and {len(shapes) - 1} more)" if len(shapes) > 1 else ""
        parts.append(f"shape of {k!r}: file {list(state[k].shape)}, model {list(own[k].shape)}{more}")
    return "; ".join(parts) or None


def build_user_arch(arch: str, data, *, model_args: Optional[dict] = None, load_weights: bool = False):
    """A random-weight model ``timm:NAME`` / ``torchvision:NAME`` for ``data`` (its classes; timm also
    its channels and image size), or ``hf:LOCAL_DIR`` (a local folder: its config, and its weights when
    ``load_weights``). Never downloads."""
    family, _, name = arch.partition(":")
    kw = dict(model_args or {})
    c, h, _ = data.input_shape
    if family == "authors" and name:
        from stakes import authors

        if name not in authors.ARCHS:
            raise UsageError(f"--arch {arch}: the authors' networks are {', '.join('authors:' + n for n in authors.ARCHS)}")
        if kw:
            raise UsageError(f"--arch {arch} takes no --model-arg (got {sorted(kw)})")
        try:
            return authors.build(name, data.num_classes, in_channels=c)
        except ValueError as err:
            raise UsageError(f"--arch {arch}: {err}") from None
    if family == "timm" and name:
        import timm

        if not timm.is_model(name):
            raise UsageError(f"--arch {arch}: timm has no model {name!r}")
        try:
            return timm.create_model(name, pretrained=False, num_classes=data.num_classes, in_chans=c,
                                     **{"img_size": h, **kw})
        except TypeError:   # a model without an image size (CNNs)
            return timm.create_model(name, pretrained=False, num_classes=data.num_classes, in_chans=c, **kw)
    if family == "torchvision" and name:
        import torchvision

        try:
            return torchvision.models.get_model(name, weights=None, num_classes=data.num_classes, **kw)
        except (ValueError, KeyError, TypeError) as err:
            raise UsageError(f"--arch {arch}: {err}") from None
    if family == "hf" and name:
        import transformers

        if not os.path.isdir(name):
            raise UsageError(f"--arch {arch}: {name!r} is not a local folder (a Hugging Face model saved with "
                             "save_pretrained; nothing is downloaded)")
        try:
            if load_weights:
                model = transformers.AutoModelForImageClassification.from_pretrained(name, local_files_only=True, **kw)
            else:
                config = transformers.AutoConfig.from_pretrained(name, local_files_only=True,
                                                                 num_labels=data.num_classes, **kw)
                model = transformers.AutoModelForImageClassification.from_config(config)
        except (OSError, ValueError) as err:
            raise UsageError(f"--arch {arch}: {str(err).splitlines()[0]}") from None
        return model
    raise UsageError(f"--arch must be timm:NAME, torchvision:NAME, hf:LOCAL_DIR or authors:NAME (the networks of "
                     f"the authors' code, e.g. authors:cifar10_resnet18), got {arch!r}")


def load_plugins(specs) -> list:
    """Import each ``--plugin`` (a .py file or a module name); a plugin registers its methods with
    :func:`stakes.register_method` when imported. Returns the modules."""
    modules = []
    for spec in specs or ():
        try:
            if spec.endswith(".py") or os.path.sep in spec or os.path.exists(spec):
                if not os.path.isfile(spec):
                    raise FileNotFoundError(f"no such file {spec!r}")
                name = "stakes_plugin_" + "".join(ch if ch.isalnum() else "_" for ch in os.path.abspath(spec))
                if name in sys.modules:
                    modules.append(sys.modules[name])
                    continue
                mspec = importlib.util.spec_from_file_location(name, spec)
                module = importlib.util.module_from_spec(mspec)
                sys.modules[name] = module
                try:
                    mspec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
            else:
                module = importlib.import_module(spec)
        except Exception as err:
            raise UsageError(f"--plugin {spec}: cannot load it ({type(err).__name__}: {err})") from None
        modules.append(module)
    return modules


def load_or_build_anchors(spec: AnchorSpec, data, model=None):
    """The anchors of ``spec`` for ``data`` and their meta (a file, prototypes of ``model``, or a text
    encoder; encoded anchors are cached next to the pretrained models, keyed by encoder and prompts,
    so the encoder is loaded once per cache)."""
    if spec.path:
        anchors, meta = load_anchors(spec.path)
        if anchors.shape[0] != data.num_classes:
            raise UsageError(f"--anchors has {anchors.shape[0]} anchors but data set {data.name!r} has "
                             f"{data.num_classes} classes")
        return anchors, {"source": spec.path, **{k: v for k, v in meta.items() if k != "prompts"}}
    if spec.encoder == "prototype":
        if model is None:
            raise UsageError("--encoder prototype needs a model (class means of its features)")
        return prototype_anchors(model, data.train_x, data.train_y, data.num_classes), {"encoder": "prototype"}
    descriptions = spec.descriptions
    if descriptions is None and data.name in BUNDLED_DESCRIPTIONS:
        descriptions = data.name
    anchors = build_anchors(data.class_names, descriptions=descriptions, encoder=spec.encoder,
                            cache_dir=spec.cache_dir or default_cache_dir(), checkpoint=spec.clip_checkpoint,
                            arch=spec.clip_arch, allow_random=spec.clip_random)
    return anchors, {"encoder": spec.encoder, "descriptions": descriptions}


# ----------------------------------------------------------------------------- one run


def run_one(data, model, anchors, method: str, k: int, seed: int, *, cfg: UnlearnConfig, proxies=None,
            checkpoint_path=None, resume=False, keep_checkpoint=False, pretrained=None, distributed=None,
            evaluate=True):
    """One unlearning run with the full evaluation; returns (record, result).

    ``cfg``: the run's config (:func:`make_config`). ``pretrained``: the pretrained model's
    ``evaluate_model`` figures for this forget set, when the caller already has them (a grid shares
    them between methods). ``distributed``: as in :func:`stakes.unlearn` (None: data-parallel over
    the default process group if there is one; False: this process alone). ``evaluate=False`` skips
    the evaluation (the other ranks of a data-parallel run: rank 0 evaluates and writes) and returns
    ``(None, result)``."""
    model = as_classifier(model)
    forget_idx = sample_forget_indices(data.train_y, k, seed)
    fx, fy = data.train_x[forget_idx], data.train_y[forget_idx]
    keep = torch.ones(len(data.train_y), dtype=torch.bool)
    keep[forget_idx] = False
    g = torch.Generator().manual_seed(seed)
    cap = cfg.eval_max_samples
    retain_idx = keep.nonzero().squeeze(1)
    if cap is not None and len(retain_idx) > cap:
        retain_idx = retain_idx[torch.randperm(len(retain_idx), generator=g)[:cap]]
    test_x, test_y = data.test_x, data.test_y
    if cap is not None and len(test_y) > cap:
        sel = torch.randperm(len(test_y), generator=g)[:cap]
        test_x, test_y = test_x[sel], test_y[sel]
    eval_sets = {"test": (test_x, test_y), "retain": (data.train_x[retain_idx], data.train_y[retain_idx])}
    autocast = Execution.resolve(cfg, model).autocast   # the evaluations run in the run's precision too
    with autocast():
        pre = (pretrained if pretrained is not None else evaluate_model(model, data, forget_idx)) if evaluate else None
    with ResourceMeter(cfg.device) as meter:
        result = unlearn(model, (fx, fy), method=method, anchors=anchors, config=cfg, eval_sets=eval_sets,
                         proxies=proxies, retain_size=int(keep.sum()), checkpoint_path=checkpoint_path,
                         resume=resume, keep_checkpoint=keep_checkpoint, distributed=distributed)
    if not evaluate:
        return None, result
    t0 = time.perf_counter()
    deployed = result.deployed   # stakes' view, images in [0, 1] (result.model may be the user's own class)
    with autocast():
        final = evaluate_model(deployed, data, forget_idx)
        mia = membership_inference(deployed, fx, fy, data.test_x, data.test_y, seed=seed)
        gallery_x, gallery_y = eval_sets["retain"]
        retrieval = embedding_metrics(model, deployed, fx, fy, test_x, test_y, gallery_x, gallery_y, seed=seed)
    record = {
        "method": method, "dataset": data.name, "synthetic": bool(getattr(data, "synthetic", False)), "k": k,
        "seed": seed, **final,
        "pretrained": pre,
        "structure_drift": result.metrics.get("structure_drift"),
        "mia": mia,
        "retrieval": retrieval,
        "peak_memory_mb": meter.peak_memory_mb,
        "steps": result.steps, "epochs": result.epochs, "stopped": result.stopped,
        "wall_time_s": result.wall_time_s, "timings": {**result.timings, "evaluation_s": time.perf_counter() - t0},
        "proxies": result.proxies, "distributed": result.distributed,
        "config": result.config, "method_config": result.method_config, "execution": result.execution,
        "history": result.history,
        "model": result.model_info,
    }
    return record, result


@torch.no_grad()
def embedding(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The representation the head sees: ``model.embed`` of a deployed model, else ``model.features``;
    batches of ``x`` go to the model's device, and the embeddings stay there."""
    embed = getattr(model, "embed", model.features)
    device = model_device(model, x.device)
    was = model.training
    model.eval()
    out = [embed(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def embedding_metrics(original, deployed, fx, fy, query_x, query_y, gallery_x, gallery_y, *, seed: int) -> dict:
    """Retrieval on embeddings (METHOD.md §11): test queries against the retained gallery
    (recall@1/5, mAP), identification accuracy (1-NN), how often a forgotten image still retrieves
    its own class, and the change of the retained embeddings' pairwise cosine matrix."""
    q, gal, f = embedding(deployed, query_x), embedding(deployed, gallery_x), embedding(deployed, fx)
    out = dict(retrieval_metrics(q, query_y, gal, gallery_y))
    out["identification_accuracy"] = identification_accuracy(q, query_y, gal, gallery_y)
    out["forgotten_retrieval_rate"] = forgotten_retrieval_rate(f, fy, gal, gallery_y)
    out["pairwise_cosine_change"] = pairwise_cosine_change(embedding(original, gallery_x), gal, seed=seed)
    return out


