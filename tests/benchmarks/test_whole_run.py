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

ROWS = {}          # recipe -> rows seen by the features' forward, by kind (see CountingFeatures)
SEEN = {}          # recipe -> {"cudnn_deterministic": set of the flag's values during its forwards}
CURRENT = {"recipe": None}


class CountingFeatures(nn.Module):
    """Counts the rows its forward sees, by kind: ``pgd`` (an input that requires grad, with grad
    enabled), ``pgd_weight_grads`` (the same, while the module's parameters require grad: the
    backward computes their gradients too), ``train`` (grad enabled, no input gradient), ``nograd``.
    The counts live outside the module, so the deep copies both recipes make count into the same place."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(8, 16), nn.ReLU())

    def forward(self, x):
        rows = ROWS.setdefault(CURRENT["recipe"], {"pgd": 0, "pgd_weight_grads": 0, "train": 0, "nograd": 0})
        SEEN.setdefault(CURRENT["recipe"], {"cudnn_deterministic": set()})["cudnn_deterministic"].add(
            torch.backends.cudnn.deterministic)
        if torch.is_grad_enabled() and x.requires_grad:
            rows["pgd"] += x.shape[0]
            if any(p.requires_grad for p in self.parameters()):
                rows["pgd_weight_grads"] += x.shape[0]
        elif torch.is_grad_enabled():
            rows["train"] += x.shape[0]
        else:
            rows["nograd"] += x.shape[0]
        return self.body(x)


def tiny_model():
    return Classifier(CountingFeatures(), nn.Linear(16, 10))


def plain_tiny_model():
    return Classifier(CountingFeatures().body, nn.Linear(16, 10))


# 60 proxies in batches of 8: 8 steps an epoch (the last batch 4 proxies), 10 steps cross an epoch, so the
# authors' stop check runs after steps 9 and 10
WORK = wr.Work(k=20, repetitions=3, pgd_steps=2, steps=10, importance_samples=70, test_size=12, batch=8,
               anchor_dim=16, retain_size=14, label="test")
PIL_CALLS = {"n": 0}


def _counted(name, fn):
    def run(inp, work, device, seed, **kw):
        CURRENT["recipe"] = name if work is WORK else None
        try:
            return fn(inp, work, device, seed, **kw)
        finally:
            CURRENT["recipe"] = None
    return run


@pytest.fixture(scope="module")
def report():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ROWS.clear()
    SEEN.clear()
    get_item = wr.HostImages.__getitem__

    def counting_get_item(self, i):   # the authors' images through PIL + ToTensor, one at a time
        PIL_CALLS["n"] += CURRENT["recipe"] == "authors"
        return get_item(self, i)

    wr.HostImages.__getitem__ = counting_get_item
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        rep = wr.run_whole(WORK, torch.device("cpu"), warmup=False, model_builder=tiny_model, image_shape=(3, 8, 8),
                           recipes={n: _counted(n, f) for n, f in wr.RECIPES.items()})
        rep["flags_after"] = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
        rep["flags_before"] = flags
        return rep
    finally:
        wr.HostImages.__getitem__ = get_item
        torch.set_num_threads(threads)


def test_work_arithmetic():
    assert WORK.n_proxies == 60 and WORK.steps_per_epoch == 8 and WORK.forget_batch == 8
    assert WORK.authors_stop_checks() == 2               # after steps 9 and 10 (the second epoch)
    assert wr.importance_batches(60, 8, 70) == [8] * 7 + [4] + [8, 8]   # a cycle ends on the short batch
    assert WORK.expected() == {"proxies": 60, "pgd_image_steps": 120, "optimisation_steps": 10,
                               "final_evaluation": {"forget": 20, "retain": 14, "test": 12}}
    a = WORK.expected_authors()
    assert a["pgd_weight_grad_image_steps"] == 120 and a["importance_samples"] == 76 and a["importance_batches"] == 10
    assert a["step_forget_rows"] == 68 and a["stop_checks"] == 2 and a["evaluations"] == 3 and a["evaluated_images"] == 2 * 20 + 20 + 14 + 12
    full = wr.full_work()
    assert (full.k, full.repetitions, full.pgd_steps, full.steps_per_epoch, full.steps) == (256, 20, 100, 40, 120)
    assert full.importance_samples == full.retain == 50_000 - 256 and full.test_size == 10_000
    fa = full.expected_authors()
    assert fa["importance_samples"] == 389 * 128 and fa["importance_batches"] == 389   # 40 distinct batches, ~9.7x
    assert fa["stop_checks"] == 80 and fa["evaluated_images"] == 80 * 256 + 256 + 49_744 + 10_000
    assert wr.full_work(128).label == "full but k = 128" and wr.full_work(128).steps == 3 * 20


def test_the_representative_size_has_the_full_runs_phase_shares():
    """k = 8 with the real R and PGD steps; N_tot and the evaluated sets scale with N_s as in the full run,
    so each phase's share of the authors' work is within 3 points of the full run's."""
    rep, full = wr.representative_work(), wr.full_work()
    assert (rep.k, rep.repetitions, rep.pgd_steps, rep.n_proxies, rep.steps) == (8, 20, 100, 160, 6)
    assert rep.importance_samples == round(160 * 49_744 / 5_120) == 1554 and rep.test_size == 312
    assert rep.importance_samples / rep.n_proxies == pytest.approx(full.importance_samples / full.n_proxies, rel=1e-3)
    a, b = wr.phase_shares(rep), wr.phase_shares(full)
    assert set(a) == set(wr.PHASES) and sum(a.values()) == pytest.approx(1.0)
    for p in wr.PHASES:
        assert abs(a[p] - b[p]) < 0.03, (p, a[p], b[p])
    assert b["proxies"] > 0.75   # PGD dominates both


