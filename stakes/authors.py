"""The networks of the authors' released StructGuard code (METHOD.md §9a.1), with parameter names and
shapes such that a state dict saved from their modules loads with ``strict=True``.

Two families, written here from the layouts METHOD.md §9a describes (no code of theirs is copied):

* ``cifar10_resnet18/34/50`` — their CIFAR-10 networks: a torchvision-layout ResNet with a 3×3
  stride-1 ``conv1``, ``bn1``, ``relu``, **then** ``maxpool`` (3, 2, 1), so ``layer1`` sees 16×16;
  ``layer1``…``layer4`` (64-128-256-512 channels, blocks named as torchvision's ``BasicBlock`` /
  ``Bottleneck``, with ``downsample``), ``avgpool``, ``fc``. (stakes' own CIFAR ResNet,
  ``resnet18`` in :func:`stakes.models.build_model`, has no max-pool: 4× the FLOPs, other weights.)
* ``cifar100_resnet18/34/50/101/152`` — their CIFAR-100 networks: ``conv1`` a Sequential (3×3
  conv, BN, ReLU), no max-pool, stages ``conv2_x``…``conv5_x`` of blocks whose
  ``residual_function`` is a Sequential (conv, BN, ReLU, conv, BN; the bottleneck: three convs)
  and whose ``shortcut`` is an empty Sequential or (1×1 conv, BN); ``avg_pool``; ``fc``.

Their input normalisation is a layer in front of the network with fixed mean and std (no state in
their state dicts). Here it is the model's ``input_normalization`` (CIFAR-10: mean (0.4914, 0.4822,
0.4465), std (0.2023, 0.1994, 0.2010); CIFAR-100: mean (0.5071, 0.4867, 0.4408), std (0.2675,
0.2565, 0.2761)), which :func:`stakes.models.as_classifier` puts in front as stakes does for every
model it adapts, so the unlearned model comes back as the same class, in the authors' layout:

    net = stakes.authors.build("cifar10_resnet18", num_classes=10)
    net.load_state_dict(stakes.authors.authors_state_dict(torch.load("resnet18.pt")))   # strict
    result = stakes.unlearn(net, forget_set, config=stakes.preset("authors"), anchors=A)
    torch.save(result.model.state_dict(), "unlearned.pt")     # loads into their ResNet again

and on the command line ``--model resnet18.pt --arch authors:cifar10_resnet18``.
"""

from __future__ import annotations

import torch
from torch import nn

