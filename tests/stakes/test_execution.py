"""How a run executes its model work (stakes.execution): the precision of every phase, channels_last,
torch.compile (or its fallback), the PGD loop without host syncs, captured in CUDA graphs (the
plumbing, with a stand-in for the capture), and its out-of-memory back-off."""

import contextlib
import math
import copy
import warnings

from unittest import mock

import pytest
import torch
import torch.nn as nn

import stakes
import stakes.proxy as proxy_mod
from stakes.execution import Execution
from stakes.methods import loop
from tests.fake_cuda import fake_cuda
from tests.stakes.test_registry import CountSyncs


@contextlib.contextmanager
def phase_dtypes(model_types=(nn.Conv2d, nn.Linear), phase=None):
    """Records (phase, output dtype) of every conv / linear layer call, the phase being the stakes
    function on the stack: PGD steps, importance, training steps, evaluation (``phase[0]``: the
    current one, for a caller that records more)."""
    seen, phase = [], phase if phase is not None else ["setup"]

    def hook(module, args, out):
        if isinstance(module, model_types):
            seen.append((phase[0], out.dtype))

    def tagged(name, fn):
        def wrapper(*a, **k):
            before, phase[0] = phase[0], name
            try:
                return fn(*a, **k)
            finally:
                phase[0] = before
        return wrapper

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    originals = [(proxy_mod._PGD, "step"), (loop, "_build_optimizer"), (loop, "_train_step"), (loop, "_log")]
    saved = [getattr(obj, name) for obj, name in originals]
    for (obj, name), fn, tag in zip(originals, saved, ("pgd", "importance", "step", "evaluation")):
        setattr(obj, name, tagged(tag, fn))
    try:
        yield seen
    finally:
        handle.remove()
        for (obj, name), fn in zip(originals, saved):
            setattr(obj, name, fn)


class ReplayingCapture:
    """A stand-in for ``stakes.proxy._CapturedSteps`` on a machine that cannot capture CUDA graphs: it
    keeps the static buffers and replays the eager step (``replays`` notes each replay's rows)."""

    replays: list = []

    def __init__(self, pgd, x, x0, target, eps):
        self.pgd = pgd
        self.x, self.x0, self.target, self.eps = x.clone(), x0.clone(), target.clone(), eps.clone()

    def replay(self):
        type(self).replays.append(len(self.x))
        self.x.copy_(self.pgd.step(self.x, self.x0, self.target, self.eps))


def replaying_capture():
    """A fresh :class:`ReplayingCapture` class (its own list of replays)."""
    return type("ReplayingCapture", (ReplayingCapture,), {"replays": []})


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_every_phase_runs_in_the_configured_precision(precision, dtype, digits_model, digits_anchors, forget_set,
                                                      fast_config, digits):
    cfg = fast_config(precision=precision, max_steps=3, log_every=1)
    with phase_dtypes() as seen:
        res = stakes.unlearn(digits_model, forget_set, anchors=digits_anchors, config=cfg,
                             eval_sets={"test": (digits.test_x[:64], digits.test_y[:64])})
    by_phase = {}
    for phase, dt in seen:
        by_phase.setdefault(phase, set()).add(dt)
    for phase in ("pgd", "importance", "step", "evaluation"):
        assert by_phase.get(phase) == {dtype}, (phase, by_phase.get(phase))
    assert res.execution["precision"] == precision and res.execution["compile"] == "off"
    # fp32 master weights: the deployed model's parameters stay fp32 whatever the autocast
    assert all(p.dtype == torch.float32 for p in res.deployed.parameters())
    assert res.metrics["forget_accuracy"] >= 0.0 and res.steps == 3


def test_fp16_trains_through_a_gradient_scaler(digits_model, digits_anchors, forget_set, fast_config, monkeypatch):
    """fp16 training steps scale the loss (a GradScaler) and update with the gradients divided back:
    three steps land where fp32's do (within fp16's rounding; an update with still-scaled gradients
    would move 2**16 times too far), and the scaler did scale (it saw each step's gradients)."""
    scalers = []
    original = loop._prepare

    def prepare(*a, **k):
        run = original(*a, **k)
        scalers.append(run.scaler)
        return run

    monkeypatch.setattr(loop, "_prepare", prepare)
    runs = {precision: stakes.unlearn(digits_model, forget_set, anchors=digits_anchors, method="adv",
                                      config=fast_config(method="adv", precision=precision, max_steps=3))
            for precision in ("fp32", "fp16")}
    scaler = scalers[1]
    assert isinstance(scaler, torch.amp.GradScaler) and runs["fp16"].execution["precision"] == "fp16"
    # a step whose scaled gradients overflowed halved the scale and was skipped: fp32 takes as many steps
    skipped = round(math.log2(2.0 ** 16 / scaler.get_scale()))
    assert 0 <= skipped < 3 and scaler._growth_tracker.item() == 3 - skipped
    if skipped:
        runs["fp32"] = stakes.unlearn(digits_model, forget_set, anchors=digits_anchors, method="adv",
                                      config=fast_config(method="adv", precision="fp32", max_steps=3 - skipped))
    moved = 0.0
    for (name, p0), p16, p32 in zip(digits_model.named_parameters(), runs["fp16"].deployed.parameters(),
                                    runs["fp32"].deployed.parameters()):
        step32 = (p32 - p0).detach()
        moved = max(moved, float(step32.abs().max()))
        torch.testing.assert_close(p16 - p0, step32, rtol=0.05, atol=0.05 * float(step32.abs().max()) + 1e-6, msg=name)
    assert moved > 1e-4   # the steps did move the weights


