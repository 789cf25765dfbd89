"""Tests that run on a card build their tensors on the card.

Every test (or helper) that takes the ``device`` fixture runs on CUDA under
``benchmarks/gpu_check.sh``; a tensor it makes on the CPU and hands to an op with the device's
tensors raises there ("Expected all tensors to be on the same device") and, under ``pytest -x``,
stopped the whole GPU test step at its first file. A CPU run cannot see that (both are CPU
tensors), so this reads the tests instead: in a function with a ``device`` parameter, every torch
factory call passes ``device=``, or is moved within the same expression (``(...).to(device)``), or
draws from a CPU ``generator=`` into names that are moved to the device later, or sits inside a
``pytest.raises`` block (bad input that never reaches a kernel).
"""

import ast
from pathlib import Path

FACTORIES = {"randn", "rand", "zeros", "ones", "empty", "full", "arange", "linspace", "logspace", "tensor",
             "randint", "randperm", "eye", "as_tensor", "normal"}
TESTS = Path(__file__).parent


def _moves_to_device(node) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("to", "cuda") and "device" in ast.unparse(node))


def _in_raises_block(node) -> bool:
    while node is not None:
        if isinstance(node, ast.With) and any("raises" in ast.unparse(item.context_expr) for item in node.items):
            return True
        node = getattr(node, "_parent", None)
    return False


def cpu_made_tensors(source: str):
    """(line, call) of every factory call in a ``device`` function that leaves its tensor on the CPU."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child._parent = node
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef) or "device" not in [a.arg for a in fn.args.args + fn.args.kwonlyargs]:
            continue
        statements = [s for s in ast.walk(fn) if isinstance(s, ast.stmt)]
        for call in ast.walk(fn):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and isinstance(call.func.value, ast.Name) and call.func.value.id == "torch"
                    and call.func.attr in FACTORIES):
                continue
            if any(k.arg == "device" for k in call.keywords) or _in_raises_block(call):
                continue
            node, moved = call, False
            while not isinstance(node, ast.stmt):
                node = node._parent
                moved = moved or _moves_to_device(node)
            if moved:
                continue
            if any(k.arg == "generator" for k in call.keywords) and isinstance(node, ast.Assign):
                names = {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
                if any(s.lineno > node.lineno and any(_moves_to_device(c) for c in ast.walk(s))
                       and names & {n.id for n in ast.walk(s) if isinstance(n, ast.Name)} for s in statements):
                    continue
            found.append((call.lineno, ast.unparse(call)))
    return found


def test_device_tests_make_their_tensors_on_the_device():
    offenders = [f"{path.relative_to(TESTS)}:{line}: {call}"
                 for path in sorted(TESTS.rglob("*.py")) for line, call in cpu_made_tensors(path.read_text())]
    assert not offenders, "tensors made on the CPU in tests that run on the card:\n" + "\n".join(offenders)


def test_the_reader_finds_a_cpu_tensor_meeting_a_device_one():
    # the defect that stopped gpu_check.sh's test step at tests/fused/test_alignment.py
    source = '''
def test_grad(device):
    x = torch.randn(3, 4, device=device, requires_grad=True)
    up = torch.linspace(0.5, 2.0, 3, dtype=torch.float64)
    x.sum(1).backward(up)
'''
    assert [line for line, _ in cpu_made_tensors(source)] == [4]
    fixed = source.replace("dtype=torch.float64)", "dtype=torch.float64, device=device)")
    assert cpu_made_tensors(fixed) == []
    seeded = '''
def make(device, gen):
    x = torch.randn(3, generator=gen)
    mask = (torch.rand(3, generator=gen) > 0.5).to(device)
    return x.to(device), mask
'''
    assert cpu_made_tensors(seeded) == []
