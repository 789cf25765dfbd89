"""The targets table, the live-card check (CUDA and ROCm builds of torch), the per-vendor choices of
the launch plans (the same ``plan_*`` code the launchers run), the AMD and sm_120 plans computing
the ops correctly under the interpreter, and the op registry (no tool lists op names)."""

from __future__ import annotations

import io
import tokenize
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fused
from fused import _targets, validate
from fused._launch import Launch
from fused._ops import OP_NAMES, REGISTRY, SpecKey, declaration
from fused._targets import BY_NAME, DEFAULT_TARGETS, INTERPRETER_TARGET, device_target, target_of

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- the table


def test_nine_default_targets_with_their_limits():
    table = {t.name: (t.vendor, t.warp_size, t.shared_limit, t.max_registers, t.fp32_dot) for t in DEFAULT_TARGETS}
    assert table == {
        "sm_80": ("nvidia", 32, 166_912, 255, "tf32x3"),
        "sm_86": ("nvidia", 32, 101_376, 255, "tf32x3"),
        "sm_89": ("nvidia", 32, 101_376, 255, "tf32x3"),
        "sm_90": ("nvidia", 32, 232_448, 255, "tf32x3"),
        "sm_100": ("nvidia", 32, 232_448, 255, "tf32x3"),
        "sm_120": ("nvidia", 32, 101_376, 255, "tf32x3"),
        "gfx90a": ("amd", 64, 65_536, 512, "ieee"),
        "gfx942": ("amd", 64, 65_536, 512, "ieee"),
        "gfx950": ("amd", 64, 163_840, 512, "ieee"),
    }
    assert all(t.products for t in DEFAULT_TARGETS)
    assert "RTX 50" in BY_NAME["sm_120"].products and "MI300X" in BY_NAME["gfx942"].products


@pytest.mark.parametrize("given, name", [
    (90, "sm_90"), ("90", "sm_90"), ("sm_90a", "sm_90"), ("SM_120", "sm_120"), (120, "sm_120"),
    ("gfx942", "gfx942"), ("gfx942:sramecc+:xnack-", "gfx942"), ("gfx90a", "gfx90a"), (BY_NAME["gfx950"], "gfx950"),
])
def test_target_of(given, name):
    assert target_of(given).name == name


def test_target_of_unknown_cards():
    t = target_of(75)  # a CUDA card outside the table: the smallest NVIDIA limits, not a default target
    assert (t.name, t.shared_limit, t.default, t.vendor) == ("sm_75", 101_376, False, "nvidia")
    rdna = target_of("gfx1100")  # RDNA runs wave32
    assert (rdna.vendor, rdna.warp_size, rdna.default) == ("amd", 32, False)
    for bad in ("gfx", "volta", 3, True, None):
        with pytest.raises((ValueError, TypeError), match="arch"):
            target_of(bad)


# ----------------------------------------------------------------------------- the live card


def test_device_target_of_cpu_cuda_and_rocm(monkeypatch):
    assert device_target(torch.device("cpu")) is INTERPRETER_TARGET
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))
    assert device_target(torch.device("cuda")).name == "sm_120"
    monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(gcnArchName="gfx942:sramecc+:xnack-"))
    assert device_target(torch.device("cuda:0")).name == "gfx942"


def test_live_card_recognises_a_rocm_build(monkeypatch):
    from fused.preflight import live_card

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(
        gcnArchName="gfx950:sramecc+:xnack-", name="AMD Instinct MI355X", shared_memory_per_block=163_840))
    assert live_card() == {"arch": "gfx950", "name": "AMD Instinct MI355X", "shared_limit": 163_840}
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(
        major=12, minor=0, name="NVIDIA GeForce RTX 5090", shared_memory_per_block_optin=101_376))
    assert live_card() == {"arch": "sm_120", "name": "NVIDIA GeForce RTX 5090", "shared_limit": 101_376}


# ----------------------------------------------------------------------------- per-vendor plans


def _launches(op, spec, arch):
    from fused.preflight import complete_spec, module_spec

    return declaration(op).launches(module_spec(op, complete_spec(op, spec)), target_of(arch))


