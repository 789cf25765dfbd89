"""Classifiers split into features and head; the CIFAR ResNets; as_classifier."""

import pytest
import torch
from torch import nn

from stakes.models import ARCHS, Classifier, as_classifier, build_model, default_arch


@pytest.mark.parametrize("arch,c,s,d_f", [("digits_cnn", 1, 8, 128), ("shapes_cnn", 3, 32, 128)])
def test_small_cnns(arch, c, s, d_f):
    torch.manual_seed(0)
    m = build_model(arch, 10, in_channels=c, image_size=s).eval()
    x = torch.rand(4, c, s, s)
    feats = m.features(x)
    assert feats.shape == (4, d_f) and m.feature_dim == d_f and m.num_classes == 10
    assert isinstance(m.head, nn.Linear) and m.head.in_features == d_f
    logits = m(x)
    assert logits.shape == (4, 10)
    assert torch.allclose(logits, m.head(feats))
    assert m.arch == arch
    assert m.arch_kwargs == dict(num_classes=10, in_channels=c, image_size=s)
    # input normalisation is the first layer of features, with fixed (buffer) statistics
    norm = m.features[0]
    assert not any(True for _ in norm.parameters())
    assert torch.allclose(norm(torch.full((1, c, s, s), 0.5)),
                          (0.5 - norm.mean) / norm.std * torch.ones(1, c, s, s))


@pytest.mark.parametrize("num_classes", [10, 100])
def test_resnet18_cifar_variant(num_classes):
    torch.manual_seed(0)
    m = build_model("resnet18", num_classes, in_channels=3, image_size=32).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        feats = m.features(x)
        logits = m(x)
    assert feats.shape == (2, 512) and logits.shape == (2, num_classes)
    assert m.feature_dim == 512
    assert torch.allclose(logits, m.head(feats), atol=1e-6)
    # the CIFAR stem: 3×3 stride-1 conv, no max-pool (32×32 stays 32×32 into layer1)
    conv1 = [mod for mod in m.features.modules() if isinstance(mod, nn.Conv2d)][0]
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
    assert not any(isinstance(mod, nn.MaxPool2d) for mod in m.features.modules())


def test_resnet50_feature_dim():
    m = build_model("resnet50", 10, in_channels=3, image_size=32).eval()
    with torch.no_grad():
        assert m.features(torch.rand(1, 3, 32, 32)).shape == (1, 2048)
    assert m.feature_dim == 2048


def test_build_model_errors_and_defaults():
    assert ARCHS == ("digits_cnn", "shapes_cnn", "resnet18", "resnet50")
    with pytest.raises(ValueError, match="unknown arch 'vgg'"):
        build_model("vgg", 10, in_channels=3, image_size=32)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("digits_cnn", 0, in_channels=1, image_size=8)
    assert default_arch("digits") == "digits_cnn"
    assert default_arch("shapes") == "shapes_cnn"
    assert {default_arch(n) for n in ("cifar10", "cifar100", "imagefolder")} == {"resnet18"}
    with pytest.raises(ValueError, match="mnist"):
        default_arch("mnist")


def test_as_classifier_torchvision_resnet_shares_parameters():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    net = resnet18(weights=None, num_classes=7).eval()
    clf = as_classifier(net)
    assert isinstance(clf, Classifier) and clf.head is net.fc
    assert clf.feature_dim == 512 and clf.num_classes == 7
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(clf(x), net(x))
        assert clf.features(x).shape == (2, 512)
    # same storage, no copies: changing the classifier changes the network
    net_params = {id(p) for p in net.parameters()}
    assert {id(p) for p in clf.parameters()} == net_params
    with torch.no_grad():
        clf.features.body.conv1.weight.zero_()
    assert net.conv1.weight.abs().sum() == 0
    assert type(net.fc) is nn.Linear   # the user's model keeps its head (the features hold a structural copy)


def test_as_classifier_other_forms():
    m = build_model("digits_cnn", 10, in_channels=1, image_size=8)
    assert as_classifier(m) is m
    feats, head = nn.Sequential(nn.Flatten(1), nn.Linear(64, 16)), nn.Linear(16, 3)
    clf = as_classifier(feats, head)
    assert clf.features is feats and clf.head is head and clf.feature_dim == 16
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(clf(x), head(feats(x)))
    with pytest.raises(TypeError, match=r"not a timm, torchvision or Hugging Face classifier"):
        as_classifier(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(TypeError, match="nn.Linear"):
        as_classifier(feats, nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="already a Classifier"):
        as_classifier(m, nn.Linear(128, 10))
