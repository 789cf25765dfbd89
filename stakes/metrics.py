"""Evaluation metrics of instance unlearning (METHOD.md §11-13).

Every model here is the *deployed* classifier (an ``nn.Module`` mapping images to logits);
embeddings are float tensors ``[N, d]``. Accuracies and rates are percentages in [0, 100];
areas under curves are in [0, 1]. An empty evaluation set gives ``nan`` (never a crash), so a
table of seeds can still be summarised with :func:`summarize`, which drops and counts NaNs.

Groups:

* classification: :func:`predict`, :func:`accuracy`, :func:`accuracy_from_logits`,
  :func:`deletion_rate`, :func:`per_sample_loss`, :func:`evaluate_model`;
* privacy: :func:`membership_inference` (a cross-validated logistic-regression attack on losses);
* structure (§4, §11): :func:`anchor_structure`, :func:`structure_drift`,
  :func:`pairwise_cosine_change`;
* retrieval / identification on embeddings: :func:`retrieval_metrics`,
  :func:`forgotten_retrieval_rate`, :func:`identification_accuracy`;
* matched forgetting (§12): :func:`matched_forgetting`, :func:`first_step_reaching`;
* cost: :class:`ResourceMeter`; tables: :func:`summarize`.

Metrics are host-side by nature (they return Python floats), so they synchronise once per call;
none of them is used inside an optimisation step.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "predict",
    "accuracy",
    "accuracy_from_logits",
    "deletion_rate",
    "per_sample_loss",
    "membership_inference",
    "anchor_structure",
    "structure_drift",
    "pairwise_cosine_change",
    "retrieval_metrics",
    "forgotten_retrieval_rate",
    "identification_accuracy",
    "matched_forgetting",
    "first_step_reaching",
    "ResourceMeter",
    "evaluate_model",
    "summarize",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Elements of one [queries x gallery] similarity block in the chunked retrieval metrics
# (~2^22 entries: sort indices + relevance + cumulative counts stay well under 200 MB).
_RETRIEVAL_BLOCK = 1 << 22


# ----------------------------------------------------------------------------- argument checks


def _check_tensor(name: str, value, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims (a batch first), got shape {tuple(value.shape)}")
    return value


def _check_embeddings(name: str, value) -> torch.Tensor:
    """A floating ``[N, d]`` tensor."""
    _check_tensor(name, value, ndim=2)
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor [N, d], got dtype {value.dtype}")
    return value


def _check_labels(name: str, value, n: int, ref_name: str) -> torch.Tensor:
    """Integer class labels ``[n]``, one per row of ``ref_name``."""
    _check_tensor(name, value, ndim=1)
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got dtype {value.dtype}")
    if value.shape[0] != n:
        raise ValueError(f"{name} has {value.shape[0]} entries but {ref_name} has {n} rows: one label per row expected")
    return value


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def _check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module mapping images to logits, got {type(model).__name__}")
    return model


def _metric_dtype(dtype: torch.dtype) -> torch.dtype:
    """Metrics are computed in fp32 (fp64 inputs stay fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def model_device(model: nn.Module, fallback: Optional[torch.device] = None) -> Optional[torch.device]:
    """The device of ``model``'s first parameter (or buffer); ``fallback`` for a model with neither.
    Every function here that runs a model moves its inputs there."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return fallback


# ----------------------------------------------------------------------------- classification


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Logits ``[N, C]`` (fp32, on ``x``'s device) of ``model`` on ``x``, in eval mode, without grad.

    Batches of ``batch_size`` are moved to the model's device. Every submodule's train/eval flag
    is restored afterwards one by one (a model may hold e.g. BatchNorm layers frozen in eval mode
    inside a training model). ``N = 0`` runs the model once on the empty batch to get ``[0, C]``.
    """
    _check_model(model)
    _check_tensor("x", x, min_ndim=1)
    _check_batch_size(batch_size)
    device = model_device(model, x.device)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        if x.shape[0] == 0:
            out = [model(x.to(device))]
        else:
            out = [model(x[i : i + batch_size].to(device, non_blocking=True)) for i in range(0, x.shape[0], batch_size)]
        logits = torch.cat([o.float() for o in out])
    finally:
        for m, mode in modes:
            m.training = mode
    if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"model must map x [N, ...] to logits [N, C], got shape {tuple(logits.shape)} for N={x.shape[0]}")
    return logits.to(x.device)


