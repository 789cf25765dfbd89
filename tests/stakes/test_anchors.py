"""Tests for stakes.anchors: descriptions, prompts, text encoders, anchor cache, prototypes."""

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stakes.anchors import (
    BUNDLED_DESCRIPTIONS,
    ENCODERS,
    TextEncoder,
    build_anchors,
    class_prompts,
    get_text_encoder,
    load_anchors,
    load_descriptions,
    prototype_anchors,
    save_anchors,
)

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]
CIFAR100 = (
    "apple, aquarium_fish, baby, bear, beaver, bed, bee, beetle, bicycle, bottle, bowl, boy, "
    "bridge, bus, butterfly, camel, can, castle, caterpillar, cattle, chair, chimpanzee, clock, "
    "cloud, cockroach, couch, crab, crocodile, cup, dinosaur, dolphin, elephant, flatfish, forest, "
    "fox, girl, hamster, house, kangaroo, keyboard, lamp, lawn_mower, leopard, lion, lizard, "
    "lobster, man, maple_tree, motorcycle, mountain, mouse, mushroom, oak_tree, orange, orchid, "
    "otter, palm_tree, pear, pickup_truck, pine_tree, plain, plate, poppy, porcupine, possum, "
    "rabbit, raccoon, ray, road, rocket, rose, sea, seal, shark, shrew, skunk, skyscraper, snail, "
    "snake, spider, squirrel, streetcar, sunflower, sweet_pepper, table, tank, telephone, "
    "television, tiger, tractor, train, trout, tulip, turtle, wardrobe, whale, willow_tree, wolf, "
    "woman, worm").split(", ")


def _expected_classes(name):
    if name == "digits":
        return [str(d) for d in range(10)]
    if name == "cifar10":
        return CIFAR10
    if name == "cifar100":
        return CIFAR100
    from stakes.data import SHAPE_CLASSES  # the procedural data set's own label order

    return list(SHAPE_CLASSES)


# ------------------------------------------------------------------------------------ descriptions

@pytest.mark.parametrize("name", BUNDLED_DESCRIPTIONS)
def test_bundled_descriptions_cover_exact_classes(name):
    desc = load_descriptions(name)
    assert list(desc) == _expected_classes(name)  # same names, same (label) order
    for cls, attrs in desc.items():
        assert len(attrs) >= 4, cls
        assert len(set(attrs)) == len(attrs), cls


def test_bundled_prompts_fit_clip_context():
    # every attribute survives CLIP's 77-token truncation (SOT + text + EOT)
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    for name in BUNDLED_DESCRIPTIONS:
        desc = load_descriptions(name)
        for prompt in class_prompts(list(desc), desc):
            assert len(tok.encode(prompt)) + 2 <= 77, prompt


