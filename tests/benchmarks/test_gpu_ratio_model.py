"""The labelled model of the whole-run ratio on an H100 (benchmarks/gpu_ratio_model.py): the op
counter and the pointwise fusion on toy ops, the time arithmetic and the efficiency curve against
hand-computed values, the calibration reproducing the cited figures, the phase plan doing the
benchmark's work, the composition against the real recipes' FLOPs, sensitivity cases that move one
recipe at a time, the floor below every recipe, and the report's labels. A tiny CNN keeps it to
seconds; the ResNet-18 numbers come from running the module."""

import math

import pytest
import torch
import torch.nn as nn

from benchmarks import gpu_ratio_model as gm
from benchmarks import whole_run as wr
from stakes.models import Classifier

A = gm.ASSUMPTIONS
P = A["recipes"]["authors"]
EFF = {"tf32_nchw": 0.25, "16bit_nhwc": 0.5}


def tiny():
    f = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(8, 16), nn.ReLU())
    return Classifier(f, nn.Linear(16, 10))


def test_the_op_counter_on_toy_ops():
    a = torch.empty(64, 32, device="meta")
    b = torch.empty(32, 16, device="meta")

    def run(oc):
        c = a @ b
        c.t().relu_()                  # a view (no kernel) then an in-place op
        oc.add("fused kernel", bytes_=100.0)

    u = gm.count(run)
    names = [o.name for o in u.ops]
    assert names == ["aten.mm", "aten.relu_", "fused kernel"] and u.kernels == 3
    mm, relu, fused = u.ops
    assert mm.kind == "matmul" and mm.dtype == "float32" and mm.flops == 2 * 64 * 32 * 16
    assert mm.gemms == [(64, 16, 32)]
    assert mm.bytes == 4 * (64 * 32 + 32 * 16 + 64 * 16)
    assert relu.flops == 0 and relu.bytes == 2 * 4 * 64 * 16     # read and written in place
    assert fused.bytes == 100.0 and u.bytes == mm.bytes + relu.bytes + 100.0
    assert u.flop_counter == u.flops == 2 * 64 * 32 * 16         # FlopCounterMode agrees


def test_convolution_gemms_and_layout():
    """A convolution's implicit GEMMs: forward (N·H·W, C_out, C_in·k²), input gradient (N·H·W, C_in,
    C_out·k²), weight gradient (C_out, C_in·k², N·H·W); channels_last inputs are NHWC."""
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False).to("meta")
    x = torch.empty(4, 8, 10, 10, device="meta", requires_grad=True)

    def run(oc):
        conv(x).sum().backward()

    u = gm.count(run)
    fwd = next(o for o in u.ops if o.name == "aten.convolution")
    bwd = next(o for o in u.ops if o.name == "aten.convolution_backward")
    assert fwd.gemms == [(400, 16, 72)] and fwd.layout == "nchw"
    assert bwd.gemms == [(400, 8, 144), (16, 72, 400)]
    assert sum(2 * m * n * k for m, n, k in fwd.gemms) == fwd.flops
    assert sum(2 * m * n * k for m, n, k in bwd.gemms) == bwd.flops
    xl = torch.empty(4, 8, 10, 10, device="meta", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    convl = nn.Conv2d(8, 16, 3, padding=1).to("meta", torch.bfloat16).to(memory_format=torch.channels_last)
    u = gm.count(lambda oc: convl(xl))
    assert u.ops[0].layout == "nhwc" and u.ops[0].dtype == "bfloat16"
    # a channels_last network stays NHWC layer after layer, forward and backward, as cuDNN runs it on a
    # card (torch's meta convolution returns contiguous outputs: the counter restrides them)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 4, 1)).to("meta", torch.bfloat16).to(memory_format=torch.channels_last)
    xg = xl.detach().requires_grad_(True)
    seen = {}

    def layered(oc):
        y = net(xg)
        seen["out"] = y
        y.float().sum().backward()

    u = gm.count(layered)
    convs = [o for o in u.ops if o.kind == "conv"]
    assert len(convs) == 6 and all(o.layout == "nhwc" for o in convs), [o.layout for o in convs]
    assert seen["out"].is_contiguous(memory_format=torch.channels_last) and not seen["out"].is_contiguous()
    assert xg.grad.is_contiguous(memory_format=torch.channels_last)
    # an NCHW network stays NCHW
    u = gm.count(lambda oc: nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 4, 3)).to("meta")(x))
    assert [o.layout for o in u.ops if o.kind == "conv"] == ["nchw", "nchw"]


