"""A path the command line cannot write (``--out``, ``--checkpoint``, ``--save-model``) is refused
before any work: one line ``stakes: error: ARG PATH: ...``, exit status 2, within a second or two,
with no data loaded, no model pretrained, no run started and nothing left on disk (issue 22, item 11:
before, an existing folder as ``--out`` ran the whole job and then died with a traceback, leaving
``OUT.ckpt`` and ``OUT.ckpt.proxies`` behind)."""

import os
import stat
import sys
import tempfile
import time

import pytest

import stakes.anchors
import stakes.cli
import stakes.compare
import stakes.pretrain
from stakes._io import atomic_write, check_output_path, OutputPathError
from stakes.cli import main

SECONDS = 3.0   # a refused path costs well under a second; the margin is for a loaded 2-core machine


class Reached(Exception):
    """Raised by the spies: the command started its work."""


@pytest.fixture
def spies(monkeypatch):
    """Every entry to real work (data, model, pretraining, anchors, a run, a grid) raises
    :class:`Reached` and is recorded."""
    calls = []

    def spy(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise Reached(name)
        return call

    for module, name in ((stakes.cli, "load_data"), (stakes.cli, "load_model"), (stakes.cli, "run_one"),
                         (stakes.cli, "load_or_build_anchors"), (stakes.compare, "run_compare"),
                         (stakes.pretrain, "pretrain"), (stakes.anchors, "build_anchors"),
                         (stakes.compare, "merge_reports")):
        monkeypatch.setattr(module, name, spy(f"{module.__name__}.{name}"))
    return calls


def _tree(root) -> set:
    """Every file and folder under ``root`` (relative paths), hidden temp files included."""
    found = set()
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(folder, name), root))
    return found


def _refused(argv, spies, capsys, where, arg, shown):
    """Run ``stakes ARGV``: it must exit 2 within SECONDS with one stderr line naming ``arg`` and
    ``shown``, without reaching any work and without adding or removing anything under ``where``."""
    before = _tree(where)
    start = time.perf_counter()
    try:
        rc = main(argv)
    except Reached as reached:
        pytest.fail(f"`stakes {' '.join(argv)}` started its work ({reached}) instead of refusing {arg}")
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"stakes: error: {arg} ") and shown in lines[0], lines[0]
    assert spies == []
    assert elapsed < SECONDS, elapsed
    assert _tree(where) == before
    return lines[0]


