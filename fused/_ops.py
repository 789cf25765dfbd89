"""The op registry: every op of the library by name, and the declaration each op module makes for
the tools (``python -m fused preflight``, ``python -m fused validate``, the benchmarks).

Adding an op: write its module (reference, kernels, ``plan_*``, public function) with a
``DECLARATION`` at the bottom, and add one :class:`Op` line to :data:`REGISTRY`. No tool lists op
names; each reads them here. Importing this module imports neither torch nor any op module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Op:
    """An op: ``name`` (the tools' name: ``--shape alignment:...``, benchmark rows), its module and
    its public function (``python -m fused validate --op structure_alignment_loss``)."""

    name: str
    module: str
    function: str


REGISTRY: Tuple[Op, ...] = (
    Op("similarity", "fused.similarity", "anchor_similarity"),
    Op("alignment", "fused.alignment", "structure_alignment_loss"),
    Op("importance", "fused.importance", "accumulate_importance"),
    Op("update", "fused.update", "masked_regularized_sgd_step"),
    Op("pgd", "fused.pgd", "l2_pgd_step"),
)
OP_NAMES: Tuple[str, ...] = tuple(op.name for op in REGISTRY)


# ----------------------------------------------------------------------------- declarations

# Kinds of spec values (the preflight's --shape grammar parses each; fused.preflight.specs):
# "int" a positive integer, "dtype" fp32/fp16/bf16, "flag" 0/1, "number" a finite number >= 0,
# "choice" one of ``choices`` (a comma-joined choice in any order), "params" a parameter list.
SPEC_KINDS = ("int", "dtype", "flag", "number", "choice", "params")
# The kernels' floating dtypes, each in every op's default preflight grid.
KERNEL_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class SpecKey:
    """One key of an op's shape spec: its kind (:data:`SPEC_KINDS`), its default (None: the key is
    left out unless given, so the op's own default applies) and, for a choice, the choices."""

    kind: str
    default: Any = None
    choices: Tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in SPEC_KINDS:
            raise ValueError(f"SpecKey kind must be one of {SPEC_KINDS}, got {self.kind!r}")
        if (self.kind == "choice") != bool(self.choices):
            raise ValueError("a 'choice' SpecKey needs choices, and only it takes them")


@dataclass(frozen=True)
class OpDeclaration:
    """What an op module tells the tools.

    * ``spec``: the keys of its shape specs, in --shape order (``dtype`` among them).
    * ``launches(spec, target)``: the launches its launcher would run for a (complete) spec on a
      target, on ``meta`` tensors: the op's own ``plan_*`` function, so what is checked is what runs.
      Spec dtypes arrive as torch dtypes and ``params`` as a list of shapes.
    * ``cases()``: the preflight's default grid for this op: specs (given keys only).
    * ``validation(quick)``: ``fused.validate.Case`` objects (shapes that are no block multiples).
    * ``weight``: the relative compile cost of its cases (the preflight schedules heavy ops first).
    """

    spec: Dict[str, SpecKey]
    launches: Callable[[Dict[str, Any], Any], List[Any]]
    cases: Callable[[], List[Dict[str, Any]]]
    validation: Callable[[bool], List[Any]]
    weight: float = 1.0

    def complete(self, spec: Dict[str, Any]) -> Dict[str, Any]:
        """``spec`` with the declared defaults of the keys it leaves out."""
        return {**{k: key.default for k, key in self.spec.items() if key.default is not None}, **spec}


def op(name: str) -> Op:
    """The registry entry of ``name`` (ValueError naming the known ops otherwise)."""
    for entry in REGISTRY:
        if entry.name == name:
            return entry
    raise ValueError(f"unknown op {name!r}; expected one of {', '.join(OP_NAMES)}")


def declaration(name: str) -> OpDeclaration:
    """The ``DECLARATION`` of op ``name`` (imports its module)."""
    module = importlib.import_module(op(name).module)
    found = getattr(module, "DECLARATION", None)
    if not isinstance(found, OpDeclaration):
        raise TypeError(f"{op(name).module} must define DECLARATION = OpDeclaration(...)")
    return found


def declarations(names: Optional[Sequence[str]] = None) -> Dict[str, OpDeclaration]:
    """Every op's declaration (or those of ``names``), by name, in registry order."""
    return {n: declaration(n) for n in (names or OP_NAMES)}


def by_function(function: str) -> Op:
    """The registry entry of a public function name (``structure_alignment_loss``)."""
    for entry in REGISTRY:
        if entry.function == function:
            return entry
    raise ValueError(f"unknown op function {function!r}; expected one of "
                     + ", ".join(e.function for e in REGISTRY))
