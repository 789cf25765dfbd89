"""Pretraining the classifier f = h_φ ∘ g_ψ that is later unlearned, and its checkpoints.

Label smoothing 0.1 is the default for every recipe: a saturated model (train CE ≈ 5e-5) gives
gradient ascent nothing to push on and then explodes (METHOD.md §12); smoothing keeps the
median train CE near 0.1 at the same accuracy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch

from types import SimpleNamespace

from stakes._io import atomic_torch_save
from stakes.execution import Execution
import torch.nn.functional as F
from torch import Tensor

from .data import ImageData, load_dataset
from .models import ARCHS, Classifier, build_model, default_arch

# Per data set: optimiser, peak learning rate of a one-cycle schedule (15 % warm-up, cosine
# decay), and the usual knobs. The small CNNs use AdamW; shapes adds the square's symmetries
# (free, label-preserving data). Measured on one loaded CPU core: digits 99.7 % train / 98.9 %
# test in ~10-25 s, shapes 94.9 % / 92.9 % in ~100 s. The CIFAR ResNets use the standard SGD
# recipe with random-crop + flip, long enough to reach ~100 % train accuracy (the paper's regime).
RECIPES: dict[str, dict] = {
    "digits": dict(optimizer="adamw", epochs=15, lr=3e-3, batch_size=64, weight_decay=5e-4,
                   label_smoothing=0.1, augment=None),
    "shapes": dict(optimizer="adamw", epochs=12, lr=1e-2, batch_size=128, weight_decay=5e-4,
                   label_smoothing=0.1, augment="dihedral"),
    "cifar10": dict(optimizer="sgd", epochs=200, lr=0.1, batch_size=128, weight_decay=5e-4,
                    label_smoothing=0.1, augment="crop_flip"),
    "cifar100": dict(optimizer="sgd", epochs=200, lr=0.1, batch_size=128, weight_decay=5e-4,
                     label_smoothing=0.1, augment="crop_flip"),
    "imagefolder": dict(optimizer="sgd", epochs=100, lr=0.1, batch_size=128, weight_decay=5e-4,
                        label_smoothing=0.1, augment="crop_flip"),
}

CHECKPOINT_FORMAT = "stakes.classifier"
CHECKPOINT_VERSION = 1


def _recipe(name: str) -> dict:
    # Unknown data set names (a user's own ImageData) train like an image folder.
    return dict(RECIPES.get(name, RECIPES["imagefolder"]))


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 512,
             device="cpu") -> float:
    """Top-1 accuracy of ``model`` on (x, y) in percent, in eval mode (mode restored after)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for i in range(0, len(y), batch_size):
        xb = x[i:i + batch_size].to(device)
        yb = y[i:i + batch_size].to(device)
        correct += (model(xb).argmax(1) == yb).sum()
    model.train(was_training)
    return 100.0 * correct.item() / max(len(y), 1)


def _crop_flip(x: Tensor, gen: torch.Generator, pad: int = 4) -> Tensor:
    """Random translation by up to ``pad`` pixels (zero padding) and horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=gen).to(x.device)
    rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy).expand(n, h, w)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx).expand(n, h, w)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device).view(n, 1, 1)
    cols = torch.where(flip, cols.flip(-1), cols)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    # gather per image: out[b, c, i, j] = padded[b, c, rows[b, i, j], cols[b, i, j]]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def _dihedral(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random element of the square's symmetry group D4 per image (transpose, then flips).

    Label-preserving for the procedural shapes: their pose, texture and background direction
    are drawn uniformly, so every symmetry leaves the image distribution unchanged."""
    n = len(x)
    t, fh, fv = (torch.rand(3, n, generator=gen) < 0.5).to(x.device).view(3, n, 1, 1, 1)
    x = torch.where(t, x.transpose(-1, -2), x)
    x = torch.where(fh, x.flip(-1), x)
    return torch.where(fv, x.flip(-2), x)


_AUGMENTATIONS = {"crop_flip": _crop_flip, "dihedral": _dihedral}