def test_pretraining_runs_in_the_given_precision(digits):
    from stakes.data import ImageData
    from stakes.models import build_model
    from stakes.pretrain import pretrain

    small = ImageData(name="digits", class_names=digits.class_names, train_x=digits.train_x[:96],
                      train_y=digits.train_y[:96], test_x=digits.test_x[:32], test_y=digits.test_y[:32])
    model = build_model("digits_cnn", 10, in_channels=1, image_size=8)
    with phase_dtypes() as seen:
        stats = pretrain(model, small, epochs=1, progress=False, precision="bf16")
    assert stats["precision"] == "bf16" and {dt for _, dt in seen} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_channels_last_lays_out_the_models_and_the_inputs(digits_model, digits_anchors, forget_set, fast_config):
    formats = []

    def hook(module, args, out):
        if isinstance(module, nn.Conv2d):
            formats.append((module.weight.is_contiguous(memory_format=torch.channels_last),
                            args[0].is_contiguous(memory_format=torch.channels_last)))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        cl = stakes.unlearn(digits_model, forget_set, anchors=digits_anchors,
                            config=fast_config(channels_last=True, max_steps=2))
    finally:
        handle.remove()
    assert formats and all(w and x for w, x in formats)   # weights and input batches, every conv call
    plain = stakes.unlearn(digits_model, forget_set, anchors=digits_anchors,
                           config=fast_config(channels_last=False, max_steps=2))
    assert cl.execution["channels_last"] and not plain.execution["channels_last"]
    # the model comes back in PyTorch's default layout (a copy reloaded from its state dict computes the same)
    assert all(p.is_contiguous() for p in cl.model.parameters())
    for a, b in zip(cl.deployed.parameters(), plain.deployed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)   # a layout, not a different computation
    # the default: channels_last for convolutional models only, on the CPU as on a card (oneDNN's NHWC
    # convolutions are the faster ones there); pretraining keeps NCHW on the CPU (the cached models)
    assert Execution.resolve(stakes.preset("stable", device="cpu"), digits_model).channels_last is True
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    assert Execution.resolve(stakes.preset("stable", device="cpu"), mlp).channels_last is False
    default = stakes.unlearn(digits_model, forget_set, anchors=digits_anchors, config=fast_config(max_steps=2))
    assert default.execution["channels_last"] is True


def test_compile_falls_back_to_eager_with_one_message(digits_model, digits_anchors, forget_set, fast_config,
                                                      monkeypatch):
    import stakes.execution as execution_mod

    def failing(module, mode, backend):
        raise RuntimeError("no C++ compiler for inductor here\nsecond line")

    monkeypatch.setattr(execution_mod, "_compile", failing)
    with pytest.warns(UserWarning, match=r"torch.compile failed for features, running it eagerly "
                                         r"\(RuntimeError: no C\+\+ compiler"):
        res = stakes.unlearn(digits_model, forget_set, anchors=digits_anchors,
                             config=fast_config(compile="default", max_steps=2))
    assert res.execution["compile"] == "default"
    why = "RuntimeError: no C++ compiler for inductor here"
    assert res.execution["compile_fallbacks"] == {"orig.features": why, "features": why}
    assert res.execution["compile_fallback"] == f"orig.features: {why}; features: {why}"
    plain = stakes.unlearn(digits_model, forget_set, anchors=digits_anchors, config=fast_config(max_steps=2))
    for a, b in zip(res.deployed.parameters(), plain.deployed.parameters()):
        assert torch.equal(a, b)   # eager, as without compile