def accuracy_from_logits(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent: 100 · mean(argmax logits == y); ``nan`` for an empty set."""
    _check_tensor("logits", logits, ndim=2)
    _check_labels("y", y, logits.shape[0], "logits")
    if y.numel() == 0:
        return float("nan")
    correct = logits.argmax(dim=1).eq(y.to(logits.device))
    return 100.0 * correct.float().mean().item()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in percent.

    An empty set (``N = 0``) returns ``nan`` without running the model: there is nothing to
    measure, and NaN keeps such a cell out of :func:`summarize`'s mean instead of faking 0 or 100.
    """
    _check_model(model)
    _check_tensor("x", x, min_ndim=1)
    _check_labels("y", y, x.shape[0], "x")
    _check_batch_size(batch_size)
    if x.shape[0] == 0:
        return float("nan")
    return accuracy_from_logits(predict(model, x, batch_size=batch_size), y)


def deletion_rate(forget_accuracy: float) -> float:
    """Deletion rate 100 − A_f (percent of forget instances misclassified); NaN stays NaN."""
    return 100.0 - float(forget_accuracy)


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Cross-entropy of each sample, ``[N]`` fp32 on ``x``'s device (reduction none, eval mode)."""
    _check_model(model)
    _check_tensor("x", x, min_ndim=1)
    _check_labels("y", y, x.shape[0], "x")
    logits = predict(model, x, batch_size=batch_size)
    return F.cross_entropy(logits, y.to(logits.device).long(), reduction="none")


def evaluate_model(
    model: nn.Module,
    data,
    forget_idx: torch.Tensor,
    *,
    batch_size: int = 512,
    max_retain: Optional[int] = None,
    seed: int = 0,
) -> dict:
    """A_f, A_r and A_test (percent) of the deployed ``model`` (METHOD.md §11).

    ``data`` has ``train_x, train_y, test_x, test_y`` (e.g. ``stakes.data.ImageData``);
    ``forget_idx`` holds training indices (an integer tensor; a bool mask over the training set is
    also accepted). The retained set D_r is the training set minus the forget set; with
    ``max_retain`` it is subsampled to that many rows (without replacement, ``seed``) for speed.
    Returns ``{"forget_accuracy", "retain_accuracy", "test_accuracy"}``.
    """
    for attr in ("train_x", "train_y", "test_x", "test_y"):
        if not hasattr(data, attr):
            raise TypeError(f"data must have attributes train_x, train_y, test_x, test_y; missing {attr!r}")
    n_train = data.train_x.shape[0]
    _check_labels("data.train_y", data.train_y, n_train, "data.train_x")
    _check_tensor("forget_idx", forget_idx, ndim=1)
    if forget_idx.dtype == torch.bool:
        if forget_idx.shape[0] != n_train:
            raise ValueError(f"forget_idx as a bool mask must have {n_train} entries (one per training sample), got {forget_idx.shape[0]}")
        forget_idx = forget_idx.nonzero().squeeze(1)
    elif forget_idx.dtype.is_floating_point or forget_idx.dtype.is_complex:
        raise TypeError(f"forget_idx must be an integer tensor of training indices, got dtype {forget_idx.dtype}")
    forget_idx = forget_idx.to(data.train_x.device).long().unique()  # a set: duplicates count once
    if forget_idx.numel() and (forget_idx.min() < 0 or forget_idx.max() >= n_train):
        raise ValueError(f"forget_idx must index the training set: values in [0, {n_train}), got "
                         f"[{forget_idx.min().item()}, {forget_idx.max().item()}]")
    if max_retain is not None and (isinstance(max_retain, bool) or not isinstance(max_retain, int) or max_retain <= 0):
        raise ValueError(f"max_retain must be None or a positive int, got {max_retain!r}")

    keep = torch.ones(n_train, dtype=torch.bool, device=forget_idx.device)
    keep[forget_idx] = False
    retain_idx = keep.nonzero().squeeze(1)
    if max_retain is not None and retain_idx.numel() > max_retain:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(retain_idx.numel(), generator=gen)[:max_retain].to(retain_idx.device)
        retain_idx = retain_idx[pick.sort().values]

    def acc(x, y):
        return accuracy(model, x, y, batch_size=batch_size)

    return {
        "forget_accuracy": acc(data.train_x[forget_idx], data.train_y[forget_idx]),
        "retain_accuracy": acc(data.train_x[retain_idx], data.train_y[retain_idx]),
        "test_accuracy": acc(data.test_x, data.test_y),
    }


# ----------------------------------------------------------------------------- membership inference

_MIA_FEATURES = ("loss", "loss_confidence")


def _mia_features(logits: torch.Tensor, y: torch.Tensor, features: str) -> np.ndarray:
    """Attack features from logits: log ℓ (and max softmax probability, softmax entropy)."""
    logp = torch.log_softmax(logits.double(), dim=1)
    loss = -logp.gather(1, y.to(logits.device).long()[:, None]).squeeze(1)
    # log ℓ spreads the near-zero losses of memorised samples (ℓ ~ 1e-5) that a linear model on
    # ℓ itself could not separate; 1e-12 bounds log 0 for perfectly fitted samples.
    cols = [loss.clamp_min(1e-12).log()]
    if features == "loss_confidence":
        p = logp.exp()
        cols += [p.max(dim=1).values, -(p * logp).sum(dim=1)]
    return torch.stack(cols, dim=1).cpu().numpy()


def membership_inference(
    model: nn.Module,
    forget_x: torch.Tensor,
    forget_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    seed: int = 0,
    folds: int = 5,
    features: str = "loss",
    batch_size: int = 512,
) -> dict:
    """Loss-based membership-inference attack: can forget instances be told from unseen test data?

    Features per sample (``features``): ``"loss"`` → [log ℓ] (ℓ = cross-entropy of the true
    label); ``"loss_confidence"`` → [log ℓ, max softmax probability, softmax entropy]. Members =
    forget set (label 1), non-members = test set (label 0). The larger side is subsampled without
    replacement (``seed``) to the size n of the smaller, so chance level is exactly 50 %.
    A standardised logistic regression is evaluated by stratified ``min(folds, n)``-fold (at least
    2) cross-validation (``cross_val_predict(method="predict_proba")``): every sample is scored by a
    model that never saw it.

    Returns ``mia_accuracy`` (percent, threshold 0.5 on the out-of-fold probability; 50 = chance),
    ``mia_auc`` (ROC AUC in [0, 1]; 0.5 = chance, 1 = forget samples fully recognisable),
    ``n_forget`` / ``n_test`` (input sizes), ``n_per_side`` (after balancing), ``folds`` (used) and
    ``reason`` (None, or why the values are NaN: fewer than 2 samples on a side, or non-finite
    losses). After successful unlearning one wants AUC near 0.5 — or below, when forget samples now
    have *higher* losses than test samples, which an attacker can equally exploit.
    """
    _check_model(model)
    _check_tensor("forget_x", forget_x, min_ndim=1)
    _check_labels("forget_y", forget_y, forget_x.shape[0], "forget_x")
    _check_tensor("test_x", test_x, min_ndim=1)
    _check_labels("test_y", test_y, test_x.shape[0], "test_x")
    if forget_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(f"test_x samples have shape {tuple(test_x.shape[1:])} but forget_x samples have "
                         f"{tuple(forget_x.shape[1:])}: both must be inputs of the same model")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    if features not in _MIA_FEATURES:
        raise ValueError(f"features must be one of {_MIA_FEATURES}, got {features!r}")

    n_forget, n_test = forget_x.shape[0], test_x.shape[0]
    n = min(n_forget, n_test)
    k = max(2, min(folds, n))
    result = {"mia_accuracy": float("nan"), "mia_auc": float("nan"), "n_forget": n_forget, "n_test": n_test,
              "n_per_side": n, "folds": k, "reason": None}
    if n < 2:
        result["reason"] = f"need at least 2 samples per side for a cross-validated attack, got n_forget={n_forget}, n_test={n_test}"
        return result

    # Balance by subsampling the larger side (same seed -> same subset).
    rng = np.random.default_rng(seed)
    f_sel = np.sort(rng.choice(n_forget, size=n, replace=False)) if n_forget > n else np.arange(n)
    t_sel = np.sort(rng.choice(n_test, size=n, replace=False)) if n_test > n else np.arange(n)
    f_sel_t, t_sel_t = torch.from_numpy(f_sel), torch.from_numpy(t_sel)
    f_feat = _mia_features(predict(model, forget_x[f_sel_t.to(forget_x.device)], batch_size=batch_size),
                           forget_y[f_sel_t.to(forget_y.device)], features)
    t_feat = _mia_features(predict(model, test_x[t_sel_t.to(test_x.device)], batch_size=batch_size),
                           test_y[t_sel_t.to(test_y.device)], features)
    X = np.concatenate([f_feat, t_feat])
    labels = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])
    if not np.isfinite(X).all():
        result["reason"] = "non-finite per-sample losses (the model produced NaN/inf logits)"
        return result

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    attack = make_pipeline(StandardScaler(), LogisticRegression())
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    member_prob = cross_val_predict(attack, X, labels, cv=cv, method="predict_proba")[:, 1]
    result["mia_accuracy"] = 100.0 * float(np.mean((member_prob >= 0.5) == (labels == 1)))
    result["mia_auc"] = float(roc_auc_score(labels, member_prob))
    return result


