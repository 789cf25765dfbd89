"""The labelled model of the whole-run ratio on an H100 (benchmarks/gpu_ratio_model.py): the op
counter on toy ops, the time arithmetic against hand-computed values, the phase plan doing the
benchmark's work, the composition against the real recipes' FLOPs, and the report's labels.
A tiny CNN keeps it to seconds; the ResNet-18 numbers come from running the module."""

import math

import pytest
import torch
import torch.nn as nn

from benchmarks import gpu_ratio_model as gm
from benchmarks import whole_run as wr
from stakes.models import Classifier

A = gm.ASSUMPTIONS


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
    assert mm.bytes == 4 * (64 * 32 + 32 * 16 + 64 * 16)
    assert relu.flops == 0 and relu.bytes == 2 * 4 * 64 * 16     # read and written in place
    assert fused.bytes == 100.0 and u.bytes == mm.bytes + relu.bytes + 100.0
    assert u.flop_counter == u.flops == 2 * 64 * 32 * 16         # FlopCounterMode agrees


def test_time_of_an_op_and_a_unit():
    a = {**A, "matmul_efficiency": 0.5, "bw_efficiency": 0.8, "min_kernel_us": 2.0, "launch_us_eager": 5.0,
         "launch_us_graph": 0.0, "sync_us": 10.0}
    fp32_mm = gm.Op("aten.mm", "matmul", "float32", 1e12, 0.0)
    fp32_conv = gm.Op("aten.convolution", "conv", "float32", 1e12, 0.0)
    bf16_conv = gm.Op("aten.convolution", "conv", "bfloat16", 1e12, 0.0)
    assert gm.op_seconds(fp32_mm, a) == pytest.approx(1e12 / (790e12 / 15 * 0.5))   # plain fp32
    assert gm.op_seconds(fp32_conv, a) == pytest.approx(1e12 / (395e12 * 0.5))      # cuDNN's TF32
    assert gm.op_seconds(bf16_conv, a) == pytest.approx(1e12 / (790e12 * 0.5))
    copy = gm.Op("aten.add", "other", "float32", 0.0, 2.4e9)
    assert gm.op_seconds(copy, a) == pytest.approx(2.4e9 / (3.0e12 * 0.8)) == pytest.approx(1e-3)
    tiny_op = gm.Op("aten.add", "other", "float32", 0.0, 8.0)
    assert gm.op_seconds(tiny_op, a) == pytest.approx(2e-6)                            # the kernel floor
    # 1000 tiny kernels: eager is bound by the host (5 ms > 2 ms), a CUDA graph by the GPU
    unit = gm.Unit([tiny_op] * 1000, syncs=2)
    s = gm.unit_seconds(unit, a)
    assert s["gpu_s"] == pytest.approx(2e-3) and s["cpu_s"] == pytest.approx(5e-3)
    assert s["time_s"] == pytest.approx(5e-3 + 2 * 10e-6)
    unit.graph = True
    assert gm.unit_seconds(unit, a)["time_s"] == pytest.approx(2e-3 + 2 * 10e-6)
    # the what-if halves the non-matmul traffic and launches
    half = gm.unit_seconds(gm.Unit([copy] * 10), a, elementwise_scale=0.5)
    assert half["gpu_s"] == pytest.approx(5e-3) and half["cpu_s"] == pytest.approx(25e-6)


WORK = wr.Work(k=20, repetitions=3, pgd_steps=2, steps=10, importance_samples=70, test_size=600, batch=8,
               anchor_dim=16, label="test")


@pytest.fixture(scope="module")
def units():
    return gm.Units(tiny, anchor_dim=16, image_shape=(3, 8, 8))