def test_compiled_modules_see_only_the_fixed_batch_shapes(digits_model, digits_anchors, forget_set, fast_config,
                                                            digits, monkeypatch):
    """Under compile, the training phases' odd batches (the epoch's last proxy batch, the last
    evaluation chunk) are padded to the run's fixed shapes and the padding dropped: the compiled
    graphs see no other batch size, and the run computes what the eager run computes."""
    import stakes.execution as execution_mod
    from stakes.methods.evaluation import CHUNK

    seen, phase = {}, {"training": False}

    def recording(module, mode, backend):   # an eager stand-in for torch.compile that records the rows it meets
        impl = module._call_impl

        def call(x, *a, **k):
            if phase["training"]:
                seen.setdefault(id(module), set()).add(x.shape[0])
            return impl(x, *a, **k)
        module._compiled_call_impl = call

    original = loop._build_optimizer

    def in_training(run):
        phase["training"] = True   # from the importance pass on: PGD is over
        return original(run)

    monkeypatch.setattr(execution_mod, "_compile", recording)
    monkeypatch.setattr(loop, "_build_optimizer", in_training)
    test = (digits.test_x, digits.test_y)   # 360 rows: one evaluation chunk short of CHUNK
    over = dict(repetitions=3, proxy_batch_size=10, max_steps=6, log_every=3)   # 24 proxies: 10 + 10 + 4
    res = stakes.unlearn(digits_model, forget_set, anchors=digits_anchors, config=fast_config(compile="default", **over),
                         eval_sets={"test": test})
    k = len(forget_set[1])
    assert res.execution["compile_fallback"] is None and len(seen) == 2   # the original's and the trained backbone
    assert len(test[1]) < CHUNK and seen and all(rows <= {k, 10, CHUNK} for rows in seen.values()), seen
    assert any(10 in rows for rows in seen.values()) and any(CHUNK in rows for rows in seen.values())
    phase["training"] = False
    plain = stakes.unlearn(digits_model, forget_set, anchors=digits_anchors, config=fast_config(**over),
                           eval_sets={"test": test})
    for a, b in zip(res.deployed.parameters(), plain.deployed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert [h["test_accuracy"] for h in res.history] == [h["test_accuracy"] for h in plain.history]


def test_padded_batches_keep_their_rows_and_memory_format():
    """One padding for the compiled modules and the graph-captured PGD: copies of the first row, in
    the batch's memory format (torch.cat alone returns a contiguous tensor here)."""
    from stakes.execution import pad_rows

    x = torch.randn(5, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    out = pad_rows(x, 8)
    assert out.shape == (8, 3, 4, 4) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out[:5], x) and all(torch.equal(out[i], x[0]) for i in range(5, 8))
    assert pad_rows(x, 5) is x and torch.equal(pad_rows(torch.arange(3), 4), torch.tensor([0, 1, 2, 0]))


def test_padding_leaves_training_batchnorm_alone():
    """A BatchNorm in training mode would see the padding rows in its batch statistics: unpadded."""
    import stakes.execution as execution_mod

    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    rows = []
    call = execution_mod._padded(net, lambda x: rows.append(len(x)) or net._call_impl(x))
    x = torch.randn(5, 3)
    with Execution(compile="default").fixed_batches([8]):
        net.train()
        assert call(x).shape == (5, 4)
        net.eval()
        out = call(x)
    assert rows == [5, 8] and out.shape == (5, 4)
    torch.testing.assert_close(out, net(x))
    with Execution(compile="off").fixed_batches([8]):   # without compile nothing is padded
        call(x)
    assert rows[-1] == 5


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adv", "structguard"])
def test_compile_is_used(method, digits, digits_model, digits_anchors, forget_set, fast_config):
    """A 6-step digits run under --compile default (the shapes of PGD, training and evaluation, grad
    on and off, train and eval modes): the original's and the trained backbone are compiled, and
    every call through a compiled module runs compiled graphs. Dynamo's own recompile limit (8
    entries, shared by every module's _call_impl) ran the rest of such a run eagerly and silently;
    a module that falls back after its first call fails here (fewer graph runs than calls, or a
    recorded fallback). StructGuard's original structures go through the compiled original too."""
    torch._dynamo.reset()
    cfg = fast_config(method, compile="default", max_steps=6, log_every=2)
    res = stakes.unlearn(digits_model, forget_set, method=method, anchors=digits_anchors, config=cfg,
                         eval_sets={"test": (digits.test_x, digits.test_y)})
    ex = res.execution
    if ex["compile_fallback"] is not None:
        pytest.fail(f"compile fell back: {ex['compile_fallback']}")
    assert set(ex["compiled_graphs"]) == {"orig.features", "features"}
    for name in ("orig.features", "features"):
        assert ex["compiled_graphs"][name] >= 1 and ex["recompiles"][name] == ex["compiled_graphs"][name] - 1
        assert ex["compiled_graph_runs"][name] >= ex["compiled_calls"][name] > 0, (name, ex)
    pgd_calls = 1 + cfg.pgd_steps + 1   # the trial, then one batch of 16 proxies: the steps and the success check
    assert ex["compiled_calls"]["orig.features"] >= pgd_calls
    if method == "structguard":   # + the original's features of the proxies, once (cached for every step)
        assert pgd_calls + 1 <= ex["compiled_calls"]["orig.features"] < pgd_calls + res.steps
    plain = stakes.unlearn(digits_model, forget_set, method=method, anchors=digits_anchors,
                           config=fast_config(method, max_steps=6, log_every=2),
                           eval_sets={"test": (digits.test_x, digits.test_y)})
    for a, b in zip(res.deployed.parameters(), plain.deployed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    torch._dynamo.reset()


def test_a_module_that_fails_to_compile_later_runs_eagerly(digits_model, digits_anchors, forget_set, fast_config,
                                                           monkeypatch):
    """A graph compiled after the trial (a training-mode graph, a new PGD shape, a SyncBatchNorm
    conversion) that fails to compile: that module falls back to eager where it happens, with one
    message, and the run goes on and computes what the eager run computes."""
    import stakes.execution as execution_mod

    compiled = {}

    def flaky(module, mode, backend):   # dynamo with a backend that fails on the trained backbone's 2nd graph
        def fake_inductor(gm, example_inputs):
            name = "orig.features" if module is flaky.orig else "features"
            n = compiled[name] = compiled.get(name, 0) + 1
            if n == 2 and name == "features":
                raise RuntimeError("inductor could not lower this graph\nsecond line")
            return gm.forward

        module.compile(backend=fake_inductor, dynamic=False)

    original_compile = loop._compile

    def remember(run):
        flaky.orig = run.ctx._frozen.features   # the frozen original's copy is what compiles as orig.features
        return original_compile(run)

    monkeypatch.setattr(execution_mod, "_compile", flaky)
    monkeypatch.setattr(loop, "_compile", remember)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match=r"torch.compile failed for features, running it eagerly \(BackendCompilerFailed"):
        res = stakes.unlearn(digits_model, forget_set, anchors=digits_anchors,
                             config=fast_config(compile="default", max_steps=3, log_every=1))
    torch._dynamo.reset()
    assert set(res.execution["compile_fallbacks"]) == {"features"}
    assert "inductor could not lower this graph" in res.execution["compile_fallbacks"]["features"]
    assert compiled["features"] == 2 and compiled["orig.features"] >= 2   # no compile of features after its failure
    plain = stakes.unlearn(digits_model, forget_set, anchors=digits_anchors, config=fast_config(max_steps=3, log_every=1))
    for a, b in zip(res.deployed.parameters(), plain.deployed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["default", "max-autotune"])
def test_the_inductor_mode_never_turns_on_inductors_cuda_graphs(mode, monkeypatch):
    """Inductor's CUDA graphs (what "max-autotune" turns on) overwrite a graph's outputs at its next
    replay: the evaluation keeps successive outputs of the compiled features, and PGD captures the
    compiled step in stakes' own graph. The mode handed to torch.compile never enables them."""
    import stakes.execution as execution_mod

    handed = []
    monkeypatch.setattr(execution_mod, "_compile", lambda module, m, backend: handed.append((m, backend)))
    compiler = Execution(compile=mode).compiler()
    compiler.add("features", nn.Linear(2, 2))
    (inductor_mode, backend), = handed
    assert not torch._inductor.list_mode_options(inductor_mode).get("triton.cudagraphs", False)
    assert not torch._TorchCompileInductorWrapper(inductor_mode, None, False).config.get("triton.cudagraphs", False)
    if mode == "max-autotune":
        assert torch._inductor.list_mode_options(inductor_mode).get("max_autotune") is True


def _pgd_case(device="cpu", n=6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 10)).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(n, 1, 8, 8, generator=gen).to(device)
    target = torch.randint(0, 10, (n,), generator=gen).to(device)
    eps = torch.full((n,), 1.0, device=device)
    return model, x0, target, eps