def _root_can_write(folder) -> bool:
    """Whether this process can create a file in ``folder`` despite its mode (root can)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


# ----------------------------------------------------------------------------- an existing folder as a file path


@pytest.mark.parametrize("argv,arg", [
    (["unlearn", "--out", "{dir}"], "--out"),
    (["pretrain", "--out", "{dir}"], "--out"),
    (["anchors", "--out", "{dir}"], "--out"),
    (["unlearn", "--out", "{tmp}/r.json", "--checkpoint", "{dir}"], "--checkpoint"),
    (["unlearn", "--out", "{tmp}/r.json", "--save-model", "{dir}"], "--save-model"),
], ids=["unlearn-out", "pretrain-out", "anchors-out", "unlearn-checkpoint", "unlearn-save-model"])
def test_an_existing_folder_is_refused(argv, arg, tmp_path, spies, capsys):
    folder = tmp_path / "result"
    folder.mkdir()
    argv = [a.format(dir=f"{folder}/", tmp=tmp_path) for a in argv]
    line = _refused(argv, spies, capsys, tmp_path, arg, f"{folder}/")
    assert "is a directory; give a file path such as" in line


def test_the_default_checkpoint_and_its_side_file_are_checked(tmp_path, spies, capsys):
    """--checkpoint defaults to OUT.ckpt, beside which the run writes OUT.ckpt.proxies."""
    out = tmp_path / "r.json"
    (tmp_path / "r.json.ckpt").mkdir()
    _refused(["unlearn", "--out", str(out)], spies, capsys, tmp_path, "--checkpoint", f"{out}.ckpt")
    os.rmdir(tmp_path / "r.json.ckpt")
    (tmp_path / "r.json.ckpt.proxies").mkdir()
    _refused(["unlearn", "--out", str(out)], spies, capsys, tmp_path, "--checkpoint", f"{out}.ckpt.proxies")
    ckpt = tmp_path / "mine.ckpt"
    (tmp_path / "mine.ckpt.proxies").mkdir()
    _refused(["unlearn", "--out", str(out), "--checkpoint", str(ckpt)], spies, capsys, tmp_path, "--checkpoint",
             f"{ckpt}.proxies")


# ----------------------------------------------------------------------------- a path under a regular file


@pytest.mark.parametrize("argv,arg", [
    (["unlearn", "--out", "{f}/r.json"], "--out"),
    (["unlearn", "--out", "{f}/deeper/still/r.json"], "--out"),
    (["unlearn", "--out", "{tmp}/r.json", "--checkpoint", "{f}/r.ckpt"], "--checkpoint"),
    (["unlearn", "--out", "{tmp}/r.json", "--save-model", "{f}/m.pt"], "--save-model"),
    (["pretrain", "--out", "{f}/m.pt"], "--out"),
    (["anchors", "--out", "{f}/a.pt"], "--out"),
    (["compare", "--out", "{f}/report"], "--out"),
], ids=["unlearn-out", "unlearn-out-deep", "unlearn-checkpoint", "unlearn-save-model", "pretrain-out", "anchors-out",
        "compare-out"])
def test_a_path_under_a_file_is_refused(argv, arg, tmp_path, spies, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("a file, not a folder\n")
    argv = [a.format(f=notes, tmp=tmp_path) for a in argv]
    shown = next(a for a in argv if a.startswith(str(notes)))
    line = _refused(argv, spies, capsys, tmp_path, arg, shown)
    assert line.endswith(f"{notes} is a file, not a folder")
    assert notes.read_text() == "a file, not a folder\n"


def test_compare_refuses_an_existing_file_as_its_report_folder(tmp_path, spies, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    line = _refused(["compare", "--out", str(notes)], spies, capsys, tmp_path, "--out", str(notes))
    assert "is a file, not a folder" in line and notes.read_text() == "keep me\n"


def test_a_special_file_is_refused(tmp_path, spies, capsys):
    """Not a regular file (a fifo here; /dev/null and the like): replacing it would, as root,
    swap a device node for a regular file."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    line = _refused(["unlearn", "--out", str(fifo)], spies, capsys, tmp_path, "--out", str(fifo))
    assert "is not a regular file" in line and stat.S_ISFIFO(os.stat(fifo).st_mode)


# ----------------------------------------------------------------------------- a folder this process cannot write in


@pytest.mark.parametrize("argv,arg", [
    (["unlearn", "--out", "{ro}/r.json"], "--out"),
    (["unlearn", "--out", "{ro}/missing/r.json"], "--out"),
    (["unlearn", "--out", "{tmp}/r.json", "--checkpoint", "{ro}/r.ckpt"], "--checkpoint"),
    (["unlearn", "--out", "{tmp}/r.json", "--save-model", "{ro}/m.pt"], "--save-model"),
    (["pretrain", "--out", "{ro}/m.pt"], "--out"),
    (["anchors", "--out", "{ro}/a.pt"], "--out"),
    (["compare", "--out", "{ro}/report"], "--out"),
    (["compare", "--out", "{ro}"], "--out"),
], ids=["unlearn-out", "unlearn-out-missing-parent", "unlearn-checkpoint", "unlearn-save-model", "pretrain-out",
        "anchors-out", "compare-out", "compare-out-existing"])