def test_pointwise_fusion():
    """conv → bias add → residual add → relu → conv: the three pointwise ops become one kernel that
    reads the conv output and the residual once and writes the relu's output once (the next conv
    reads it); a tensor only used inside the group is never written."""
    w1 = torch.empty(8, 8, 3, 3, device="meta")
    x = torch.empty(2, 8, 6, 6, device="meta")
    bias = torch.empty(1, 8, 1, 1, device="meta")

    def run(oc):
        y = torch.nn.functional.conv2d(x, w1, padding=1)
        z = torch.relu((y + bias) + x)
        torch.nn.functional.conv2d(z, w1, padding=1)

    u = gm.count(run)
    fused = gm.fuse_pointwise(u.ops)
    assert [o.name for o in u.ops] == ["aten.convolution", "aten.add", "aten.add", "aten.relu", "aten.convolution"]
    assert [o.name for o in fused] == ["aten.convolution", "fused pointwise (3 ops)", "aten.convolution"]
    act = 2 * 8 * 6 * 6 * 4
    assert fused[1].bytes == act + 8 * 4 + act + act     # y, bias, x read; relu(...) written
    assert fused[1].kernels == 1 and sum(o.bytes for o in u.ops[1:4]) > fused[1].bytes
    assert sum(o.flops for o in fused) == u.flops


def test_time_of_an_op_and_a_unit():
    card = A["card"]
    fp32_mm = gm.Op("aten.mm", "matmul", "float32", 2.0 * 4096 ** 3, 0.0, gemms=[(4096, 4096, 4096)])
    tf32_conv = gm.Op("aten.convolution", "conv", "float32", 2.0 * 4096 ** 3, 0.0, gemms=[(4096, 4096, 4096)])
    bf16_conv = gm.Op("aten.convolution", "conv", "bfloat16", 2.0 * 4096 ** 3, 0.0, gemms=[(4096, 4096, 4096)],
                      layout="nhwc")
    f = 2.0 * 4096 ** 3
    assert gm.op_seconds(fp32_mm, A, P, EFF) == pytest.approx(f / (card["fp32_tflops"] * 1e12 * 0.25))
    assert gm.op_seconds(tf32_conv, A, P, EFF) == pytest.approx(f / (card["tf32_tflops"] * 1e12 * 0.25))
    assert gm.op_seconds(bf16_conv, A, P, EFF) == pytest.approx(f / (card["bf16_tflops"] * 1e12 * 0.5))
    # a recipe's own convolution efficiency scale moves its convolutions only
    assert gm.op_seconds(tf32_conv, A, {**P, "conv_eff_scale": 2.0}, EFF) == pytest.approx(
        gm.op_seconds(tf32_conv, A, P, EFF) / 2)
    copy = gm.Op("aten.add", "other", "float32", 0.0, 2.68e9)
    assert gm.op_seconds(copy, A, P, EFF) == pytest.approx(2.68e9 / (card["hbm_tbps"] * 1e12 * 0.8))
    tiny_op = gm.Op("aten.add", "other", "float32", 0.0, 8.0)
    assert gm.op_seconds(tiny_op, A, P, EFF) == pytest.approx(2e-6)                            # the kernel floor
    # 1000 tiny kernels: eager is bound by the host (5 ms > 2 ms), a CUDA graph by the GPU; two syncs, a copy
    unit = gm.Unit([tiny_op] * 1000, syncs=2, copies=[(25e6, True)])
    s = gm.unit_seconds(unit, A, P, EFF)
    assert s["gpu_s"] == pytest.approx(2e-3) and s["cpu_s"] == pytest.approx(5e-3)
    assert s["time_s"] == pytest.approx(5e-3 + 3 * 10e-6 + 25e6 / 25e9)
    unit.graph = True
    assert gm.unit_seconds(unit, A, P, EFF)["time_s"] == pytest.approx(2e-3 + 3 * 10e-6 + 1e-3)
    # host loading adds to the host side; CUDA_LAUNCH_BLOCKING serialises host and GPU
    unit = gm.Unit([tiny_op] * 1000, host_s=1e-3)
    assert gm.unit_seconds(unit, A, P, EFF)["cpu_s"] == pytest.approx(6e-3)
    assert gm.unit_seconds(unit, A, {**P, "launch_blocking": True}, EFF)["time_s"] == pytest.approx(8e-3)