# ----------------------------------------------------------------------------- structures (§4, §11)


def anchor_structure(v: torch.Tensor, anchors: torch.Tensor, *, backend: Optional[str] = "reference") -> torch.Tensor:
    """Structure S = normalize(V) · normalize(A)ᵀ, ``[N, b]``: S_ij = cos(v_i, a_j) (METHOD.md §4).

    Delegates to ``fused.anchor_similarity`` (the reference path by default: metrics run rarely and
    on any device; pass ``backend=None`` to use the kernel where available). No grad.
    """
    _check_embeddings("v", v)
    _check_embeddings("anchors", anchors)
    if anchors.shape[1] != v.shape[1]:
        raise ValueError(f"anchors has dimension {anchors.shape[1]} but v has dimension {v.shape[1]}: "
                         f"embeddings and anchors must share d")
    from fused import anchor_similarity

    ct = _metric_dtype(v.dtype)  # the op normalises both operands itself
    with torch.no_grad():
        return anchor_similarity(v.to(ct), anchors.to(v.device, ct), backend=backend)


def structure_drift(
    v_ori: torch.Tensor, v_unl: torch.Tensor, anchors: torch.Tensor, *, backend: Optional[str] = "reference"
) -> float:
    """Structure drift 1 − (1/N) Σ_i cos(S_i^ori, S_i^unl) (METHOD.md §11; = L_align of §5).

    ``v_ori`` / ``v_unl``: embeddings of the same N held-out (non-forget) samples by the original
    and the unlearned model, ``[N, d_a]`` each; ``anchors`` ``[b, d_a]``. 0 = the instance-anchor
    profiles are unchanged, 1 = orthogonal on average, up to 2. ``nan`` for N = 0.
    """
    _check_embeddings("v_ori", v_ori)
    _check_embeddings("v_unl", v_unl)
    _check_embeddings("anchors", anchors)
    if v_unl.shape != v_ori.shape:
        raise ValueError(f"v_unl has shape {tuple(v_unl.shape)} but v_ori has shape {tuple(v_ori.shape)}: "
                         f"both must embed the same samples in the same space")
    if anchors.shape[1] != v_ori.shape[1]:
        raise ValueError(f"anchors has dimension {anchors.shape[1]} but v_ori has dimension {v_ori.shape[1]}")
    if v_ori.shape[0] == 0:
        return float("nan")
    from fused import structure_alignment_loss

    device, ct = v_unl.device, _metric_dtype(v_unl.dtype)
    # Unit rows up front: idempotent for x and x_ref (the loss normalises them, §5) and makes sure
    # the anchors are unit as §2 defines them, whatever the op assumes.
    v_unl, v_ori, anchors = (F.normalize(t.to(device, ct), dim=1) for t in (v_unl, v_ori, anchors))
    with torch.no_grad():
        loss = structure_alignment_loss(v_unl, v_ori, anchors, reduction="mean", backend=backend)
    return float(loss)