def test_the_plan_does_the_benchmarks_work(units):
    """Each phase's units times their batch = the work the benchmark counts, for both recipes."""
    phases = gm.plan(WORK, units, pgd_batch=16, eval_chunk=512)
    exp = WORK.expected()

    def rows(recipe, phase, prefix):
        return sum(n * int(label.split(prefix)[1].split()[0].split("+")[-1])
                   for _, n, label in phases[recipe][phase].units if label.startswith(prefix.strip()))

    for recipe in ("authors", "stakes"):
        assert rows(recipe, "proxies", "PGD step, batch ") == exp["pgd_image_steps"] == 120
        assert rows(recipe, "importance", "importance batch ") == exp["importance_samples"] == 76
        assert sum(n for _, n, _ in phases[recipe]["steps"].units) == exp["optimisation_steps"] == 10
    # proxy rows of the steps: 7 batches of 8, the epoch's short one of 4, then 2 of 8
    assert rows("stakes", "steps", "step 8+") == 7 * 8 + 4 + 2 * 8
    # the authors: every PGD batch is one repetition's batch of <= 8 forget images; stakes batches them (16)
    assert {label for _, _, label in phases["authors"]["proxies"].units} == {"PGD step, batch 8", "PGD step, batch 4"}
    assert rows("stakes", "proxies", "success check, batch ") == WORK.n_proxies
    assert rows("authors", "evaluation", "eval batch ") == exp["evaluated_images"] == 3 * (20 + 600)
    assert rows("stakes", "evaluation", "eval chunk ") == exp["evaluated_images"]
    assert rows("stakes", "evaluation", "drift: original structure ") == 600        # once a run
    # the reference code's quirk: no L_reg on the first two steps of every epoch (steps 0, 1 and 8, 9)
    no_reg = sum(n for _, n, label in phases["authors"]["steps"].units if "without L_reg" in label)
    assert no_reg == 4
    assert all(u.graph for u, _, label in phases["stakes"]["proxies"].units if label.startswith("PGD"))


def test_prediction_arithmetic(units):
    pred = gm.predict(WORK, A, units)
    for recipe in ("authors", "stakes"):
        r = pred["recipes"][recipe]
        for p in wr.PHASES:
            want = sum(n * gm.unit_seconds(u, A)["time_s"] for u, n, _ in gm.plan(WORK, units)[recipe][p].units)
            assert r[p]["seconds"] == pytest.approx(want)
        assert r["whole"]["seconds"] == pytest.approx(sum(r[p]["seconds"] for p in wr.PHASES))
    for p in (*wr.PHASES, "whole"):
        assert pred["ratios"][p] == pytest.approx(pred["recipes"]["authors"][p]["seconds"] /
                                                  pred["recipes"]["stakes"][p]["seconds"])


def test_precisions_and_stakes_fused_kernels(units):
    """The authors' units run in fp32, stakes' in bf16 (its policy on sm_90), with its fused kernels."""
    a_pgd, s_pgd = units.unit("authors_pgd", 8), units.unit("stakes_pgd", 16, graph=True)
    assert {o.dtype for o in a_pgd.ops if o.kind == "conv"} == {"float32"}
    assert {o.dtype for o in s_pgd.ops if o.kind == "conv"} == {"bfloat16"}
    assert [o.name for o in s_pgd.ops].count("fused.l2_pgd_step") == 1
    assert any(o.name.startswith("autocast cast") for o in s_pgd.ops)
    step = units.unit("stakes_step", 8, 8)
    assert [o.name for o in step.ops].count("fused masked update (StructureSGD)") == 1
    assert units.unit("authors_step", 8, 8, 1).syncs == 1 and step.syncs == 0   # their .item() a step


def test_the_composition_matches_the_real_recipes_flops():
    check = gm.composition_check(wr.Work(k=4, repetitions=2, pgd_steps=2, steps=3, importance_samples=10,
                                         test_size=6, batch=4, anchor_dim=16, label="t"),
                                 model_builder=tiny, image_shape=(3, 8, 8))
    for recipe in ("authors", "stakes"):
        assert check[recipe]["counted_flops"] > 0
        assert check[recipe]["modelled_flops"] == pytest.approx(check[recipe]["counted_flops"], rel=1e-9)
        assert check[recipe]["modelled_kernels"] <= check[recipe]["counted_kernels"]


def test_the_report_is_labelled_a_model(units, monkeypatch):
    monkeypatch.setattr(gm, "Units", lambda anchor_dim=512, **kw: units)
    small = wr.replace(WORK, anchor_dim=16)
    monkeypatch.setattr(wr, "full_work", lambda k=256: wr.replace(small, k=k, label=f"k={k}"))
    report = gm.build_report(small, other_ks=(10,))
    assert report["kind"].startswith("MODEL, not a measurement") and report["assumptions"]["kind"].startswith("MODEL")
    assert report["predictions_by_size"][1]["work"]["k"] == 10
    assert set(report["sensitivity"]) == set(gm.SENSITIVITY)
    text = gm.markdown(report)
    assert text.startswith("### Whole run on an H100: MODEL, not a measurement")
    assert text.rstrip().endswith("Every time above is modelled, not measured.")
    assert math.isclose(report["sensitivity"]["central"]["ratios"]["whole"], report["prediction"]["ratios"]["whole"])