def test_load_descriptions_from_path_and_dict(tmp_path):
    data = {"cat": ["whiskers", " pointed ears "]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    assert load_descriptions(path) == {"cat": ["whiskers", "pointed ears"]}
    assert load_descriptions(str(path)) == load_descriptions(data)


def test_load_descriptions_errors(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_descriptions(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json.*not valid JSON.*class_name"):
        load_descriptions(bad)
    wrong = tmp_path / "wrong.json"
    for content in (["cat", "dog"], {"cat": []}, {"cat": "whiskers"}, {"cat": ["ok", 3]},
                    {"": ["x"]}):
        wrong.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=r"wrong.json.*expected"):
            load_descriptions(wrong)
    with pytest.raises(TypeError, match="descriptions"):
        load_descriptions(42)


# ----------------------------------------------------------------------------------------- prompts

def test_class_prompts_join_and_template():
    desc = {"cat": ["whiskers", "pointed ears"], "aquarium fish": ["fins", "tank"]}
    prompts = class_prompts(["cat", "aquarium_fish", "pickup_truck"], desc)
    assert prompts == ["a photo of a cat: whiskers; pointed ears",
                       "a photo of a aquarium fish: fins; tank",  # matched without underscores
                       "a photo of a pickup truck"]                # template fallback
    assert class_prompts(["cat"], {"cat": desc["cat"]}, prefix_class=False) == [
        "whiskers; pointed ears"]
    assert class_prompts(["lawn_mower", "dog"]) == ["a photo of a lawn mower", "a photo of a dog"]


def test_class_prompts_bad_inputs():
    with pytest.warns(UserWarning, match=r"\['catt'\] match no class.*\['cat'\]"):
        class_prompts(["cat"], {"catt": ["whiskers"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a superset of the classes (subset of a data set) is fine
        assert class_prompts(["cat"], "cifar10")[0].startswith("a photo of a cat: ")
    with pytest.raises(ValueError, match="duplicate"):
        class_prompts(["cat", "cat"])
    with pytest.raises(ValueError, match="empty"):
        class_prompts([])
    with pytest.raises(TypeError, match="class_names"):
        class_prompts("cat")


# -------------------------------------------------------------------------------------- minilm

@pytest.fixture(scope="module")
def minilm_cifar10():
    return build_anchors(CIFAR10, descriptions="cifar10")


def test_minilm_anchors_unit_norm_frozen_deterministic(minilm_cifar10):
    a = minilm_cifar10
    assert a.shape == (10, 384) and a.dtype == torch.float32 and not a.requires_grad
    torch.testing.assert_close(a.norm(dim=1), torch.ones(10), atol=1e-5, rtol=0)
    assert torch.equal(build_anchors(CIFAR10, descriptions="cifar10"), a)
    # distinct classes give distinct anchors
    sim = a @ a.T
    assert (sim - torch.eye(10)).max() < 0.95


def test_minilm_is_semantic(minilm_cifar10):
    t = build_anchors(["cat", "dog", "truck"])  # template prompts "a photo of a ..."
    assert t[0] @ t[1] > t[0] @ t[2] + 0.05
    # with descriptions, each of these classes has its natural neighbour closest
    sim = minilm_cifar10 @ minilm_cifar10.T
    sim.fill_diagonal_(-1.0)
    nearest = {CIFAR10[i]: CIFAR10[j] for i, j in enumerate(sim.argmax(1).tolist())}
    assert nearest["cat"] == "dog" and nearest["dog"] == "cat"
    assert nearest["automobile"] == "truck" and nearest["truck"] == "automobile"
    assert nearest["deer"] == "horse" and nearest["horse"] == "deer"


# ------------------------------------------------------------------------------------ open_clip

@pytest.fixture(scope="module")
def clip_random():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        enc = get_text_encoder("open_clip", arch="ViT-B-32", allow_random=True)
    return enc


FEW = ["cat", "truck", "ship"]  # a ViT-B-32 text encode costs ~0.1-0.5 s per prompt on 2 busy cores


def test_open_clip_random_warns_and_is_unit_norm(clip_random):
    a = build_anchors(FEW, descriptions="cifar10", encoder=clip_random)
    assert a.shape == (3, 512) and a.dtype == torch.float32 and not a.requires_grad
    torch.testing.assert_close(a.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    assert (a @ a.T - torch.eye(3)).abs().max() < 0.999  # rows differ
    # by name: warns, and the seeded random weights reproduce the same anchors
    with pytest.warns(UserWarning, match="meaningless"):
        b = build_anchors(FEW, descriptions="cifar10", encoder="open_clip", allow_random=True)
    torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_open_clip_truncates_at_context(clip_random):
    long = "a photo of a cat: " + "; ".join(["whiskers and pointed ears"] * 40)
    e = clip_random.encode([long, long + "; a long striped tail"])
    torch.testing.assert_close(e[0], e[1])  # the extra words fall beyond 77 tokens


def test_open_clip_checkpoint_loads_weights(clip_random, tmp_path):
    # every tensor of the (text-only) random model rescaled by its own factor, saved, reloaded
    gen = torch.Generator().manual_seed(1)
    sd = {k: (v * (1 + 0.2 * torch.randn((), generator=gen)) if v.is_floating_point() else v)
          for k, v in clip_random.model.state_dict().items()}
    ckpt = tmp_path / "text_tower.pt"
    torch.save(sd, ckpt)
    reference = copy.deepcopy(clip_random.model)
    reference.load_state_dict(sd)
    import open_clip

    tokens = open_clip.get_tokenizer("ViT-B-32")(class_prompts(FEW[:2], "cifar10"))
    with torch.no_grad():
        expected = F.normalize(reference.encode_text(tokens).float(), dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint must not trigger the random-weights warning
        got = build_anchors(FEW[:2], descriptions="cifar10", encoder="open_clip", checkpoint=ckpt)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    random = build_anchors(FEW[:2], descriptions="cifar10", encoder=clip_random)
    assert (got - random).abs().max() > 1e-3  # the checkpoint's weights were really used

    # a checkpoint missing text weights, or not a checkpoint at all, is rejected by name (checked
    # on the reference copy: a fresh encoder would spend seconds building a model first)
    from stakes.anchors import _load_text_weights

    del sd["text_projection"]
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"partial.pt.*missing text weights.*text_projection"):
        _load_text_weights(reference, tmp_path / "partial.pt", "ViT-B-32")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        _load_text_weights(reference, tmp_path / "junk.pt", "ViT-B-32")


def test_open_clip_needs_weights(tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint=.*allow_random=True"):
        get_text_encoder("open_clip")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        get_text_encoder("open_clip", checkpoint=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="arch"):
        get_text_encoder("open_clip", arch="ViT-Nope", allow_random=True)


# ------------------------------------------------------------------------------- encoder errors

def test_get_text_encoder_errors():
    with pytest.raises(ValueError, match=r"unknown encoder 'bert'.*minilm.*open_clip"):
        get_text_encoder("bert")
    with pytest.raises(ValueError, match="prototype_anchors"):
        get_text_encoder("prototype")
    with pytest.raises(ValueError, match="checkpoint"):
        get_text_encoder("minilm", checkpoint="x.pt")
    with pytest.raises(TypeError, match="encoder"):
        build_anchors(["cat"], encoder=3)
    assert ENCODERS == ("minilm", "open_clip", "prototype")


# ------------------------------------------------------------------------------------------ cache

class CountingEncoder(TextEncoder):
    """A deterministic toy encoder that counts its calls."""

    name = "counting"

    def __init__(self):
        self.calls = 0

    @property
    def dim(self):
        return 4

    def encode(self, texts):
        self.calls += 1
        return torch.tensor([[len(t), t.count("a"), t.count(" "), 1.0] for t in texts])

    def cache_key(self):
        return "counting|v1"


def test_cache_hit_skips_encoder(tmp_path):
    enc = CountingEncoder()
    a = build_anchors(CIFAR10, encoder=enc, cache_dir=tmp_path)
    b = build_anchors(CIFAR10, encoder=enc, cache_dir=tmp_path)
    assert enc.calls == 1 and torch.equal(a, b)
    expected = F.normalize(enc.encode(class_prompts(CIFAR10)), dim=1)
    torch.testing.assert_close(a, expected)
    assert not b.requires_grad
    # other prompts -> another key, the encoder runs again; no temporary files are left behind
    build_anchors(CIFAR10, descriptions="cifar10", encoder=enc, cache_dir=tmp_path)
    assert enc.calls == 3  # (+1 for the `expected` call above)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.startswith("anchors-counting-") and f.endswith(".pt")
                                   for f in files)
    # no cache_dir: always encodes
    build_anchors(CIFAR10, encoder=enc)
    assert enc.calls == 4


@pytest.mark.parametrize("corruption", ["garbage", "wrong_content"])
def test_corrupt_cache_is_recomputed(tmp_path, corruption):
    enc = CountingEncoder()
    a = build_anchors(CIFAR10, encoder=enc, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    if corruption == "garbage":
        path.write_bytes(b"\x00garbage")
    else:
        torch.save({"key": "other", "prompts": [], "anchors": torch.zeros(10, 4)}, path)
    with pytest.warns(UserWarning, match="corrupt anchor cache"):
        b = build_anchors(CIFAR10, encoder=enc, cache_dir=tmp_path)
    assert enc.calls == 2 and torch.equal(a, b)
    c = build_anchors(CIFAR10, encoder=enc, cache_dir=tmp_path)  # rewritten: a clean hit
    assert enc.calls == 2 and torch.equal(a, c)


# ------------------------------------------------------------------------------------- prototypes

class TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3))
        self.head = nn.Linear(3, 3)
        with torch.no_grad():
            self.features[2].running_mean.copy_(torch.tensor([0.5, -0.5, 0.0]))
            self.features[2].running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))

    def forward(self, x):
        return self.head(self.features(x))


def test_prototype_anchors_class_means():
    torch.manual_seed(0)
    model = TinyClassifier().train()
    x = torch.randn(7, 1, 2, 2)
    y = torch.tensor([0, 1, 2, 0, 1, 0, 2])
    a = prototype_anchors(model, x, y, 3, batch_size=2)  # 4 batches, the last one of size 1
    assert model.training  # mode restored
    lin, bn = model.features[1], model.features[2]
    with torch.no_grad():  # eval-mode features: BatchNorm with its running statistics
        f = (lin(x.flatten(1)) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
        f = f * bn.weight + bn.bias
    means = torch.stack([f[y == c].mean(0) for c in range(3)])
    torch.testing.assert_close(a, F.normalize(means, dim=1))
    assert a.shape == (3, 3) and not a.requires_grad


def test_prototype_anchors_errors():
    model = TinyClassifier()
    x = torch.randn(4, 1, 2, 2)
    with pytest.raises(ValueError, match="class 2 has no samples"):
        prototype_anchors(model, x, torch.tensor([0, 1, 0, 1]), 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        prototype_anchors(model, x, torch.tensor([0, 1, 2, 1]), 2)
    with pytest.raises(ValueError, match="y: expected integer labels"):
        prototype_anchors(model, x, torch.tensor([0, 1, 0]), 2)
    with pytest.raises(TypeError, match="features"):
        prototype_anchors(nn.Linear(4, 2), x, torch.tensor([0, 1, 0, 1]), 2)
    with pytest.raises(ValueError, match="batch_size"):
        prototype_anchors(model, x, torch.tensor([0, 1, 0, 1]), 2, batch_size=0)


# ----------------------------------------------------------------------------------- anchor files

def test_save_load_anchors_roundtrip(tmp_path):
    anchors = F.normalize(torch.randn(3, 5), dim=1)
    meta = {"class_names": ["a", "b", "c"], "encoder": "minilm",
            "prompts": class_prompts(["a", "b", "c"])}
    path = tmp_path / "sub" / "anchors.pt"
    save_anchors(path, anchors, meta)
    got, got_meta = load_anchors(path)
    assert torch.equal(got, anchors) and got_meta == meta
    assert [p.name for p in path.parent.iterdir()] == ["anchors.pt"]  # no temporary left


def test_save_load_anchors_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="none.pt"):
        load_anchors(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk.pt.*save_anchors"):
        load_anchors(tmp_path / "junk.pt")
    torch.save({"anchors": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt.*stakes-anchors"):
        load_anchors(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="class_names"):
        save_anchors(tmp_path / "x.pt", torch.zeros(2, 3), {"class_names": ["a"]})
    with pytest.raises(ValueError, match="anchors"):
        save_anchors(tmp_path / "x.pt", torch.zeros(3), {})
