"""The command line with a user's own checkpoint (timm / torchvision / Hugging Face, random weights,
no downloads) and a user's own method loaded with --plugin, through unlearn and compare."""

import json

import pytest
import torch

from stakes.cli import main

timm = pytest.importorskip("timm")
hf = pytest.importorskip("transformers")

# a short run on digits: k = 4, tiny PGD, two steps; prototype anchors (no text encoder needed)
FAST = ["--dataset", "digits", "--k", "4", "--no-progress", "--encoder", "prototype",
        "--set", "repetitions=2", "--set", "pgd_steps=2", "--set", "eps=1.0", "--set", "max_steps=2",
        "--set", "stop_warmup_steps=100", "--set", "eval_max_samples=64",
        "--set", "backend='reference'"]


def _timm_digits():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=10, in_chans=1).eval()


def test_unlearn_a_timm_state_dict(tmp_path, capsys):
    sd = tmp_path / "weights.pt"
    torch.save(_timm_digits().state_dict(), sd)
    out, saved = tmp_path / "r.json", tmp_path / "unlearned.pt"
    rc = main(["unlearn", "--model", str(sd), "--arch", "timm:test_resnet", "--out", str(out),
               "--save-model", str(saved), *FAST, "--set", "importance_samples=16"])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads(out.read_text())
    assert rec["steps"] == 2 and rec["method"] == "structguard"
    assert rec["model"]["type"] == "timm.models.resnet.ResNet" and rec["model"]["form"] == "h∘g"
    # timm's pretrained_cfg statistics (RGB), averaged for the one-channel digits model
    assert rec["model"]["normalization"]["mean"] == [0.5] and "timm pretrained_cfg" in rec["model"]["normalization"]["source"]
    assert "input normalisation: timm pretrained_cfg" in capsys.readouterr().out
    model = torch.load(saved, weights_only=False)["model"]
    assert type(model) is timm.models.resnet.ResNet
    again = _timm_digits()
    again.load_state_dict(model.state_dict())   # the usual way back: the timm model's own state dict
    assert any(not torch.equal(a, b) for a, b in zip(again.state_dict().values(), _timm_digits().state_dict().values()))
    # the saved whole model is itself a valid --model (a pickled model), here with user statistics
    rc = main(["unlearn", "--model", str(saved), "--mean", "0.3", "--std", "0.4", "--method", "adv",
               "--out", str(tmp_path / "r2.json"), *FAST])
    assert rc == 0
    rec2 = json.loads((tmp_path / "r2.json").read_text())
    assert rec2["model"]["normalization"] == {"source": "given by the user", "mean": [0.3], "std": [0.4]}


def test_unlearn_a_local_hugging_face_folder(tmp_path, capsys):
    torch.manual_seed(0)
    model = hf.ViTForImageClassification(hf.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                                      num_hidden_layers=1, num_attention_heads=2,
                                                      intermediate_size=32, num_labels=10))
    model.save_pretrained(tmp_path / "vit")
    hf.ViTImageProcessor(image_mean=[0.3], image_std=[0.35]).save_pretrained(tmp_path / "vit")
    out = tmp_path / "r.json"
    rc = main(["unlearn", "--arch", f"hf:{tmp_path / 'vit'}", "--out", str(out), "--method", "neggrad", *FAST])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads(out.read_text())
    assert rec["model"]["type"].endswith("ViTForImageClassification")
    assert rec["model"]["normalization"]["mean"] == pytest.approx([0.3])
    assert "preprocessor_config.json" in rec["model"]["normalization"]["source"]