def pairwise_cosine_change(
    e_before: torch.Tensor, e_after: torch.Tensor, *, max_samples: int = 2000, seed: int = 0
) -> float:
    """Mean |cos_after(i, j) − cos_before(i, j)| over pairs i ≠ j of retained samples (§11).

    ``e_before`` / ``e_after``: embeddings of the same N samples before and after unlearning; their
    widths may differ (only the N×N cosine matrices are compared, which is also why the metric is
    invariant to any rotation of either space). Rows are subsampled to ``max_samples`` (same rows
    for both, ``seed``) to bound the N² memory. Range [0, 2]; ``nan`` for N < 2.
    """
    _check_embeddings("e_before", e_before)
    _check_embeddings("e_after", e_after)
    if e_after.shape[0] != e_before.shape[0]:
        raise ValueError(f"e_after has {e_after.shape[0]} rows but e_before has {e_before.shape[0]}: "
                         f"both must embed the same samples")
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 2:
        raise ValueError(f"max_samples must be an int >= 2, got {max_samples!r}")
    n = e_before.shape[0]
    if n < 2:
        return float("nan")
    if n > max_samples:
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randperm(n, generator=gen)[:max_samples]
        e_before = e_before[rows.to(e_before.device)]
        e_after = e_after[rows.to(e_after.device)]
        n = max_samples

    def cosine_matrix(e):
        e = F.normalize(e.to(_metric_dtype(e.dtype)), dim=1)
        return e @ e.T

    diff = (cosine_matrix(e_after) - cosine_matrix(e_before).to(e_after.device)).abs()
    diff.fill_diagonal_(0.0)  # the diagonal is 1 vs 1 (or 0 for zero rows): not a pair
    return float(diff.sum(dtype=torch.float64) / (n * (n - 1)))