def test_the_graph_replayed_pgd_steps_make_no_host_sync(monkeypatch):
    """The 100-step loop as a card runs it: the graph-replay path (fixed batch shape, padding, static
    buffers, a replay a step; a stand-in replays the eager step), the model's backward, and the
    fused PGD step on its Triton path (the CPU interpreter here: the launch glue a card runs).
    Nothing waits for the device: no .item(), no bool(tensor), no copy to the host, inside a
    fused op's body either (tests.fused.test_host_sync.SyncCounter enters them)."""
    import fused._launch as launch_mod
    from fused._dispatch import triton_available_for
    from tests.fused.test_host_sync import SyncCounter

    if not triton_available_for(torch.device("cpu")):
        pytest.skip("needs the Triton CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)")

    StandIn = replaying_capture()

    launches = []
    real_run = launch_mod.Launch.run

    def counted(self, wrap=False):
        launches.append(self.name)
        return real_run(self, wrap)

    monkeypatch.setattr(proxy_mod, "_CapturedSteps", StandIn)
    monkeypatch.setattr(launch_mod.Launch, "run", counted)
    model, x0, target, eps = _pgd_case(n=5)
    pgd = proxy_mod._PGD(model, steps=4, step_size=0.1, backend=None, execution=Execution())
    start = proxy_mod._random_start(x0, eps, torch.arange(5), 0)
    pgd._replayed(start, x0, target, eps, size=8)   # warm-up and capture: outside the counted replays
    launches.clear()
    with SyncCounter() as counter:
        out = pgd._replayed(start, x0, target, eps, size=8)
    # the one sync: l2_pgd_step checks the radii of a CPU eps tensor (CPU only, by design: below)
    where = {frames[-1].name for _, frames in counter.calls}
    assert where <= {"_check_eps"}, counter.report()
    assert launches == ["pgd.step"] * 4 and out.shape == x0.shape
    from fused.pgd import _check_eps
    from tests.fake_cuda import fake_cuda

    with fake_cuda():
        on_card = torch.full((5,), 1.0, device="cuda")
        with SyncCounter() as counter:
            _check_eps(on_card, 5, on_card.device)
    assert counter.calls == [], counter.report()


