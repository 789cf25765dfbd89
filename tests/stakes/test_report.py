"""summary.md tables and report merging on hand-made records (no model is run)."""

import json

import pytest

from stakes.compare import merge_reports, write_summary


def _record(method, seed, test, recall1, mem, k=4):
    return {"method": method, "k": k, "seed": seed, "status": "ok", "test_accuracy": test,
            "forget_accuracy": 0.0, "retain_accuracy": test + 1, "steps": 10, "wall_time_s": 2.0,
            "structure_drift": 0.01, "mia": {"mia_auc": 0.6, "mia_accuracy": 55.0},
            "retrieval": {"recall@1": recall1, "recall@5": 90.0, "mAP": 40.0, "identification_accuracy": recall1,
                          "forgotten_retrieval_rate": 75.0, "pairwise_cosine_change": 0.125},
            "peak_memory_mb": mem,
            "history": [{"step": 0, "forget_accuracy": 100.0, "test_accuracy": 99.0},
                        {"step": 5, "forget_accuracy": 20.0, "test_accuracy": 80.0},
                        {"step": 10, "forget_accuracy": 0.0, "test_accuracy": test}]}


META = {"dataset": "digits", "preset": "stable", "seeds": [0, 1], "ks": [4], "methods": ["adv"],
        "pretrained_test_accuracy": 99.0, "radius": {}}


def test_summary_tables_hold_the_means(tmp_path):
    runs = [_record("adv", 0, 60.0, 80.0, 100.0), _record("adv", 1, 70.0, 90.0, 300.0)]
    text = write_summary(runs, str(tmp_path / "summary.md"), META)
    # the accuracy table: mean ± sample std, matched forgetting from the trajectory (≤ 25 % first at step 5)
    assert "| adv | 65.0 ± 7.1 | 0.0 ± 0.0 | 66.0 ± 7.1 | 2/2 | 80.0 ± 0.0 (2/2) | 65.0 ± 7.1 (2/2) |" in text
    # the embedding table: recall@1, recall@5, mAP, identification, forgotten retrieved, cos change, MIA acc, MB
    assert ("| adv | 85.0 ± 7.1 | 90.0 ± 0.0 | 40.0 ± 0.0 | 85.0 ± 7.1 | 75.0 ± 0.0 | 0.1250 ± 0.0000 | "
            "55.0 ± 0.0 | 200 ± 141 | 2 |") in text
    # records of reports written before the embedding fields existed: no embedding table
    old = [{k: v for k, v in r.items() if k not in ("retrieval", "peak_memory_mb")} for r in runs]
    assert "recall@1" not in write_summary(old, str(tmp_path / "old.md"), META)


def _write(folder, meta, runs):
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"meta": meta, "runs": runs}))
    return str(folder)


def test_merge_refuses_parts_that_do_not_belong_together(tmp_path):
    a = _write(tmp_path / "a", META, [_record("adv", 0, 60.0, 80.0, 100.0)])
    b = _write(tmp_path / "b", dict(META, dataset="shapes"), [_record("adv", 1, 60.0, 80.0, 100.0)])
    c = _write(tmp_path / "c", dict(META, pretrained_test_accuracy=98.0), [_record("adv", 1, 60.0, 80.0, 100.0)])
    d = _write(tmp_path / "d", dict(META, seeds=[1], methods=["l2ul"]),
               [_record("adv", 1, 70.0, 90.0, 300.0), _record("l2ul", 1, 71.0, 90.0, 300.0)])
    with pytest.raises(ValueError, match="its dataset is 'shapes'"):
        merge_reports([a, b], str(tmp_path / "out"))
    with pytest.raises(ValueError, match="pretrained model differs"):
        merge_reports([a, c], str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="no results.json"):
        merge_reports([a, str(tmp_path / "missing")], str(tmp_path / "out"))
    meta, runs = merge_reports([a, d], str(tmp_path / "out"))
    assert meta["seeds"] == [0, 1] and meta["methods"] == ["adv", "l2ul"] and len(runs) == 3
    assert meta["merged_from"] == ["a", "d"]
