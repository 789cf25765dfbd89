"""stakes with ``--device cuda`` on a machine without a GPU (``tests/fake_cuda.py``).

Inside ``fake_cuda()`` a CUDA tensor is a CPU tensor that says it is on ``cuda:0``, and a CPU tensor
with data that meets one raises as on a card. So these runs go through every path that meets the
model on the card with data from the CPU (radius calibration, proxies, importance, the loop,
evaluation, embedding metrics, membership inference, pretraining, the retrain oracle, prototype
anchors, compare) and compare the results with the same runs on the CPU: equal, because the
arithmetic is the same (fused takes its reference path in both).

Before the fix, ``stakes unlearn --device cuda`` crashed after the whole run (``jobs.embedding``
fed CPU batches to the model on the card) and no result was written.
"""

import json

import pytest
import torch

from stakes.cli import main
from stakes.pretrain import load_checkpoint
from tests.fake_cuda import CudaTensor, DeviceMismatch, fake_cuda

# the card's execution policy set to the CPU's (fp32, contiguous, eager PGD: a fake card cannot capture CUDA
# graphs), so that both runs do the same arithmetic; test_the_card_defaults covers the card's own policy
SMALL = ["--set", "pgd_steps=8", "--set", "repetitions=4", "--set", "max_epochs=3", "--set", "eval_max_samples=120",
         "--set", "backend=reference", "--no-progress", "--precision", "fp32", "--set", "channels_last=false",
         "--set", "cuda_graphs=false"]
FIGURES = ("forget_accuracy", "retain_accuracy", "test_accuracy", "steps", "stopped", "structure_drift")


@pytest.fixture
def cache_env(stakes_cache, digits_model, monkeypatch):
    monkeypatch.setenv("STAKES_CACHE", str(stakes_cache))
    return stakes_cache


def _unlearn(tmp_path, device, *extra):
    out = tmp_path / f"{device}.json"
    argv = ["unlearn", "--dataset", "digits", "--method", "structguard", "--k", "6", "--seed", "1", "--out", str(out),
            "--device", device, *SMALL, "--set", "importance_samples=64", *extra]
    if device == "cuda":
        with fake_cuda():
            rc = main(argv)
    else:
        rc = main(argv)
    assert rc == 0
    return json.loads(out.read_text())


def test_the_harness_raises_where_a_card_does():
    with fake_cuda():
        model = torch.nn.Linear(4, 2).to("cuda")
        assert isinstance(model.weight, CudaTensor) and model.weight.device.type == "cuda"
        x = torch.randn(3, 4, device="cuda")
        assert model(x).sum().item() == pytest.approx(model(x.cpu().to("cuda")).sum().item())
        with pytest.raises(DeviceMismatch, match="same device"):
            model(torch.randn(3, 4))
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        with pytest.raises(RuntimeError, match="generator"):
            torch.randn(3, generator=torch.Generator().manual_seed(0), device="cuda")
        assert x[torch.tensor([0, 2])].shape == (2, 4)   # CPU indices into a CUDA tensor: allowed on a card
        assert x.cpu().device.type == "cpu" and not isinstance(x.cpu(), CudaTensor)


@pytest.mark.slow
def test_unlearn_on_cuda_writes_the_cpu_result(tmp_path, cache_env):
    """The whole CLI run on the card: calibration, proxies, importance, loop, evaluation, metrics."""
    cpu, cuda = _unlearn(tmp_path, "cpu"), _unlearn(tmp_path, "cuda")
    for key in FIGURES:
        assert cuda[key] == pytest.approx(cpu[key], abs=1e-6), key
    assert cuda["proxies"]["eps"] == cpu["proxies"]["eps"]
    assert cuda["mia"] == pytest.approx(cpu["mia"]) and cuda["retrieval"] == pytest.approx(cpu["retrieval"])
    assert [h["test_accuracy"] for h in cuda["history"]] == pytest.approx([h["test_accuracy"] for h in cpu["history"]])
    assert cuda["config"]["device"] == "cuda"


@pytest.mark.slow
def test_prototype_anchors_and_a_paper_preset_run_on_cuda(tmp_path, cache_env):
    """Class-mean anchors from the model on the card; the paper preset trains a cold projector."""
    cpu = _unlearn(tmp_path, "cpu", "--encoder", "prototype", "--preset", "paper", "--set", "max_epochs=1")
    cuda = _unlearn(tmp_path, "cuda", "--encoder", "prototype", "--preset", "paper", "--set", "max_epochs=1")
    for key in FIGURES:
        assert cuda[key] == pytest.approx(cpu[key], abs=1e-6), key


@pytest.mark.slow
def test_pretrain_on_cuda(tmp_path):
    out = {}
    for device in ("cpu", "cuda"):
        path = tmp_path / f"{device}.pt"
        argv = ["pretrain", "--dataset", "digits", "--epochs", "1", "--out", str(path), "--device", device,
                "--no-progress", "--cache-dir", str(tmp_path / "cache")]
        if device == "cuda":
            with fake_cuda():
                assert main(argv) == 0
        else:
            assert main(argv) == 0
        out[device] = load_checkpoint(path)
    assert out["cuda"][1]["test_accuracy"] == pytest.approx(out["cpu"][1]["test_accuracy"])
    for (name, a), b in zip(out["cpu"][0].state_dict().items(), out["cuda"][0].state_dict().values()):
        torch.testing.assert_close(b, a, msg=name)