def test_graph_replay_plumbing_equals_the_eager_loop(monkeypatch):
    """The CUDA-graph path (fixed batch shape, padding, static buffers, one replay per step) with a
    stand-in for the capture: it must give the eager loop's result."""
    StandIn = replaying_capture()
    replays = StandIn.replays
    monkeypatch.setattr(proxy_mod, "_CapturedSteps", StandIn)
    model, x0, target, eps = _pgd_case(n=5)
    pgd = proxy_mod._PGD(model, steps=4, step_size=0.1, backend="reference", execution=Execution())
    start = proxy_mod._random_start(x0, eps, torch.arange(5), 0)
    eager = pgd.run_steps(start, x0, target, eps)
    graphed = pgd._replayed(start, x0, target, eps, size=8)   # padded from 5 to 8 rows
    assert graphed.shape == (5, 1, 8, 8) and len(replays) == 4 and len(pgd._graphs) == 1
    torch.testing.assert_close(graphed, eager)
    pgd._replayed(start[:3], x0[:3], target[:3], eps[:3], size=8)   # the same shape: the same graph
    assert len(pgd._graphs) == 1


@pytest.mark.parametrize("where", ["capture", "replay"])
def test_out_of_memory_in_the_graph_path_halves_the_pgd_batch(where, monkeypatch, digits_model, forget_set):
    """The PGD attacks on the card run out of memory inside the CUDA-graph path, where a card runs
    out: while a batch's graph is warmed up and captured, or when a captured graph replays. The
    attacks restart with half the batch until one fits, the graphs of the sizes that did not fit are
    released (a graph holds its memory pool), and the proxies are those of a run that fitted at once.
    On the fake card, with a stand-in capture that replays the eager step."""
    from stakes.proxy import generate_proxies
    from tests.fake_cuda import fake_cuda

    x, y = forget_set
    kwargs = dict(num_classes=10, repetitions=2, steps=3, step_size=0.1, eps=1.0, seed=0, backend="reference",
                  progress=False)
    made, released = [], []

    class StandIn:   # runs out of memory for batches of more than 4 rows, at capture or at replay
        def __init__(self, pgd, x, x0, target, eps):
            self.pgd, made_rows = pgd, len(x)
            self.x, self.x0, self.target, self.eps = x.clone(), x0.clone(), target.clone(), eps.clone()
            for _ in range(3):   # the warm-up steps, as the real capture runs them
                self.x.copy_(pgd.step(self.x, self.x0, self.target, self.eps))
            if where == "capture" and made_rows > 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated, capture)")
            made.append(made_rows)

        def replay(self):
            if where == "replay" and len(self.x) > 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated, replay)")
            self.x.copy_(self.pgd.step(self.x, self.x0, self.target, self.eps))

    original_release = proxy_mod._PGD.release

    def release(self):
        released.append(sorted(shape[0] for shape, _ in self._graphs))
        original_release(self)

    monkeypatch.setattr(proxy_mod, "_CapturedSteps", StandIn)
    monkeypatch.setattr(proxy_mod._PGD, "release", release)
    with fake_cuda():
        exe = Execution(cuda_graphs=True, device_type="cuda")
        model = copy.deepcopy(digits_model).to("cuda")
        xc, yc = x.to("cuda"), y.to("cuda")
        direct = generate_proxies(model, xc, yc, batch_size=4, execution=exe, **kwargs)
        made.clear()
        report = {}
        with pytest.warns(UserWarning, match="retrying with batches of 4"):
            backed_off = generate_proxies(model, xc, yc, batch_size=16, report=report, execution=exe, **kwargs)
    assert report["batch_size"] == 4
    if where == "replay":   # the 16- and 8-row graphs were captured, failed at replay and were released
        assert made[:2] == [16, 8] and set(made[2:]) == {4} and released == [[16], [8]]
    else:   # the captures of 16 and 8 rows failed: nothing to release, no graph of theirs kept
        assert set(made) == {4} and released == [[], []]
    torch.testing.assert_close(backed_off.x.cpu(), direct.x.cpu())
    assert backed_off.success_rate == direct.success_rate


