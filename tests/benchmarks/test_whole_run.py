"""``python -m benchmarks whole-run`` (benchmarks/whole_run.py): both recipes do the same work
(counted by the recipes and, independently, by a hook on the model's features), the results'
schema and ratios, and the exit status when a recipe fails or the work differs.

The recipes run on a tiny CNN at 8×8 on one thread (seconds); the ResNet-18 sizes are exercised by
the CLI itself (``--quick``) and on a card by gpu_check.sh.
"""

import csv
import json
import math

import pytest
import torch
import torch.nn as nn

from benchmarks import __main__ as cli
from benchmarks import whole_run as wr
from stakes.models import Classifier

ROWS = {}          # recipe -> {"pgd": rows with input gradients, "train": grad-enabled rows without}
CURRENT = {"recipe": None}


class CountingFeatures(nn.Module):
    """Counts the rows its forward sees, by kind; the counts live outside the module, so the deep
    copies both recipes make of the model count into the same place."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(8, 16), nn.ReLU())

    def forward(self, x):
        rows = ROWS.setdefault(CURRENT["recipe"], {"pgd": 0, "train": 0})
        if torch.is_grad_enabled() and x.requires_grad:
            rows["pgd"] += x.shape[0]
        elif torch.is_grad_enabled():
            rows["train"] += x.shape[0]
        return self.body(x)


def tiny_model():
    return Classifier(CountingFeatures(), nn.Linear(16, 10))


def plain_tiny_model():
    return Classifier(CountingFeatures().body, nn.Linear(16, 10))


# 60 proxies in batches of 8: 8 steps an epoch (the last batch 4 proxies), 10 steps cross an epoch
WORK = wr.Work(k=20, repetitions=3, pgd_steps=2, steps=10, importance_samples=70, test_size=12, batch=8,
               anchor_dim=16, label="test")


def _counted(name, fn):
    def run(inp, work, device, seed):
        CURRENT["recipe"] = name if work is WORK else None
        try:
            return fn(inp, work, device, seed)
        finally:
            CURRENT["recipe"] = None
    return run


@pytest.fixture(scope="module")
def report():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ROWS.clear()
    try:
        return wr.run_whole(WORK, torch.device("cpu"), warmup=False, model_builder=tiny_model, image_shape=(3, 8, 8),
                            recipes={n: _counted(n, f) for n, f in wr.RECIPES.items()})
    finally:
        torch.set_num_threads(threads)


def test_work_arithmetic():
    assert WORK.n_proxies == 60 and WORK.steps_per_epoch == 8 and WORK.forget_batch == 8
    assert WORK.evaluations() == 3                        # step 0, step 8 (an epoch), step 10 (the end)
    assert wr.importance_batches(60, 8, 70) == [8] * 7 + [4] + [8, 8]   # a cycle ends on the short batch
    assert WORK.expected() == {"proxies": 60, "pgd_image_steps": 120, "importance_samples": 76,
                               "optimisation_steps": 10, "evaluations": 3, "evaluated_images": 3 * (20 + 12)}
    full = wr.full_work()
    assert (full.k, full.repetitions, full.pgd_steps, full.steps_per_epoch, full.steps) == (256, 20, 100, 40, 120)
    assert full.importance_samples == 50_000 - 256 and full.expected()["importance_samples"] == 389 * 128
    assert full.expected()["evaluations"] == 4 and full.test_size == 2000
    assert wr.full_work(128).label == "full but k = 128" and wr.full_work(128).steps == 3 * 20


def test_both_recipes_do_the_same_work(report):
    assert report["status"] == "ok", report["status"]
    work = report["work"]
    assert work["same"] is True and work["differences"] == []
    for name in ("authors", "stakes"):
        assert {k: work[name][k] for k in wr.WORK_KEYS} == WORK.expected()
    # how the work is batched differs by design: the authors one repetition and one batch at a time
    assert work["authors"]["pgd_batches"] == 3 * math.ceil(20 / 8) * 2 and work["stakes"]["pgd_batches"] == 2
    assert work["authors"]["importance_batches"] == work["stakes"]["importance_batches"] == 10


def test_the_work_counted_independently_by_a_hook(report):
    """Rows through the model's features: with an input gradient (PGD) and grad-enabled without
    (importance + the steps' forget and proxy batches), the same for both recipes."""
    assert report["status"] == "ok"
    # importance samples + 10 steps x forget 8 + proxies: 7 batches of 8, the epoch's short one of 4, 2 of 8
    train_rows = 76 + 10 * 8 + (7 * 8 + 4 + 2 * 8)
    assert ROWS["authors"] == ROWS["stakes"] == {"pgd": 120, "train": train_rows}
    assert None not in ROWS                # nothing ran outside the two timed recipes


def test_the_stakes_side_is_stakes_defaults(report):
    rec = report["recipes"]["stakes"]
    assert rec["config"]["preset"] == "stable" and rec["config"]["eps"] == 3.0
    assert rec["config"]["log_every"] == WORK.steps_per_epoch and rec["config"]["max_steps"] == 10
    assert rec["method_config"]["importance_samples"] == 70 and rec["method_config"]["warm_start"] is True
    assert rec["steps"] == 10 and rec["stopped"] == "max_steps"
    assert [e["step"] for e in rec["history"]] == [0, 8, 10]
    assert [e["step"] for e in report["recipes"]["authors"]["history"]] == [0, 8, 10]
    ex = rec["execution"]
    if wr.stakes_has_execution_policy():
        assert ex["available"] is True and ex["precision"] == "fp32" and ex["cuda_graphs"] is False
    else:
        assert ex["available"] is False and "no execution policy" in ex["note"]


def test_the_results_files(report, tmp_path):
    json_path, csv_path = wr.write_report(report, str(tmp_path))
    data = json.loads(open(json_path).read())
    meta = data["metadata"]
    for key in ("device", "torch", "triton", "python", "date", "git_commit", "load_avg_1_5_15", "cpu_count"):
        assert meta[key] is not None, key
    assert data["benchmark"] == "whole-run" and data["kind"].startswith("measurement")
    assert data["size"]["label"] == "test" and data["size"]["k"] == 20 and data["size"]["n_proxies"] == 60
    recs = data["recipes"]
    for name in ("authors", "stakes"):
        assert recs[name]["status"] == "ok"
        assert set(recs[name]["phases_s"]) == set(wr.PHASES)
        assert all(v >= 0 for v in recs[name]["phases_s"].values())
        assert recs[name]["whole_s"] >= sum(recs[name]["phases_s"].values()) - 1e-6
    for p in wr.PHASES:
        assert data["ratios"][p] == pytest.approx(recs["authors"]["phases_s"][p] / recs["stakes"]["phases_s"][p])
    assert data["ratios"]["whole"] == pytest.approx(recs["authors"]["whole_s"] / recs["stakes"]["whole_s"])
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["phase"] for r in rows] == list(wr.PHASES) + ["whole"]
    assert float(rows[-1]["ratio"]) == pytest.approx(data["ratios"]["whole"])
    assert rows[0]["device"] == meta["device"] and rows[0]["date"] == meta["date"]
    lines = wr.summary_lines(data)
    assert lines[-1].startswith(f"VERDICT: ok whole run x{data['ratios']['whole']:.2f} (authors / stakes; proxies x")