def test_the_wave_fill_and_the_efficiency_curve_are_monotone_in_batch_size():
    sms = A["card"]["sms"]
    assert gm.wave_fill(128 * 132, 128, 64, A) == (1.0, 1)                  # one full wave of tiles
    assert gm.wave_fill(128, 128, 64, A) == (pytest.approx(1 / sms), 1)    # one tile, K too short to split
    assert gm.wave_fill(128, 128, 256 * 200, A) == (1.0, sms)              # split along K to fill the SMs
    for n, k in ((64, 576), (512, 4608), (10, 512)):
        fills = [gm.wave_fill(m, n, k, A)[0] for m in range(16, 40000, 97)]
        assert all(b >= a for a, b in zip(fills, fills[1:]))
    units = gm.Units(tiny, anchor_dim=16, image_shape=(3, 8, 8))
    for cls in ("tf32_nchw", "16bit_nhwc"):
        curve = [gm.forward_efficiency(units, b, cls, A, EFF) for b in (1, 2, 4, 16, 64, 256, 1024, 4096)]
        assert all(b >= a - 1e-12 for a, b in zip(curve, curve[1:])), curve
        assert curve[0] < 0.1 * curve[-1] and 0 < curve[-1] <= EFF[cls] + 1e-9


def test_the_calibration_reproduces_the_cited_figures():
    """e for TF32 NCHW and 16-bit NHWC: the model's ResNet-50 step on the A100 gives NVIDIA's published
    images/s (938 and 2470), and 16-bit NHWC convolutions reach a larger fraction of their peak."""
    cal = gm.calibrate()
    for cls, point in gm.CALIBRATION["points"].items():
        assert cal[cls]["modelled_images_per_s"] == pytest.approx(point["images_per_s"], rel=1e-6)
        assert 0.05 < cal[cls]["e"] < 1.0
        assert 0.3 < cal[cls]["conv_share_of_step"] < 0.9
    assert cal["16bit_nhwc"]["e"] > cal["tf32_nchw"]["e"]
    assert cal["tf32_nchw"]["step_flops"] == pytest.approx(256 * 3 * 2 * 4.09e9, rel=0.05)   # ResNet-50: ~4.1 GMAC


WORK = wr.Work(k=20, repetitions=3, pgd_steps=2, steps=10, importance_samples=70, test_size=600, batch=8,
               anchor_dim=16, retain_size=30, label="test")


@pytest.fixture(scope="module")
def units():
    return gm.Units(tiny, anchor_dim=16, image_shape=(3, 8, 8))


def _rows(phases, recipe, phase, prefix):
    total = 0
    for _, n, label in phases[recipe][phase].units:
        if label.startswith(prefix):
            total += n * int(label[len(prefix):].split()[0].split("+")[-1].rstrip(":"))
    return total


def test_the_plan_does_each_recipes_work(units):
    """Each phase's units times their batch = the work each recipe does (benchmarks/whole_run.Work)."""
    phases = gm.plan(WORK, units, pgd_batch=16, eval_chunk=512)
    a = WORK.expected_authors()
    for recipe in ("authors", "stakes"):
        assert _rows(phases, recipe, "proxies", "PGD step, batch ") == a["pgd_image_steps"] == 120
        assert sum(n for _, n, label in phases[recipe]["steps"].units if label.startswith("step ")) == 10
    # the authors: their loader cycled to N_tot; one repetition of one forget batch at a time; weight gradients
    assert _rows(phases, "authors", "importance", "importance batch ") == a["importance_samples"] == 76
    assert {label for _, _, label in phases["authors"]["proxies"].units if label.startswith("PGD")} == \
        {"PGD step, batch 8 (weight gradients too)", "PGD step, batch 4 (weight gradients too)"}
    # stakes: each distinct batch once (stakes' own plan), PGD batched (16), its success check and S^ori once
    assert _rows(phases, "stakes", "importance", "importance batch ") == 60
    assert _rows(phases, "stakes", "proxies", "success check, batch ") == WORK.n_proxies
    assert _rows(phases, "stakes", "proxies", "the proxies' S^ori once, chunk ") == WORK.n_proxies
    assert all(u.graph for u, _, label in phases["stakes"]["proxies"].units if label.startswith("PGD"))
    # the authors' steps: their forget loader's partial batch (8, 8, 4 cycled), SR left out on an epoch's first two
    forget_rows = sum(n * int(label.split()[1].split("+")[0]) for _, n, label in phases["authors"]["steps"].units
                      if label.startswith("step "))
    assert forget_rows == a["step_forget_rows"] == 8 + 8 + 4 + 8 + 8 + 4 + 8 + 8 + 4 + 8
    assert _rows(phases, "authors", "steps", "step ") == 7 * 8 + 4 + 2 * 8      # the proxy rows
    no_reg = sum(n for _, n, label in phases["authors"]["steps"].units if "without L_reg" in label)
    assert no_reg == 4
    # evaluation: the authors' 2 stop checks + the final forget set, D_r and the test set; stakes' epoch-end
    # checks (2 epochs) and the same final sets
    ev = sum(n * int(label.split("batch ")[1].split()[0].rstrip(":")) for _, n, label in
             phases["authors"]["evaluation"].units)
    assert ev == a["evaluated_images"] == 2 * 20 + 20 + 30 + 600
    assert _rows(phases, "stakes", "evaluation", "final evaluation chunk ") == 20 + 30 + 600
    assert sum(n for _, n, label in phases["stakes"]["evaluation"].units if label.startswith("stop check")) == 2
    # the authors' host work: PIL for every forget / D_r / test image they load, copies on every step
    host = [(u.host_s, n) for u, n, _ in phases["authors"]["evaluation"].units]
    assert sum(h * n for h, n in host) == pytest.approx((3 * 20 + 30 + 600) * A["host_pil_image_us"] * 1e-6
                                                        + 630 * 4 * 192 / (A["pin_gbps"] * 1e9))
    assert all(len(u.copies) == 5 for u, _, label in phases["authors"]["steps"].units if label.startswith("step "))


