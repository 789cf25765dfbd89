"""Bring your own model: timm, torchvision and Hugging Face classifiers (random weights, small
configs, no downloads) split exactly, unlearned end to end, and returned in their own class."""

import copy

import pytest
import torch
from torch import nn

import stakes
from stakes.models import Classifier, Normalize, as_classifier

timm = pytest.importorskip("timm")
hf = pytest.importorskip("transformers")
tv = pytest.importorskip("torchvision")

C = 5   # classes


def _timm(name, **kw):
    return lambda: timm.create_model(name, num_classes=C, **kw)


def _tv(factory, **kw):
    return lambda: factory(num_classes=C, **kw)


def _tv_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=C)


def _tv_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2],
                           num_classes=C)


def _tv_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=C)


def _hf_vit():
    return hf.ViTForImageClassification(hf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=C))


def _hf_resnet():
    return hf.ResNetForImageClassification(hf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                           num_labels=C))


def _hf_convnext():
    return hf.ConvNextForImageClassification(hf.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                                               num_labels=C))


def _hf_swin():
    return hf.SwinForImageClassification(hf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                       num_heads=[1, 2], window_size=2, num_labels=C))


MODELS = {
    # name: (factory, head path)
    "timm-resnet10t": (_timm("resnet10t"), "fc"),
    "timm-vit": (_timm("vit_tiny_patch16_224", img_size=32, patch_size=8), "head"),
    "timm-convnext": (_timm("convnext_atto"), "head.fc"),
    "timm-test_resnet": (_timm("test_resnet"), "fc"),
    "timm-test_vit": (_timm("test_vit", img_size=32), "head"),
    "tv-resnet18": (lambda: tv.models.resnet18(num_classes=C), "fc"),
    "tv-resnext": (lambda: tv.models.ResNet(tv.models.resnet.Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4,
                                            num_classes=C), "fc"),
    "tv-vit": (_tv_vit, "heads.head"),
    "tv-swin": (_tv_swin, "head"),
    "tv-convnext": (_tv_convnext, "classifier.2"),
    "tv-mobilenet_v3_small": (lambda: tv.models.mobilenet_v3_small(num_classes=C), "classifier.3"),
    "tv-efficientnet_b0": (lambda: tv.models.efficientnet_b0(num_classes=C), "classifier.1"),
    "tv-regnet": (lambda: tv.models.regnet_y_400mf(num_classes=C), "fc"),
    "tv-densenet": (lambda: tv.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                               num_classes=C), "classifier"),
    "hf-vit": (_hf_vit, "classifier"),
    "hf-resnet": (_hf_resnet, "classifier.1"),
    "hf-convnext": (_hf_convnext, "classifier"),
    "hf-swin": (_hf_swin, "classifier"),
}


def _logits(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _make(name):
    torch.manual_seed(0)
    return MODELS[name][0]().eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_the_split_reproduces_the_model_exactly(name):
    model = _make(name)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        ref = _logits(model, x)
        clf = as_classifier(model, normalization=None).eval()
        assert torch.equal(clf(x), ref)
        assert torch.equal(clf.head(clf.features(x)), ref)
    assert clf.adapter.head_path == tuple(MODELS[name][1].split("."))
    assert isinstance(clf.head, nn.Linear) and clf.head.out_features == C
    # a view: every weight is shared, the head's are not in the features, the user's model is unchanged
    assert {id(p) for p in clf.parameters()} == {id(p) for p in model.parameters()}
    assert not {id(p) for p in clf.head.parameters()} & {id(p) for p in clf.features.parameters()}
    assert dict(model.named_modules())[MODELS[name][1]] is clf.head
    back = clf.unwrap()
    assert type(back) is type(model) and back is not model
    with torch.no_grad():
        assert torch.equal(_logits(back, x), ref)


def test_normalization_comes_from_the_config_or_the_user():
    model = _make("timm-resnet10t")
    x = torch.rand(2, 3, 32, 32)
    clf = as_classifier(model).eval()   # timm: pretrained_cfg's mean/std, as a layer in front
    assert clf.normalization == {"source": "timm pretrained_cfg", "mean": [0.485, 0.456, 0.406],
                                 "std": [0.229, 0.224, 0.225]}
    norm = Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        assert torch.equal(clf(x), model(norm(x)))
    user = as_classifier(model, normalization=([0.5] * 3, [0.25] * 3))
    assert user.normalization["source"] == "given by the user"
    with torch.no_grad():
        assert torch.equal(user(x), model((x - 0.5) / 0.25))
    # torchvision models carry no statistics: none is added, and the result says so
    plain = as_classifier(_make("tv-resnext"))
    assert plain.normalization["mean"] is None and "carries no mean/std" in plain.normalization["source"]
    # RGB statistics for a one-channel model: their channel mean
    gray = as_classifier(timm.create_model("test_resnet", num_classes=C, in_chans=1))
    assert gray.normalization["mean"] == [0.5] and "averaged over channels" in gray.normalization["source"]
    with pytest.raises(ValueError, match="same length"):
        as_classifier(model, normalization=([0.5, 0.5], [0.2]))
    with pytest.raises(ValueError, match="std > 0"):
        as_classifier(model, normalization=([0.5], [0.0]))
    with pytest.raises(ValueError, match="normalization must be"):
        as_classifier(model, normalization="imagenet")


def test_hf_normalization_from_a_local_image_processor_config(tmp_path):
    model = _make("hf-vit")
    model.save_pretrained(tmp_path)
    hf.ViTImageProcessor(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]).save_pretrained(tmp_path)
    loaded = hf.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    clf = as_classifier(loaded)
    assert clf.normalization["mean"] == pytest.approx([0.4, 0.5, 0.6])
    assert "preprocessor_config.json" in clf.normalization["source"]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(clf(x), _logits(model, Normalize([0.4, 0.5, 0.6], [0.2, 0.3, 0.4])(x)))
    proc = hf.AutoImageProcessor.from_pretrained(tmp_path)
    assert as_classifier(model, normalization=proc).normalization["std"] == pytest.approx([0.2, 0.3, 0.4])