def test_fp32_dots_run_ieee_on_amd_and_tf32x3_on_nvidia():
    for op, spec in (("similarity", dict(K=256)), ("alignment", dict(K=100)), ("alignment", dict(K=1000))):
        for arch, kind in (("gfx90a", 3), ("gfx942", 3), ("gfx950", 3), ("sm_90", 0), ("sm_120", 0)):
            for launch in _launches(op, dict(spec, dtype="float32"), arch):
                assert launch.constexprs["DOT_KIND"] == kind and launch.dot == torch.float32, (op, arch)
            for launch in _launches(op, dict(spec, dtype="bfloat16"), arch):
                assert launch.constexprs["DOT_KIND"] == 2 and launch.dot == torch.bfloat16


def test_amd_plans_size_their_waves():
    """64-lane AMD waves: 4 a workgroup for the alignment kernels (one a SIMD), as many threads as
    NVIDIA's warps for the fp32 similarity tile and the streaming kernels; maxnreg on NVIDIA only."""
    from fused.alignment import AMD_WAVES

    for spec in (dict(K=10, dtype="float16"), dict(K=100, dtype="float32"), dict(K=1000, dtype="bfloat16")):
        assert {launch.num_warps for launch in _launches("alignment", spec, "gfx942")} == {AMD_WAVES}
        assert all(launch.options == {"maxnreg": 255} for launch in _launches("alignment", spec, "sm_120"))
        assert all(launch.options == {} for launch in _launches("alignment", spec, "gfx950"))
    nv, gfx = _launches("similarity", dict(K=256), "sm_80"), _launches("similarity", dict(K=256), "gfx942")
    assert [32 * a.num_warps for a in nv] == [64 * b.num_warps for b in gfx]
    for op in ("update", "importance"):
        for arch in ("sm_90", "gfx942"):
            for launch in _launches(op, dict(params="resnet18", mask="uint8") if op == "update"
                                    else dict(params="resnet18"), arch):
                assert launch.tile == 2048 and launch.aligned
                assert ("maxnreg" in launch.options) == (arch == "sm_90" and op == "update")  # NVIDIA only


@pytest.mark.parametrize("arch", ["sm_80", "sm_120", "gfx942"])
@pytest.mark.parametrize("D", [64, 3072, 8192, 150528])
def test_pgd_lanes_move_whole_16_byte_vectors(arch, D):
    t = target_of(arch)
    for dtype in ("float32", "float16"):
        (launch,) = _launches("pgd", dict(D=D, dtype=dtype), arch)
        per_lane = launch.tile // (t.warp_size * launch.num_warps)
        assert per_lane * torch.empty((), dtype=getattr(torch, dtype)).element_size() >= 16, (arch, D, dtype)
        assert launch.aligned and {o.name for o in launch.operands if o.written} == {"out"}


def test_anchor_path_refuses_more_anchors_than_it_holds():
    assert {launch.name for launch in _launches("alignment", dict(K=10, path="gram"), "gfx942")} == {
        "alignment.scalars", "alignment.gram_grad"}
    with pytest.raises(ValueError, match="path='anchors' holds at most 128 anchors"):
        _launches("alignment", dict(K=129, path="anchors"), "sm_90")


def test_launch_operands_are_typed():
    (launch,) = _launches("update", dict(params="resnet18", importance="uint8", mask="bool", momentum=0.9,
                                         dtype="bfloat16", grad_dtype="float32"), "sm_90")
    assert [(o.name, o.dtype, o.read, o.written) for o in launch.operands] == [
        ("param", torch.bfloat16, True, True), ("grad", torch.float32, True, False),
        ("ref_param", torch.bfloat16, True, False), ("importance", torch.uint8, True, False),
        ("grad_mask", torch.bool, True, False), ("momentum", torch.bfloat16, True, True)]
    assert launch.writes == (0, 5, 8)  # ψ and b slots, and the partials (tests/fused/test_traced_registration)
    frozen = _launches("update", dict(params="resnet18", frozen_head=True), "sm_90")
    assert any(not any(o.written for o in launch.operands) for launch in frozen)  # no gradient: ψ only read
    (imp,) = _launches("importance", dict(params="resnet18", dtype="float16"), "gfx942")
    assert [(o.name, o.written) for o in imp.operands] == [("importance", True), ("grad", False)]
    assert "param=bfloat16" in launch.describe() and "warps=" in launch.describe()


