"""Atomic file writes: every result, checkpoint, cache and report the framework writes goes
through :func:`atomic_write`, so a crash never leaves a half-written file nor damages the old one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

import torch


def atomic_write(path, write: Callable[[IO], None], *, binary: bool = True) -> Path:
    """Call ``write(fh)`` on a temporary file in ``path``'s folder, fsync it, then ``os.replace``
    it over ``path``. On any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_torch_save(obj: Any, path) -> Path:
    """``torch.save(obj, path)``, atomically."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() != 1 else float(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_json_dump(payload, path) -> Path:
    """Write ``payload`` as indented JSON (tensors become lists/numbers), atomically."""

    def write(fh):
        json.dump(payload, fh, indent=2, default=_json_default, allow_nan=True)
        fh.write("\n")

    return atomic_write(path, write, binary=False)


def atomic_text(text: str, path) -> Path:
    """Write ``text`` to ``path``, atomically."""
    return atomic_write(path, lambda fh: fh.write(text), binary=False)
