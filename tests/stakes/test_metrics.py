"""Tests of stakes.metrics: every metric against small hand-computed cases or an independent oracle."""

import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from stakes import metrics
from stakes.metrics import (
    ResourceMeter,
    accuracy,
    accuracy_from_logits,
    anchor_structure,
    deletion_rate,
    evaluate_model,
    first_step_reaching,
    forgotten_retrieval_rate,
    identification_accuracy,
    matched_forgetting,
    membership_inference,
    pairwise_cosine_change,
    per_sample_loss,
    predict,
    retrieval_metrics,
    structure_drift,
    summarize,
)

SQRT2 = math.sqrt(2.0)


class Raises(nn.Module):
    """A model that must never be called."""

    def forward(self, x):
        raise AssertionError("the model was called")


# ----------------------------------------------------------------------------- classification


def test_predict_matches_model_batched_and_restores_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.9), nn.Linear(8, 3))
    model(torch.randn(32, 4))  # give BatchNorm non-trivial running statistics
    model.train()
    model[1].eval()  # a BatchNorm frozen in eval mode inside a training model
    x = torch.randn(11, 4)
    logits = predict(model, x, batch_size=4)
    assert [m.training for m in model] == [True, False, True, True]
    model.eval()
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(logits, expected)
    assert logits.dtype == torch.float32 and not logits.requires_grad
    assert predict(model, x[:0]).shape == (0, 3)


def test_predict_rejects_bad_input():
    with pytest.raises(TypeError, match="model"):
        predict(lambda x: x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="batch_size"):
        predict(nn.Identity(), torch.zeros(2, 3), batch_size=0)
    with pytest.raises(ValueError, match="logits"):
        predict(nn.Flatten(0), torch.zeros(2, 3))


def test_accuracy_hand_case_and_empty_set():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0]])
    y = torch.tensor([0, 1, 1])
    assert accuracy_from_logits(logits, y) == pytest.approx(200 / 3)
    assert accuracy(nn.Identity(), logits, y, batch_size=2) == pytest.approx(200 / 3)
    assert math.isnan(accuracy(Raises(), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))
    assert math.isnan(accuracy_from_logits(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="y has 2 entries but x has 3"):
        accuracy(nn.Identity(), logits, y[:2])
    with pytest.raises(TypeError, match="y must hold integer"):
        accuracy_from_logits(logits, y.float())


def test_deletion_rate():
    assert deletion_rate(30.0) == 70.0
    assert deletion_rate(0.0) == 100.0
    assert math.isnan(deletion_rate(float("nan")))


def test_per_sample_loss_is_cross_entropy_per_row():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    y = torch.tensor([1, 0])
    loss = per_sample_loss(nn.Identity(), logits, y)
    torch.testing.assert_close(loss, torch.tensor([math.log(2.0), math.log(4.0 / 3.0)]))


# ----------------------------------------------------------------------------- membership inference


def _margin_logits(margins, y, num_classes=4):
    """Logits with the true class ahead of the others by ``margin`` (nn.Identity is the model)."""
    logits = torch.zeros(len(y), num_classes)
    logits[torch.arange(len(y)), y] = margins
    return logits


def test_mia_separable_losses_are_detected():
    g = torch.Generator().manual_seed(0)
    yf, yt = torch.randint(0, 4, (64,), generator=g), torch.randint(0, 4, (300,), generator=g)
    forget_x = _margin_logits(8 + torch.randn(64, generator=g), yf)  # memorised: tiny loss
    test_x = _margin_logits(1 + torch.randn(300, generator=g), yt)  # unseen: large loss
    res = membership_inference(nn.Identity(), forget_x, yf, test_x, yt, seed=0)
    assert res["mia_auc"] > 0.97 and res["mia_accuracy"] > 90.0
    assert (res["n_forget"], res["n_test"], res["n_per_side"], res["folds"], res["reason"]) == (64, 300, 64, 5, None)
    full = membership_inference(nn.Identity(), forget_x, yf, test_x, yt, seed=0, features="loss_confidence")
    assert full["mia_auc"] > 0.97


def test_mia_identical_distributions_are_near_chance_and_seeded():
    g = torch.Generator().manual_seed(1)
    yf, yt = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (400,), generator=g)
    forget_x = _margin_logits(2 + torch.randn(400, generator=g), yf)
    test_x = _margin_logits(2 + torch.randn(400, generator=g), yt)
    res = membership_inference(nn.Identity(), forget_x, yf, test_x, yt, seed=3)
    assert abs(res["mia_auc"] - 0.5) < 0.08
    assert abs(res["mia_accuracy"] - 50.0) < 8.0
    assert membership_inference(nn.Identity(), forget_x, yf, test_x, yt, seed=3) == res