def test_both_recipes_do_the_same_work(report):
    assert report["status"] == "ok", report["status"]
    row = report["rows"]["custom"]
    work = row["work"]
    assert work["same"] is True and work["differences"] == []
    for name in ("authors", "stakes"):
        assert {k: work["counted"][name][k] for k in wr.SAME_KEYS} == WORK.expected()
    assert {k: work["counted"]["authors"][k] for k in wr.WORK_KEYS} == WORK.expected_authors()
    # how the work is batched differs by design: the authors one repetition and one forget batch at a time
    assert work["counted"]["authors"]["pgd_batches"] == 3 * math.ceil(20 / 8) * 2
    assert work["counted"]["stakes"]["pgd_batches"] == 2
    # and what differs by design is counted for both and said
    dd = work["differs_by_design"]
    assert dd["pgd_weight_grad_image_steps"]["authors"] == 120 and dd["pgd_weight_grad_image_steps"]["stakes"] == 0
    assert dd["stop_checks"]["authors"] == 2 and dd["stop_checks"]["stakes"] == 0      # stakes' rule off: not run
    assert work["counted"]["stakes"]["stop_checks_at_its_cadence"] == 1                 # the first epoch's end
    assert all(dd[k]["why"] for k in wr.DESIGN_KEYS)
    s = work["counted"]["stakes"]
    # stakes evaluates once, at the end (no trajectory by default), the three sets whole (eval_max_samples=None):
    # the same final metrics as the authors'
    assert s["evaluations"] == 1 and s["final_evaluation"] == {"forget": 20, "retain": 14, "test": 12}
    assert s["evaluated_images"] == 20 + 14 + 12


def test_the_work_counted_independently_by_a_hook(report):
    """The rows through the model's features, by kind, are the work each recipe claims."""
    assert report["status"] == "ok"
    counted = report["rows"]["custom"]["work"]["counted"]
    a, s = counted["authors"], counted["stakes"]
    # the optimisation steps' proxy rows: 7 batches of 8, the epoch's short one of 4, then 2 of 8; the forget rows:
    # the authors' unshuffled loader cycles 8, 8, 4 (k = 20), stakes reshuffles full batches of 8
    proxy_rows = 7 * 8 + 4 + 2 * 8
    assert a["step_forget_rows"] == 8 + 8 + 4 + 8 + 8 + 4 + 8 + 8 + 4 + 8 and s["step_forget_rows"] == 10 * 8
    # the authors: PGD with the attacked model's parameters requiring grad (weight gradients every step);
    # importance through the live model (grad) and the pretrained copy (no grad); the original's structure
    # every step (no grad); the stop checks and the final evaluation (no grad)
    assert ROWS["authors"] == {"pgd": a["pgd_image_steps"], "pgd_weight_grads": a["pgd_weight_grad_image_steps"],
                               "train": a["importance_samples"] + a["step_forget_rows"] + proxy_rows,
                               "nograd": a["importance_samples"] + proxy_rows + a["evaluated_images"]}
    assert ROWS["authors"]["pgd_weight_grads"] == 120
    # stakes: PGD on the input only; its own importance and the steps' rows with grad; its evaluations among
    # the rows without (with its frozen forwards: success checks, the original's structures)
    assert ROWS["stakes"]["pgd"] == s["pgd_image_steps"] == 120 and ROWS["stakes"]["pgd_weight_grads"] == 0
    assert ROWS["stakes"]["train"] == s["importance_samples"] + s["step_forget_rows"] + proxy_rows
    assert ROWS["stakes"]["nograd"] >= s["evaluated_images"]
    assert None not in ROWS                # nothing ran outside the two timed recipes


