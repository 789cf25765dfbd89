"""Atomic file writes: every result, checkpoint, cache and report the framework writes goes
through :func:`atomic_write`, so a crash never leaves a half-written file nor damages the old one."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, IO, Optional

import torch


def _make_folders(folder: Path, created: list) -> None:
    """``mkdir -p folder``, appending each folder created here to ``created`` (outermost first)."""
    missing = []
    while not folder.is_dir() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue
        created.append(folder)


def atomic_write(path, write: Callable[[IO], None], *, binary: bool = True) -> Path:
    """Call ``write(fh)`` on a temporary file in ``path``'s folder, fsync it, then ``os.replace``
    it over ``path``. Missing parent folders are created first. On any error the temporary file and
    the folders created here are removed, and ``path`` is untouched."""
    path = Path(path).expanduser()
    created: list = []
    try:
        _make_folders(path.parent, created)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except BaseException:
        _remove_empty(created)
        raise
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
        _remove_empty(created)
        raise
    return path


def _remove_empty(folders: list) -> None:
    """Remove ``folders`` (outermost first, as :func:`_make_folders` lists them), innermost
    first, each only while it is empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


class OutputPathError(ValueError):
    """An output path the command line cannot write (the ``stakes`` CLI prints it as one line and
    exits with status 2)."""


def check_output_path(path, arg: str, *, folder: bool = False, example: Optional[str] = "result.json") -> None:
    """Check, before any work, that ``path`` (the value of the command-line argument ``arg``) can
    be written: raise :class:`OutputPathError` with one line naming ``arg`` and ``path`` otherwise
    (``example``: a file name the message suggests in place of an existing folder).

    A file path (``folder=False``) must not be an existing folder nor anything but a regular,
    writable file; a folder path (``folder=True``) must not be an existing file. Missing parent
    folders are fine (they are created when the first file is written), but the nearest existing
    one must be a folder in which this process can create a file: a probe file is created in it and
    removed at once. Nothing is left behind, whatever the outcome."""
    shown = os.fspath(path)
    target = Path(shown).expanduser()
    try:
        st = target.stat()
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as err:
        raise OutputPathError(f"{arg} {shown}: cannot reach it ({err.strerror})") from None
    if st is not None:
        if folder:
            if not stat.S_ISDIR(st.st_mode):
                raise OutputPathError(f"{arg} {shown}: is a file, not a folder; give a folder path (it is "
                                      f"created if missing)")
        elif stat.S_ISDIR(st.st_mode):
            hint = f"; give a file path such as {os.path.join(shown, example)}" if example else ""
            raise OutputPathError(f"{arg} {shown}: is a directory{hint}")
        elif not stat.S_ISREG(st.st_mode):
            hint = f"; give a file path such as {example}" if example else ""
            raise OutputPathError(f"{arg} {shown}: is not a regular file{hint}")
        elif not os.access(target, os.W_OK):
            raise OutputPathError(f"{arg} {shown}: the existing file is read-only")
    # the folder the file (or, for a folder path, the folder itself) is created in: the nearest existing one
    where = target if folder and st is not None else target.parent
    while True:
        try:
            st_where = where.stat()
            break
        except (FileNotFoundError, NotADirectoryError):
            if where == where.parent:
                raise OutputPathError(f"{arg} {shown}: no existing folder above it") from None
            where = where.parent
        except OSError as err:
            raise OutputPathError(f"{arg} {shown}: cannot reach the folder {where} ({err.strerror})") from None
    if not stat.S_ISDIR(st_where.st_mode):
        raise OutputPathError(f"{arg} {shown}: {where} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".stakes-probe-", dir=where)
    except OSError as err:
        raise OutputPathError(f"{arg} {shown}: cannot write in the folder {where} ({err.strerror})") from None
    os.close(fd)
    os.unlink(probe)


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