def test_mia_tiny_forget_sets():
    g = torch.Generator().manual_seed(2)
    yt = torch.randint(0, 4, (100,), generator=g)
    test_x = _margin_logits(torch.randn(100, generator=g), yt)
    yf = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    res = membership_inference(nn.Identity(), _margin_logits(torch.full((8,), 10.0), yf), yf, test_x, yt, folds=10)
    assert (res["n_per_side"], res["folds"], res["reason"]) == (8, 8, None)
    assert res["mia_auc"] > 0.9
    res = membership_inference(Raises(), test_x[:1], yt[:1], test_x, yt)
    assert math.isnan(res["mia_auc"]) and math.isnan(res["mia_accuracy"])
    assert "at least 2" in res["reason"]
    with pytest.raises(ValueError, match="forget_y has 3 entries"):
        membership_inference(nn.Identity(), test_x[:2], yt[:3], test_x, yt)
    with pytest.raises(ValueError, match="folds"):
        membership_inference(nn.Identity(), test_x, yt, test_x, yt, folds=1)


def test_mia_non_finite_losses_give_nan_with_reason():
    y = torch.zeros(10, dtype=torch.long)
    x = torch.full((10, 3), float("nan"))
    res = membership_inference(nn.Identity(), x, y, x, y)
    assert math.isnan(res["mia_auc"]) and "non-finite" in res["reason"]


# ----------------------------------------------------------------------------- structures


def test_anchor_structure_hand_case():
    anchors = torch.tensor([[2.0, 0.0], [0.0, 0.5]])  # not unit: the structure normalises them
    v = torch.tensor([[3.0, 4.0], [-1.0, 0.0]])
    torch.testing.assert_close(anchor_structure(v, anchors), torch.tensor([[0.6, 0.8], [-1.0, 0.0]]))
    with pytest.raises(ValueError, match="anchors has dimension 3"):
        anchor_structure(v, torch.ones(2, 3))


def test_structure_drift_zero_for_identical_and_hand_case():
    torch.manual_seed(0)
    v, anchors = torch.randn(6, 5), torch.randn(3, 5)
    assert structure_drift(v, v.clone(), anchors) == pytest.approx(0.0, abs=1e-6)
    # S_ori = (1, 0), S_unl = (1, 1)/√2 -> cos = 1/√2 (row 1); row 2 unchanged -> cos = 1.
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v_ori = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    v_unl = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert structure_drift(v_ori, v_unl, anchors) == pytest.approx((1 - 1 / SQRT2) / 2, abs=1e-6)
    assert math.isnan(structure_drift(torch.zeros(0, 2), torch.zeros(0, 2), anchors))
    with pytest.raises(ValueError, match="v_unl has shape"):
        structure_drift(v_ori, v_unl[:1], anchors)


def test_pairwise_cosine_change_hand_cases():
    torch.manual_seed(0)
    e = torch.randn(7, 4)
    assert pairwise_cosine_change(e, e.clone()) == pytest.approx(0.0, abs=1e-6)
    q, _ = torch.linalg.qr(torch.randn(4, 4))
    assert pairwise_cosine_change(e, 3.0 * e @ q) == pytest.approx(0.0, abs=1e-5)  # rotation + scale
    before = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    after = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    # pair changes: (0,1) 0 -> 1/√2, (0,2) 1 -> 1, (1,2) 0 -> 1/√2: mean = √2/3
    assert pairwise_cosine_change(before, after) == pytest.approx(SQRT2 / 3, abs=1e-6)
    # widths may differ: only the N×N cosine matrices are compared
    assert pairwise_cosine_change(before, torch.cat([after, torch.zeros(3, 5)], 1)) == pytest.approx(SQRT2 / 3, abs=1e-6)
    assert math.isnan(pairwise_cosine_change(before[:1], after[:1]))
    with pytest.raises(ValueError, match="e_after has 2 rows"):
        pairwise_cosine_change(before, after[:2])