@pytest.mark.slow
def test_shapes_with_the_cifar_resnet18_runs_under_every_option(tmp_path):
    """The issue's CPU end-to-end case: the CIFAR-form ResNet-18 on the CIFAR-shaped shapes data, bf16
    autocast, channels_last and torch.compile together; the policy is recorded and applied."""
    from stakes.data import make_shapes, sample_forget_indices
    from stakes.models import build_model

    data = make_shapes(n_train=120, n_test=40)
    torch.manual_seed(0)
    model = build_model("resnet18", 10, in_channels=3, image_size=32).eval()
    idx = sample_forget_indices(data.train_y, 2, seed=0)
    cfg = stakes.preset("stable", method="adv", precision="bf16", channels_last=True, compile="default",
                        repetitions=2, pgd_steps=2, eps=0.5, max_steps=2, stop_warmup_steps=100, log_every=1,
                        progress=False, backend="reference", pgd_batch_size=4, proxy_batch_size=4, forget_batch_size=2)
    torch._dynamo.reset()
    laid_out, prepare = [], Execution.prepare

    def recording(self, module):   # the layout each model copy runs in (the result comes back in the default)
        out = prepare(self, module)
        laid_out.extend(m.weight.is_contiguous(memory_format=torch.channels_last)
                        for m in module.modules() if isinstance(m, nn.Conv2d))
        return out

    with phase_dtypes() as seen, mock.patch.object(Execution, "prepare", recording):
        res = stakes.unlearn(model, (data.train_x[idx], data.train_y[idx]), method="adv", config=cfg,
                             eval_sets={"test": (data.test_x, data.test_y)})
    torch._dynamo.reset()
    ex = res.execution
    assert (ex["precision"], ex["channels_last"], ex["compile"]) == ("bf16", True, "default")
    assert ex["compile_fallback"] is None, ex["compile_fallback"]
    assert res.steps == 2 and all(torch.isfinite(p).all() for p in res.deployed.parameters())
    assert {dt for phase, dt in seen if phase in ("pgd", "step", "evaluation")} == {torch.bfloat16}
    assert laid_out and all(laid_out)
    convs = [m for m in res.deployed.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous() for m in convs)


def test_fp16_importance_gradients_survive_below_fp16_range():
    """The importance pass takes |∂L/∂ψ| through a 16-bit backward: under fp16 the loss is scaled
    (and the gradients divided back), so gradients below fp16's smallest number are not flushed to
    zero; an overflowing scale is halved until the gradients are finite."""
    from stakes.methods.strategy import SingleProcess

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    params = list(net.parameters())

    def loss_fn(xb):   # gradients of about 1e-9 reach the fp16 activations
        return net(xb).float().sum() * 1e-9

    grads = {}
    for precision in ("fp32", "fp16"):
        strategy = SingleProcess()
        strategy.setup(None, None, Execution(precision=precision))
        grads[precision] = strategy.batch_gradient(loss_fn, x, params)
    unscaled = torch.autograd.grad(_in_fp16(loss_fn, x), params)
    assert all(g.abs().max() == 0 for g in unscaled[:2])   # what the fp16 backward gives unscaled: nothing
    for g16, g32 in zip(grads["fp16"], grads["fp32"]):
        assert g16.abs().max() > 0
        torch.testing.assert_close(g16, g32, rtol=2e-2, atol=1e-2 * float(g32.abs().max()))

    def huge(xb):   # gradients near fp16's largest: the scale backs off to a finite one
        return net(xb).float().sum() * 1e2

    strategy = SingleProcess()
    strategy.setup(None, None, Execution(precision="fp16"))
    got = strategy.batch_gradient(huge, x, params)
    assert all(torch.isfinite(g).all() for g in got)
    ref = torch.autograd.grad(huge(x), params)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=2e-2, atol=1e-2 * float(r.abs().max()))