@pytest.mark.slow
def test_compare_of_every_baseline_on_cuda(tmp_path, cache_env):
    """A grid of the baselines on the card (their importance, masks and optimisers included)."""
    reports = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        argv = ["compare", "--dataset", "digits", "--methods", "adv,l2ul,salun,finetune", "--k", "4", "--seeds", "0",
                "--out", str(out), "--device", device, *SMALL, "--set", "max_epochs=1"]
        if device == "cuda":
            with fake_cuda():
                assert main(argv) == 0
        else:
            assert main(argv) == 0
        reports[device] = json.loads((out / "results.json").read_text())
    runs = {d: {(r["method"], r["seed"]): r for r in rep["runs"]} for d, rep in reports.items()}
    assert set(runs["cuda"]) == set(runs["cpu"]) and len(runs["cuda"]) == 4
    for key, rec in runs["cuda"].items():
        assert rec.get("status", "ok") == "ok", (key, rec.get("error"))
        assert rec["test_accuracy"] == pytest.approx(runs["cpu"][key]["test_accuracy"], abs=1e-6), key


def test_retrain_oracle_on_cuda(digits):
    """The oracle trains from scratch on the card, with the data set's recipe (on 150 images here)."""
    from stakes.data import ImageData
    from stakes.methods.retrain import retrain_oracle

    small = ImageData(name=digits.name, class_names=digits.class_names, train_x=digits.train_x[:150],
                      train_y=digits.train_y[:150], test_x=digits.test_x[:40], test_y=digits.test_y[:40])
    forget = torch.tensor([3, 7, 11])
    cpu = retrain_oracle(small, forget, seed=0)
    with fake_cuda():
        cuda = retrain_oracle(small, forget, seed=0, device="cuda")
        assert next(cuda.parameters()).device.type == "cuda"
        cuda = cuda.cpu()
    for (name, a), b in zip(cpu.state_dict().items(), cuda.state_dict().values()):
        torch.testing.assert_close(b, a, msg=name)


def test_the_card_defaults(tmp_path, cache_env):
    """On a card the defaults are bf16 autocast, channels_last and CUDA-graph PGD. A run with the
    first two on the fake card (which cannot capture graphs, and whose autocast cannot lower the
    precision of what C++ sees as CPU tensors) lays out every model and batch channels_last on the
    card without a device mismatch, and computes what the CPU computes with channels_last."""
    import stakes
    from stakes.execution import Execution
    from stakes.models import build_model

    with fake_cuda():
        exe = Execution.resolve(stakes.preset("stable", device="cuda"),
                                build_model("digits_cnn", 10, in_channels=1, image_size=8))
    assert (exe.precision, exe.channels_last, exe.cuda_graphs) == ("bf16", True, True)
    common = ["unlearn", "--dataset", "digits", "--k", "6", "--seed", "1", "--no-progress", "--set", "pgd_steps=8",
              "--set", "repetitions=4", "--set", "max_epochs=3", "--set", "eval_max_samples=120",
              "--set", "importance_samples=64", "--set", "backend=reference"]
    with fake_cuda():
        assert main([*common, "--device", "cuda", "--set", "cuda_graphs=false", "--out", str(tmp_path / "card.json")]) == 0
    assert main([*common, "--device", "cpu", "--set", "channels_last=true", "--out", str(tmp_path / "cpu.json")]) == 0
    card, cpu = (json.loads((tmp_path / f"{d}.json").read_text()) for d in ("card", "cpu"))
    assert card["execution"]["precision"] == "bf16" and card["execution"]["channels_last"] is True
    assert cpu["execution"]["precision"] == "fp32" and cpu["execution"]["channels_last"] is True
    for key in FIGURES:
        assert card[key] == pytest.approx(cpu[key], abs=1e-6), key


def test_phase_timings_wait_for_the_card(digits_model, digits_anchors, forget_set, fast_config, monkeypatch):
    """On a card the phase clocks synchronise at the phase boundaries (proxies, importance, each
    evaluation, the loop) and never inside a training step."""
    import stakes
    from stakes.methods import loop

    calls, in_step = [], [False]
    original = loop._train_step

    def step(run, batch):
        in_step[0] = True
        try:
            return original(run, batch)
        finally:
            in_step[0] = False

    monkeypatch.setattr(loop, "_train_step", step)
    with fake_cuda():
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(in_step[0]))
        cfg = fast_config(device="cuda", cuda_graphs=False, max_steps=4, log_every=2)
        res = stakes.unlearn(digits_model, forget_set, anchors=digits_anchors, config=cfg)
    assert res.steps == 4 and len(calls) >= 8 and not any(calls)
