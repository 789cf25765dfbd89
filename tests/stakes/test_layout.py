"""The package's floors and the size of its pieces: the command line is the top floor (nothing
imports it back), then compare and jobs, then the loop and the methods, then config, data and the
other building blocks; no module imports one from a higher floor; the loop, compare, jobs and
config know no method names; every function fits on a screen; fused never imports stakes."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# floor of each stakes module (higher = nearer the command line); a module may import from its own
# floor or below
FLOORS = {"stakes.cli": 4, "stakes.__main__": 4, "stakes.compare": 3, "stakes.jobs": 3, "stakes.methods": 2,
          "stakes.oracle": 1}
BUILDING_BLOCKS = 1   # config, data, models, metrics, proxy, anchors, pretrain, distributed, _io, ...
LOOP_INFRASTRUCTURE = ["__init__", "base", "checkpoint", "context", "evaluation", "finite", "loop", "parts",
                       "retrain", "strategy"]


def _imports(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _floor(module: str) -> int:
    for prefix in sorted(FLOORS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return FLOORS[prefix]
    return BUILDING_BLOCKS


def test_no_module_imports_from_a_higher_floor():
    upward = []
    for path in (ROOT / "stakes").rglob("*.py"):
        me = _module(path)
        for name in _imports(path):
            if name.startswith("stakes.") and name != "stakes" and _floor(name) > _floor(me):
                upward.append(f"{me} (floor {_floor(me)}) imports {name} (floor {_floor(name)})")
    assert upward == []
    assert not [p for p in (ROOT / "fused").rglob("*.py") if any(m.startswith("stakes") for m in _imports(p))]


def test_the_floors_catch_an_upward_import():
    # the check above is not vacuous: config importing the methods (what preset() did) is a violation
    assert _floor("stakes.config") < _floor("stakes.methods.base") < _floor("stakes.compare") < _floor("stakes.cli")


def test_compare_runs_without_the_command_line_loaded():
    code = "import sys, stakes.compare, stakes.jobs; sys.exit('stakes.cli' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_no_method_name_in_the_loop_compare_jobs_or_config():
    from stakes.methods import METHODS

    files = [ROOT / "stakes" / "methods" / f"{m}.py" for m in LOOP_INFRASTRUCTURE if m not in ("__init__", "retrain")]
    files += [ROOT / "stakes" / name for name in ("compare.py", "jobs.py", "config.py")]
    for path in files:
        text = path.read_text(encoding="utf-8")
        if path.name == "loop.py":   # unlearn() defaults to structguard: its signature only
            text = text.replace('method="structguard"', "")
        if path.name == "base.py":   # preset() defaults to structguard
            text = text.replace('method="structguard"', "")
        for name in METHODS:
            assert f'"{name}"' not in text and f"'{name}'" not in text, (path.name, name)
    assert sorted(p.stem for p in (ROOT / "stakes" / "methods").glob("*.py")) == sorted(LOOP_INFRASTRUCTURE + list(METHODS))


def test_every_function_fits_on_a_screen():
    long = []
    for path in (ROOT / "stakes").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 100:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_no_hook_receives_a_private_object():
    """Every hook of UnlearningMethod is called with the public UnlearnContext."""
    import inspect

    from stakes.methods import loop, strategy

    source = inspect.getsource(loop) + inspect.getsource(strategy)
    for hook in ("loss_terms", "importance", "grad_masks", "param_groups", "optimizer_options", "needs_projector",
                 "before_update", "check"):
        calls = [line.strip() for line in source.splitlines() if f"method.{hook}(" in line]
        assert calls, hook
        assert all(f"method.{hook}(ctx" in c or f"method.{hook}(self.ctx" in c or f"method.{hook}(run.ctx" in c
                   for c in calls), (hook, calls)
