"""Data sets: digits split, procedural shapes, CIFAR pickles and image folders, forget sets."""

import math
import pickle
import time

import numpy as np
import pytest
import torch

from stakes.data import (DATASETS, SHAPE_CLASSES, ImageData, load_dataset, make_shapes,
                         sample_forget_indices)


def test_digits_fixed_split_independent_of_seed():
    d = load_dataset("digits", seed=0)
    assert isinstance(d, ImageData)
    assert d.train_x.shape == (1437, 1, 8, 8) and d.test_x.shape == (360, 1, 8, 8)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert d.train_x.min() >= 0 and d.train_x.max() == 1.0  # 16 / 16
    assert d.class_names == [str(i) for i in range(10)]
    assert d.num_classes == 10 and d.input_shape == (1, 8, 8) and not d.synthetic
    # stratified: every class holds 35-37 of the 360 test images
    counts = torch.bincount(d.test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    other = load_dataset("digits", seed=7)
    assert torch.equal(d.train_x, other.train_x) and torch.equal(d.test_y, other.test_y)
    # train and test images are disjoint samples of the 1,797
    assert len(d.train_y) + len(d.test_y) == 1797


def test_subset():
    d = load_dataset("digits")
    x, y = d.subset("train", [3, 0])
    assert torch.equal(x, d.train_x[[3, 0]]) and torch.equal(y, d.train_y[[3, 0]])
    with pytest.raises(ValueError, match="split"):
        d.subset("val", [0])


def test_unknown_and_rootless_names():
    with pytest.raises(ValueError, match="digits, shapes, cifar10, cifar100, imagefolder"):
        load_dataset("mnist")
    for name in ("cifar10", "cifar100", "imagefolder"):
        with pytest.raises(ValueError, match="root"):
            load_dataset(name)
    assert DATASETS == ("digits", "shapes", "cifar10", "cifar100", "imagefolder")


# ----------------------------------------------------------------------------------------- shapes

def test_shapes_shapes_ranges_balance():
    d = make_shapes(n_train=300, n_test=100, seed=0, image_size=32)
    assert d.name == "shapes" and d.synthetic and d.class_names == list(SHAPE_CLASSES)
    assert d.train_x.shape == (300, 3, 32, 32) and d.test_x.shape == (100, 3, 32, 32)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert d.train_x.min() >= 0 and d.train_x.max() <= 1
    assert torch.equal(torch.bincount(d.train_y, minlength=10), torch.full((10,), 30))
    assert torch.equal(torch.bincount(d.test_y, minlength=10), torch.full((10,), 10))
    # images are not constant and differ from one another
    assert (d.train_x.flatten(1).std(1) > 0.02).all()
    flat = d.train_x[:20].flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(9).min() > 1


def test_shapes_deterministic_by_seed():
    a = make_shapes(n_train=50, n_test=20, seed=3)
    b = make_shapes(n_train=50, n_test=20, seed=3)
    c = make_shapes(n_train=50, n_test=20, seed=4)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    # the test set is its own stream: it does not move when n_train changes
    d = make_shapes(n_train=70, n_test=20, seed=3)
    assert torch.equal(a.test_x, d.test_x)
    # load_dataset forwards seed and sizes
    e = load_dataset("shapes", seed=3, n_train=50, n_test=20)
    assert torch.equal(a.train_x, e.train_x)


def test_shape_classes_distinct_under_rotation():
    """No class is a rotation of another: best-rotation IoU of the unit-frame masks < 0.85.

    (circle/square, the closest pair, reach ≈ 0.83; a hexagon would reach 0.91 with a circle.)
    """
    from stakes.data import _shape_sdf

    g = torch.linspace(-1.2, 1.2, 96)
    y, x = torch.meshgrid(g, g, indexing="ij")
    angles = torch.arange(36) * (2 * math.pi / 36)
    c, s = torch.cos(angles).view(-1, 1, 1), torch.sin(angles).view(-1, 1, 1)
    u, v = c * x + s * y, -s * x + c * y
    masks = [_shape_sdf(k, u, v) < 0 for k in range(10)]  # [36 rotations, 96, 96]
    for k, m in enumerate(masks):
        area = m[0].float().mean().item() * 2.4 ** 2
        assert 0.5 < area < 3.2, (SHAPE_CLASSES[k], area)
    for i in range(10):
        for j in range(i + 1, 10):
            inter = (masks[i][:1] & masks[j]).sum((1, 2)).float()
            union = (masks[i][:1] | masks[j]).sum((1, 2)).float()
            iou = (inter / union).max().item()
            assert iou < 0.85, (SHAPE_CLASSES[i], SHAPE_CLASSES[j], iou)


def test_shapes_generator_speed():
    make_shapes(n_train=10, n_test=10)  # warm-up
    start = time.perf_counter()
    make_shapes(n_train=2000, n_test=10)
    # ~0.2 s on one idle core; generous for a loaded CI machine
    assert time.perf_counter() - start < 10


def test_shapes_bad_arguments():
    with pytest.raises(ValueError, match="n_train"):
        make_shapes(n_train=0)
    with pytest.raises(ValueError, match="image_size"):
        make_shapes(n_train=5, n_test=5, image_size=4)


def test_shapes_other_image_size():
    d = make_shapes(n_train=20, n_test=10, image_size=16)
    assert d.input_shape == (3, 16, 16)


# ------------------------------------------------------------------------------------------ CIFAR

def _write_pickle(path, obj):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def _cifar_batch(rng, n, label_key, num_classes):
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key.encode(): rng.integers(0, num_classes, n).tolist()}


