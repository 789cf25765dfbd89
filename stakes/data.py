"""Image data sets for instance unlearning: the training set D = D_f ∪ D_r and the test set.

Every loader returns an :class:`ImageData` holding float32 images in [0, 1] as [N, C, H, W] and
int64 labels. Nothing is downloaded: ``digits`` ships with scikit-learn, ``shapes`` is drawn
procedurally (METHOD.md §13), and CIFAR / image folders are read from a local ``root``.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DATASETS = ("digits", "shapes", "cifar10", "cifar100", "imagefolder")

# The ten procedural shape classes, in label order. Rotation is uniform over [0, 2π), so no two
# classes may be rotations of each other (hence no "diamond": it is a rotated square), and at
# 32×32 a hexagon is hardly told from a circle, so the tenth class is an L-shaped "corner".
SHAPE_CLASSES = (
    "circle", "square", "triangle", "star", "cross",
    "ring", "corner", "crescent", "arrow", "ellipse",
)


@dataclass
class ImageData:
    """A classification data set held in memory.

    ``train_x``/``test_x`` are float32 [N, C, H, W] in [0, 1]; ``train_y``/``test_y`` int64 [N]
    class indices into ``class_names``. ``synthetic`` marks procedurally generated data.
    """

    name: str
    class_names: list[str]
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    synthetic: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train_x.shape[1:])

    def subset(self, split: str, indices) -> tuple[Tensor, Tensor]:
        """Images and labels of ``split`` ("train" or "test") at ``indices``."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
        idx = torch.as_tensor(indices, dtype=torch.long)
        return x[idx], y[idx]

    def __repr__(self) -> str:
        return (f"ImageData(name={self.name!r}, classes={self.num_classes}, "
                f"input_shape={self.input_shape}, train={len(self.train_y)}, "
                f"test={len(self.test_y)}, synthetic={self.synthetic})")


def load_dataset(name: str, *, root=None, seed: int = 0, **kwargs) -> ImageData:
    """Load data set ``name`` (one of :data:`DATASETS`).

    ``root`` is required for ``cifar10``, ``cifar100`` and ``imagefolder``. ``seed`` drives the
    random parts that are defined by a seed: the ``shapes`` generator and the 80/20 split of an
    image folder without train/test subfolders. The ``digits`` split is fixed (random_state 0)
    whatever the seed, so a cached pretrained digits model stays valid. Extra keyword arguments go
    to the loader (``make_shapes``: n_train, n_test, image_size; ``imagefolder``: image_size).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
    if name == "digits":
        _no_kwargs(name, kwargs)
        return load_digits()
    if name == "shapes":
        return make_shapes(seed=seed, **kwargs)
    if root is None:
        raise ValueError(f"data set {name!r} is read from disk: pass root=<folder> "
                         f"(nothing is downloaded)")
    if name in ("cifar10", "cifar100"):
        _no_kwargs(name, kwargs)
        return load_cifar(name, root)
    return load_imagefolder(root, seed=seed, **kwargs)


def _no_kwargs(name, kwargs):
    if kwargs:
        raise TypeError(f"data set {name!r} takes no extra arguments, got {sorted(kwargs)}")


# ----------------------------------------------------------------------------------------- digits

def load_digits() -> ImageData:
    """scikit-learn's 8×8 digits: [N, 1, 8, 8] in [0, 1] (pixel/16), stratified 1,437/360 split."""
    from sklearn.datasets import load_digits as _sk_digits
    from sklearn.model_selection import train_test_split

    bunch = _sk_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    # Fixed random_state (not the caller's seed): the split is part of the data set's identity.
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=360, stratify=bunch.target, random_state=0)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return ImageData("digits", [str(c) for c in range(10)],
                     x[train_idx].contiguous(), y[train_idx].contiguous(),
                     x[test_idx].contiguous(), y[test_idx].contiguous())


# ----------------------------------------------------------------------------------------- shapes