# ----------------------------------------------------------------------------- the CLI's exit status


def _fake(counts_change=None, fail=None):
    def recipe(inp, work, device, seed):
        if fail:
            raise RuntimeError(fail)
        counts = {**work.expected(), "pgd_batches": 1, "importance_batches": 1, **(counts_change or {})}
        return {"phases_s": {p: 1.0 for p in wr.PHASES}, "whole_s": 4.5, "other_s": 0.5, "counts": counts}
    return recipe


@pytest.mark.parametrize("stakes_side, rc, message", [
    (_fake(), 0, None),
    (_fake(fail="CUDA error: an illegal memory access was encountered"), 1,
     "stakes: error: RuntimeError: CUDA error: an illegal memory access was encountered"),
    (_fake(counts_change={"pgd_image_steps": 1}), 1, "work: pgd_image_steps differs: authors 96, stakes 1"),
])
def test_cli_exit_status(monkeypatch, tmp_path, capsys, stakes_side, rc, message):
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # the suite's interpreter would be refused (next test)
    monkeypatch.setitem(wr.RECIPES, "authors", _fake())
    monkeypatch.setitem(wr.RECIPES, "stakes", stakes_side)
    monkeypatch.setattr(wr, "default_model", lambda: tiny_model())
    assert cli.main(["whole-run", "--quick", "--device", "cpu", "--no-warmup", "--out", str(tmp_path)]) == rc
    out, err = capsys.readouterr()
    data = json.loads((tmp_path / "whole_run.json").read_text())
    if rc == 0:
        assert data["status"] == "ok" and data["ratios"]["whole"] == 1.0 and "VERDICT: ok whole run x1.00" in out
    else:
        assert message in data["status"] and message in err and "VERDICT: FAILED" in out


