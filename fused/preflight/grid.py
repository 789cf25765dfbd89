"""The default grid: every op's declared cases (``DECLARATION.cases()`` in its module), completed
with the op's spec defaults. Each op's module says why its grid covers what its launches depend
on (e.g. ``fused._triton_common.STRUCTURE_K``)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from fused._ops import OP_NAMES, declaration
from fused.preflight.specs import complete_spec


def default_cases(ops: Optional[Sequence[str]] = None) -> List[Tuple[str, Dict[str, Any]]]:
    """(op, complete spec) of every op's default cases (of ``ops`` only, when given), each once."""
    cases: List[Tuple[str, Dict[str, Any]]] = []
    seen = set()
    for op in ops or OP_NAMES:
        for given in declaration(op).cases():
            spec = complete_spec(op, given)
            key = repr(sorted(spec.items()))
            if key not in seen:
                seen.add(key)
                cases.append((op, spec))
    return cases