# ----------------------------------------------------------------------------- retrieval


def _check_retrieval(query_emb, query_y, gallery_emb, gallery_y, *, query_name="query"):
    _check_embeddings(f"{query_name}_emb", query_emb)
    _check_labels(f"{query_name}_y", query_y, query_emb.shape[0], f"{query_name}_emb")
    _check_embeddings("gallery_emb", gallery_emb)
    _check_labels("gallery_y", gallery_y, gallery_emb.shape[0], "gallery_emb")
    if gallery_emb.shape[1] != query_emb.shape[1]:
        raise ValueError(f"gallery_emb has dimension {gallery_emb.shape[1]} but {query_name}_emb has dimension "
                         f"{query_emb.shape[1]}: both must live in one embedding space")
    if gallery_emb.shape[0] == 0:
        raise ValueError("gallery_emb must have at least one row")


def _check_k(name: str, k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name} must be a positive int, got {k!r}")
    return k


def _query_blocks(query_emb, query_y, gallery_emb, gallery_y):
    """Yield (cosine similarities [q, G], same-class mask [q, G]) for chunks of queries."""
    device = gallery_emb.device
    g = F.normalize(gallery_emb.float(), dim=1)
    g_y = gallery_y.to(device)
    chunk = max(1, _RETRIEVAL_BLOCK // g.shape[0])
    for i in range(0, query_emb.shape[0], chunk):
        q = F.normalize(query_emb[i : i + chunk].to(device).float(), dim=1)
        yield q @ g.T, query_y[i : i + chunk].to(device)[:, None] == g_y[None, :]


def _hit_at_k(query_emb, query_y, gallery_emb, gallery_y, k: int) -> float:
    """Percent of queries with a same-class gallery item among their k most cosine-similar."""
    if query_emb.shape[0] == 0:
        return float("nan")
    k = min(k, gallery_emb.shape[0])
    hits = 0
    for sims, same in _query_blocks(query_emb, query_y, gallery_emb, gallery_y):
        top = sims.topk(k, dim=1).indices  # exact similarity ties are broken by topk's order
        hits += same.gather(1, top).any(dim=1).sum()
    return 100.0 * float(hits) / query_emb.shape[0]


def retrieval_metrics(
    query_emb: torch.Tensor,
    query_y: torch.Tensor,
    gallery_emb: torch.Tensor,
    gallery_y: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 5),
) -> dict:
    """Class-level retrieval with cosine similarity: ``recall@k`` for each k in ``ks`` and ``mAP``.

    For each query the gallery is ranked by cosine similarity (descending; exact ties keep gallery
    order, stable sort). A gallery item is relevant when it has the query's class.
    recall@k = percent of queries with ≥ 1 relevant item among the top k (k > G means all).
    AP = (1/|rel|) Σ_{r: item r relevant} precision@r over the full ranking; mAP = mean AP in
    percent. A query whose class is absent from the gallery counts as a miss for recall@k and is
    left out of mAP (its AP is undefined); ``n_queries_without_relevant`` reports how many.
    Queries are processed in chunks so memory stays O(chunk · G). The gallery should not contain
    the queries themselves (each would retrieve itself at rank 1). Values are ``nan`` for 0 queries.
    """
    _check_retrieval(query_emb, query_y, gallery_emb, gallery_y)
    ks = [_check_k("ks entries", k) for k in ks]
    n_q, n_g = query_emb.shape[0], gallery_emb.shape[0]
    out = {f"recall@{k}": float("nan") for k in ks}
    out.update({"mAP": float("nan"), "n_queries_without_relevant": 0})
    if n_q == 0:
        return out
    hits = {k: 0 for k in ks}
    ap_sum, n_ap = 0.0, 0
    ranks = torch.arange(1, n_g + 1, device=gallery_emb.device, dtype=torch.float64)
    for sims, same in _query_blocks(query_emb, query_y, gallery_emb, gallery_y):
        order = sims.argsort(dim=1, descending=True, stable=True)
        rel = same.gather(1, order)  # relevance in rank order
        for k in ks:
            hits[k] += rel[:, :k].any(dim=1).sum()
        n_rel = rel.sum(dim=1)
        precision_at_r = rel.cumsum(dim=1) / ranks  # precision@r = (# relevant in top r) / r
        ap = (precision_at_r * rel).sum(dim=1) / n_rel.clamp_min(1)
        has_rel = n_rel > 0
        ap_sum += ap[has_rel].sum()
        n_ap += has_rel.sum()
    for k in ks:
        out[f"recall@{k}"] = 100.0 * float(hits[k]) / n_q
    n_ap = int(n_ap)
    out["mAP"] = 100.0 * float(ap_sum) / n_ap if n_ap else float("nan")
    out["n_queries_without_relevant"] = n_q - n_ap
    return out


