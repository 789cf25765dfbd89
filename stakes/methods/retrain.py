"""The retrain oracle (METHOD.md §10): train from scratch without the forget set, with the data
set's default recipe. A reference point, not an unlearning run: ``stakes compare --retrain`` runs
it next to the methods; :func:`stakes.unlearn` refuses it."""

from __future__ import annotations

import torch

from stakes.methods.base import UnlearningMethod, register_method


class RetrainOracle(UnlearningMethod):
    oracle = True
    uses_proxies = False

    def train(self, data, forget_idx: torch.Tensor, seed: int, *, progress: bool = False, device: str = "cpu"):
        """The model trained on ``data`` without ``forget_idx`` (default architecture of the data set)."""
        from stakes.data import ImageData
        from stakes.models import build_model, default_arch
        from stakes.pretrain import pretrain

        keep = torch.ones(len(data.train_y), dtype=torch.bool)
        keep[forget_idx] = False
        retained = ImageData(name=data.name, class_names=data.class_names, train_x=data.train_x[keep],
                             train_y=data.train_y[keep], test_x=data.test_x, test_y=data.test_y,
                             synthetic=data.synthetic)
        torch.manual_seed(seed)
        c, h, _ = data.input_shape
        model = build_model(default_arch(data.name), data.num_classes, in_channels=c, image_size=h)
        pretrain(model, retained, seed=seed, progress=progress, device=device)
        return model.eval()


def retrain_oracle(data, forget_idx: torch.Tensor, seed: int, *, progress: bool = False, device: str = "cpu"):
    """Train from scratch without the forget set (the data set's default recipe); returns the model."""
    return RetrainOracle().train(data, forget_idx, seed, progress=progress, device=device)


register_method("retrain", RetrainOracle())