def test_the_authors_data_path_and_cudnn_flags(report):
    """Their images go through PIL + ToTensor one at a time: the forget loader for the attacks, its first
    pass again for the cycled loader, once per stop check, and the final evaluation of the three sets; cuDNN
    deterministic and not benchmarked during their recipe only, the flags restored after."""
    k, r, t = WORK.k, WORK.retain, WORK.test_size
    assert PIL_CALLS["n"] == k + k + WORK.authors_stop_checks() * k + (k + r + t)
    a = report["rows"]["custom"]["recipes"]["authors"]
    assert a["loaders"] is True and a["host_loading_s"] > 0
    assert SEEN["authors"]["cudnn_deterministic"] == {True} and SEEN["stakes"]["cudnn_deterministic"] == {False}
    assert report["flags_after"] == report["flags_before"]
    assert report["options"]["loaders"] is True and "no copy to make" in report["options"]["on_the_cpu"]


def test_the_stakes_side_is_stakes_defaults(report):
    rec = report["rows"]["custom"]["recipes"]["stakes"]
    assert rec["config"]["preset"] == "stable" and rec["config"]["eps"] == 3.0
    assert rec["config"]["log_every"] is None and rec["config"]["max_steps"] == 10       # stakes' default
    assert rec["config"]["eval_max_samples"] is None     # the sets whole: the same final metrics as the authors'
    assert rec["method_config"]["importance_samples"] == 70 and rec["method_config"]["warm_start"] is True
    assert rec["steps"] == 10 and rec["stopped"] == "max_steps"
    assert [e["step"] for e in rec["history"]] == [10]
    assert {"retain_accuracy", "test_accuracy"} <= set(rec["history"][-1])
    authors = report["rows"]["custom"]["recipes"]["authors"]["history"]
    assert [e["step"] for e in authors] == [9, 10, 10] and {"retain_accuracy", "test_accuracy"} <= set(authors[-1])
    assert rec["data_s"] > 0 and rec["whole_s"] >= rec["data_s"]
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
    assert data["headline"] == "custom" and data["rows"]["custom"]["headline"] is True
    recs = data["rows"]["custom"]["recipes"]
    for name in ("authors", "stakes"):
        assert recs[name]["status"] == "ok"
        assert set(recs[name]["phases_s"]) == set(wr.PHASES)
        assert all(v >= 0 for v in recs[name]["phases_s"].values())
        assert recs[name]["whole_s"] >= sum(recs[name]["phases_s"].values()) - 1e-6
    for p in wr.PHASES:
        assert data["ratios"][p] == pytest.approx(recs["authors"]["phases_s"][p] / recs["stakes"]["phases_s"][p])
    assert data["ratios"]["whole"] == pytest.approx(recs["authors"]["whole_s"] / recs["stakes"]["whole_s"])
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["phase"] for r in rows] == list(wr.PHASES) + ["whole"] and {r["network"] for r in rows} == {"custom"}
    assert float(rows[-1]["ratio"]) == pytest.approx(data["ratios"]["whole"])
    assert rows[0]["device"] == meta["device"] and rows[0]["date"] == meta["date"]
    lines = wr.summary_lines(data)
    assert lines[-1].startswith(f"VERDICT: ok whole run x{data['ratios']['whole']:.2f} (authors / stakes; proxies x")
    assert any(line.startswith("work that differs by design: pgd_weight_grad_image_steps authors 120, stakes 0")
               for line in lines)