def forgotten_retrieval_rate(
    forget_emb: torch.Tensor,
    forget_y: torch.Tensor,
    gallery_emb: torch.Tensor,
    gallery_y: torch.Tensor,
    *,
    k: int = 1,
) -> float:
    """Percent of forgotten instances still retrieved by their own class: a same-class item is
    among their top-``k`` cosine neighbours in the gallery (lower = better forgotten).

    The gallery must not contain the forget instances themselves (use the retained or test set).
    ``nan`` for an empty forget set.
    """
    _check_retrieval(forget_emb, forget_y, gallery_emb, gallery_y, query_name="forget")
    _check_k("k", k)
    return _hit_at_k(forget_emb, forget_y, gallery_emb, gallery_y, k)


def identification_accuracy(
    query_emb: torch.Tensor, query_y: torch.Tensor, gallery_emb: torch.Tensor, gallery_y: torch.Tensor
) -> float:
    """Face-style closed-set identification: percent of queries whose 1-nearest gallery neighbour
    (cosine similarity) has the query's identity. ``nan`` for 0 queries."""
    _check_retrieval(query_emb, query_y, gallery_emb, gallery_y)
    return _hit_at_k(query_emb, query_y, gallery_emb, gallery_y, 1)


# ----------------------------------------------------------------------------- matched forgetting (§12)

_TRAJECTORY_KEYS = ("step", "forget_accuracy", "test_accuracy")


def _ordered_trajectory(trajectory) -> list:
    if isinstance(trajectory, Mapping) or not isinstance(trajectory, Iterable):
        raise TypeError(f"trajectory must be a list of dicts with keys {_TRAJECTORY_KEYS}, got {type(trajectory).__name__}")
    entries = list(trajectory)
    for i, e in enumerate(entries):
        if not isinstance(e, Mapping):
            raise TypeError(f"trajectory[{i}] must be a dict, got {type(e).__name__}")
        missing = [key for key in _TRAJECTORY_KEYS if key not in e]
        if missing:
            raise ValueError(f"trajectory[{i}] lacks key(s) {missing}; every entry needs {_TRAJECTORY_KEYS}")
    return sorted(entries, key=lambda e: e["step"])  # stable: equal steps keep logging order