def pretrain(model: Classifier, data: ImageData, *, epochs: int | None = None,
             lr: float | None = None, batch_size: int | None = None,
             weight_decay: float | None = None, label_smoothing: float = 0.1, seed: int = 0,
             progress: bool = True, device="cpu", augment: str | None = None,
             precision: str | None = None, channels_last: bool | None = None) -> dict:
    """Train ``model`` on ``data.train_*`` in place with the data set's recipe (:data:`RECIPES`).

    Arguments left ``None`` come from the recipe; ``augment`` is "dihedral", "crop_flip" or
    False. ``seed`` fixes the batch order and the augmentation; on CPU the run is deterministic.
    ``precision`` / ``channels_last``: as in :class:`stakes.UnlearnConfig` (None: bf16 autocast and
    channels_last on CUDA sm_80+, fp32 on the CPU; fp32 master weights, an fp16 gradient scaler).
    The model is left in eval mode. Returns ``dict(train_accuracy, test_accuracy, epochs,
    wall_time_s)`` with accuracies in percent (eval mode, after training). Raises RuntimeError
    if the loss becomes non-finite.
    """
    from tqdm.auto import tqdm

    if not isinstance(data, ImageData):
        raise TypeError(f"data must be an ImageData, got {type(data).__name__}")
    recipe = _recipe(data.name)
    epochs = recipe["epochs"] if epochs is None else epochs
    lr = recipe["lr"] if lr is None else lr
    batch_size = recipe["batch_size"] if batch_size is None else batch_size
    weight_decay = recipe["weight_decay"] if weight_decay is None else weight_decay
    augment = recipe["augment"] if augment is None else augment
    if augment not in (None, False, *_AUGMENTATIONS):
        raise ValueError(f"augment must be one of {sorted(_AUGMENTATIONS)} or None, "
                         f"got {augment!r}")
    for name, val in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if model.num_classes != data.num_classes:
        raise ValueError(f"model has {model.num_classes} outputs but data {data.name!r} has "
                         f"{data.num_classes} classes")

    start = time.perf_counter()
    device = torch.device(device)
    cl = False if channels_last is None and device.type == "cpu" else channels_last   # NCHW on the CPU: cached
    exe = Execution.resolve(SimpleNamespace(device=str(device), precision=precision, channels_last=cl,  # models stay
                                            compile="off", cuda_graphs=False), model)
    exe.prepare(model.to(device)).train()
    scaler = exe.grad_scaler()
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    n = len(train_y)
    # drop the ragged last batch: a batch of one breaks BatchNorm and adds gradient noise
    drop_last = n > batch_size
    steps_per_epoch = n // batch_size if drop_last else 1
    # no weight decay on biases and norm scales (1-d tensors)
    groups = [dict(params=[p for p in model.parameters() if p.ndim > 1], weight_decay=weight_decay),
              dict(params=[p for p in model.parameters() if p.ndim <= 1], weight_decay=0.0)]
    if recipe["optimizer"] == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15,
        anneal_strategy="cos", cycle_momentum=False)
    gen = torch.Generator().manual_seed(int(seed))

    bar = tqdm(range(epochs), desc=f"pretrain {data.name}", disable=not progress, leave=False)
    for _ in bar:
        order = torch.randperm(n, generator=gen).to(device)
        loss_sum = torch.zeros((), device=device)
        for s in range(steps_per_epoch):
            idx = order[s * batch_size:(s + 1) * batch_size]
            xb, yb = train_x[idx], train_y[idx]
            if augment:
                xb = _AUGMENTATIONS[augment](xb, gen)
            with exe.autocast():
                loss = F.cross_entropy(model(exe.inputs(xb)), yb, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            loss_sum += loss.detach()
        mean_loss = loss_sum.item() / steps_per_epoch  # one host sync per epoch
        if not math.isfinite(mean_loss):
            raise RuntimeError(f"pretraining {data.name}: loss became non-finite "
                               f"(lr={lr}); lower the learning rate")
        bar.set_postfix(loss=f"{mean_loss:.3f}")

    model.eval()
    with exe.autocast():
        result = dict(train_accuracy=accuracy(model, data.train_x, data.train_y, device=device),
                      test_accuracy=accuracy(model, data.test_x, data.test_y, device=device),
                      epochs=epochs, wall_time_s=time.perf_counter() - start, precision=exe.precision)
    if exe.channels_last:   # back in PyTorch's default layout, as stakes.unlearn returns its models
        model.to(memory_format=torch.contiguous_format)
    return result


# ------------------------------------------------------------------------------------ checkpoints

def save_checkpoint(path, model: Classifier, meta: dict | None = None) -> Path:
    """Write ``model`` (arch, arch_kwargs, state_dict) and ``meta`` to ``path`` atomically.

    The file is written to a temporary file in the same folder and moved over ``path`` with
    ``os.replace``, so a crash never leaves a partial checkpoint nor damages an existing one.
    ``meta`` must be JSON-serialisable. Refuses (ValueError) models with non-finite parameters or
    buffers, and models that :func:`build_model` cannot rebuild.
    """
    if not isinstance(model, Classifier):
        raise TypeError(f"model must be a stakes Classifier, got {type(model).__name__}")
    if model.arch not in ARCHS:
        raise ValueError(f"model arch {model.arch!r} cannot be rebuilt from a checkpoint "
                         f"(expected one of {', '.join(ARCHS)}); save its state_dict yourself")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to save a model with non-finite values in {', '.join(bad)}")
    try:
        meta_json = json.dumps(meta or {})
    except TypeError as exc:
        raise ValueError(f"meta must be JSON-serialisable: {exc}") from exc
    payload = dict(format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, arch=model.arch,
                   arch_kwargs=dict(model.arch_kwargs), state_dict=state, meta_json=meta_json)

    return atomic_torch_save(payload, path)


def load_checkpoint(path, map_location="cpu") -> tuple[Classifier, dict]:
    """Rebuild the :class:`Classifier` saved by :func:`save_checkpoint`; returns (model, meta).

    The model is returned in eval mode. Missing file → FileNotFoundError; a file that is not a
    stakes checkpoint → ValueError.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable checkpoint (expected a file written by "
                         f"stakes.pretrain.save_checkpoint): {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a stakes checkpoint (expected a dict with "
                         f"format={CHECKPOINT_FORMAT!r}, written by save_checkpoint)")
    try:
        model = build_model(payload["arch"], **payload["arch_kwargs"])
        model.load_state_dict(payload["state_dict"])
        meta = json.loads(payload["meta_json"])
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{path}: damaged stakes checkpoint ({type(exc).__name__}: {exc})") \
            from exc
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    return model.eval(), meta


# -------------------------------------------------------------------------------- cached models

def data_fingerprint(data: ImageData) -> str:
    """A short hash identifying a data set's contents (labels, shapes, a strided pixel sample)."""
    h = hashlib.sha1()
    h.update(repr((data.name, data.class_names, tuple(data.train_x.shape),
                   tuple(data.test_x.shape))).encode())
    for t in (data.train_y, data.test_y):
        h.update(t.cpu().numpy().tobytes())
    for t in (data.train_x, data.test_x):
        step = max(1, len(t) // 64)
        h.update(t[::step].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    """$STAKES_CACHE, else (unset or empty) ~/.cache/stakes."""
    return Path(os.environ.get("STAKES_CACHE") or "~/.cache/stakes").expanduser()


def pretrained_model(dataset: str, *, data: ImageData | None = None, cache_dir=None,
                     seed: int = 0, progress: bool = True, device="cpu") -> tuple[Classifier, dict]:
    """The pretrained classifier for ``dataset``: from ``cache_dir`` if cached, else trained.

    The cache file is ``cache_dir/<dataset>_<arch>_seed<seed>.pt`` (arch = ``default_arch``).
    ``data`` defaults to ``load_dataset(dataset, seed=seed)``; when ``data`` is given and differs
    from the data the cached model was trained on (fingerprint), the model is retrained and the
    cache overwritten. ``seed`` fixes initialisation and batch order. meta holds dataset, arch,
    seed, train_accuracy, test_accuracy, epochs, wall_time_s, recipe and data_fingerprint.
    """
    arch = default_arch(dataset)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache / f"{dataset}_{arch}_seed{seed}.pt"
    if data is not None and data.name != dataset:
        raise ValueError(f"data is {data.name!r} but dataset is {dataset!r}")
    fingerprint = data_fingerprint(data) if data is not None else None

    if path.is_file():
        model, meta = load_checkpoint(path, map_location=device)
        stale = fingerprint is not None and meta.get("data_fingerprint") != fingerprint
        if not stale:
            return model, meta
        warnings.warn(f"{path} was trained on different {dataset!r} data; retraining",
                      stacklevel=2)

    if data is None:
        data = load_dataset(dataset, seed=seed)
        fingerprint = data_fingerprint(data)
    c, h, _ = data.input_shape
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = build_model(arch, data.num_classes, in_channels=c, image_size=h)
    stats = pretrain(model, data, seed=seed, progress=progress, device=device)
    meta = dict(dataset=dataset, arch=arch, seed=seed, recipe=_recipe(dataset),
                data_fingerprint=fingerprint, num_classes=data.num_classes,
                input_shape=list(data.input_shape), **stats)
    save_checkpoint(path, model, meta)
    return model.eval(), meta