def make_shapes(n_train: int = 12000, n_test: int = 2000, seed: int = 0,
                image_size: int = 32) -> ImageData:
    """Procedural 10-class shape images, 3×S×S in [0, 1] (METHOD.md §13), balanced classes.

    Each image: a gradient background, 0-3 small distractor blobs behind the shape, one shape of
    :data:`SHAPE_CLASSES` with random position, scale and rotation, a colour and a texture (solid,
    stripes or dots, fixed to the shape's frame), 0-2 thin distractor lines over it, and Gaussian
    pixel noise. Shapes are rasterised from signed distance functions with one-pixel anti-aliasing.
    The train and test sets come from independent streams derived from ``seed``, so the test set
    depends only on (seed, n_test, image_size).
    """
    for arg, val in (("n_train", n_train), ("n_test", n_test), ("image_size", image_size)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{arg} must be a positive int, got {val!r}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 to draw shapes, got {image_size}")
    train_x, train_y = _draw_shapes(n_train, image_size, _split_generator(seed, 0))
    test_x, test_y = _draw_shapes(n_test, image_size, _split_generator(seed, 1))
    return ImageData("shapes", list(SHAPE_CLASSES), train_x, train_y, test_x, test_y,
                     synthetic=True)


def _split_generator(seed: int, split: int) -> torch.Generator:
    # SeedSequence decorrelates (seed, split) streams; a plain seed+split would overlap seeds.
    state = np.random.SeedSequence([int(seed), split]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _polygon_sdf(u, v, n, circumradius, phase=0.0):
    """Regular n-gon: max over edge normals φ_k of (u cos φ_k + v sin φ_k) − apothem.

    Exact inside, a slight under-estimate outside near corners, which only softens the corners'
    anti-aliasing."""
    apothem = circumradius * math.cos(math.pi / n)
    d = None
    for k in range(n):
        phi = phase + 2 * math.pi * (k + 0.5) / n  # normals between the vertices at 2πk/n
        dk = u * math.cos(phi) + v * math.sin(phi) - apothem
        d = dk if d is None else torch.maximum(d, dk)
    return d


def _box_sdf(u, v, half_u, half_v):
    return torch.maximum(u.abs() - half_u, v.abs() - half_v)


def _shape_sdf(cls: int, u: Tensor, v: Tensor) -> Tensor:
    """Signed distance (negative inside) of shape class ``cls`` in its unit frame (radius ≈ 1)."""
    name = SHAPE_CLASSES[cls]
    rho = torch.sqrt(u * u + v * v)
    if name == "circle":
        return rho - 0.9
    if name == "square":
        return _box_sdf(u, v, 0.78, 0.78)
    if name == "triangle":
        return _polygon_sdf(u, v, 3, 1.1, phase=math.pi / 2)
    if name == "star":
        # radius oscillates linearly between r_in (notches) and r_out (5 tips); the 0.5 factor
        # turns the radial gap into an approximate normal distance along the thin arms.
        t = torch.remainder(torch.atan2(v, u) * (5 / (2 * math.pi)), 1.0)
        tip = (t - 0.5).abs() * 2
        return 0.5 * (rho - (0.36 + 0.69 * tip))
    if name == "cross":
        return torch.minimum(_box_sdf(u, v, 0.95, 0.24), _box_sdf(u, v, 0.24, 0.95))
    if name == "ring":
        return (rho - 0.72).abs() - 0.22
    if name == "corner":
        # an L: a vertical bar and a horizontal foot sharing the lower-left corner
        return torch.minimum(_box_sdf(u + 0.45, v, 0.27, 0.9), _box_sdf(u, v - 0.63, 0.72, 0.27))
    if name == "crescent":
        bite = torch.sqrt((u - 0.5) ** 2 + v * v) - 0.75
        return torch.maximum(rho - 0.95, -bite)
    if name == "arrow":
        shaft = torch.maximum(v.abs() - 0.17, torch.maximum(u - 0.2, -u - 0.95))
        # head: triangle with tip (0.95, 0) and base corners (0.1, ±0.62)
        nu, nv = 0.62, 0.85
        norm = math.hypot(nu, nv)
        edge = (nu * (u - 0.95) + nv * v.abs()) / norm
        head = torch.maximum(0.1 - u, edge)
        return torch.minimum(shaft, head)
    if name == "ellipse":
        return 0.45 * (torch.sqrt(u * u + (v / 0.45) ** 2) - 1.0)
    raise AssertionError(name)


def _over(canvas: Tensor, colour: Tensor, alpha: Tensor) -> Tensor:
    """Alpha compositing ``colour`` ([n,3,S,S] or [n,3,1,1]) over ``canvas`` with alpha [n,S,S]."""
    # canvas + a·(colour − canvas), in place: one pass over the canvas
    return canvas.lerp_(colour.expand_as(canvas), alpha.unsqueeze(1))


def _shape_parameters(n: int, gen: torch.Generator) -> tuple[Tensor, dict]:
    """Balanced labels and every per-image parameter of the shapes data set (all drawn up front, so
    the pixel work can be chunked freely)."""
    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    # Balanced labels: every class n // 10 or n // 10 + 1 times, in random order.
    labels = (torch.arange(n) % len(SHAPE_CLASSES))[torch.randperm(n, generator=gen)]
    P = {}
    P["scale"] = 0.5 + 0.32 * rand(n)                      # shape radius, image spans [-1, 1]
    P["centre"] = (rand(n, 2) * 2 - 1) * (0.95 - P["scale"]).unsqueeze(1)
    P["angle"] = rand(n) * 2 * math.pi
    P["bg1"], P["bg2"] = rand(n, 3), rand(n, 3)
    P["bg_dir"] = rand(n) * 2 * math.pi
    fg = rand(n, 3)
    # Keep the shape visible: a colour too close to the background's mean is replaced by its
    # complement (distance in RGB ≥ 0.35 is then almost always true).
    bg_mean = (P["bg1"] + P["bg2"]) / 2
    too_close = (fg - bg_mean).norm(dim=1, keepdim=True) < 0.45
    P["fg"] = torch.where(too_close, 1 - fg, fg)
    P["fg2"] = P["fg"] * (0.55 + 0.3 * rand(n, 1))               # texture colour: a darker shade of fg
    P["texture"] = torch.randint(0, 3, (n,), generator=gen)  # 0 solid, 1 stripes, 2 dots
    P["tex_freq"] = 1.5 + 1.5 * rand(n)
    P["tex_dir"] = rand(n) * 2 * math.pi
    P["tex_phase"] = rand(n) * 2 * math.pi
    P["n_blobs"] = torch.randint(0, _MAX_BLOBS + 1, (n,), generator=gen)
    P["blob_pos"] = rand(n, _MAX_BLOBS, 2) * 2 - 1
    P["blob_r"] = 0.06 + 0.1 * rand(n, _MAX_BLOBS)
    P["blob_col"] = rand(n, _MAX_BLOBS, 3)
    P["n_lines"] = torch.randint(0, _MAX_LINES + 1, (n,), generator=gen)
    P["line_a"] = rand(n, _MAX_LINES, 2) * 2 - 1
    P["line_b"] = rand(n, _MAX_LINES, 2) * 2 - 1
    P["line_col"] = rand(n, _MAX_LINES, 3)
    P["noise_std"] = 0.02 + 0.04 * rand(n)
    return labels, P


_MAX_BLOBS, _MAX_LINES = 3, 2


def _draw_shapes(n: int, size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    labels, P = _shape_parameters(n, gen)
    pixel = 2.0 / size                                   # pixel pitch in image units
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) * pixel - 1
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")  # y down rows, x across columns
    images = torch.empty(n, 3, size, size)
    chunk = 1024
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        m = sl.stop - sl.start
        img = _render_chunk(P, labels[sl], sl, gx.expand(m, size, size), gy.expand(m, size, size), pixel)
        noise = torch.randn(m, 3, size, size, generator=gen) * P["noise_std"][sl].view(m, 1, 1, 1)
        images[sl] = img.add_(noise).clamp_(0, 1)
    return images, labels.to(torch.int64)


def _render_chunk(P: dict, lab: Tensor, sl: slice, X: Tensor, Y: Tensor, pixel: float) -> Tensor:
    """The images ``sl`` of the shapes data set without noise: background, blobs, the textured
    shape, lines. ``X``/``Y``: the pixel centres' coordinates, ``[m, size, size]``."""
    m, size = X.shape[0], X.shape[1]

    def coverage(d_image: Tensor) -> Tensor:
        # One-pixel-wide anti-aliasing: 1 inside, 0 outside, linear across the edge.
        return (0.5 - d_image / pixel).clamp(0, 1)

    # gradient background b1 → b2 along a random direction
    c, s = torch.cos(P["bg_dir"][sl]).view(m, 1, 1), torch.sin(P["bg_dir"][sl]).view(m, 1, 1)
    t = ((X * c + Y * s) * 0.5 + 0.5).clamp(0, 1).unsqueeze(1)
    img = torch.lerp(P["bg1"][sl].view(m, 3, 1, 1), P["bg2"][sl].view(m, 3, 1, 1), t)

    # distractor blobs behind the shape
    for b in range(_MAX_BLOBS):
        bx, by = P["blob_pos"][sl, b, 0].view(m, 1, 1), P["blob_pos"][sl, b, 1].view(m, 1, 1)
        d = torch.sqrt((X - bx) ** 2 + (Y - by) ** 2) - P["blob_r"][sl, b].view(m, 1, 1)
        alpha = coverage(d) * (P["n_blobs"][sl] > b).view(m, 1, 1)
        img = _over(img, P["blob_col"][sl, b].view(m, 3, 1, 1), alpha)

    # the shape, in its own frame: rotate by -angle, divide by scale
    dx = X - P["centre"][sl, 0].view(m, 1, 1)
    dy = Y - P["centre"][sl, 1].view(m, 1, 1)
    c, s = torch.cos(P["angle"][sl]).view(m, 1, 1), torch.sin(P["angle"][sl]).view(m, 1, 1)
    sc = P["scale"][sl].view(m, 1, 1)
    u, v = (c * dx + s * dy) / sc, (-s * dx + c * dy) / sc
    d_local = torch.empty(m, size, size)
    for k in range(len(SHAPE_CLASSES)):
        idx = (lab == k).nonzero(as_tuple=True)[0]
        if len(idx):
            d_local[idx] = _shape_sdf(k, u[idx], v[idx])
    alpha = coverage(d_local * sc)

    # texture fixed to the shape frame (it rotates and scales with the shape)
    tc = torch.cos(P["tex_dir"][sl]).view(m, 1, 1)
    ts = torch.sin(P["tex_dir"][sl]).view(m, 1, 1)
    f = P["tex_freq"][sl].view(m, 1, 1) * math.pi
    ph = P["tex_phase"][sl].view(m, 1, 1)
    stripes = (torch.sin(f * (u * tc + v * ts) + ph) > 0).float()
    dots = ((torch.sin(f * u + ph) * torch.sin(f * v + ph)) > 0.35).float()
    kind = P["texture"][sl].view(m, 1, 1)
    pattern = torch.where(kind == 1, stripes, torch.where(kind == 2, dots, torch.zeros_like(u)))
    colour = torch.lerp(P["fg"][sl].view(m, 3, 1, 1), P["fg2"][sl].view(m, 3, 1, 1), pattern.unsqueeze(1))
    img = _over(img, colour, alpha)

    # thin distractor lines over the shape: distance to segment a→b
    for li in range(_MAX_LINES):
        a, b = P["line_a"][sl, li], P["line_b"][sl, li]
        ab = b - a
        ax, ay = a[:, 0].view(m, 1, 1), a[:, 1].view(m, 1, 1)
        abx, aby = ab[:, 0].view(m, 1, 1), ab[:, 1].view(m, 1, 1)
        h = (((X - ax) * abx + (Y - ay) * aby) / (abx * abx + aby * aby + 1e-8)).clamp(0, 1)
        d = torch.sqrt((X - ax - h * abx) ** 2 + (Y - ay - h * aby) ** 2) - 0.5 * pixel
        alpha = coverage(d) * (P["n_lines"][sl] > li).view(m, 1, 1)
        img = _over(img, P["line_col"][sl, li].view(m, 3, 1, 1), alpha)
    return img


# ------------------------------------------------------------------------------------------ CIFAR

_CIFAR = {
    # name: (folder, train files, test files, meta file, label key, names key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels",
                 "fine_label_names"),
}


def load_cifar(name: str, root) -> ImageData:
    """CIFAR-10/100 from the standard python-pickle folder (``root`` is that folder or its parent).

    Images become float32 [N, 3, 32, 32] in [0, 1]; CIFAR-100 uses the 100 fine labels.
    """
    if name not in _CIFAR:
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    folder_name, train_files, test_files, meta_file, label_key, names_key = _CIFAR[name]
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{name}: root {root} does not exist (expected the folder "
                                f"{folder_name}/ of the python-pickle release, or its parent)")
    folder = root / folder_name if (root / folder_name).is_dir() else root
    needed = train_files + test_files + [meta_file]
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{name}: {folder} lacks {', '.join(missing)} (expected the "
                                f"python-pickle release {folder_name}/ with {', '.join(needed)})")
    meta = _unpickle(folder / meta_file)
    class_names = [n.decode() if isinstance(n, bytes) else str(n)
                   for n in _field(meta, names_key, folder / meta_file)]

    def read(files):
        xs, ys = [], []
        for f in files:
            batch = _unpickle(folder / f)
            data = np.asarray(_field(batch, "data", folder / f), dtype=np.uint8)
            labels = np.asarray(_field(batch, label_key, folder / f), dtype=np.int64)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
                raise ValueError(f"{folder / f}: expected 'data' uint8 [N, 3072] and {label_key!r} "
                                 f"[N], got {data.shape} and {labels.shape}")
            xs.append(data)
            ys.append(labels)
        x = torch.from_numpy(np.concatenate(xs).reshape(-1, 3, 32, 32)).float().div_(255.0)
        y = torch.from_numpy(np.concatenate(ys))
        if len(y) and (y.min() < 0 or y.max() >= len(class_names)):
            raise ValueError(f"{name}: labels outside [0, {len(class_names)}) in {folder}")
        return x, y

    train_x, train_y = read(train_files)
    test_x, test_y = read(test_files)
    return ImageData(name, class_names, train_x, train_y, test_x, test_y)


def _unpickle(path: Path):
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="bytes")
    except Exception as exc:  # truncated or not a pickle at all
        raise ValueError(f"{path}: not a readable CIFAR python-pickle file ({exc})") from exc