def test_kernels_only_keeps_the_authors_data_on_the_device():
    """``loaders=False``: no PIL conversion, no host round trip of the proxies; the same work."""
    calls = {"n": 0}
    get_item = wr.HostImages.__getitem__

    def counting(self, i):
        calls["n"] += 1
        return get_item(self, i)

    small = wr.Work(k=6, repetitions=2, pgd_steps=1, steps=4, importance_samples=9, test_size=5, batch=4,
                    anchor_dim=16, retain_size=3, label="t")
    inp = wr.make_inputs(small, torch.device("cpu"), model_builder=plain_tiny_model, image_shape=(3, 8, 8))
    wr.HostImages.__getitem__ = counting
    try:
        run = wr.authors_recipe(inp, small, torch.device("cpu"), loaders=False)
    finally:
        wr.HostImages.__getitem__ = get_item
    assert calls["n"] == 0 and run["host_loading_s"] == 0.0 and run["loaders"] is False
    assert {k: run["counts"][k] for k in wr.WORK_KEYS} == small.expected_authors()
    # the host arrays and the device tensors hold the same values (ToTensor's x / 255)
    from PIL import Image

    x, _ = inp.host["forget"]
    assert torch.equal(wr._to_tensor(Image.fromarray(x[0])), inp.fx[0])


def test_the_authors_pgd_is_advertorchs_and_leaves_weight_gradients():
    """One attack: every step moves the start towards the target inside the ε-ball and [0, 1], and the
    attacked model's parameters hold accumulated gradients afterwards (their PGD's cost)."""
    torch.manual_seed(0)
    model = plain_tiny_model().eval()
    x = torch.rand(5, 3, 8, 8)
    target = torch.tensor([1, 2, 3, 4, 5])
    work = wr.Work(k=5, repetitions=1, pgd_steps=4, steps=2, importance_samples=5, test_size=1, eps=0.5, label="t")
    counts = {"pgd_image_steps": 0, "pgd_weight_grad_image_steps": 0, "pgd_batches": 0}
    adv = wr.authors_perturb(model, x, target, work, counts)
    assert counts == {"pgd_image_steps": 20, "pgd_weight_grad_image_steps": 20, "pgd_batches": 4}
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert float((adv - x).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-5
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())
    # the targets: a draw of the true label becomes C // 2
    y = torch.arange(10).repeat(50)
    t = wr.authors_targets(y, torch.device("cpu"))
    assert bool(((t != y) | (t == 5)).all()) and int(t.min()) >= 0 and int(t.max()) <= 9


# ----------------------------------------------------------------------------- the CLI's exit status


def _fake(counts_change=None, fail=None, authors=False):
    def recipe(inp, work, device, seed, **kw):
        if fail:
            raise RuntimeError(fail)
        counts = {**work.expected_authors(), "pgd_batches": 1, **(counts_change or {})}
        return {"phases_s": {p: 1.0 for p in wr.PHASES}, "whole_s": 4.5, "other_s": 0.5, "counts": counts}
    return recipe