def _make_cifar10(folder, rng):
    folder.mkdir(parents=True)
    batches = {}
    for i in range(1, 6):
        batches[f"data_batch_{i}"] = _cifar_batch(rng, 4, "labels", 10)
        _write_pickle(folder / f"data_batch_{i}", batches[f"data_batch_{i}"])
    batches["test_batch"] = _cifar_batch(rng, 3, "labels", 10)
    _write_pickle(folder / "test_batch", batches["test_batch"])
    _write_pickle(folder / "batches.meta",
                  {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return batches


def test_cifar10_from_folder_or_parent(tmp_path):
    rng = np.random.default_rng(0)
    batches = _make_cifar10(tmp_path / "cifar-10-batches-py", rng)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        d = load_dataset("cifar10", root=root)
        assert d.train_x.shape == (20, 3, 32, 32) and d.test_x.shape == (3, 3, 32, 32)
        assert d.class_names == [f"c{i}" for i in range(10)]
        # pixel (image 0, channel 1, row 2, col 5) is byte 1024 + 2·32 + 5 of the row, / 255
        raw = batches["data_batch_1"][b"data"]
        assert d.train_x[0, 1, 2, 5].item() == pytest.approx(raw[0, 1024 + 64 + 5] / 255)
        raw2 = batches["data_batch_2"][b"data"]
        assert torch.allclose(d.train_x[4].flatten(), torch.from_numpy(raw2[0] / 255).float())
        assert d.train_y.tolist()[:4] == batches["data_batch_1"][b"labels"]
        assert d.test_y.tolist() == batches["test_batch"][b"labels"]


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = _cifar_batch(rng, 6, "fine_labels", 100)
    train[b"coarse_labels"] = [0] * 6
    test = _cifar_batch(rng, 2, "fine_labels", 100)
    _write_pickle(folder / "train", train)
    _write_pickle(folder / "test", test)
    _write_pickle(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                    b"coarse_label_names": [b"x"] * 20})
    d = load_dataset("cifar100", root=tmp_path)
    assert d.num_classes == 100 and d.class_names[7] == "f7"
    assert d.train_y.tolist() == train[b"fine_labels"] and len(d.test_y) == 2


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("cifar10", root=tmp_path / "nowhere")
    folder = tmp_path / "cifar-10-batches-py"
    _make_cifar10(folder, np.random.default_rng(0))
    (folder / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_dataset("cifar10", root=tmp_path)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch"):
        load_dataset("cifar10", root=tmp_path)


# ------------------------------------------------------------------------------------ imagefolder

def _write_png(path, colour, size=(12, 10)):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_imagefolder_train_test(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for i in range(n):
            _write_png(tmp_path / split / "apple" / f"{i}.png", (255, 0, 0))
            _write_png(tmp_path / split / "kiwi" / f"{i}.png", (0, 255, 0))
    # a test tree that lacks a class still maps labels by name
    _write_png(tmp_path / "train" / "zebra" / "0.png", (0, 0, 255))
    d = load_dataset("imagefolder", root=tmp_path, image_size=16)
    assert d.class_names == ["apple", "kiwi", "zebra"]
    assert d.train_x.shape == (7, 3, 16, 16) and d.test_x.shape == (2, 3, 16, 16)
    assert d.test_y.tolist() == [0, 1]
    # apple images are pure red after resizing
    red = d.train_x[d.train_y == 0]
    assert torch.allclose(red[:, 0], torch.ones(3, 16, 16)) and red[:, 1:].abs().max() == 0
    assert torch.allclose(d.train_x[d.train_y == 2][:, 2], torch.ones(1, 16, 16))


def test_imagefolder_single_tree_split(tmp_path):
    for i in range(10):
        _write_png(tmp_path / "a" / f"{i}.png", (i * 20, 0, 0))
        _write_png(tmp_path / "b" / f"{i}.png", (0, i * 20, 0))
    d0 = load_dataset("imagefolder", root=tmp_path, seed=0, image_size=8)
    assert len(d0.train_y) == 16 and len(d0.test_y) == 4
    assert torch.bincount(d0.test_y).tolist() == [2, 2]
    assert torch.equal(d0.test_x, load_dataset("imagefolder", root=tmp_path, seed=0,
                                               image_size=8).test_x)
    d1 = load_dataset("imagefolder", root=tmp_path, seed=1, image_size=8)
    assert not torch.equal(d0.test_x, d1.test_x)
    # train and test are disjoint: each red level appears in exactly one split
    levels = torch.cat([d0.train_x[:, 0, 0, 0], d0.test_x[:, 0, 0, 0]])
    reds = levels[levels > 0]
    assert len(torch.unique(reds)) == len(reds)


def test_imagefolder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_dataset("imagefolder", root=tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_dataset("imagefolder", root=tmp_path / "empty")


# ------------------------------------------------------------------------------------ forget sets

def test_sample_forget_indices():
    labels = torch.arange(100) % 10
    idx = sample_forget_indices(labels, 16, seed=0)
    assert idx.dtype == torch.int64 and idx.shape == (16,)
    assert len(torch.unique(idx)) == 16 and idx.min() >= 0 and idx.max() < 100
    assert torch.equal(idx, sample_forget_indices(labels, 16, seed=0))
    assert not torch.equal(idx, sample_forget_indices(labels, 16, seed=1))
    assert sorted(sample_forget_indices(labels, 100, seed=2).tolist()) == list(range(100))
    with pytest.raises(ValueError, match=r"k=101.*|\[1, 100\]"):
        sample_forget_indices(labels, 101, seed=0)
    with pytest.raises(ValueError, match="k=0"):
        sample_forget_indices(labels, 0, seed=0)
