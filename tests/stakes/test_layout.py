"""The package's floors: the command line is the top one (nothing imports it back), the loop knows
no method names, and fused never imports stakes."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_nothing_imports_the_command_line():
    importers = [str(p.relative_to(ROOT)) for p in (ROOT / "stakes").rglob("*.py")
                 if p.name not in ("cli.py", "__main__.py") and "stakes.cli" in _imports(p)]
    assert importers == []
    assert "stakes.cli" not in _imports(ROOT / "stakes" / "compare.py")
    assert not [p for p in (ROOT / "fused").rglob("*.py") if any(m.startswith("stakes") for m in _imports(p))]


def test_compare_runs_without_the_command_line_loaded():
    code = "import sys, stakes.compare, stakes.jobs; sys.exit('stakes.cli' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_the_loop_knows_no_method_names():
    from stakes.methods import METHODS

    loop = (ROOT / "stakes" / "methods" / "loop.py").read_text(encoding="utf-8")
    body = loop[loop.index("class _Run"):loop.index("\ndef unlearn(")]   # unlearn() defaults to structguard
    for name in METHODS:
        assert f'"{name}"' not in body and f"'{name}'" not in body, name
    assert sorted(p.stem for p in (ROOT / "stakes" / "methods").glob("*.py")) == sorted(
        ["__init__", "base", "loop", *METHODS])