@pytest.mark.parametrize("argv,needle", [
    (["--arch", "timm:no_such_model"], "timm has no model 'no_such_model'"),
    (["--arch", "keras:resnet"], "--arch must be timm:NAME, torchvision:NAME, hf:LOCAL_DIR or authors:NAME"),
    (["--arch", "hf:/nonexistent/dir"], "not a local folder"),
    (["--arch", "torchvision:resnet18"], "cannot take the images of data set 'digits'"),
    (["--arch", "timm:test_resnet", "--mean", "0.5"], "--mean and --std go together"),
    (["--arch", "timm:test_resnet", "--mean", "a", "--std", "1"], "--mean expects comma-separated numbers"),
    (["--plugin", "/nonexistent/plugin.py"], "--plugin /nonexistent/plugin.py: cannot load it"),
])
def test_bad_model_input_is_one_clear_line(tmp_path, capsys, argv, needle):
    out = tmp_path / "never.json"
    rc = main(["unlearn", *argv, "--out", str(out), *FAST])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("stakes: error:") and needle in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_state_dict_needs_arch(tmp_path, capsys):
    sd = tmp_path / "weights.pt"
    torch.save(_timm_digits().state_dict(), sd)
    assert main(["unlearn", "--model", str(sd), "--out", str(tmp_path / "r.json"), *FAST]) == 2
    assert "is a state dict: say what it belongs to with --arch" in capsys.readouterr().err
    assert main(["unlearn", "--model", str(sd), "--arch", "timm:test_vit", "--out", str(tmp_path / "r.json"),
                 *FAST]) == 2
    assert "does not fit --arch timm:test_vit" in capsys.readouterr().err


@pytest.fixture
def plugin(tmp_path):
    """The README's user method, saved as a plugin file; unregistered afterwards."""
    from tests.stakes.test_readme import user_method_block

    import stakes
    from stakes.methods import unregister_method

    path = tmp_path / "nearest_wrong.py"
    path.write_text(user_method_block())
    yield str(path)
    if "nearest-wrong" in stakes.available_methods():
        unregister_method("nearest-wrong")


def test_a_plugin_method_runs_through_unlearn_and_compare(tmp_path, plugin, capsys):
    sd = tmp_path / "weights.pt"
    torch.save(_timm_digits().state_dict(), sd)
    model = ["--model", str(sd), "--arch", "timm:test_resnet"]
    out = tmp_path / "r.json"
    assert main(["unlearn", "--plugin", plugin, "--method", "nearest-wrong", *model, "--out", str(out), *FAST,
                 "--set", "log_every=1"]) == 0
    rec = json.loads(out.read_text())
    assert rec["method"] == "nearest-wrong" and rec["steps"] == 2
    assert [h["step"] for h in rec["history"]] == [0, 1, 2]
    assert all({"relabel", "retention", "loss"} <= set(h) for h in rec["history"][1:])
    report = tmp_path / "report"
    assert main(["compare", "--plugin", plugin, "--methods", "nearest-wrong,adv", *model, "--k", "4", "--seeds", "0",
                 "--out", str(report), *[a for a in FAST if a not in ("--k", "4")]]) == 0
    runs = json.loads((report / "results.json").read_text())["runs"]
    assert [(r["method"], r["status"]) for r in runs] == [("nearest-wrong", "ok"), ("adv", "ok")]
    assert all(r["steps"] == 2 and 0 <= r["test_accuracy"] <= 100 for r in runs)
    assert "| nearest-wrong |" in (report / "summary.md").read_text()
    # without the plugin the name is unknown, and argparse lists the registered methods
    from stakes.methods import unregister_method

    unregister_method("nearest-wrong")
    with pytest.raises(SystemExit) as exc:
        main(["unlearn", "--method", "nearest-wrong", "--out", str(tmp_path / "x.json")])
    assert exc.value.code == 2 and "invalid choice: 'nearest-wrong'" in capsys.readouterr().err


def test_arch_builds_random_weight_models_for_the_data():
    from types import SimpleNamespace

    from stakes.jobs import UsageError, build_user_arch

    rgb = SimpleNamespace(input_shape=(3, 32, 32), num_classes=7)
    tv_model = build_user_arch("torchvision:mobilenet_v3_small", rgb).eval()
    vit = build_user_arch("timm:test_vit", rgb, model_args={"patch_size": 8}).eval()   # img_size from the data
    with torch.no_grad():
        assert tv_model(torch.rand(2, 3, 32, 32)).shape == (2, 7)
        assert vit(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    assert type(tv_model).__name__ == "MobileNetV3" and vit.patch_embed.img_size == (32, 32)
    with pytest.raises(UsageError, match="--arch torchvision:nope: Unknown model nope"):
        build_user_arch("torchvision:nope", rgb)
