"""Classifiers f = h_φ ∘ g_ψ split into a feature extractor and a linear head (METHOD.md §1).

The unlearning methods need the split: deletion uses h_φ ∘ g_ψ, retention and alignment put a
projector between them (§7). Every model here takes images in [0, 1]; the input normalisation is
the first layer of ``features`` so that attacks (PGD proxies) work in pixel space.
"""

from __future__ import annotations

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
                 arch_kwargs: dict | None = None):
        super().__init__()
        if not isinstance(features, nn.Module):
            raise TypeError(f"features must be an nn.Module, got {type(features).__name__}")
        if not isinstance(head, nn.Linear):
            raise TypeError(f"head must be an nn.Linear, got {type(head).__name__}")
        self.features = features
        self.head = head
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs or {})

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
    clf = as_classifier(net)
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


def as_classifier(model: nn.Module, head: nn.Linear | None = None) -> Classifier:
    """View ``model`` as a :class:`Classifier` without copying weights.

    Accepted forms:
    - a :class:`Classifier` (returned as is);
    - ``as_classifier(features, head)``: any module mapping images to [N, d_f] and an
      ``nn.Linear(d_f, num_classes)``;
    - a torchvision-style ResNet (``conv1 … layer4, avgpool`` and a linear ``fc``): features are
      the trunk up to global pooling plus flatten, the head is ``fc``. The modules are shared with
      ``model``, so training one trains the other. No input normalisation is added: the result
      expects whatever inputs ``model`` expected.
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
    if (isinstance(model, nn.Module) and isinstance(getattr(model, "fc", None), nn.Linear)
            and all(isinstance(getattr(model, n, None), nn.Module) for n in _RESNET_TRUNK)):
        trunk = [getattr(model, n) for n in _RESNET_TRUNK]
        return Classifier(nn.Sequential(*trunk, nn.Flatten(1)), model.fc)
    raise TypeError(
        f"cannot split a {type(model).__name__} into features and head; pass a Classifier, "
        f"as_classifier(features, head) with head an nn.Linear, or a torchvision-style ResNet "
        f"(attributes {', '.join(_RESNET_TRUNK)} and a linear fc)")