# ----------------------------------------------------------------------------- under the interpreter


@pytest.mark.parametrize("arch", ["gfx942", "sm_120"])
def test_other_targets_plans_compute_the_ops(monkeypatch, arch):
    """The launches planned for an AMD card (fp32 dots in 'ieee', its tiles) and for sm_120 give the
    same numbers as the fp64 oracle within PERFORMANCE.md's rule, under the interpreter (which
    computes fp32 products exactly in fp32, as 'ieee' does)."""
    if not validate.interpreter_enabled():
        pytest.skip("needs the Triton interpreter (a GPU runs its own target)")
    target = target_of(arch)
    planned = set()

    def planning_for(name):
        def device_target_(device):
            planned.add(name)
            return target
        return device_target_

    for entry in REGISTRY:
        module = __import__(entry.module, fromlist=["device_target"])
        monkeypatch.setattr(module, "device_target", planning_for(entry.name))
    rows = validate.run_validation(quick=False, backends=["triton"], device=torch.device("cpu"))
    failed = [r for r in rows if not r.passed]
    assert not failed, validate.format_table(failed)
    assert planned == set(OP_NAMES)  # every op's launcher planned for the target
    assert {r.op.split("[")[0].split(" ")[0] for r in rows} == set(validate.OP_NAMES)


# ----------------------------------------------------------------------------- the op registry


def test_every_op_declares_what_the_tools_need():
    assert OP_NAMES == ("similarity", "alignment", "importance", "update", "pgd")
    for entry in REGISTRY:
        d = declaration(entry.name)
        assert d.spec["dtype"] == SpecKey("dtype", "float32"), entry.name
        assert d.cases() and all(set(c) <= set(d.spec) for c in d.cases())
        assert d.validation(True) and len(d.validation(False)) >= len(d.validation(True))
        assert callable(getattr(fused, entry.function))  # the public API comes from the registry too
    assert validate.OP_NAMES == tuple(e.function for e in REGISTRY)
    from benchmarks.ops import OPS

    assert OPS == OP_NAMES


def _string_literals(path: Path):
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    for tok in tokens:
        if tok.type == tokenize.STRING:
            try:
                yield tok.start[0], eval(tok.string)  # noqa: S307 - a literal of our own source
            except Exception:  # noqa: BLE001 - f-strings and the like are no tables of names
                continue


def test_no_tool_lists_op_names():
    """Op names (and their modules and functions) appear as string literals only in their own module
    and the registry (fused/_ops.py): the tools (preflight, validate, the command line, the package's
    lazy exports, the shared kernel helpers) read them from the registry. (The module forms in nn.py
    and optim.py may say "importance", the method's word for their state, but name no op module or
    function.)"""
    qualified = {n for e in REGISTRY for n in (e.module, e.function)}
    names = qualified | {e.name for e in REGISTRY}
    own = {ROOT / (e.module.replace(".", "/") + ".py") for e in REGISTRY} | {ROOT / "fused" / "_ops.py"}
    wrappers = {ROOT / "fused" / "nn.py", ROOT / "fused" / "optim.py"}
    offenders = []
    for path in sorted((ROOT / "fused").rglob("*.py")):
        if path in own:
            continue
        for line, value in _string_literals(path):
            if isinstance(value, str) and value in (qualified if path in wrappers else names):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {value!r}")
    for path in sorted((ROOT / "benchmarks").glob("*.py")):   # the benchmarks take the op modules from it too
        offenders += [f"{path.relative_to(ROOT)}:{line}: {value!r}" for line, value in _string_literals(path)
                      if isinstance(value, str) and value in {e.module for e in REGISTRY}]
    assert not offenders, "\n".join(offenders)
    assert (ROOT / "fused" / "preflight" / "specs.py") not in own  # the tools are scanned


def test_launch_device_and_writes_survive():
    launch = Launch("x", None, (1,), (torch.empty(2, device="meta"), 3), {}, 1, writes=(0,))
    assert launch.device == torch.device("meta") and launch.writes == (0,)
    assert _targets.INTERPRETER_TARGET.name == "sm_90"