CIFAR10_NORMALIZATION = {"source": "the authors' CIFAR-10 normalisation layer",
                         "mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}
CIFAR100_NORMALIZATION = {"source": "the authors' CIFAR-100 normalisation layer",
                          "mean": [0.5071, 0.4867, 0.4408], "std": [0.2675, 0.2565, 0.2761]}

# name → (family, block kind, blocks per stage)
ARCHS = {
    "cifar10_resnet18": ("cifar10", "basic", (2, 2, 2, 2)),
    "cifar10_resnet34": ("cifar10", "basic", (3, 4, 6, 3)),
    "cifar10_resnet50": ("cifar10", "bottleneck", (3, 4, 6, 3)),
    "cifar100_resnet18": ("cifar100", "basic", (2, 2, 2, 2)),
    "cifar100_resnet34": ("cifar100", "basic", (3, 4, 6, 3)),
    "cifar100_resnet50": ("cifar100", "bottleneck", (3, 4, 6, 3)),
    "cifar100_resnet101": ("cifar100", "bottleneck", (3, 4, 23, 3)),
    "cifar100_resnet152": ("cifar100", "bottleneck", (3, 8, 36, 3)),
}


class _Cifar10Block(nn.Module):
    """A torchvision-layout residual block (``conv1``, ``bn1``, ``relu``, ``conv2``, ``bn2``[, ``conv3``,
    ``bn3``], ``downsample``): the authors' CIFAR-10 ResNets are built of these."""

    def __init__(self, c_in: int, planes: int, stride: int, bottleneck: bool):
        super().__init__()
        self.expansion = 4 if bottleneck else 1
        self.bottleneck = bottleneck
        out = planes * self.expansion
        if bottleneck:
            self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(out)
        else:
            self.conv1 = nn.Conv2d(c_in, planes, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
        self.out_channels = out

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.bottleneck:
            out = self.bn3(self.conv3(self.relu(out)))
        return self.relu(out + identity)


class Cifar10ResNet(nn.Module):
    """The authors' CIFAR-10 ResNet (module docstring): the torchvision layout with a 3×3 stride-1
    ``conv1`` and its max-pool kept. ``forward`` takes normalised images (``input_normalization``)."""

    input_normalization = CIFAR10_NORMALIZATION

    def __init__(self, block_kind: str, layers, num_classes: int = 10):
        super().__init__()
        bottleneck = block_kind == "bottleneck"
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        c = 64
        for i, (planes, blocks, stride) in enumerate(zip((64, 128, 256, 512), layers, (1, 2, 2, 2))):
            stage = []
            for s in [stride] + [1] * (blocks - 1):
                stage.append(_Cifar10Block(c, planes, s, bottleneck))
                c = stage[-1].out_channels
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():   # the initialisation of torchvision's (and the authors') ResNet
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class _Cifar100Block(nn.Module):
    """A residual block of the authors' CIFAR-100 ResNet: ``relu(residual_function(x) + shortcut(x))``."""

    def __init__(self, c_in: int, planes: int, stride: int, bottleneck: bool):
        super().__init__()
        expansion = 4 if bottleneck else 1
        if bottleneck:
            layers = [nn.Conv2d(c_in, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
                      nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(planes),
                      nn.ReLU(inplace=True),
                      nn.Conv2d(planes, planes * expansion, 1, bias=False), nn.BatchNorm2d(planes * expansion)]
        else:
            layers = [nn.Conv2d(c_in, planes, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(planes),
                      nn.ReLU(inplace=True),
                      nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes)]
        self.residual_function = nn.Sequential(*layers)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != planes * expansion:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, planes * expansion, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes * expansion))
        self.out_channels = planes * expansion

    def forward(self, x):
        return torch.relu(self.residual_function(x) + self.shortcut(x))


class Cifar100ResNet(nn.Module):
    """The authors' CIFAR-100 ResNet (module docstring). ``forward`` takes normalised images."""

    input_normalization = CIFAR100_NORMALIZATION

    def __init__(self, block_kind: str, layers, num_classes: int = 100):
        super().__init__()
        bottleneck = block_kind == "bottleneck"
        self.conv1 = nn.Sequential(nn.Conv2d(3, 64, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(64),
                                   nn.ReLU(inplace=True))
        c = 64
        for i, (planes, blocks, stride) in enumerate(zip((64, 128, 256, 512), layers, (1, 2, 2, 2))):
            stage = []
            for s in [stride] + [1] * (blocks - 1):
                stage.append(_Cifar100Block(c, planes, s, bottleneck))
                c = stage[-1].out_channels
            setattr(self, f"conv{i + 2}_x", nn.Sequential(*stage))
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.conv1(x)
        for stage in (self.conv2_x, self.conv3_x, self.conv4_x, self.conv5_x):
            x = stage(x)
        return self.fc(torch.flatten(self.avg_pool(x), 1))


def build(name: str, num_classes: int, *, in_channels: int = 3) -> nn.Module:
    """A freshly initialised network of the authors' layout ``name`` (one of :data:`ARCHS`)."""
    if name not in ARCHS:
        raise ValueError(f"unknown authors' network {name!r}; expected one of {', '.join(ARCHS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if in_channels != 3:
        raise ValueError(f"the authors' {name} takes 3-channel (RGB) images; the data have {in_channels} channel(s)")
    family, kind, layers = ARCHS[name]
    net = (Cifar10ResNet if family == "cifar10" else Cifar100ResNet)(kind, layers, num_classes=num_classes)
    net.authors_arch = name
    return net


def authors_state_dict(state: dict) -> dict:
    """The network's own state dict from a file saved from the authors' modules: their bare ResNet
    (as released: returned unchanged), or their wrappers around it — ``Sequential(normalize, net)``
    (keys ``1.…``) and the ``ModelWrapper(normalize, net)`` of their StructGuard run (keys
    ``model.…`` plus the wrapper's own ``fc.…``, the same tensors as ``model.fc.…``). Their
    normalisation layer holds no state, so nothing else is dropped."""
    keys = list(state)
    for prefix in ("model.", "1."):
        if keys and all(k.startswith(prefix) or (prefix == "model." and k.startswith("fc.")) for k in keys) \
                and any(k.startswith(prefix) for k in keys):
            inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            # the wrapper's own fc.* are the inner net's fc (one tensor saved twice): keep one
            return inner
    return state
