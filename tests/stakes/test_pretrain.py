"""Pretraining recipes, checkpoints (round trip, atomicity, errors) and the model cache."""

import os

import pytest
import torch
import torch.nn.functional as F

import stakes.pretrain as pt
from stakes.data import ImageData, load_dataset, make_shapes
from stakes.models import as_classifier, build_model
from stakes.pretrain import (RECIPES, accuracy, load_checkpoint, pretrain, pretrained_model,
                             save_checkpoint)


@pytest.fixture(autouse=True)
def one_thread():
    """Train on one intra-op thread: on a CPU shared with other jobs, two OpenMP threads spin
    against each other (the digits recipe took 85 s instead of 4 s on the 2-core CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _small(data, n_train=256, n_test=64):
    return ImageData(data.name, data.class_names, data.train_x[:n_train], data.train_y[:n_train],
                     data.test_x[:n_test], data.test_y[:n_test])


def test_recipes_complete():
    for name in ("digits", "shapes", "cifar10", "cifar100", "imagefolder"):
        r = RECIPES[name]
        assert r["label_smoothing"] == 0.1
        assert r["epochs"] >= 1 and r["lr"] > 0 and r["batch_size"] >= 1 and r["weight_decay"] >= 0


def test_digits_recipe_reaches_95_percent_and_caches(digits, tmp_path):
    model, meta = pretrained_model("digits", data=digits, cache_dir=tmp_path, progress=False)
    assert meta["test_accuracy"] >= 95.0 and meta["train_accuracy"] >= 97.0
    assert meta["dataset"] == "digits" and meta["arch"] == "digits_cnn" and meta["seed"] == 0
    assert meta["epochs"] == RECIPES["digits"]["epochs"]
    path = tmp_path / "digits_digits_cnn_seed0.pt"
    assert path.is_file()
    # the accuracy reported is the model's accuracy
    assert accuracy(model, digits.test_x, digits.test_y) == pytest.approx(meta["test_accuracy"])
    # label smoothing 0.1 keeps the model off saturation: median train CE well above 1e-3
    with torch.no_grad():
        ce = F.cross_entropy(model(digits.train_x), digits.train_y, reduction="none")
    assert 0.02 < ce.median() < 0.5
    # second call loads the cache (same outputs, no retraining)
    cached, meta2 = pretrained_model("digits", cache_dir=tmp_path, progress=False)
    assert meta2 == meta
    with torch.no_grad():
        assert torch.equal(cached(digits.test_x), model(digits.test_x))


def test_pretrain_deterministic_and_reports(digits):
    data = _small(digits)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = build_model("digits_cnn", 10, in_channels=1, image_size=8)
        stats = pretrain(m, data, epochs=2, seed=5, progress=False)
        outs.append((m.state_dict(), stats))
    (sa, a), (sb, b) = outs
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["train_accuracy"] == b["train_accuracy"] and a["epochs"] == 2
    assert 0 <= a["test_accuracy"] <= 100 and a["wall_time_s"] > 0
    torch.manual_seed(0)
    m = build_model("digits_cnn", 10, in_channels=1, image_size=8)
    pretrain(m, data, epochs=2, seed=6, progress=False)
    assert not torch.equal(m.state_dict()["head.weight"], sa["head.weight"])


def test_pretrain_argument_errors(digits):
    data = _small(digits)
    m = build_model("digits_cnn", 3, in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="3 outputs"):
        pretrain(m, data, epochs=1, progress=False)
    m = build_model("digits_cnn", 10, in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="epochs"):
        pretrain(m, data, epochs=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        pretrain(m, data, epochs=1, lr=-1.0, progress=False)
    with pytest.raises(RuntimeError, match="non-finite"):
        pretrain(m, data, epochs=1, lr=1e30, progress=False)


def test_accuracy_value():
    head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    clf = as_classifier(torch.nn.Flatten(1), head)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 1, 1, 1])
    assert accuracy(clf, x, y, batch_size=3) == 75.0


def test_crop_flip_is_a_shift_or_flipped_shift():
    torch.manual_seed(0)
    x = torch.rand(6, 2, 5, 5)
    out = pt._crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    padded = F.pad(x, (2, 2, 2, 2))
    flips = 0
    for b in range(6):
        crops = [padded[b, :, i:i + 5, j:j + 5] for i in range(5) for j in range(5)]
        plain = any(torch.equal(out[b], c) for c in crops)
        flipped = any(torch.equal(out[b], c.flip(-1)) for c in crops)
        assert plain or flipped
        flips += flipped and not plain
    assert out.shape == x.shape and flips >= 1


def test_dihedral_is_a_square_symmetry():
    x = torch.rand(16, 3, 6, 6)
    out = pt._dihedral(x, torch.Generator().manual_seed(0))
    seen = set()
    for b in range(16):
        ims = {}
        for t in (0, 1):
            base = x[b].transpose(-1, -2) if t else x[b]
            for k in range(4):  # the 8 elements: transpose or not, times 4 rotations
                ims[(t, k)] = torch.rot90(base, k, (-2, -1))
        match = [key for key, im in ims.items() if torch.equal(out[b], im)]
        assert match
        seen.add(match[0])
    assert len(seen) >= 4  # different images get different symmetries


def test_unknown_augmentation(digits):
    m = build_model("digits_cnn", 10, in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="augment"):
        pretrain(m, _small(digits), epochs=1, augment="mixup", progress=False)


def _trained_shapes_model():
    torch.manual_seed(0)
    data = make_shapes(n_train=64, n_test=16)
    m = build_model("shapes_cnn", 10, in_channels=3, image_size=32)
    pretrain(m, data, epochs=1, batch_size=16, progress=False)  # moves BN running stats
    return m, data


def test_checkpoint_round_trip(tmp_path):
    m, data = _trained_shapes_model()
    path = save_checkpoint(tmp_path / "sub" / "m.pt", m, {"test_accuracy": 12.5, "note": "x"})
    loaded, meta = load_checkpoint(path)
    assert meta == {"test_accuracy": 12.5, "note": "x"}
    assert loaded.arch == "shapes_cnn" and loaded.arch_kwargs == m.arch_kwargs
    assert not loaded.training
    m.eval()
    with torch.no_grad():
        assert torch.equal(loaded(data.test_x), m(data.test_x))
    bn = [k for k in m.state_dict() if k.endswith("running_mean")][0]
    assert torch.equal(loaded.state_dict()[bn], m.state_dict()[bn])


def test_save_is_atomic(tmp_path, monkeypatch):
    m = build_model("digits_cnn", 10, in_channels=1, image_size=8)
    path = tmp_path / "m.pt"
    save_checkpoint(path, m, {"version": "old"})
    before = path.read_bytes()

    def failing_save(obj, fh):
        fh.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(pt.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, m, {"version": "new"})
    monkeypatch.undo()
    assert path.read_bytes() == before and load_checkpoint(path)[1] == {"version": "old"}
    assert os.listdir(tmp_path) == ["m.pt"]  # no temporary file left behind


def test_save_refuses_bad_models_and_meta(tmp_path):
    m = build_model("digits_cnn", 10, in_channels=1, image_size=8)
    with torch.no_grad():
        m.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*head.weight"):
        save_checkpoint(tmp_path / "nan.pt", m, {})
    assert not (tmp_path / "nan.pt").exists() and os.listdir(tmp_path) == []
    good = build_model("digits_cnn", 10, in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path / "m.pt", good, {"t": torch.zeros(1)})
    custom = as_classifier(torch.nn.Flatten(1), torch.nn.Linear(64, 10))
    with pytest.raises(ValueError, match="custom"):
        save_checkpoint(tmp_path / "m.pt", custom, {})
    assert os.listdir(tmp_path) == []


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt.pt"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a stakes checkpoint"):
        load_checkpoint(other)
    # a truncated real checkpoint
    m = build_model("digits_cnn", 10, in_channels=1, image_size=8)
    good = save_checkpoint(tmp_path / "good.pt", m, {})
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="trunc.pt"):
        load_checkpoint(trunc)


def test_cache_retrains_on_different_data(digits, tmp_path, monkeypatch):
    monkeypatch.setitem(RECIPES, "digits", dict(RECIPES["digits"], epochs=1))
    data = _small(digits)
    m1, meta1 = pretrained_model("digits", data=data, cache_dir=tmp_path, seed=3,
                                 progress=False)
    assert (tmp_path / "digits_digits_cnn_seed3.pt").is_file() and meta1["epochs"] == 1
    other = _small(digits, n_train=128)
    with pytest.warns(UserWarning, match="different"):
        _, meta2 = pretrained_model("digits", data=other, cache_dir=tmp_path, seed=3,
                                    progress=False)
    assert meta2["data_fingerprint"] != meta1["data_fingerprint"]
    # the cache now holds the retrained model
    _, meta3 = load_checkpoint(tmp_path / "digits_digits_cnn_seed3.pt")
    assert meta3 == meta2
    # STAKES_CACHE is the default cache folder
    monkeypatch.setenv("STAKES_CACHE", str(tmp_path / "env"))
    pretrained_model("digits", data=data, seed=3, progress=False)
    assert (tmp_path / "env" / "digits_digits_cnn_seed3.pt").is_file()
    with pytest.raises(ValueError, match="shapes"):
        pretrained_model("digits", data=make_shapes(n_train=10, n_test=10), cache_dir=tmp_path)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from pathlib import Path

    from stakes.pretrain import default_cache_dir

    monkeypatch.setenv("STAKES_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    for unset in ("", None):   # an empty variable means unset, not the current folder
        if unset is None:
            monkeypatch.delenv("STAKES_CACHE")
        else:
            monkeypatch.setenv("STAKES_CACHE", unset)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert default_cache_dir() == Path(tmp_path / "home" / ".cache" / "stakes")


def test_pretraining_in_channels_last_returns_the_default_layout():
    """Pretraining in channels_last (a card's default; asked for here on the CPU) trains in it and
    returns the model in PyTorch's default layout, as stakes.unlearn returns its models: a saved and
    reloaded copy has that layout too."""
    torch.manual_seed(0)
    data = make_shapes(n_train=32, n_test=8)
    m = build_model("shapes_cnn", 10, in_channels=3, image_size=32)
    seen = []
    hook = m.features[0].register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)) if mod.training
        else None)
    pretrain(m, data, epochs=1, batch_size=16, progress=False, channels_last=True)
    hook.remove()
    assert len(seen) == 2 and all(seen)   # its two training steps ran in channels_last
    convs = [p for p in m.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous() for p in convs)