def test_pairwise_cosine_change_subsamples_rows_with_seed():
    torch.manual_seed(0)
    e, f = torch.randn(50, 3), torch.randn(50, 3)
    a = pairwise_cosine_change(e, f, max_samples=10, seed=4)
    assert a == pairwise_cosine_change(e, f, max_samples=10, seed=4)
    rows = torch.randperm(50, generator=torch.Generator().manual_seed(4))[:10]
    assert a == pytest.approx(pairwise_cosine_change(e[rows], f[rows]), abs=1e-6)
    assert pairwise_cosine_change(e, f, max_samples=50) == pytest.approx(pairwise_cosine_change(e, f, max_samples=500))


# ----------------------------------------------------------------------------- retrieval

# Gallery in 2-D: g0 = (1, 0) class 0, g1 = (0, 1) class 1, g2 = (1, 1) class 0, g3 = (-1, 0) class 1.
GALLERY = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
GALLERY_Y = torch.tensor([0, 1, 0, 1])
# q0 = (1, .2) class 1: ranking g0, g2, g1, g3 -> relevant at ranks 3, 4: AP = (1/3 + 2/4) / 2
# q1 = (0, 1) class 0: ranking g1, g2, {g0, g3 tie at 0: gallery order} -> ranks 2, 3: AP = (1/2 + 2/3) / 2
# q2 = (1, .1) class 0: ranking g0, g2, g1, g3 -> ranks 1, 2: AP = 1
QUERY = torch.tensor([[1.0, 0.2], [0.0, 1.0], [1.0, 0.1]])
QUERY_Y = torch.tensor([1, 0, 0])


def test_retrieval_metrics_hand_case():
    res = retrieval_metrics(QUERY, QUERY_Y, GALLERY, GALLERY_Y, ks=(1, 2, 5))
    assert res["recall@1"] == pytest.approx(100 / 3)
    assert res["recall@2"] == pytest.approx(200 / 3)
    assert res["recall@5"] == pytest.approx(100.0)
    ap = [(1 / 3 + 2 / 4) / 2, (1 / 2 + 2 / 3) / 2, 1.0]
    assert res["mAP"] == pytest.approx(100 * sum(ap) / 3)
    assert res["n_queries_without_relevant"] == 0
    assert set(retrieval_metrics(QUERY, QUERY_Y, GALLERY, GALLERY_Y)) >= {"recall@1", "recall@5", "mAP"}


def test_retrieval_metrics_query_class_absent_from_gallery():
    res = retrieval_metrics(torch.cat([QUERY, QUERY[:1]]), torch.cat([QUERY_Y, torch.tensor([7])]), GALLERY, GALLERY_Y)
    assert res["n_queries_without_relevant"] == 1
    assert res["recall@5"] == pytest.approx(75.0)  # the unmatched query is a miss
    ap = [(1 / 3 + 2 / 4) / 2, (1 / 2 + 2 / 3) / 2, 1.0]
    assert res["mAP"] == pytest.approx(100 * sum(ap) / 3)  # ... and is left out of mAP


def test_retrieval_metrics_match_sklearn_and_brute_force(monkeypatch):
    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(0)
    q, qy = torch.randn(13, 6, generator=g), torch.randint(0, 3, (13,), generator=g)
    gal, gy = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    monkeypatch.setattr(metrics, "_RETRIEVAL_BLOCK", 100)  # chunks of 2 queries
    res = retrieval_metrics(q, qy, gal, gy, ks=(1, 5))
    sims = nn.functional.normalize(q, dim=1) @ nn.functional.normalize(gal, dim=1).T
    rel = (qy[:, None] == gy[None, :]).numpy()
    expected_map = np.mean([average_precision_score(rel[i], sims[i].numpy()) for i in range(13)])
    assert res["mAP"] == pytest.approx(100 * expected_map, abs=1e-4)
    for k in (1, 5):
        top = sims.topk(k, dim=1).indices
        hit = (gy[top] == qy[:, None]).any(1).float().mean().item()
        assert res[f"recall@{k}"] == pytest.approx(100 * hit)
    assert identification_accuracy(q, qy, gal, gy) == pytest.approx(res["recall@1"])