def _in_fp16(loss_fn, x):
    with torch.autocast("cpu", dtype=torch.float16):
        return loss_fn(x)


@pytest.mark.parametrize("method", ["l2ul", "salun"])
def test_fp16_importance_and_saliency_are_not_flushed(method, digits_model, forget_set, fast_config, monkeypatch):
    """L2UL's importance and SalUn's saliency take their gradients through ctx.gradients: under fp16
    the loss is scaled, so a tiny loss still gives the fp32 gradients (unscaled: all zero)."""
    from stakes.methods.context import UnlearnContext

    seen = {}
    original = UnlearnContext.gradients

    def tiny(self, loss, params):   # the hook's loss made tiny: its gradients fall below fp16's range
        grads = original(self, loss * 1e-5, params)
        seen[self.config.precision] = [g / 1e-5 for g in grads if g is not None]
        return grads

    monkeypatch.setattr(UnlearnContext, "gradients", tiny)
    for precision in ("fp32", "fp16"):
        stakes.unlearn(digits_model, forget_set, method=method, config=fast_config(method, precision=precision,
                                                                                   max_steps=1))
    assert len(seen["fp16"]) == len(seen["fp32"]) > 0
    for g16, g32 in zip(seen["fp16"], seen["fp32"]):
        assert g16.abs().max() > 0 or g32.abs().max() == 0
        assert (g16 - g32).norm() <= 0.03 * g32.norm() + 1e-12   # fp16's rounding, not a flush


@pytest.mark.parametrize("method", ["structguard", "salun"])
def test_channels_last_reaches_every_phase_of_a_three_channel_model(method):
    """With channels_last every convolution meets channels_last inputs, in the importance pass and
    SalUn's saliency mask too (the forget images and the proxies are laid out before the first
    model call). Three channels: with one channel NCHW is already channels_last and the check is blind."""
    from stakes.models import build_model

    torch.manual_seed(0)
    model = build_model("shapes_cnn", 10, in_channels=3, image_size=16).eval()
    gen = torch.Generator().manual_seed(0)
    forget = (torch.rand(4, 3, 16, 16, generator=gen), torch.tensor([0, 1, 2, 3]))
    anchors = torch.nn.functional.normalize(torch.randn(10, 32, generator=gen), dim=1)
    cfg = stakes.preset("stable", method=method, channels_last=True, repetitions=2, pgd_steps=2, eps=1.0,
                        max_steps=2, log_every=1, progress=False, stop_warmup_steps=100, backend="reference")
    with phase_dtypes(model_types=(nn.Conv2d,)) as seen, _conv_layouts() as layouts:
        res = stakes.unlearn(model, forget, method=method, anchors=anchors, config=cfg)
    assert res.execution["channels_last"]
    phases = [phase for phase, _ in seen]
    assert len(phases) == len(layouts) and "importance" in phases and "step" in phases
    bad = sorted({phase for phase, cl in zip(phases, layouts) if not cl})
    assert not bad, f"NCHW inputs met channels_last weights in: {bad}"


@contextlib.contextmanager
def _conv_layouts():
    """Whether each convolution call's input is channels_last (in call order)."""
    layouts = []

    def hook(module, args, out):
        if isinstance(module, nn.Conv2d):
            layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield layouts
    finally:
        handle.remove()


def test_the_fp16_loss_scale_found_once_serves_the_next_calls():
    """Under fp16 the loss scale halves while gradients overflow; the next call starts from the scale
    found, so an importance pass of many batches pays the halvings once (one backward a batch after)."""
    exe = Execution(precision="fp16")
    calls = []

    def gradients_of(scale):   # overflows above 2**12
        calls.append(scale)
        return [torch.tensor([float("inf") if scale > 2.0 ** 12 else 1.0 * scale])]

    first = exe.unscaled_gradients(gradients_of)
    assert calls == [2.0 ** k for k in range(16, 11, -1)] and first[0].item() == 1.0
    calls.clear()
    for _ in range(3):
        assert exe.unscaled_gradients(gradients_of)[0].item() == 1.0
    assert calls == [2.0 ** 12] * 3
    assert Execution(precision="fp16") == exe and "_loss_scale" not in exe.record()