def _field(d, key: str, path: Path):
    """A CIFAR pickle's field, stored under a bytes key (python-2 pickles) or a str key."""
    if isinstance(d, dict):
        for k in (key.encode(), key):
            if k in d:
                return d[k]
    raise ValueError(f"{path}: expected a dict with key {key!r}")


# ------------------------------------------------------------------------------------ imagefolder

def load_imagefolder(root, *, seed: int = 0, image_size: int = 32) -> ImageData:
    """Images in torchvision's ImageFolder layout, resized to ``image_size`` × ``image_size`` RGB.

    ``root/train/<class>/*`` and ``root/test/<class>/*`` are used as given; without those
    subfolders, ``root/<class>/*`` is split per class into 80 % train / 20 % test with ``seed``.
    """
    from torchvision import datasets, transforms

    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder: root {root} is not a folder (expected "
                                f"root/train/<class>/*.png and root/test/<class>/*.png, "
                                f"or root/<class>/*.png)")
    tf = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor()])

    def read(path: Path):
        try:
            ds = datasets.ImageFolder(str(path), transform=tf)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"imagefolder: no class folders with images under {path} "
                                    f"(expected {path}/<class>/*.png): {exc}") from exc
        xs = torch.stack([ds[i][0] for i in range(len(ds))])
        return xs, torch.tensor(ds.targets, dtype=torch.int64), ds.classes

    has_split = (root / "train").is_dir() and (root / "test").is_dir()
    if has_split:
        train_x, train_y, classes = read(root / "train")
        test_x, test_y, test_classes = read(root / "test")
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise ValueError(f"imagefolder: test classes {unknown} under {root / 'test'} have no "
                             f"training folder under {root / 'train'}")
        # map test labels through the class *names*: the test tree may miss some classes
        remap = torch.tensor([classes.index(c) for c in test_classes], dtype=torch.int64)
        test_y = remap[test_y]
    else:
        x, y, classes = read(root)
        rng = np.random.default_rng(seed)
        test_mask = np.zeros(len(y), dtype=bool)
        for k in range(len(classes)):
            idx = np.flatnonzero(y.numpy() == k)
            n_test = int(round(0.2 * len(idx)))
            test_mask[rng.permutation(idx)[:n_test]] = True
        test_mask = torch.from_numpy(test_mask)
        train_x, train_y = x[~test_mask], y[~test_mask]
        test_x, test_y = x[test_mask], y[test_mask]
    return ImageData("imagefolder", list(classes), train_x.contiguous(), train_y,
                     test_x.contiguous(), test_y)


# ------------------------------------------------------------------------------------ forget sets

def sample_forget_indices(labels, k: int, seed: int) -> Tensor:
    """``k`` distinct training indices drawn uniformly with ``seed`` (the forget set D_f), sorted.

    ``labels`` is the training label tensor (only its length is used).
    """
    n = len(labels)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1 or k > n:
        raise ValueError(f"k must be in [1, {n}] (the number of training samples), got k={k}")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=gen)[: int(k)].sort().values