def test_forgotten_retrieval_rate_and_identification_hand_case():
    assert forgotten_retrieval_rate(QUERY, QUERY_Y, GALLERY, GALLERY_Y) == pytest.approx(100 / 3)
    assert forgotten_retrieval_rate(QUERY, QUERY_Y, GALLERY, GALLERY_Y, k=2) == pytest.approx(200 / 3)
    assert forgotten_retrieval_rate(QUERY, QUERY_Y, GALLERY, GALLERY_Y, k=3) == pytest.approx(100.0)
    assert math.isnan(forgotten_retrieval_rate(QUERY[:0], QUERY_Y[:0], GALLERY, GALLERY_Y))
    # identification: nearest neighbours g0 (class 0), g1 (class 1), g0 (class 0)
    assert identification_accuracy(QUERY, torch.tensor([0, 1, 1]), GALLERY, GALLERY_Y) == pytest.approx(200 / 3)


def test_retrieval_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="gallery_emb has dimension 3"):
        retrieval_metrics(QUERY, QUERY_Y, torch.ones(4, 3), GALLERY_Y)
    with pytest.raises(ValueError, match="query_y has 2 entries"):
        retrieval_metrics(QUERY, QUERY_Y[:2], GALLERY, GALLERY_Y)
    with pytest.raises(ValueError, match="gallery_y has 3 entries"):
        identification_accuracy(QUERY, QUERY_Y, GALLERY, GALLERY_Y[:3])
    with pytest.raises(ValueError, match="forget_emb must be 2-D"):
        forgotten_retrieval_rate(QUERY[0], QUERY_Y[:1], GALLERY, GALLERY_Y)
    with pytest.raises(ValueError, match="k must be a positive int"):
        forgotten_retrieval_rate(QUERY, QUERY_Y, GALLERY, GALLERY_Y, k=0)


# ----------------------------------------------------------------------------- matched forgetting

TRAJECTORY = [
    {"step": 0, "forget_accuracy": 100.0, "test_accuracy": 91.0},
    {"step": 10, "forget_accuracy": 30.0, "test_accuracy": 85.0},
    {"step": 20, "forget_accuracy": float("nan"), "test_accuracy": 10.0},  # a NaN never qualifies
    {"step": 30, "forget_accuracy": 25.0, "test_accuracy": 80.0},
    {"step": 50, "forget_accuracy": 12.5, "test_accuracy": 77.0},
    {"step": 40, "forget_accuracy": 6.25, "test_accuracy": 70.0},  # logged out of order
]


def test_matched_forgetting_hand_trajectory():
    res = matched_forgetting(TRAJECTORY)
    assert res == {"test_at_forget<=25": 80.0, "test_at_forget<=10": 70.0, "test_at_forget<=0": None}
    assert matched_forgetting(TRAJECTORY, thresholds=(12.5, 100)) == {
        "test_at_forget<=12.5": 70.0, "test_at_forget<=100": 91.0}
    assert first_step_reaching(TRAJECTORY, 25.0) == 30
    assert first_step_reaching(TRAJECTORY, 10.0) == 40
    assert first_step_reaching(TRAJECTORY, 0.0) is None
    assert matched_forgetting([]) == {"test_at_forget<=25": None, "test_at_forget<=10": None, "test_at_forget<=0": None}


def test_matched_forgetting_bad_trajectory():
    with pytest.raises(ValueError, match=r"trajectory\[1\] lacks key\(s\) \['test_accuracy'\]"):
        matched_forgetting([TRAJECTORY[0], {"step": 1, "forget_accuracy": 0.0}])
    with pytest.raises(TypeError, match="trajectory must be a list"):
        matched_forgetting(TRAJECTORY[0])


