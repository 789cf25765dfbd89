"""The data-parallel scaling model (benchmarks/scaling_model.py): counts and formulas on the CIFAR
ResNet-18 setup only (fast; the ViT-B/16 setup is exercised by running the module)."""

import json
import math

import pytest

from benchmarks import scaling_model as sm


@pytest.fixture(scope="module")
def cifar():
    return sm.model_setup(sm.SETUPS["cifar10_resnet18"])


def test_params_and_gradient_bytes(cifar):
    assert cifar["params"] == 11_173_962
    assert cifar["grad_bytes_per_step_fp32"] == 4 * cifar["params"]
    assert cifar["grad_bytes_per_step_bf16"] == 2 * cifar["params"]


def test_ring_allreduce_formula(cifar):
    nbytes = cifar["grad_bytes_per_step_fp32"]
    assert sm.ring_allreduce_bytes_per_gpu(nbytes, 1) == 0
    assert sm.ring_allreduce_bytes_per_gpu(nbytes, 8) == pytest.approx(2 * 7 / 8 * nbytes)
    rows = {r["world_size"]: r for r in cifar["rows"]}
    assert set(rows) == {1, 8, 64}
    assert rows[1]["allreduce_bytes_per_gpu_per_step_fp32"] == 0 and rows[1]["step_comm_ms_fp32"] == 0
    assert rows[8]["allreduce_bytes_per_gpu_per_step_fp32"] == pytest.approx(2 * 7 / 8 * nbytes)
    assert rows[64]["allreduce_bytes_per_gpu_per_step_fp32"] == pytest.approx(2 * 63 / 64 * nbytes)
    assert rows[8]["allreduce_bytes_per_gpu_per_step_bf16"] == pytest.approx(rows[8]["allreduce_bytes_per_gpu_per_step_fp32"] / 2)
    # link: NVLink within a node, InfiniBand across nodes
    a = sm.ASSUMPTIONS
    assert rows[8]["step_comm_ms_fp32"] == pytest.approx(1e3 * 2 * 7 / 8 * nbytes / (a["intra_node_bw_gbps"] * 1e9))
    assert rows[64]["step_comm_ms_fp32"] == pytest.approx(1e3 * 2 * 63 / 64 * nbytes / (a["inter_node_bw_gbps"] * 1e9))


def test_proxies_split_over_ranks(cifar):
    st = cifar["setup"]
    n = st["repetitions"] * st["k"]
    assert cifar["n_proxies"] == n == 2000
    for r in cifar["rows"]:
        assert r["proxies_per_gpu"] == math.ceil(n / r["world_size"])
        assert r["proxy_flops_per_gpu"] == r["proxies_per_gpu"] * cifar["proxy_flops_each"]
        # the forget batch is split like the proxy batch when it has at least one image per rank
        fb = min(st["forget_batch_size"], st["k"])
        assert r["forget_images_per_gpu_per_step"] == (-(-fb // r["world_size"]) if fb >= r["world_size"] else fb)
        assert r["proxy_images_per_gpu_per_step"] == math.ceil(st["proxy_batch_size"] / r["world_size"])
    assert cifar["rows"][0]["proxy_gen_s_per_gpu"] == pytest.approx(8 * cifar["rows"][1]["proxy_gen_s_per_gpu"])


def test_flops(cifar):
    f = cifar["flops_per_image"]
    assert 0.9e9 < f["fwd"] < 1.3e9                      # CIFAR ResNet-18: ~0.56 GMAC
    assert 2.5 <= f["fwd_bwd_params_input"] / f["fwd"] <= 3.5
    assert 2.5 <= f["fwd_bwd_params"] / f["fwd"] <= 3.5
    assert 1.5 <= f["fwd_bwd_input"] / f["fwd"] <= 2.5   # PGD: no weight gradients
    st = cifar["setup"]
    assert cifar["proxy_flops_each"] == st["pgd_steps"] * f["fwd_bwd_input"] + f["fwd"]


def test_markdown_and_json(tmp_path, monkeypatch):
    monkeypatch.setattr(sm, "SETUPS", {"cifar10_resnet18": sm.SETUPS["cifar10_resnet18"]})
    out = tmp_path / "m.json"
    assert sm.main(["--json", str(out), "--markdown", "--setups", "cifar10_resnet18"]) == 0
    data = json.loads(out.read_text())
    assert data["metadata"]["kind"] == "model, not measured"
    assert data["setups"][0]["params"] == 11_173_962
    text = sm.markdown(data)
    assert "model, not measured" in text and "400 TFLOP/s" in text and "25 GB/s" in text
    assert text.count("| CIFAR-10 resnet18_cifar |") == 3
