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
# graphs), so that both runs do the same arithmetic; test_the_card_defaults_reach_every_phase covers the card's own policy
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
                "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--precision", "fp32"]   # the card's default
        if device == "cuda":                                                                 # is bf16 autocast
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
    with fake_cuda():   # in fp32 (the card's default is bf16, which the fake card computes as a card does)
        cuda = retrain_oracle(small, forget, seed=0, device="cuda", precision="fp32")
        assert next(cuda.parameters()).device.type == "cuda"
        cuda = cuda.cpu()
    for (name, a), b in zip(cpu.state_dict().items(), cuda.state_dict().values()):
        torch.testing.assert_close(b, a, msg=name)


def test_the_card_defaults_reach_every_phase(monkeypatch):
    """On a card the defaults are bf16 autocast, channels_last and CUDA-graph PGD, and a run with
    them (none overridden) takes each where it belongs: every phase (PGD, importance, steps,
    evaluation) enters autocast on the card in bf16, every convolution meets a channels_last batch
    (three channels: with one, NCHW is channels_last already), and the PGD steps are replayed from a
    captured graph. The fake card cannot capture (a stand-in replays the eager step); its autocast is
    the CPU's, so the run's work really is in bf16 (the frozen original's weights cast once)."""
    import stakes
    import stakes.proxy as proxy_mod
    from stakes.models import build_model
    from tests.stakes.test_execution import phase_dtypes

    from tests.stakes.test_execution import replaying_capture

    StandIn = replaying_capture()
    replays = StandIn.replays

    phase, entered = ["setup"], []

    monkeypatch.setattr(proxy_mod, "_CapturedSteps", StandIn)
    torch.manual_seed(0)
    model = build_model("shapes_cnn", 10, in_channels=3, image_size=16).eval()
    gen = torch.Generator().manual_seed(0)
    forget = (torch.rand(4, 3, 16, 16, generator=gen), torch.tensor([0, 1, 2, 3]))
    anchors = torch.nn.functional.normalize(torch.randn(10, 32, generator=gen), dim=1)
    cfg = stakes.preset("stable", device="cuda", repetitions=2, pgd_steps=3, eps=1.0, max_steps=2, log_every=1,
                        progress=False, stop_warmup_steps=100, backend="reference")
    layouts = []

    def conv_hook(module, args, out):
        if isinstance(module, torch.nn.Conv2d):
            layouts.append((phase[0], args[0].is_contiguous(memory_format=torch.channels_last)))

    handle = torch.nn.modules.module.register_module_forward_hook(conv_hook)
    try:
        with fake_cuda(), phase_dtypes(phase=phase):
            card_autocast = torch.autocast   # the fake card's (the CPU's autocast on its tensors), recorded

            class RecordingAutocast(card_autocast):
                def __init__(self, device_type, dtype=None, *a, **k):
                    entered.append((phase[0], device_type, dtype))
                    super().__init__(device_type, dtype, *a, **k)

            torch.autocast = RecordingAutocast   # restored before fake_cuda restores its own
            try:
                res = stakes.unlearn(model, forget, anchors=anchors, config=cfg,
                                     eval_sets={"test": (torch.rand(6, 3, 16, 16, generator=gen), torch.arange(6))})
            finally:
                torch.autocast = card_autocast
    finally:
        handle.remove()
    ex = res.execution
    assert (ex["precision"], ex["channels_last"], ex["cuda_graphs"], ex["device_type"]) == ("bf16", True, True, "cuda")
    by_phase = {}
    for where, device_type, dtype in entered:
        by_phase.setdefault(where, set()).add((device_type, dtype))
    for where in ("pgd", "importance", "step", "evaluation"):
        assert by_phase.get(where) == {("cuda", torch.bfloat16)}, (where, by_phase)
    assert {where for where, _ in layouts} >= {"pgd", "importance", "step", "evaluation"}
    assert all(cl for _, cl in layouts), [where for where, cl in layouts if not cl]
    assert replays == [8] * cfg.pgd_steps   # the 8 proxies' batch: one replay a step


def test_a_card_run_computes_what_the_cpu_computes(tmp_path, cache_env):
    """The whole CLI run on the fake card in fp32 with channels_last and CUDA graphs off (the fake card
    cannot capture) equals the CPU run with channels_last: the card's paths (layout, devices, no CPU
    tensor meeting the card) change nothing in what is computed."""
    common = ["unlearn", "--dataset", "digits", "--k", "6", "--seed", "1", "--no-progress", "--set", "pgd_steps=8",
              "--set", "repetitions=4", "--set", "max_epochs=3", "--set", "eval_max_samples=120",
              "--set", "importance_samples=64", "--set", "backend=reference"]
    with fake_cuda():
        assert main([*common, "--device", "cuda", "--set", "cuda_graphs=false", "--precision", "fp32",
                     "--out", str(tmp_path / "card.json")]) == 0
    assert main([*common, "--device", "cpu", "--set", "channels_last=true", "--out", str(tmp_path / "cpu.json")]) == 0
    card, cpu = (json.loads((tmp_path / f"{d}.json").read_text()) for d in ("card", "cpu"))
    assert card["execution"]["precision"] == "fp32" and card["execution"]["channels_last"] is True
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
