"""The `stakes` command line, end to end on the bundled digits data (the README's main job)."""

import json
import os

import pytest
import torch

from stakes.cli import main


@pytest.fixture
def cache_env(stakes_cache, digits_model, monkeypatch):
    """Point the CLI at the session cache that already holds the pretrained digits model."""
    monkeypatch.setenv("STAKES_CACHE", str(stakes_cache))
    return stakes_cache


REQUIRED = ("method", "k", "seed", "forget_accuracy", "retain_accuracy", "test_accuracy", "pretrained",
            "structure_drift", "steps", "wall_time_s", "config")


@pytest.mark.slow
def test_main_job_forgets_and_keeps_test_accuracy(tmp_path, cache_env, capsys):
    """The README's main command: StructGuard on digits, k = 8, stable preset, MiniLM anchors."""
    out = tmp_path / "result.json"
    rc = main(["unlearn", "--dataset", "digits", "--method", "structguard", "--k", "8", "--seed", "0",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    rec = json.loads(out.read_text())
    for key in REQUIRED:
        assert key in rec, key
    assert rec["forget_accuracy"] == 0.0
    assert rec["test_accuracy"] >= 50.0          # chance is 10 %; measured 62.2 % on 2 CPU cores
    assert rec["pretrained"]["test_accuracy"] > 97.0 and rec["pretrained"]["forget_accuracy"] == 100.0
    assert rec["config"]["preset"] == "stable" and rec["k"] == 8 and rec["method"] == "structguard"
    assert all(v == v for v in (rec["test_accuracy"], rec["retain_accuracy"]))   # never NaN
    text = capsys.readouterr().out
    assert "forget accuracy" in text and "test accuracy" in text


def test_config_overrides_reach_the_run(tmp_path, cache_env):
    out = tmp_path / "r.json"
    rc = main(["unlearn", "--method", "neggrad", "--k", "4", "--out", str(out), "--no-progress",
               "--set", "max_steps=2", "--set", "repetitions=1", "--set", "pgd_steps=3", "--set", "eps=1.0",
               "--set", "stop_warmup_steps=100", "--trajectory", "1"])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["steps"] == 2 and rec["config"]["repetitions"] == 1 and rec["proxies"]["eps"] == 1.0
    ret = rec["retrieval"]
    for key in ("recall@1", "recall@5", "mAP", "identification_accuracy", "forgotten_retrieval_rate"):
        assert 0.0 <= ret[key] <= 100.0, key
    assert ret["recall@5"] >= ret["recall@1"] and ret["pairwise_cosine_change"] >= 0.0
    assert rec["peak_memory_mb"] > 0
    assert rec["k"] == 4 and len(rec["history"]) >= 2


def test_early_exit_from_the_command_line(tmp_path, cache_env, capsys):
    """``--set pgd_early_exit=true``: the result records the proxies' mean PGD steps and the summary says it."""
    out = tmp_path / "r.json"
    rc = main(["unlearn", "--method", "adv", "--k", "4", "--out", str(out), "--no-progress", "--set", "max_steps=1",
               "--set", "repetitions=2", "--set", "pgd_steps=30", "--set", "eps=2.0", "--set", "pgd_early_exit=true"])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["config"]["pgd_early_exit"] is True and 0 <= rec["proxies"]["mean_pgd_steps"] < 30
    assert f"early exit: {rec['proxies']['mean_pgd_steps']:.1f} PGD steps a proxy on average" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["unlearn", "--k", "100000"], "--k must be between 1 and"),
    (["unlearn", "--k", "0"], "--k must be between 1 and"),
    (["unlearn", "--model", "/nonexistent/model.pt"], "/nonexistent/model.pt"),
    (["unlearn", "--set", "lr=-1"], "config.lr"),
    (["unlearn", "--set", "lr"], "key=value"),
    (["unlearn", "--descriptions", "/nonexistent/desc.json"], "/nonexistent/desc.json"),
    (["unlearn", "--dataset", "cifar10"], "root"),
    (["compare", "--methods", "neggrad,magic"], "magic"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, cache_env, capsys, argv, needle):
    out = tmp_path / "never.json"
    rc = main(argv + ["--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("stakes: error:") and needle in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_unknown_choices_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["unlearn", "--method", "forget-it"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["unlearn", "--dataset", "mnist"])


def test_corrupt_model_checkpoint(tmp_path, cache_env, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    rc = main(["unlearn", "--model", str(bad), "--out", str(tmp_path / "r.json"), "--no-progress"])
    assert rc == 2 and str(bad) in capsys.readouterr().err


def test_anchors_command(tmp_path, cache_env):
    from stakes.anchors import load_anchors

    out = tmp_path / "anchors.pt"
    assert main(["anchors", "--dataset", "cifar10", "--encoder", "minilm", "--out", str(out)]) == 0
    anchors, meta = load_anchors(out)
    assert anchors.shape == (10, 384)
    assert torch.allclose(anchors.norm(dim=1), torch.ones(10), atol=1e-5)
    assert meta["class_names"][0] == "airplane" and len(meta["prompts"]) == 10
    # the anchors file is accepted by unlearn only when the class count matches
    out2 = tmp_path / "digits_anchors.pt"
    assert main(["anchors", "--dataset", "digits", "--out", str(out2)]) == 0


def test_pretrain_command(tmp_path):
    from stakes.pretrain import load_checkpoint

    out = tmp_path / "m.pt"
    assert main(["pretrain", "--dataset", "digits", "--epochs", "2", "--out", str(out), "--no-progress"]) == 0
    model, meta = load_checkpoint(out)
    assert meta["dataset"] == "digits" and meta["epochs"] == 2 and model.num_classes == 10
    assert meta["test_accuracy"] > 50.0


@pytest.mark.slow
def test_compare_tiny_grid(tmp_path, cache_env):
    out = tmp_path / "report"
    rc = main(["compare", "--methods", "neggrad,structguard", "--k", "4", "--seeds", "0,1", "--out", str(out),
               "--no-progress", "--set", "max_steps=3", "--set", "repetitions=2", "--set", "pgd_steps=5",
               "--set", "eps=1.0", "--set", "stop_warmup_steps=100", "--set", "importance_samples=32",
               "--ablate-warm-start", "--ablate-projector"])
    assert rc == 0
    payload = json.loads((out / "results.json").read_text())
    runs = payload["runs"]
    assert list(cache_env.glob("anchors-minilm-*.pt")), "the CLI caches the anchors next to the models"
    variants = ("neggrad", "structguard", "structguard-cold", "structguard-trainproj")
    assert {(r["method"], r["seed"]) for r in runs} == {(m, s) for m in variants for s in (0, 1)}
    by = {(r["method"], r["seed"]): r for r in runs}
    opts = {key: r["method_config"] for key, r in by.items()}   # the method's own options, as the run used them
    assert opts[("structguard", 0)]["projector_lr"] == 0.0     # stable: fixed warm-started projector
    assert opts[("structguard-trainproj", 0)]["projector_lr"] > 0
    assert opts[("structguard-cold", 0)]["warm_start"] is False
    assert opts[("structguard-cold", 0)]["projector_lr"] > 0   # the paper's cold projector is trained
    assert opts[("structguard", 0)]["importance_samples"] == 32 and opts[("neggrad", 0)] == {}
    assert by[("structguard-cold", 0)]["config"]["method_options"]["structguard"]["warm_start"] is False
    assert all(r["status"] == "ok" for r in runs), [r.get("error") for r in runs]
    assert all(r["steps"] == 3 for r in runs)
    # one proxy set per (k, seed), shared by all methods
    for s in (0, 1):
        eps = {r["proxies"]["eps"] for r in runs if r["seed"] == s}
        assert eps == {1.0}
    summary = (out / "summary.md").read_text()
    assert "| neggrad |" in summary and "| structguard-cold |" in summary and "k = 4" in summary
    assert "| method | recall@1 | recall@5 | mAP | identification |" in summary
    assert summary.count("| structguard-trainproj |") == 2   # the accuracy table and the embedding table
    # a grid split over two folders merges back into the same report
    part_a, part_b = tmp_path / "a", tmp_path / "b"
    for part, seed in ((part_a, 0), (part_b, 1)):
        part.mkdir()
        meta = dict(payload["meta"], seeds=[seed],
                    radius={"4": {key: ({str(seed): v[str(seed)]} if isinstance(v, dict) else v)
                                  for key, v in payload["meta"]["radius"]["4"].items()}})
        (part / "results.json").write_text(json.dumps({"meta": meta,
                                                       "runs": [r for r in runs if r["seed"] == seed]}))
    merged = tmp_path / "merged"
    assert main(["report", str(part_a), str(part_b), "--out", str(merged)]) == 0
    again = json.loads((merged / "results.json").read_text())
    assert again["meta"]["seeds"] == [0, 1] and again["meta"]["radius"]["4"]["eps"] == {"0": 1.0, "1": 1.0}
    assert sorted(json.dumps(r, sort_keys=True) for r in again["runs"]) == \
        sorted(json.dumps(r, sort_keys=True) for r in runs)
    assert (merged / "summary.md").read_text().split("## k = 4")[1] == summary.split("## k = 4")[1]
    # the same part twice is refused, naming the duplicate run
    assert main(["report", str(part_a), str(part_a), "--out", str(tmp_path / "dup")]) == 2
    assert main(["report", str(part_a), str(part_b)]) == 2   # several folders need --out
    for png in ("trajectories.png", "test_vs_k.png", "drift.png"):
        assert (out / png).stat().st_size > 1000
    radius = payload["meta"]["radius"]["4"]
    assert radius["calibrated"] is False and radius["eps"] == {"0": 1.0, "1": 1.0}
    assert all(d > 0 for d in radius["neighbour_distance"].values())