@pytest.mark.parametrize("stakes_side, rc, message", [
    (_fake(), 0, None),
    (_fake(fail="CUDA error: an illegal memory access was encountered"), 1,
     "stakes: error: RuntimeError: CUDA error: an illegal memory access was encountered"),
    (_fake(counts_change={"pgd_image_steps": 1}), 1, "work: pgd_image_steps differs: authors 96, stakes 1"),
    (_fake(counts_change={"stop_checks": 0, "importance_batches": 1}), 0, None),   # differs by design: said, no error
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

    def slow_then_fast(inp, work, device, seed, **kw):
        calls.append(("authors", seed))
        t = [3.0, 1.0, 2.0][len([c for c in calls if c[0] == "authors"]) - 1]
        return {"phases_s": {"proxies": t, "importance": 4.0 - t, "steps": 1.0, "evaluation": 1.0},
                "whole_s": 6.5 + t, "other_s": 0.5, "counts": {**work.expected_authors(), "pgd_batches": 1}}

    fake = _fake()

    def stakes_side(*a, **kw):
        calls.append(("stakes", a[3]))
        return fake(*a, **kw)

    rep = wr.run_whole(WORK, torch.device("cpu"), warmup=False, model_builder=tiny_model, image_shape=(3, 8, 8),
                       recipes={"authors": slow_then_fast, "stakes": stakes_side}, repeats=3)
    row = rep["rows"]["custom"]
    a = row["recipes"]["authors"]
    assert rep["status"] == "ok" and row["repeats"] == 3 and len(a["runs"]) == 3
    assert [c[0] for c in calls] == ["authors", "stakes"] * 3          # interleaved
    assert a["phases_s"] == {"proxies": 1.0, "importance": 1.0, "steps": 1.0, "evaluation": 1.0}
    assert a["whole_s"] == 7.5 and rep["ratios"]["whole"] == pytest.approx(7.5 / 4.5)


def test_the_representative_size_from_the_cli(monkeypatch, tmp_path):
    """``--size representative --repeats N``: that Work, the authors' network alone, N interleaved repeats."""
    seen = {}

    def fake_run_whole(work, device, **kw):
        seen.update(work=work, **kw)
        return {"status": "ok", "rows": {}, "headline": "authors", "size": {**wr.asdict(work)}, "metadata": {},
                "options": {"loaders": kw["loaders"]}}

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(wr, "run_whole", fake_run_whole)
    monkeypatch.setattr(wr, "write_report", lambda r, d: ("a.json", "a.csv"))
    monkeypatch.setattr(wr, "summary_lines", lambda r: ["VERDICT: ok"])
    assert cli.main(["whole-run", "--size", "representative", "--repeats", "3", "--device", "cpu",
                     "--out", str(tmp_path)]) == 0
    assert seen["work"] == wr.representative_work() and seen["repeats"] == 3 and seen["networks"] == ["authors"]
    assert seen["loaders"] is True and set(seen["recipes"]) == {"authors", "stakes"}
    assert cli.main(["whole-run", "--size", "representative", "--k", "16", "--kernels-only", "--networks",
                     "authors,resnet18", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert seen["work"] == wr.representative_work(16) and seen["loaders"] is False
    assert seen["networks"] == ["authors", "resnet18"]
    assert cli.main(["whole-run", "--device", "cpu", "--out", str(tmp_path)]) == 0    # the full size: both rows
    assert seen["work"] == wr.full_work() and seen["networks"] == ["authors", "resnet18"]


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
    report = {"rows": {"authors": {"headline": True, "ratios": {**ratios, "whole": 1.5}, "recipes": {}}},
              "headline": "authors", "size": {**wr.asdict(full)}, "status": "ok",
              "metadata": {"device": "H100", "torch": "x"}, "model_prediction": got}
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
    pin = wr.pin_memory
    wr.pin_memory = lambda device: False      # the fake card cannot pin host memory
    try:
        with fake_cuda() as card:
            rep = wr.run_whole(WORK, torch.device("cuda"), warmup=False, model_builder=plain_tiny_model,
                               image_shape=(3, 8, 8), recipes=recipes)
    finally:
        wr.pin_memory = pin
        torch.set_num_threads(threads)
    assert rep["status"] == "ok", rep["status"]
    row = rep["rows"]["custom"]
    assert row["work"]["same"] and rep["metadata"]["device"] == "fake CUDA (CPU)"
    ex = row["recipes"]["stakes"]["execution"]
    assert ex["device_type"] == "cuda" and ex["precision"] == "bf16"   # stakes' automatic policy on sm_90
    assert row["recipes"]["authors"]["cuda_flags_at_start"]["cudnn_allow_tf32"] is True   # torch's default
    # their data path copies every batch from the host: the forget batches, the proxies (twice a step), the
    # labels, the evaluation batches
    assert len(card.h2d_copies) > 2 * WORK.steps
    assert "model_prediction" in rep and rep["model_prediction"] is None   # no model for this tiny size
    assert "synchronise the device at every phase boundary" in rep["notes"][0]


def test_the_launch_blocking_row_is_a_card_only_side_row(monkeypatch, tmp_path, capsys):
    """CUDA_LAUNCH_BLOCKING=1 applies to a card: on the CPU the row says it is skipped; it is never the
    headline and its status does not decide the verdict."""
    row = wr.launch_blocking_row(WORK, torch.device("cpu"), [])
    assert row["status"].startswith("skipped") and row["headline"] is False and "never a" in row["note"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setitem(wr.RECIPES, "authors", _fake())
    monkeypatch.setitem(wr.RECIPES, "stakes", _fake())
    assert cli.main(["whole-run", "--quick", "--device", "cpu", "--no-warmup", "--launch-blocking-row",
                     "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "whole_run.json").read_text())
    assert data["headline"] == "authors" and data["rows"]["authors, CUDA_LAUNCH_BLOCKING=1"]["status"].startswith(
        "skipped")
    assert "VERDICT: ok whole run x1.00" in capsys.readouterr().out