# ----------------------------------------------------------------------------- cost


def test_resource_meter_measures_a_sleep():
    with ResourceMeter() as meter:
        time.sleep(0.05)
    assert 0.05 <= meter.wall_time_s < 1.0
    assert meter.peak_memory_mb > 1.0 and meter.rss_growth_mb >= 0.0
    assert meter.device == torch.device("cpu")
    assert set(meter.as_dict()) == {"wall_time_s", "peak_memory_mb", "device"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA peak memory needs a GPU")
def test_resource_meter_cuda_peak_memory():
    with ResourceMeter("cuda") as meter:
        x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
        del x
    assert meter.peak_memory_mb >= 64.0


# ----------------------------------------------------------------------------- evaluate_model


def _toy_data():
    # nn.Identity reads inputs as logits: a row is correct when its argmax equals its label.
    train_x = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]])
    train_y = torch.tensor([0, 0, 0, 0, 1, 0])  # correct: 1, 0, 1, 1, 1, 0
    test_x = torch.tensor([[1.0, 0], [0, 1.0]])
    return SimpleNamespace(train_x=train_x, train_y=train_y, test_x=test_x, test_y=torch.tensor([0, 1]))


def test_evaluate_model_hand_case():
    data = _toy_data()
    res = evaluate_model(nn.Identity(), data, torch.tensor([0, 1]), batch_size=3)
    assert res == {"forget_accuracy": 50.0, "retain_accuracy": 75.0, "test_accuracy": 100.0}
    mask = torch.zeros(6, dtype=torch.bool)
    mask[[0, 1]] = True
    assert evaluate_model(nn.Identity(), data, mask) == res
    assert evaluate_model(nn.Identity(), data, torch.tensor([1, 0, 1])) == res  # a set: duplicates once
    empty = evaluate_model(nn.Identity(), data, torch.tensor([], dtype=torch.long))
    assert math.isnan(empty["forget_accuracy"]) and empty["retain_accuracy"] == pytest.approx(400 / 6)


def test_evaluate_model_max_retain_subsamples_with_seed():
    data = _toy_data()
    a = evaluate_model(nn.Identity(), data, torch.tensor([0]), max_retain=2, seed=5)
    assert a == evaluate_model(nn.Identity(), data, torch.tensor([0]), max_retain=2, seed=5)
    assert a["retain_accuracy"] in (0.0, 50.0, 100.0)
    retain = torch.tensor([1, 2, 3, 4, 5])
    pick = retain[torch.randperm(5, generator=torch.Generator().manual_seed(5))[:2]]
    correct = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.float)
    assert a["retain_accuracy"] == pytest.approx(100 * correct[pick].mean().item())


def test_evaluate_model_bad_inputs():
    data = _toy_data()
    with pytest.raises(ValueError, match="forget_idx must index the training set"):
        evaluate_model(nn.Identity(), data, torch.tensor([6]))
    with pytest.raises(TypeError, match="forget_idx must be an integer tensor"):
        evaluate_model(nn.Identity(), data, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="bool mask must have 6 entries"):
        evaluate_model(nn.Identity(), data, torch.zeros(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="missing 'test_y'"):
        evaluate_model(nn.Identity(), SimpleNamespace(train_x=data.train_x, train_y=data.train_y, test_x=data.test_x),
                       torch.tensor([0]))


# ----------------------------------------------------------------------------- summarize


def test_summarize():
    assert summarize([1.0, 2.0, 3.0, float("nan")]) == {"mean": 2.0, "std": 1.0, "n": 3, "n_nan": 1}
    assert summarize([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1, "n_nan": 0}
    assert summarize(torch.tensor([2.0, 4.0])) == {"mean": 3.0, "std": pytest.approx(SQRT2), "n": 2, "n_nan": 0}
    empty = summarize([None, float("nan")])
    assert math.isnan(empty["mean"]) and math.isnan(empty["std"]) and (empty["n"], empty["n_nan"]) == (0, 2)
