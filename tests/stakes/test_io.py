import json

import pytest
import torch

from stakes._io import atomic_json_dump, atomic_text, atomic_torch_save, atomic_write


def test_round_trips(tmp_path):
    atomic_json_dump({"a": torch.tensor(1.5), "b": torch.arange(3), "c": float("nan")}, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["a"] == 1.5 and data["b"] == [0, 1, 2] and data["c"] != data["c"]
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "sub" / "m.pt")
    assert torch.equal(torch.load(tmp_path / "sub" / "m.pt")["w"], torch.ones(2))
    atomic_text("hello\n", tmp_path / "t.md")
    assert (tmp_path / "t.md").read_text() == "hello\n"


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")

    def boom(fh):
        fh.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    with pytest.raises(TypeError, match="not JSON serialisable"):
        atomic_json_dump({"x": object()}, target)
    assert target.read_text() == "old"