def test_the_authors_pgd_computes_weight_gradients_and_stakes_does_not(units):
    """Their PGD step's backward runs both GEMMs of every convolution (input and weight gradients) and
    accumulates the weight gradients; stakes' runs the input gradient alone, on the folded copy."""
    a_pgd = units.unit("authors_pgd", 8)
    s_pgd = units.unit("stakes_pgd", 8, graph=True, fuse=True)
    a_bwd = [o for o in a_pgd.ops if o.name == "aten.convolution_backward"]
    s_bwd = [o for o in s_pgd.ops if o.name == "aten.convolution_backward"]
    assert a_bwd and all(len(o.gemms) == 2 for o in a_bwd)
    assert s_bwd and all(len(o.gemms) == 1 for o in s_bwd)
    assert {o.dtype for o in a_pgd.ops if o.kind == "conv"} == {"float32"}
    assert {o.dtype for o in s_pgd.ops if o.kind == "conv"} == {"bfloat16"}
    assert units.folded and not any("batch_norm" in o.name for o in s_pgd.ops)       # BatchNorm folded
    assert any("batch_norm" in o.name for o in a_pgd.ops)
    assert [o.name for o in s_pgd.ops].count("fused.l2_pgd_step") == 1
    assert a_pgd.flop_counter == a_pgd.flops and s_pgd.flop_counter == s_pgd.flops    # FlopCounterMode agrees
    step = units.unit("stakes_step", 8, 8)
    assert [o.name for o in step.ops].count("fused masked update (StructureSGD)") == 1
    # every unit of both recipes agrees with FlopCounterMode
    phases = gm.plan(WORK, units)
    for recipe in ("authors", "stakes"):
        for phase in phases[recipe].values():
            for u, _, label in phase.units:
                assert u.flop_counter == pytest.approx(u.flops, rel=1e-9, abs=1e-9), (recipe, label)


def test_sensitivity_cases_move_one_recipe_at_a_time(units):
    """A case that changes one recipe's parameters changes that recipe's time and not the other's; a
    case that slows only the authors' convolutions raises their time and the ratio."""
    phases = gm.plan(WORK, units)
    central = gm.predict(WORK, A, units, phases, EFF)

    def whole(pred, r):
        return pred["recipes"][r]["whole"]["seconds"]

    moved = {"authors": 0, "stakes": 0}
    for name, case in gm.SENSITIVITY.items():
        ph = gm.plan(WORK, units, **case["plan"]) if case["plan"] else phases
        pred = gm.predict(WORK, gm.with_case(A, case), units, ph, EFF)
        touches_authors = bool(case["authors"]) or bool(case["card"])
        touches_stakes = bool(case["stakes"]) or bool(case["plan"]) or bool(case["card"])
        if not touches_authors:
            assert whole(pred, "authors") == pytest.approx(whole(central, "authors"), rel=1e-12), name
        if not touches_stakes:
            assert whole(pred, "stakes") == pytest.approx(whole(central, "stakes"), rel=1e-12), name
        for r in moved:
            moved[r] += whole(pred, r) != pytest.approx(whole(central, r), rel=1e-9)
    assert moved["authors"] >= 3 and moved["stakes"] >= 3
    slow = gm.predict(WORK, gm.with_case(A, gm._case(authors={"conv_eff_scale": 1e-4})), units, phases, EFF)
    assert whole(slow, "authors") > whole(central, "authors") and whole(slow, "stakes") == whole(central, "stakes")
    assert slow["ratios"]["whole"] > central["ratios"]["whole"]