def _first_reaching(entries: list, threshold: float):
    for e in entries:
        if float(e["forget_accuracy"]) <= threshold:  # NaN never qualifies
            return e
    return None


def first_step_reaching(trajectory, threshold: float):
    """The first logged step at which forget accuracy ≤ ``threshold`` (percent); None if never."""
    entry = _first_reaching(_ordered_trajectory(trajectory), float(threshold))
    return None if entry is None else entry["step"]


def matched_forgetting(trajectory, thresholds: Sequence[float] = (25.0, 10.0, 0.0)) -> dict:
    """Test accuracy at matched forgetting (METHOD.md §12).

    ``trajectory``: logged dicts with at least ``step``, ``forget_accuracy``, ``test_accuracy``
    (percent), taken in step order. For each threshold t the result holds, under the key
    ``"test_at_forget<={t:g}"`` (e.g. ``"test_at_forget<=25"``), the test accuracy at the first
    step where forget accuracy ≤ t, or None if it never got there.
    """
    entries = _ordered_trajectory(trajectory)
    out = {}
    for t in thresholds:
        t = float(t)
        entry = _first_reaching(entries, t)
        out[f"test_at_forget<={t:g}"] = None if entry is None else float(entry["test_accuracy"])
    return out


# ----------------------------------------------------------------------------- cost


class ResourceMeter:
    """Wall time and peak memory of a block::

        with ResourceMeter(device) as meter:
            run()
        meter.wall_time_s, meter.peak_memory_mb

    * ``wall_time_s``: ``time.perf_counter`` difference; on CUDA the device is synchronised at
      enter and exit so queued kernels are counted.
    * ``peak_memory_mb`` on CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak at
      enter — the largest amount of tensor memory allocated during the block, *including* what was
      already allocated before it (the model, the data).
    * ``peak_memory_mb`` on CPU: the process's resident-set high-water mark
      (``getrusage(RUSAGE_SELF).ru_maxrss``) at exit. It is a process-lifetime maximum and cannot be
      reset: a block that stays under an earlier peak reports that earlier peak.
      ``rss_growth_mb`` is how much the block raised the high-water mark (0 if it did not).
    """

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.wall_time_s = float("nan")
        self.peak_memory_mb = float("nan")
        self.rss_growth_mb = float("nan")
        self._start = None
        self._rss_start = None

    @staticmethod
    def _max_rss_mb() -> float:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is in kilobytes on Linux, bytes on macOS.
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10

    def __enter__(self) -> "ResourceMeter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._rss_start = self._max_rss_mb()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.wall_time_s = time.perf_counter() - self._start
        rss = self._max_rss_mb()
        self.rss_growth_mb = rss - self._rss_start
        if self.device.type == "cuda":
            self.peak_memory_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_memory_mb = rss
        return None

    def as_dict(self) -> dict:
        """``{"wall_time_s", "peak_memory_mb", "device"}`` for a results table."""
        return {"wall_time_s": self.wall_time_s, "peak_memory_mb": self.peak_memory_mb, "device": str(self.device)}

    def __repr__(self) -> str:
        return (f"ResourceMeter(device={self.device}, wall_time_s={self.wall_time_s:.3f}, "
                f"peak_memory_mb={self.peak_memory_mb:.1f})")


# ----------------------------------------------------------------------------- tables


def summarize(values) -> dict:
    """Mean ± std of one table cell over seeds: ``{"mean", "std", "n", "n_nan"}``.

    NaN (and None) values are excluded and counted in ``n_nan``. ``std`` is the sample standard
    deviation (ddof = 1) for n > 1 and 0 for n = 1; with n = 0 both mean and std are NaN.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().flatten().tolist()
    elif isinstance(values, np.ndarray):
        values = values.ravel().tolist()
    vals = [float("nan") if v is None else float(v) for v in values]
    finite_or_inf = np.array([v for v in vals if not math.isnan(v)], dtype=np.float64)
    n = int(finite_or_inf.size)
    n_nan = len(vals) - n
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0, "n_nan": n_nan}
    std = float(np.std(finite_or_inf, ddof=1)) if n > 1 else 0.0
    return {"mean": float(np.mean(finite_or_inf)), "std": std, "n": n, "n_nan": n_nan}
