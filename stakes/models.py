"""Classifiers f = h_φ ∘ g_ψ split into a feature extractor and a linear head (METHOD.md §1).

The unlearning methods need the split: deletion uses h_φ ∘ g_ψ, retention and alignment put a
projector between them (§7). Every model here takes images in [0, 1]; the input normalisation is
the first layer of ``features`` so that attacks (PGD proxies) work in pixel space.

:func:`as_classifier` adapts the models researchers bring — timm classifiers, torchvision's
families, Hugging Face ``*ForImageClassification`` — by the surfaces they share (timm's
``forward_features`` / ``forward_head(pre_logits=True)`` / ``get_classifier()``, the last linear
layer of a torchvision or Hugging Face classifier block), not class by class. The adapted model's
head slot is emptied (an ``nn.Identity``) in a structural copy that shares every weight, so the
features end exactly at the head's input and ``as_classifier(m)(x) == m(x)``; after unlearning
:meth:`Classifier.unwrap` puts the head back and returns a model of the user's own class.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Optional

import torch
from torch import Tensor, nn

ARCHS = ("digits_cnn", "shapes_cnn", "resnet18", "resnet50")

# Per-channel statistics of the data each architecture is meant for; for a different channel
# count the channel mean of these values is used.
_NORM = {
    "digits_cnn": ((0.305,), (0.383,)),          # sklearn digits / 16
    "shapes_cnn": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    "resnet18": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),  # CIFAR-10
    "resnet50": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


class Normalize(nn.Module):
    """x ↦ (x − mean) / std per channel; mean and std are buffers (saved, never trained)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """f(x) = head(features(x)): ``features`` maps images to [N, feature_dim], ``head`` is linear.

    ``arch`` and ``arch_kwargs`` record how to rebuild the model with :func:`build_model`
    (``arch == "custom"`` for wrapped models that cannot be rebuilt).
    """

    def __init__(self, features: nn.Module, head: nn.Linear, *, arch: str = "custom",
                 arch_kwargs: dict | None = None, adapter: "ModelAdapter | None" = None):
        super().__init__()
        if not isinstance(features, nn.Module):
            raise TypeError(f"features must be an nn.Module, got {type(features).__name__}")
        if not isinstance(head, nn.Linear):
            raise TypeError(f"head must be an nn.Linear, got {type(head).__name__}")
        self.features = features
        self.head = head
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs or {})
        self.adapter = adapter   # how a user's timm / torchvision / Hugging Face model was split, or None

    @property
    def normalization(self) -> dict:
        """The input normalisation in front of the model: ``{"source", "mean", "std"}``."""
        adapter = getattr(self, "adapter", None)
        if adapter is None:
            return {"source": "the model's own (inside features)"}
        return dict(adapter.normalization)

    def unwrap(self) -> nn.Module:
        """The model in its original form: for an adapted model, a model of the user's class with the
        (current) head back in its slot, taking inputs normalised as the user's model did; else self."""
        adapter = getattr(self, "adapter", None)
        return self if adapter is None else adapter.rebuild(self.features, self.head)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


def _norm_layer(arch: str, in_channels: int) -> Normalize:
    mean, std = _NORM[arch]
    if len(mean) != in_channels:
        mean = (sum(mean) / len(mean),) * in_channels
        std = (sum(std) / len(std),) * in_channels
    return Normalize(mean, std)