def test_the_pgd_graph_is_captured_on_the_datas_card(monkeypatch):
    """With the data on cuda:1 (``--device cuda:1`` in one process, where cuda:0 stays current), the
    side stream, the warm-up, the capture and every replay happen with cuda:1 current: a graph made
    on cuda:0 would record nothing of the work on cuda:1 and the proxies would stay at their starts.
    Two fake cards, with stand-ins for streams and graphs that note the card they are made on."""
    from tests.fake_cuda import fake_cuda

    events = []

    def card_of(device=None):
        return torch.cuda.current_device() if device is None else torch.device(device).index

    class Stream:
        def __init__(self, device=None, **kw):
            events.append(("stream", card_of(device)))

        def wait_stream(self, other):
            events.append(("wait", torch.cuda.current_device()))

    class Graph:
        def __init__(self, *a, **kw):
            events.append(("graph", torch.cuda.current_device()))

        def replay(self):
            events.append(("replay", torch.cuda.current_device()))

    @contextlib.contextmanager
    def capture(graph, *a, **kw):
        events.append(("capture", torch.cuda.current_device()))
        yield

    with fake_cuda(devices=2):
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(device))
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", capture)
        model, x0, target, eps = _pgd_case("cuda:1", n=5)
        assert torch.cuda.current_device() == 0 and x0.device == torch.device("cuda", 1)
        pgd = proxy_mod._PGD(model, steps=3, step_size=0.1, backend=None,
                             execution=Execution(cuda_graphs=True, device_type="cuda"))
        out = pgd(x0, target, eps, index=torch.arange(5), seed=0, pad_to=8)
        assert out.device == torch.device("cuda", 1) and torch.cuda.current_device() == 0
    kinds = [kind for kind, _ in events]
    assert {"stream", "graph", "capture"} <= set(kinds) and kinds.count("replay") == 3
    assert all(card == 1 for _, card in events), events


class _CenterRows(nn.Module):
    """x − mean over the batch: mixes rows in eval mode with no BatchNorm to reveal it."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)),
    lambda: nn.Sequential(nn.Linear(3, 4), _CenterRows()),
], ids=["batchnorm-without-running-stats", "a-module-that-centres-the-batch"])
def test_padding_leaves_modules_that_mix_rows_in_eval_mode_alone(make):
    """A BatchNorm without running statistics normalises with the batch's statistics in eval mode
    too, and a module may mix rows in ways no type reveals: padding rows would change the real
    rows' outputs, so neither the compiled modules nor the graph-captured PGD pad them."""
    import stakes.execution as execution_mod

    torch.manual_seed(0)
    net = make().eval()
    rows = []
    call = execution_mod._padded(net, lambda x: rows.append(len(x)) or net._call_impl(x))
    x = torch.randn(5, 3)
    with Execution(compile="default").fixed_batches([8]):
        out = call(x)
    assert rows == [5]
    torch.testing.assert_close(out, net(x))
    independent = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()   # running statistics: rows independent
    assert execution_mod.rows_independent(independent, x) and not execution_mod.rows_independent(net, x)


def test_graph_captured_pgd_does_not_pad_a_model_that_mixes_rows(monkeypatch):
    """The CUDA-graph PGD pads an odd batch to the graph's shape only where rows are independent: a
    model with a BatchNorm on batch statistics gets a graph of the batch's own shape, and the eager
    loop's result."""
    StandIn = replaying_capture()

    monkeypatch.setattr(proxy_mod, "_CapturedSteps", StandIn)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    _, x0, target, eps = _pgd_case(n=5)
    pgd = proxy_mod._PGD(model, steps=3, step_size=0.1, backend="reference", execution=Execution())
    start = proxy_mod._random_start(x0, eps, torch.arange(5), 0)
    eager = pgd.run_steps(start, x0, target, eps)
    graphed = pgd._replayed(start, x0, target, eps, size=8)
    assert [shape for shape, _ in pgd._graphs] == [(5, 1, 8, 8)]
    torch.testing.assert_close(graphed, eager)


def test_compile_frozen_compiles_only_the_originals_inference_copy(digits_model, digits_anchors, forget_set,
                                                                   fast_config, monkeypatch):
    """``--compile frozen``: PGD's and the structures' network alone (the folded original), with
    inductor's default mode; the trained backbone stays eager."""
    import stakes.execution as execution_mod

    compiled = []

    def record(module, mode, backend):   # an eager stand-in that notes what would be compiled, and how
        compiled.append((module, mode))
        module._compiled_call_impl = module._call_impl

    monkeypatch.setattr(execution_mod, "_compile", record)
    res = stakes.unlearn(digits_model, forget_set, anchors=digits_anchors, config=fast_config(compile="frozen",
                                                                                               max_steps=1))
    assert [mode for _, mode in compiled] == ["default"]
    assert res.execution["compile"] == "frozen" and set(res.execution["compiled_graphs"]) == {"orig.features"}