def test_the_floor_is_below_every_recipes_time(units):
    phases = gm.plan(WORK, units)
    floor = gm.job_floor(A, phases)
    assert floor["floor_s"] >= max(floor["flops_at_peak_s"], floor["bytes_at_bandwidth_s"]) * 0.999
    assert floor["floor_s"] <= floor["flops_at_peak_s"] + floor["bytes_at_bandwidth_s"]
    assert floor["flops"] == pytest.approx(sum(n * u.flops for ph in phases["stakes"].values() for u, n, _ in ph.units))
    for name, case in gm.SENSITIVITY.items():
        ph = gm.plan(WORK, units, **case["plan"]) if case["plan"] else phases
        pred = gm.predict(WORK, gm.with_case(A, case), units, ph, EFF)
        for r in ("authors", "stakes"):
            assert floor["floor_s"] < pred["recipes"][r]["whole"]["seconds"], (name, r)


def test_prediction_arithmetic(units):
    phases = gm.plan(WORK, units)
    pred = gm.predict(WORK, A, units, phases, EFF)
    for recipe in ("authors", "stakes"):
        r = pred["recipes"][recipe]
        for p in wr.PHASES:
            want = sum(n * gm.unit_seconds(u, A, A["recipes"][recipe], EFF)["time_s"]
                       for u, n, _ in phases[recipe][p].units)
            assert r[p]["seconds"] == pytest.approx(want)
        assert r["whole"]["seconds"] == pytest.approx(sum(r[p]["seconds"] for p in wr.PHASES))
    for p in (*wr.PHASES, "whole"):
        assert pred["ratios"][p] == pytest.approx(pred["recipes"]["authors"][p]["seconds"] /
                                                  pred["recipes"]["stakes"][p]["seconds"])


def test_the_composition_matches_the_real_recipes_flops():
    """Both recipes run whole on the CPU under the op counter count the FLOPs the model composes."""
    check = gm.composition_check(wr.Work(k=4, repetitions=2, pgd_steps=2, steps=3, importance_samples=10,
                                         test_size=6, batch=2, anchor_dim=16, retain_size=5, label="t"),
                                 model_builder=tiny, image_shape=(3, 8, 8))
    for recipe in ("authors", "stakes"):
        assert check[recipe]["counted_flops"] > 0
        assert check[recipe]["modelled_flops"] == pytest.approx(check[recipe]["counted_flops"], rel=1e-9)
        assert check[recipe]["modelled_kernels"] <= check[recipe]["counted_kernels"]


def test_the_report_is_labelled_a_model(units, monkeypatch):
    monkeypatch.setattr(gm, "Units", lambda builder=None, anchor_dim=512, a=None, **kw: units)
    monkeypatch.setattr(gm, "calibrate", lambda a=None: {k: {"e": v} for k, v in EFF.items()})
    small = wr.replace(WORK, anchor_dim=16)
    monkeypatch.setattr(wr, "full_work", lambda k=256: wr.replace(small, k=k, label=f"k={k}"))
    report = gm.build_report(small, other_ks=(10,), networks=("custom",), builders={"custom": tiny})
    assert report["kind"].startswith("MODEL, not a measurement") and report["assumptions"]["kind"].startswith("MODEL")
    assert report["predictions_by_size"][1]["work"]["k"] == 10
    assert set(report["sensitivity"]) == set(gm.SENSITIVITY)
    assert report["headline"] == "custom" and set(report["targets"]) == {
        "ratio_at_least_5", "no_case_below_4", "stakes_at_least_40_percent_of_floor"}
    row = report["networks"]["custom"]
    assert row["efficiency_curve"]["batches"][0] == 1 and len(row["efficiency_curve"]["tf32_nchw"]) == 12
    assert row["authors_under_cuda_launch_blocking"]["seconds"] > row["prediction"]["recipes"]["authors"]["whole"][
        "seconds"]
    text = gm.markdown(report)
    assert text.startswith("### Whole run on an H100: MODEL, not a measurement")
    assert text.rstrip().endswith("Every time above is modelled, not measured.")
    assert math.isclose(report["sensitivity"]["central"]["ratios"]["whole"], report["prediction"]["ratios"]["whole"])