def build_model(arch: str, num_classes: int, *, in_channels: int, image_size: int) -> Classifier:
    """A freshly initialised :class:`Classifier` of architecture ``arch`` (one of :data:`ARCHS`).

    - ``digits_cnn``: conv32-conv64-pool-conv128, then global average pool → 128-d features.
      No BatchNorm: the unlearning steps see batches of a few forget images.
    - ``shapes_cnn``: 4 conv-BN-ReLU layers (16, 32, 64, 128 channels, max-pool after the first
      three; narrow so that it pretrains in minutes on a CPU), global average pool → 128-d
      features.
    - ``resnet18`` / ``resnet50``: torchvision ResNets in their CIFAR form (3×3 stride-1 stem,
      no max-pool) → 512-d / 2048-d features.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    for name, val in (("num_classes", num_classes), ("in_channels", in_channels),
                      ("image_size", image_size)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    kwargs = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    norm = _norm_layer(arch, in_channels)

    if arch == "digits_cnn":
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        features = nn.Sequential(
            norm,
            nn.Conv2d(in_channels, 32, 3, padding=1), relu(),
            nn.Conv2d(32, 64, 3, padding=1), relu(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), relu(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
        )
        return Classifier(features, nn.Linear(128, num_classes), arch=arch, arch_kwargs=kwargs)

    if arch == "shapes_cnn":
        features = nn.Sequential(
            norm,
            *_conv_block(in_channels, 16), nn.MaxPool2d(2),
            *_conv_block(16, 32), nn.MaxPool2d(2),
            *_conv_block(32, 64), nn.MaxPool2d(2),
            *_conv_block(64, 128),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
        )
        return Classifier(features, nn.Linear(128, num_classes), arch=arch, arch_kwargs=kwargs)

    from torchvision.models import resnet18, resnet50

    net = (resnet18 if arch == "resnet18" else resnet50)(weights=None, num_classes=num_classes)
    # CIFAR variant: 32×32 inputs keep their resolution through the stem.
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    clf = _resnet_trunk_split(net)
    clf.features = nn.Sequential(norm, *clf.features)
    clf.arch, clf.arch_kwargs = arch, kwargs
    return clf


def default_arch(dataset_name: str) -> str:
    """The architecture pretrained for a data set by default."""
    if dataset_name == "digits":
        return "digits_cnn"
    if dataset_name == "shapes":
        return "shapes_cnn"
    if dataset_name in ("cifar10", "cifar100", "imagefolder"):
        return "resnet18"
    raise ValueError(f"no default architecture for data set {dataset_name!r}; expected one of "
                     f"digits, shapes, cifar10, cifar100, imagefolder")


_RESNET_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                 "avgpool")

# Where torchvision and Hugging Face keep the classifier block; the head is its last nn.Linear.
_HEAD_BLOCKS = ("fc", "classifier", "heads", "head")


def _resnet_trunk_split(model: nn.Module) -> Classifier:
    """A ResNet-shaped module (``conv1 … layer4, avgpool`` and a linear ``fc``) as
    ``Sequential(trunk…, Flatten) → fc``, sharing the modules (stakes' own CIFAR ResNets)."""
    trunk = [getattr(model, n) for n in _RESNET_TRUNK]
    return Classifier(nn.Sequential(*trunk, nn.Flatten(1)), model.fc)


def _is_resnet_shaped(model) -> bool:
    return (isinstance(model, nn.Module) and isinstance(getattr(model, "fc", None), nn.Linear)
            and all(isinstance(getattr(model, n, None), nn.Module) for n in _RESNET_TRUNK))


def _with_module(root: nn.Module, path: tuple, new: nn.Module) -> nn.Module:
    """A structural copy of ``root`` with the submodule at ``path`` replaced by ``new``.

    Only the modules along the path are copied (shallowly, with their own child dicts); every other
    submodule, parameter and buffer is shared with ``root``, which is left unchanged."""
    clone = copy.copy(root)
    for attr in ("_modules", "_parameters", "_buffers"):
        setattr(clone, attr, type(getattr(root, attr))(getattr(root, attr)))
    name, rest = path[0], path[1:]
    clone._modules[name] = new if not rest else _with_module(root._modules[name], rest, new)
    return clone


def _module_path(root: nn.Module, target: nn.Module) -> Optional[tuple]:
    for name, mod in root.named_modules(remove_duplicate=False):
        if mod is target and name:
            return tuple(name.split("."))
    return None


def _kind(model) -> Optional[str]:
    """"timm", "torchvision", "transformers", or "authors" (the networks of the authors' code,
    :mod:`stakes.authors`) from the classes the model is built from."""
    modules = [c.__module__ or "" for c in type(model).__mro__]
    if type(model).__module__ == "stakes.authors":
        return "authors"
    if any(m.startswith("transformers.") for m in modules):
        return "transformers"
    if any(m.startswith("timm.") for m in modules) or all(
            callable(getattr(model, f, None)) for f in ("forward_features", "forward_head", "get_classifier")):
        return "timm"
    if any(m.startswith("torchvision.models") for m in modules):
        return "torchvision"
    return None


def _head_of_block(model: nn.Module, kind: str) -> tuple:
    """(path, head) of the last nn.Linear of the model's classifier block (torchvision, Hugging Face).

    The head must be the block's last layer with parameters or effect: anything after it would act
    on the logits, and the split would no longer reproduce the model."""
    for attr in _HEAD_BLOCKS:
        block = getattr(model, attr, None)
        if not isinstance(block, nn.Module):
            continue
        leaves = [(n, m) for n, m in block.named_modules() if not list(m.children())]
        linears = [(n, m) for n, m in leaves if isinstance(m, nn.Linear)]
        if not linears:
            break
        name, head = linears[-1]
        after = [n for n, m in leaves[[m for _, m in leaves].index(head) + 1:]
                 if not isinstance(m, (nn.Identity, nn.Dropout, nn.Flatten))]
        if after:
            raise TypeError(f"cannot split a {type(model).__name__}: its classifier block {attr!r} has layers after "
                            f"its last nn.Linear ({', '.join(after)}); pass as_classifier(features, head)")
        return (attr, *name.split(".")) if name else (attr,), head
    raise TypeError(f"cannot split a {type(model).__name__} ({kind}): no nn.Linear head in "
                    f"{' / '.join(_HEAD_BLOCKS)}; pass as_classifier(features, head) with head an nn.Linear")


def _config_normalization(model, kind: str) -> Optional[dict]:
    """mean/std from the model's own configuration: timm's ``pretrained_cfg``, or the Hugging Face
    image-processor config (``preprocessor_config.json``) next to a model loaded from a local folder."""
    if kind == "authors":   # their normalisation layer's fixed mean and std
        return dict(model.input_normalization)
    if kind == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        if cfg.get("mean") is not None and cfg.get("std") is not None:
            return {"source": "timm pretrained_cfg", "mean": list(cfg["mean"]), "std": list(cfg["std"])}
    if kind == "transformers":
        folder = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        path = os.path.join(folder, "preprocessor_config.json")
        if folder and os.path.isfile(path):
            with open(path) as fh:
                proc = json.load(fh)
            if proc.get("image_mean") is not None and proc.get("image_std") is not None:
                return {"source": f"Hugging Face image-processor config ({path})",
                        "mean": list(proc["image_mean"]), "std": list(proc["image_std"])}
    return None


def _input_channels(model: nn.Module) -> Optional[int]:
    """The channel count of the model's first convolution (or patch embedding), if it has one."""
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            return mod.in_channels
    return None


def _fit_channels(norm: dict, model: nn.Module) -> dict:
    """Config statistics are for RGB; a model built for another channel count gets their channel mean."""
    channels = _input_channels(model)
    if norm.get("mean") is None or channels is None or channels == len(norm["mean"]):
        return norm
    mean, std = sum(norm["mean"]) / len(norm["mean"]), sum(norm["std"]) / len(norm["std"])
    return {"source": f"{norm['source']}, averaged over channels (the model takes {channels})",
            "mean": [mean] * channels, "std": [std] * channels}


def _normalization(model, kind: str, normalization) -> dict:
    """The input normalisation to put in front of an adapted model (see :func:`as_classifier`)."""
    if normalization is False or normalization is None:
        return {"source": "none (the model sees images in [0, 1])", "mean": None, "std": None}
    if isinstance(normalization, str):
        if normalization != "config":
            raise ValueError(f"normalization must be 'config', (mean, std), an image processor or None, "
                             f"got {normalization!r}")
        found = _config_normalization(model, kind)
        if found is not None:
            return _fit_channels(found, model)
        return {"source": f"none: the {kind} model carries no mean/std (pass normalization=(mean, std)); "
                          "it sees images in [0, 1]", "mean": None, "std": None}
    if hasattr(normalization, "image_mean") and hasattr(normalization, "image_std"):   # an HF image processor
        mean, std, source = normalization.image_mean, normalization.image_std, f"{type(normalization).__name__}"
    else:
        try:
            mean, std = normalization
        except (TypeError, ValueError):
            raise ValueError(f"normalization must be 'config', (mean, std), an image processor or None, "
                             f"got {normalization!r}") from None
        source = "given by the user"
    mean = [float(v) for v in torch.as_tensor(mean, dtype=torch.float64).flatten()]
    std = [float(v) for v in torch.as_tensor(std, dtype=torch.float64).flatten()]
    if not mean or len(mean) != len(std) or any(v <= 0 for v in std):
        raise ValueError(f"normalization: mean and std need the same length (one value per channel) and std > 0, "
                         f"got mean={mean}, std={std}")
    return {"source": source, "mean": mean, "std": std}


class ModelAdapter:
    """How a user's model was split: its family, class, the path of its head and the normalisation
    in front. :meth:`rebuild` gives back a model of the user's class with a (trained) head."""

    def __init__(self, kind: str, model_type: str, head_path: tuple, normalization: dict):
        self.kind, self.model_type, self.head_path = kind, model_type, tuple(head_path)
        self.normalization = dict(normalization)

    def rebuild(self, features: "AdaptedFeatures", head: nn.Linear) -> nn.Module:
        """The user's model class, with ``features``' body and ``head`` in its slot (shared weights)."""
        return _with_module(features.body, self.head_path, head)

    def __repr__(self) -> str:
        return (f"ModelAdapter({self.kind}: {self.model_type}, head {'.'.join(self.head_path)}, "
                f"normalization {self.normalization['source']})")


class AdaptedFeatures(nn.Module):
    """g(x) of an adapted model: [normalisation →] the user's model, with its head slot emptied,
    up to the head's input. ``call`` is how the model is called: "timm" (``forward_features`` then
    ``forward_head(pre_logits=True)``), "transformers" (``pixel_values=``, ``.logits``) or "module"."""

    def __init__(self, body: nn.Module, call: str, normalize: Optional[nn.Module] = None):
        super().__init__()
        self.normalize = normalize if normalize is not None else nn.Identity()
        self.body = body
        self.call = call

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize(x)
        if self.call == "timm":
            return self.body.forward_head(self.body.forward_features(x), pre_logits=True)
        if self.call == "transformers":
            return self.body(pixel_values=x).logits
        return self.body(x)


def _adapt(model: nn.Module, kind: str, normalization) -> Classifier:
    if kind == "timm":
        head = model.get_classifier()
        path = _module_path(model, head) if isinstance(head, nn.Module) else None
        if not isinstance(head, nn.Linear) or path is None:
            raise TypeError(f"cannot split the timm model {type(model).__name__}: get_classifier() is a "
                            f"{type(head).__name__}, not an nn.Linear of the model (was it built with num_classes=0?); "
                            "pass as_classifier(features, head)")
    else:
        path, head = _head_of_block(model, kind)
    norm = _normalization(model, kind, normalization)
    body = _with_module(model, path, nn.Identity())
    call = {"timm": "timm", "transformers": "transformers"}.get(kind, "module")
    layer = Normalize(norm["mean"], norm["std"]) if norm["mean"] is not None else None
    adapter = ModelAdapter(kind, f"{type(model).__module__}.{type(model).__qualname__}", path, norm)
    return Classifier(AdaptedFeatures(body, call, layer), head, adapter=adapter)


def as_classifier(model: nn.Module, head: nn.Linear | None = None, *, normalization="config") -> Classifier:
    """View ``model`` as a :class:`Classifier` (features → linear head) without copying weights.

    Accepted forms:

    - a :class:`Classifier` (returned as is);
    - ``as_classifier(features, head)``: any module mapping images to [N, d_f] and an
      ``nn.Linear(d_f, num_classes)``;
    - a timm classifier (CNN or ViT): features = ``forward_features`` + ``forward_head(pre_logits=True)``,
      head = ``get_classifier()``;
    - a torchvision classifier (ResNet/ResNeXt/Wide-ResNet, ViT, Swin, ConvNeXt, EfficientNet,
      MobileNet, RegNet, DenseNet, …): the head is the last ``nn.Linear`` of its classifier block
      (``fc``, ``classifier``, ``heads`` or ``head``) and the features everything before it;
    - a Hugging Face ``*ForImageClassification`` model (ViT, ConvNeXt, ResNet, Swin, …): called
      with ``pixel_values``, the head is the last ``nn.Linear`` of ``classifier``;
    - a network of the authors' code (:mod:`stakes.authors`): the head is ``fc``, and
      ``normalization="config"`` puts their fixed normalisation in front;
    - any other ResNet-shaped module (``conv1 … layer4, avgpool`` and a linear ``fc``).

    The split reproduces the model exactly (eval mode): with ``normalization=None``,
    ``as_classifier(m)(x)`` equals ``m(x)`` (``.logits`` for Hugging Face). stakes works on images
    in [0, 1] (the PGD radius, the clamp), so for timm / torchvision / Hugging Face models
    ``normalization`` puts a per-channel normalisation in front: ``"config"`` (default) takes mean
    and std from the model's configuration (timm ``pretrained_cfg``; the Hugging Face
    image-processor config of a model loaded from a local folder; torchvision models carry none,
    so none is added), ``(mean, std)`` or a Hugging Face image processor gives them, ``None`` adds
    nothing. ``clf.normalization`` says which was used; :meth:`Classifier.unwrap` returns the
    model in the user's class.
    """
    if head is not None:
        if isinstance(model, Classifier):
            raise TypeError("as_classifier(features, head): features is already a Classifier; "
                            "pass it alone")
        if not isinstance(model, nn.Module):
            raise TypeError(f"as_classifier(features, head): features must be an nn.Module, "
                            f"got {type(model).__name__}")
        if not isinstance(head, nn.Linear):
            raise TypeError(f"as_classifier(features, head): head must be an nn.Linear, "
                            f"got {type(head).__name__}")
        return Classifier(model, head)
    if isinstance(model, Classifier):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (or a (features, head) pair), got {type(model).__name__}")
    kind = _kind(model)
    if kind is not None:
        return _adapt(model, kind, normalization)
    if _is_resnet_shaped(model):
        return _resnet_trunk_split(model)
    raise TypeError(
        f"cannot split a {type(model).__name__} into features and head: it is not a timm, torchvision or "
        f"Hugging Face classifier nor ResNet-shaped. Pass stakes.models.as_classifier(features, head) (or the "
        f"pair (features, head) to stakes.unlearn), with features a module mapping images in [0, 1] to "
        f"[N, d] and head the nn.Linear(d, num_classes) applied to them")