def test_cli_refuses_to_time_the_triton_interpreter(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cli.main(["whole-run", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "TRITON_INTERPRET is set" in capsys.readouterr().err and not (tmp_path / "whole_run.json").exists()


def test_cli_refuses_bad_sizes(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["whole-run", "--k", "0"])
    assert exc.value.code == 2 and "expected a positive integer, got '0'" in capsys.readouterr().err


def test_repeats_keep_each_phases_fastest_run():
    """Interleaved repeats: each phase's fastest time (contention only slows a run down), every run kept."""
    calls = []

    def slow_then_fast(inp, work, device, seed):
        calls.append(seed)
        t = [3.0, 1.0, 2.0][len(calls) - 1]
        return {"phases_s": {"proxies": t, "importance": 4.0 - t, "steps": 1.0, "evaluation": 1.0},
                "whole_s": 6.5 + t, "other_s": 0.5, "counts": {**work.expected(), "pgd_batches": 1}}

    rep = wr.run_whole(WORK, torch.device("cpu"), warmup=False, model_builder=tiny_model, image_shape=(3, 8, 8),
                       recipes={"authors": slow_then_fast, "stakes": _fake()}, repeats=3)
    a = rep["recipes"]["authors"]
    assert rep["status"] == "ok" and rep["repeats"] == 3 and len(a["runs"]) == 3 and len(calls) == 3
    assert a["phases_s"] == {"proxies": 1.0, "importance": 1.0, "steps": 1.0, "evaluation": 1.0}
    assert a["whole_s"] == 7.5 and rep["ratios"]["whole"] == pytest.approx(7.5 / 4.5)


def test_the_models_prediction_for_the_same_size(tmp_path):
    """On a card the report carries the labelled model's prediction for exactly this work, if any."""
    full = wr.full_work(128)
    ratios = {p: 2.0 for p in (*wr.PHASES, "whole")}
    model = {"assumptions": {"gpu": "NVIDIA H100 (SXM, 80 GB)"},
             "predictions_by_size": [{"work": {**wr.asdict(wr.full_work()), "expected": {}}, "ratios": {}, "seconds": {}},
                                     {"work": {**wr.asdict(full), "expected": {}}, "ratios": ratios, "seconds": {}}]}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    got = wr.model_prediction(full, str(path))
    assert got["ratios"] == ratios and got["kind"].startswith("MODEL, not a measurement")
    assert wr.model_prediction(wr.replace(full, steps=full.steps + 1), str(path)) is None
    assert wr.model_prediction(full, str(tmp_path / "missing.json")) is None
    report = {"recipes": {}, "size": {**wr.asdict(full)}, "status": "ok", "metadata": {"device": "H100", "torch": "x"},
              "ratios": {**ratios, "whole": 1.5}, "model_prediction": got}
    assert wr.summary_lines(report)[-1].endswith("k=128; the MODEL predicted x2.00")


def test_a_whole_run_on_a_fake_card():
    """Both recipes with device "cuda" on tests/fake_cuda.py's card (CPU values, a CPU tensor meeting a
    CUDA one raises): the benchmark keeps every tensor on the device, and on a card it records the
    model's prediction and the note on stakes' phase clocks. The fake models no CUDA graphs, so stakes
    runs without them here (and without channels_last, kept as the test was written)."""
    import functools

    from tests.fake_cuda import fake_cuda

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    recipes = {"authors": wr.authors_recipe,
               "stakes": functools.partial(wr.stakes_recipe, cuda_graphs=False, channels_last=False)}
    try:
        with fake_cuda():
            rep = wr.run_whole(WORK, torch.device("cuda"), warmup=False, model_builder=plain_tiny_model,
                               image_shape=(3, 8, 8), recipes=recipes)
    finally:
        torch.set_num_threads(threads)
    assert rep["status"] == "ok", rep["status"]
    assert rep["work"]["same"] and rep["metadata"]["device"] == "fake CUDA (CPU)"
    ex = rep["recipes"]["stakes"]["execution"]
    assert ex["device_type"] == "cuda" and ex["precision"] == "bf16"   # stakes' automatic policy on sm_90
    assert rep["recipes"]["authors"]["cuda_flags_at_start"]["cudnn_allow_tf32"] is True   # torch's default
    assert "model_prediction" in rep and rep["model_prediction"] is None   # no model for this tiny size
    assert "synchronise the device at every phase boundary" in rep["notes"][0]
