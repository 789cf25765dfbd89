"""Data-parallel runs on torch.distributed (gloo, 2 CPU processes) against the single-process run:
the proxy set, StructGuard's importance, the parameters after a few steps (stable and paper
presets, the latter through the all-reduce BatchNorm; SalUn's per-step random labels; forget
batches split over the ranks and computed whole), and the launch checks (the resume across world
sizes is in test_distributed_cli.py). The command-line runs under torchrun are in test_distributed_cli.py."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from stakes import distributed as dist_

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(**over):
    from stakes.methods import preset

    values = dict(repetitions=4, pgd_steps=5, eps=None, max_steps=4, log_every=2, progress=False,
                  stop_warmup_steps=100, backend="reference", proxy_batch_size=7, forget_batch_size=4,
                  importance_samples=20, seed=3)
    values.update(over)
    name = values.pop("preset", "stable")
    return preset(name, **values)


def _inputs(path):
    return torch.load(path, weights_only=False)


def _jobs(inputs, *, distributed):
    """What both the workers and the single-process reference compute: {name: tensors}."""
    from stakes.methods import build_proxies, unlearn
    from tests.stakes.runs import prepared

    model, fx, fy, anchors = inputs["model"], inputs["fx"], inputs["fy"], inputs["anchors"]
    out = {}
    proxies, _ = build_proxies(model, fx, fy, _config(), distributed=distributed)
    out["proxy_x"], out["proxy_y"], out["eps"] = proxies.x, proxies.y, torch.tensor(proxies.eps)
    early, _ = build_proxies(model, fx, fy, _config(eps=1.0, pgd_steps=8, pgd_early_exit=True), distributed=distributed)
    out["early_x"], out["early_steps"] = early.x, early.steps
    # importance on the calibrated proxies (warm start: the structure's own sensitivity)
    cfg = _config()
    run = prepared(model, (fx, fy), "structguard", anchors, cfg, proxies=proxies, retain_size=1000,
                   distributed=distributed)
    run.ctx.projector is None or run.ctx.projector.warm_start()
    imp = run.method.importance(run.ctx)
    out["importance"] = torch.cat([v.flatten() for v in imp.values()])
    # forget batches of 4 are split over the ranks; one of 1 is computed whole on every rank
    for name, preset_name, method, fbs in (("stable", "stable", "structguard", 4), ("paper", "paper", "structguard", 4),
                                           ("salun", "stable", "salun", 4), ("whole_forget", "stable", "adv", 1)):
        res = unlearn(model, (fx, fy), method=method, anchors=anchors, proxies=proxies, retain_size=1000,
                      config=_config(preset=preset_name, eps=1.0, forget_batch_size=fbs), distributed=distributed)
        out[f"params_{name}"] = torch.cat([p.detach().flatten() for p in res.deployed.parameters()])
        out[f"loss_{name}"] = torch.tensor([e["loss"] for e in res.history if "loss" in e])
        out[f"world_{name}"] = torch.tensor(res.distributed["world_size"])
    return out


def _worker(rank, world, port, inputs_path, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = _jobs(_inputs(inputs_path), distributed=None)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def dist_inputs(digits_model, digits_anchors, digits, tmp_path_factory):
    from stakes.data import sample_forget_indices

    idx = sample_forget_indices(digits.train_y, 8, 5)
    path = tmp_path_factory.mktemp("dist") / "inputs.pt"
    torch.save({"model": digits_model, "fx": digits.train_x[idx], "fy": digits.train_y[idx],
                "anchors": digits_anchors}, path)
    return path


@pytest.fixture(scope="module")
def two_ranks(dist_inputs, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist_out")
    mp.start_processes(_worker, args=(2, _free_port(), str(dist_inputs), str(out_dir)), nprocs=2, join=True,
                       start_method="spawn")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def one_rank(dist_inputs):
    torch.set_num_threads(1)
    try:
        return _jobs(_inputs(dist_inputs), distributed=False)
    finally:
        torch.set_num_threads(max(1, os.cpu_count() or 1))


def test_proxies_equal_single_process(two_ranks, one_rank):
    for out in two_ranks:   # every rank holds the whole set
        assert out["eps"] == one_rank["eps"]
        assert torch.equal(out["proxy_y"], one_rank["proxy_y"])
        torch.testing.assert_close(out["proxy_x"], one_rank["proxy_x"], rtol=0, atol=1e-5)
    assert one_rank["proxy_x"].shape[0] == 32


def test_early_exit_proxies_and_their_steps_equal_single_process(two_ranks, one_rank):
    """With PGD early exit each rank attacks its slice and the step counts are gathered with the proxies."""
    steps = one_rank["early_steps"]
    assert steps.shape == (32,) and int(steps.min()) < 8   # some proxies left their batch early
    for out in two_ranks:
        assert torch.equal(out["early_steps"], steps)
        torch.testing.assert_close(out["early_x"], one_rank["early_x"], rtol=0, atol=1e-5)


def test_importance_reduces_gradients_before_abs(two_ranks, one_rank):
    ref = one_rank["importance"]
    assert ref.abs().sum() > 0
    for out in two_ranks:
        torch.testing.assert_close(out["importance"], ref, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name", ["stable", "paper", "salun", "whole_forget"])
def test_params_after_steps_equal_single_process(two_ranks, one_rank, name):
    ref = one_rank[f"params_{name}"]
    r0, r1 = (out[f"params_{name}"] for out in two_ranks)
    assert torch.equal(r0, r1), "the ranks' parameters diverged"
    torch.testing.assert_close(r0, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(two_ranks[0][f"loss_{name}"], one_rank[f"loss_{name}"], rtol=1e-4, atol=1e-6)
    assert int(two_ranks[0][f"world_{name}"]) == 2 and int(one_rank[f"world_{name}"]) == 1


class _Relabel:   # built in the worker: "relabel" is a mean over the forget batch, not declared as such
    @staticmethod
    def make():
        import torch.nn.functional as F

        from stakes.methods import UnlearningMethod

        class Relabel(UnlearningMethod):
            def loss_terms(self, run, batch):
                return {"relabel": F.cross_entropy(run.deployed(batch.forget_x), (batch.forget_y + 1) % 10),
                        "retention": F.cross_entropy(run.deployed(batch.proxy_x), batch.proxy_y)}

        return Relabel()


def _refused_worker(rank, world, port, inputs_path, out_dir, case):
    """A run that every rank must refuse with a ValueError; each rank writes the message."""
    from stakes.methods import unlearn

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    inputs = _inputs(inputs_path)
    if case == "mismatch":   # rank 1 was given another learning rate
        method, cfg = "adv", _config(eps=1.0, lr=0.005 * (1 + rank))
    else:
        method, cfg = _Relabel.make(), _config(eps=1.0)
    try:
        unlearn(inputs["model"], (inputs["fx"], inputs["fy"]), method=method, anchors=inputs["anchors"], config=cfg)
        message = "no error"
    except ValueError as err:
        message = str(err)
    finally:
        torch.distributed.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as fh:
        fh.write(message)


def _refusals(case, dist_inputs, out_dir) -> list:
    mp.start_processes(_refused_worker, args=(2, _free_port(), str(dist_inputs), str(out_dir), case), nprocs=2,
                       join=True, start_method="spawn")
    return [(out_dir / f"rank{rank}.txt").read_text() for rank in range(2)]


def test_undeclared_shard_dependent_term_is_reported(dist_inputs, tmp_path):
    for text in _refusals("undeclared", dist_inputs, tmp_path):
        assert "loss term(s) ['relabel'] differ between ranks at the first step" in text, text
        assert "forget_terms" in text


def test_mismatched_configs_are_refused_on_every_rank(dist_inputs, tmp_path):
    for text in _refusals("mismatch", dist_inputs, tmp_path):
        assert "mismatched launch: the ranks of this adv run were given different config" in text, text


def test_shard_range_covers_everything():
    for n in (0, 1, 5, 7, 160):
        for w in (1, 2, 3, 8):
            parts = [dist_.shard_range(n, r, w) for r in range(w)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(h - lo for lo, h in parts) - min(h - lo for lo, h in parts) <= 1


def test_world_size_checks_name_the_limit():
    ctx = dist_.DistContext(rank=0, world_size=4, backend="gloo")
    with pytest.raises(ValueError, match=r"world size 4 > 3 \(forget image, repetition\) pairs"):
        dist_.world_size_check(3, 3, ctx)
    with pytest.raises(ValueError, match=r"world size 4 > 2, the smallest global proxy batch"):
        dist_.world_size_check(10, 2, ctx)
    dist_.world_size_check(10, 4, ctx)


def test_resolve_rejects_bad_values():
    assert dist_.resolve(False) is dist_.SINGLE
    assert not dist_.resolve(None).enabled
    with pytest.raises(ValueError, match="needs an initialised process group"):
        dist_.resolve(True)
    with pytest.raises(TypeError, match="distributed must be"):
        dist_.resolve("gloo")