def test_anything_else_gets_a_clear_error():
    with pytest.raises(TypeError, match=r"as_classifier\(features, head\)"):
        as_classifier(nn.Sequential(nn.Flatten(1), nn.Linear(12, 3)))
    with pytest.raises(TypeError, match="num_classes=0"):
        as_classifier(timm.create_model("test_resnet", num_classes=0))
    with pytest.raises(TypeError, match="layers after its last nn.Linear"):
        m = tv.models.resnet18(num_classes=C)
        m.fc = nn.Sequential(nn.Linear(512, C), nn.Softmax(dim=1))
        as_classifier(m)
    with pytest.raises(TypeError, match="must be an nn.Module"):
        stakes.unlearn("model.pt", (torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, C, (n,), generator=g)


def _config(**over):
    """A few steps, tiny PGD (2 repetitions of 2 steps), a small importance sample."""
    values = dict(repetitions=2, pgd_steps=2, eps=0.5, max_steps=2, log_every=1, progress=False, backend="reference",
                  stop_warmup_steps=100, importance_samples=8, lr=0.05)
    values.update(over)
    return stakes.preset("stable", **values)


@pytest.mark.parametrize("name", ["timm-test_resnet", "timm-test_vit", "tv-resnext", "tv-swin", "tv-convnext",
                                  "hf-vit", "hf-resnet"])
def test_structguard_unlearns_a_users_model_and_returns_its_class(name, tmp_path):
    model = _make(name)
    before = copy.deepcopy(model.state_dict())
    forget, test = _data(4, 1), _data(8, 2)
    anchors = torch.randn(C, 16, generator=torch.Generator().manual_seed(3))
    res = stakes.unlearn(model, forget, method="structguard", anchors=anchors, config=_config(),
                         eval_sets={"test": test})
    assert res.steps == 2 and [h["step"] for h in res.history] == [0, 1, 2]
    assert 0.0 <= res.metrics["test_accuracy"] <= 100.0 and res.metrics["structure_drift"] >= 0.0
    # the user's model is untouched; the result is a model of its class with moved weights
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    out = res.model
    assert type(out) is type(model) and out is not model
    assert res.model_info["type"].endswith(type(model).__qualname__) and res.model_info["form"] == "h∘g"
    moved = [k for k, v in out.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert moved and set(out.state_dict()) == set(before)
    # it is the deployed model: the same logits as stakes' [0, 1]-space view, behind the normalisation
    norm = res.model_info["normalization"]
    layer = Normalize(norm["mean"], norm["std"]) if norm["mean"] is not None else nn.Identity()
    x = test[0][:4]
    with torch.no_grad():
        torch.testing.assert_close(_logits(out.eval(), layer(x)), res.deployed(x), rtol=0, atol=0)
    # savable the usual way, and reloads to the same logits
    if name.startswith("hf-"):
        out.save_pretrained(tmp_path / "m")
        again = hf.AutoModelForImageClassification.from_pretrained(tmp_path / "m").eval()
    else:
        torch.save(out.state_dict(), tmp_path / "m.pt")
        again = _make(name)
        again.load_state_dict(torch.load(tmp_path / "m.pt"))
    with torch.no_grad():
        assert torch.equal(_logits(again, x), _logits(out, x))


def test_a_trained_projector_keeps_stakes_deployed_model_and_says_so():
    model = _make("timm-test_resnet")
    forget = _data(4, 1)
    res = stakes.unlearn(model, forget, anchors=torch.randn(C, 16), config=_config(projector_lr=0.009))
    assert res.model is res.deployed and res.model.projector is not None
    assert res.model_info["form"] == "h∘p∘g" and "not a timm.models.resnet.ResNet" in res.model_info["note"]
    assert res.model_info["input"].startswith("images in [0, 1]")


def test_a_classifier_passes_through_unchanged():
    from stakes.models import build_model

    m = build_model("digits_cnn", C, in_channels=1, image_size=8)
    assert as_classifier(m) is m and isinstance(m, Classifier) and m.unwrap() is m
