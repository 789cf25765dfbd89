"""The model pieces of a run: the projector p_ω (METHOD.md §7), the deployed model h∘p∘g, and the
fixed random projection R_p (§4)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class Projector(nn.Module):
    """p_ω: Linear(d_f, d_a) → BatchNorm1d → ReLU → Linear(d_a, d_f) (METHOD.md §7).

    ``forward`` returns ``(out, z)``: the d_f-dimensional output fed to the head and the
    d_a-dimensional representation z whose anchor structure is aligned (§4). For d_f == d_a, z is
    the output; otherwise z is the first linear layer's output (the hidden layer of width d_a,
    before BatchNorm) [ours].
    """

    def __init__(self, feature_dim: int, anchor_dim: int, hidden_dim: Optional[int] = None):
        super().__init__()
        hidden_dim = anchor_dim if hidden_dim is None else hidden_dim
        self.feature_dim, self.anchor_dim, self.hidden_dim = feature_dim, anchor_dim, hidden_dim
        self.fc1 = nn.Linear(feature_dim, hidden_dim)
        self.bn = nn.BatchNorm1d(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, feature_dim)
        self.frozen_bn = False   # warm start keeps BatchNorm statistics fixed

    def forward(self, h: torch.Tensor):
        hidden = self.fc1(h)
        out = self.fc2(F.relu(self.bn(hidden)))
        z = out if self.feature_dim == self.hidden_dim else hidden
        return out, z

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_bn:
            self.bn.eval()
        return self

    @torch.no_grad()
    def warm_start(self, init_std: float = 0.01, generator: Optional[torch.Generator] = None) -> None:
        """Initialise so that ``out == h`` for every h ≥ 0 (METHOD.md §13 [ours]).

        Pooled CNN features are non-negative (they come out of a ReLU), so an identity embedding
        passes them through: fc1 = [I; W'] (the extra d_a − d_f hidden units get small random rows W'
        and zero outgoing weights, so they start silent but can learn), BatchNorm frozen as the
        identity (eval mode, zero mean, unit variance), fc2 = [I, 0]. Needs a hidden width ≥ d_f
        (the unlearner builds the projector with width max(d_a, d_f) when warm-starting).
        """
        d_f, d_a = self.feature_dim, self.hidden_dim
        if d_a < d_f:
            raise ValueError(f"warm start needs hidden width >= feature dim, got {d_a} < {d_f}")
        w1 = torch.zeros(d_a, d_f)
        w1[:d_f] = torch.eye(d_f)
        w1[d_f:] = torch.randn(d_a - d_f, d_f, generator=generator) * init_std
        self.fc1.weight.copy_(w1)
        self.fc1.bias.zero_()
        self.bn.reset_running_stats()
        self.bn.running_var.fill_(1.0 - self.bn.eps)   # (x − 0) / sqrt(1 − eps + eps) = x
        self.bn.weight.fill_(1.0)
        self.bn.bias.zero_()
        self.frozen_bn = True
        self.bn.eval()
        w2 = torch.zeros(d_f, d_a)
        w2[:, :d_f] = torch.eye(d_f)
        self.fc2.weight.copy_(w2)
        self.fc2.bias.zero_()


class DeployedModel(nn.Module):
    """The model after unlearning: h_φ ∘ p_ω ∘ g_ψ (or h ∘ g for methods without a projector)."""

    def __init__(self, features: nn.Module, head: nn.Linear, projector: Optional[Projector] = None):
        super().__init__()
        self.features, self.head, self.projector = features, head, projector

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The representation the head sees: p(g(x)), or g(x) without a projector."""
        h = self.features(x)
        return h if self.projector is None else self.projector(h)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def as_classifier(self):
        """This model as a :class:`stakes.models.Classifier` (features: g, or p∘g with a projector; the
        same modules, shared)."""
        from stakes.models import Classifier

        features = self.features if self.projector is None else _Embedding(self)
        return Classifier(features, self.head)


class _Embedding(nn.Module):
    """p(g(x)) of a deployed model, as a module (its features with the projector)."""

    def __init__(self, deployed: DeployedModel):
        super().__init__()
        self.features, self.projector = deployed.features, deployed.projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.features(x))[0]


def random_projection(feature_dim: int, anchor_dim: int, seed: int) -> torch.Tensor:
    """R_p ∈ R^{d_f×d_a}: Gaussian with L2-normalised columns, fixed per run; identity if d_f == d_a."""
    if feature_dim == anchor_dim:
        return torch.eye(feature_dim)
    g = torch.Generator().manual_seed(seed + 104729)
    r = torch.randn(feature_dim, anchor_dim, generator=g)
    return r / r.norm(dim=0, keepdim=True)