def test_an_unwritable_folder_is_refused(argv, arg, tmp_path, spies, capsys):
    """A folder of mode 0o500. Root writes in it regardless, so as root there is nothing to refuse
    and this case is skipped; test_a_folder_even_root_cannot_write_in_is_refused covers root."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if _root_can_write(ro):
            pytest.skip("running as root: a 0o500 folder is writable for this process, so it is rightly "
                        "accepted (the /sys case checks a folder root cannot write in)")
        argv = [a.format(ro=ro, tmp=tmp_path) for a in argv]
        shown = next(a for a in argv if a.startswith(str(ro)))
        line = _refused(argv, spies, capsys, tmp_path, arg, shown)
        assert f"cannot write in the folder {ro} (" in line
    finally:
        ro.chmod(0o700)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sysfs is Linux's")
@pytest.mark.parametrize("argv,arg", [
    (["unlearn", "--out", "/sys/stakes-test-r.json"], "--out"),
    (["unlearn", "--out", "{tmp}/r.json", "--checkpoint", "/sys/stakes-test-r.ckpt"], "--checkpoint"),
    (["unlearn", "--out", "{tmp}/r.json", "--save-model", "/sys/stakes-test-m.pt"], "--save-model"),
    (["pretrain", "--out", "/sys/stakes-test-m.pt"], "--out"),
    (["anchors", "--out", "/sys/stakes-test-a.pt"], "--out"),
    (["compare", "--out", "/sys/stakes-test-report"], "--out"),
], ids=["unlearn-out", "unlearn-checkpoint", "unlearn-save-model", "pretrain-out", "anchors-out", "compare-out"])
def test_a_folder_even_root_cannot_write_in_is_refused(argv, arg, tmp_path, spies, capsys):
    """/sys (sysfs): no process, root included, can create a file there."""
    if not os.path.isdir("/sys") or _root_can_write("/sys"):
        pytest.skip("no /sys here, or this process can create files in it")
    argv = [a.format(tmp=tmp_path) for a in argv]
    shown = next(a for a in argv if a.startswith("/sys/"))
    line = _refused(argv, spies, capsys, tmp_path, arg, shown)
    assert "cannot write in the folder /sys (" in line
    assert not any(name.startswith(("stakes-test", ".stakes")) for name in os.listdir("/sys"))


def test_a_read_only_file_is_refused(tmp_path, spies, capsys):
    """An existing result of mode 0o400 is not replaced. Root may write it anyway, so as root this
    case is skipped."""
    out = tmp_path / "r.json"
    out.write_text("{}\n")
    out.chmod(0o400)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as root: a 0o400 file is writable for this process, so it is rightly accepted")
        line = _refused(["unlearn", "--out", str(out)], spies, capsys, tmp_path, "--out", str(out))
        assert "read-only" in line and out.read_text() == "{}\n"
    finally:
        out.chmod(0o600)


# ----------------------------------------------------------------------------- two arguments naming one file


@pytest.mark.parametrize("extra,arg", [
    (["--checkpoint", "{tmp}/r.json"], "--checkpoint"),          # the result would be removed as the checkpoint
    (["--save-model", "{tmp}/./r.json"], "--save-model"),        # the model would be overwritten by the result
], ids=["checkpoint", "save-model"])
def test_one_file_for_two_arguments_is_refused(extra, arg, tmp_path, spies, capsys):
    argv = ["unlearn", "--out", str(tmp_path / "r.json"), *[a.format(tmp=tmp_path) for a in extra]]
    before = _tree(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and spies == [] and _tree(tmp_path) == before
    assert err.startswith(f"stakes: error: --out and {arg} name the same file") and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- what is accepted


def test_a_missing_parent_folder_is_accepted_and_not_created_by_the_check(tmp_path, spies, capsys):
    """Missing folders above --out are created when the first file is written (as before), not by
    the check: a command refused later (here: the work it reaches raises) leaves none behind."""
    out = tmp_path / "new" / "deeper" / "r.json"
    with pytest.raises(Reached):
        main(["unlearn", "--out", str(out), "--save-model", str(tmp_path / "models" / "m.pt")])
    assert spies == ["stakes.cli.load_data"]
    assert _tree(tmp_path) == set()
    with pytest.raises(Reached):
        main(["compare", "--out", str(tmp_path / "reports" / "digits")])
    assert _tree(tmp_path) == set()
    check_output_path(out, "--out")
    check_output_path(tmp_path / "reports" / "digits", "--out", folder=True)
    assert _tree(tmp_path) == set()


def test_an_existing_writable_target_is_accepted(tmp_path, monkeypatch):
    (tmp_path / "r.json").write_text("old")
    (tmp_path / "report").mkdir()
    check_output_path(tmp_path / "r.json", "--out")
    check_output_path(tmp_path / "report", "--out", folder=True)
    monkeypatch.chdir(tmp_path)
    check_output_path("r.json", "--out")          # bare relative names: their folder is "."
    check_output_path("new.json", "--out")
    assert _tree(tmp_path) == {"r.json", "report"}
    with pytest.raises(OutputPathError, match=r"^--out .*report: is a directory"):
        check_output_path(tmp_path / "report", "--out")


def test_a_failing_write_removes_the_folders_it_created(tmp_path):
    """atomic_write creates missing parent folders right before writing; when the write fails it
    removes them again (before, they stayed behind, empty)."""
    def boom(fh):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "a" / "b" / "r.json", boom)
    assert _tree(tmp_path) == set()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep.txt").write_text("x")
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "a" / "b" / "c" / "r.json", boom)
    assert _tree(tmp_path) == {"a", os.path.join("a", "keep.txt")}
    atomic_write(tmp_path / "a" / "b" / "r.json", lambda fh: fh.write(b"ok"))
    assert (tmp_path / "a" / "b" / "r.json").read_bytes() == b"ok"
