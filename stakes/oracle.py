"""The retrain oracle (METHOD.md §10): the model trained from scratch without the forget set, with
the data set's default recipe. A reference point for a comparison (``stakes compare --retrain``),
not an unlearning method: it never sees the pretrained model."""

from __future__ import annotations

import torch

from stakes.data import ImageData
from stakes.models import build_model, default_arch
from stakes.pretrain import pretrain


def retrain_oracle(data: ImageData, forget_idx: torch.Tensor, seed: int, *, progress: bool = False,
                   device: str = "cpu", precision=None) -> torch.nn.Module:
    """Train from scratch on ``data`` without ``forget_idx`` (the data set's default architecture and
    recipe; ``precision`` as :func:`stakes.pretrain.pretrain`'s, None: the device's default); returns
    the model in eval mode."""
    keep = torch.ones(len(data.train_y), dtype=torch.bool)
    keep[forget_idx] = False
    retained = ImageData(name=data.name, class_names=data.class_names, train_x=data.train_x[keep],
                         train_y=data.train_y[keep], test_x=data.test_x, test_y=data.test_y,
                         synthetic=data.synthetic)
    torch.manual_seed(seed)
    c, h, _ = data.input_shape
    model = build_model(default_arch(data.name), data.num_classes, in_channels=c, image_size=h)
    pretrain(model, retained, seed=seed, progress=progress, device=device, precision=precision)
    return model.eval()
