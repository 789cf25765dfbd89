"""The README's Python examples run as written (in order, in one namespace, on the bundled data)."""

import re
from pathlib import Path

import pytest
import torch

import stakes

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks() -> list:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def user_method_block() -> str:
    """The README's complete user method (also run by tests/stakes/test_registry.py and, as a
    --plugin file, by tests/stakes/test_cli_models.py)."""
    return next(b for b in _python_blocks() if "stakes.register_method(" in b)


def test_readme_has_the_api_examples():
    blocks = _python_blocks()
    assert len(blocks) == 4 and "stakes.unlearn(" in blocks[0] and "fused.masked_regularized_sgd_step(" in blocks[2]
    assert "class NearestWrongClass(stakes.UnlearningMethod)" in blocks[1] == user_method_block()
    assert "authors.build(" in blocks[3] and 'stakes.preset("authors")' in blocks[3]


def test_readme_authors_block_loads_their_checkpoint(tmp_path, monkeypatch):
    """The README's authors' block, on a checkpoint saved as their StructGuard script saves it (the
    ModelWrapper's keys): the network loads strictly and the run gets the authors' preset. The run
    itself is replaced by a recorder here (its CIFAR-sized run is test_authors.py's end-to-end test)."""
    from stakes import authors

    block = _python_blocks()[3]
    saved = authors.build("cifar10_resnet18", num_classes=10).state_dict()
    wrapped = {f"model.{k}": v for k, v in saved.items()}
    wrapped.update({k: v for k, v in saved.items() if k.startswith("fc.")})   # their wrapper's own fc
    torch.save(wrapped, tmp_path / "resnet18.pt")
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(stakes, "unlearn", lambda net, forget, **kw: calls.append((net, forget, kw)) or "ran")
    forget_set, anchors = (torch.rand(2, 3, 32, 32), torch.tensor([0, 1])), torch.randn(10, 384)
    ns = {"torch": torch, "stakes": stakes, "forget_set": forget_set, "anchors": anchors}
    exec(compile(block, str(README), "exec"), ns)
    (net, forget, kw), = calls
    assert ns["result"] == "ran" and forget is forget_set and kw["anchors"] is anchors
    assert kw["config"] == stakes.preset("authors")
    for name, value in net.state_dict().items():
        assert torch.equal(value, saved[name]), name


@pytest.mark.slow
def test_readme_python_examples_run(stakes_cache, digits_model, monkeypatch):
    monkeypatch.setenv("STAKES_CACHE", str(stakes_cache))   # the session's pretrained digits model
    from stakes.methods import unregister_method

    ns: dict = {}
    try:
        for block in _python_blocks()[:3]:   # the 4th, the authors' network: test_readme_authors_block_loads_their_checkpoint
            exec(compile(block, str(README), "exec"), ns)
    finally:
        if "nearest-wrong" in stakes.available_methods():
            unregister_method("nearest-wrong")
    result = ns["result"]
    assert result.metrics["forget_accuracy"] == 0.0 and result.metrics["test_accuracy"] > 50.0
    assert result.history[0]["step"] == 0 and result.history[-1]["step"] == result.steps
    assert ns["S"].shape == (256, 10) and ns["z"].grad.shape == (256, 384)
    assert 0.0 <= float(ns["loss"].detach()) <= 2.0 and float(ns["sr"]) == 0.0   # params start at their reference
    assert all(torch.allclose(i, 0.5 * g.abs()) for i, g in zip(ns["importance"], ns["grads"]))
    offsets = (ns["x_adv"] - ns["x0"]).flatten(1).norm(dim=1)
    assert float(offsets.max()) <= 1.5 + 1e-4
    assert torch.allclose(ns["loss_m"].detach(), ns["loss"].detach(), atol=1e-6)
    assert torch.allclose(ns["S_m"], ns["S"], atol=1e-6)
