"""The interpreter version check of tests/conftest.py: which triton/numpy pairs it refuses, and that a
pytest run with such a pair (faked by a plugin loaded before the conftest) stops at collection with
one message, while the same run without the interpreter, or with the override, goes on. The pairs
themselves are measured by .ci/versions (benchmarks/results/versions/)."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fused._dispatch import _release, interpreter_version_problem

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("version, expected", [
    ("3.6.0", (3, 6, 0)), ("2.5", (2, 5, 0)), ("2.5.0rc1", (2, 5, 0)), ("3.6.0+git1a2b3c", (3, 6, 0)),
    ("1.26.4", (1, 26, 4)), ("2.10.0.dev20261201", (2, 10, 0)),
])
def test_release_parses_the_version(version, expected):
    assert _release(version) == expected


@pytest.mark.parametrize("triton, numpy, broken", [
    ("3.6.0", "2.5.2", True),    # the GPU machine's pair, measured broken
    ("3.6.0", "2.4.6", True),    # measured broken too: numpy 2.4 expired the deprecation
    ("3.6.0", "2.4.0", True),
    ("3.5.1", "2.4.6", True),    # older triton has the same int(array) conversion
    ("3.6.0", "2.3.5", False),   # numpy < 2.4 works with it (measured)
    ("3.6.0", "1.24.4", False),  # the floor row
    ("3.7.0", "2.5.2", False),   # triton 3.7 squeezes the array first
    ("3.8.0", "2.5.2", False),   # measured
    ("3.8.0", "2.4.6", False),   # CI's pair
])
def test_pairs_refused_by_the_check(triton, numpy, broken):
    problem = interpreter_version_problem(triton, numpy, interpreting=True)
    assert (problem is not None) == broken
    if broken:
        assert f"triton {triton}" in problem and f"numpy {numpy}" in problem
        assert "pip install 'numpy<2.4'" in problem


def test_no_check_without_the_interpreter_or_triton():
    # on a GPU the kernels compile: numpy is not in their way
    assert interpreter_version_problem("3.6.0", "2.5.2", interpreting=False) is None
    assert interpreter_version_problem(None, "2.5.2", interpreting=True) is None


def _pytest(tmp_path, *args, collect_only=True, **env_extra):
    plugin = tmp_path / "fake_versions.py"
    plugin.write_text(textwrap.dedent("""
        import numpy, triton
        numpy.__version__ = "2.5.2"
        triton.__version__ = "3.6.0"
    """))
    env = {k: v for k, v in os.environ.items() if k != "STAKES_IGNORE_VERSION_CHECK"}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]), TRITON_INTERPRET="1")
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "fake_versions", "-p", "no:cacheprovider",
                           *(["--collect-only"] if collect_only else []), "-q", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_a_run_stops_at_collection_with_one_message(tmp_path):
    run = _pytest(tmp_path, "tests/fused/test_nn.py", "tests/stakes/test_config.py", collect_only=False)
    out = run.stdout + run.stderr
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, out
    assert out.count("cannot run with numpy") == 1, out
    assert "ERROR: the tests run Triton kernels under the CPU interpreter (TRITON_INTERPRET=1)" in out
    assert "interpreter of triton 3.6.0 cannot run with numpy 2.5.2" in out
    assert "Fix: pip install 'numpy<2.4'" in out
    assert not re.search(r"\d+ (passed|failed)", out), out  # nothing ran


@pytest.mark.slow
def test_without_the_interpreter_or_with_the_override_the_run_goes_on(tmp_path):
    run = _pytest(tmp_path, "tests/stakes/test_config.py", TRITON_INTERPRET="0")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "tests/stakes/test_config.py::" in run.stdout
    run = _pytest(tmp_path, "tests/fused/test_nn.py", STAKES_IGNORE_VERSION_CHECK="1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "tests/fused/test_nn.py::" in run.stdout


@pytest.mark.slow
def test_fused_validate_refuses_the_pair_with_one_line(tmp_path):
    """python -m fused validate on the CPU meets the same interpreter defect: one clear line, exit 2."""
    (tmp_path / "sitecustomize.py").write_text("import numpy, triton\nnumpy.__version__ = '2.5.2'\n"
                                               "triton.__version__ = '3.6.0'\n")
    env = {k: v for k, v in os.environ.items() if k != "STAKES_IGNORE_VERSION_CHECK"}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]), TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "fused", "validate"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m fused validate: error: the CPU interpreter of triton "
                                                  "3.6.0 cannot run with numpy 2.5.2"), run.stderr
    assert "pip install 'numpy<2.4'" in lines[0]
