"""Shape specs: ``op:key=val,...`` (``--shape``), checked against the keys each op declares
(``DECLARATION.spec`` in its module, :class:`fused._ops.SpecKey`).

A spec is a dict of key -> value with dtypes as names ("float32") and ``params`` as a list name
or a list of shapes; :func:`module_spec` turns it into what the op's ``launches`` take.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, List, Sequence, Tuple

from fused._ops import OP_NAMES, SpecKey, declaration


class SpecError(ValueError):
    """A --shape that does not parse or names an unknown op, key or value."""


DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
               "half": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}
SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _param_lists() -> Dict[str, List[Tuple[int, ...]]]:
    from fused._multi_tensor import PARAM_LISTS

    return PARAM_LISTS


def _positive_int(value: str) -> int:
    if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
        raise ValueError("a positive integer")
    return int(value)


def _dtype_name(value: str) -> str:
    name = DTYPE_NAMES.get(value.lower())
    if name is None:
        raise ValueError("one of fp32, fp16, bf16")
    return name


def _flag(value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError("0 or 1")
    return value == "1"


def _number(value: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise ValueError("a number (0 = off)") from None
    if not math.isfinite(out) or out < 0:
        raise ValueError("a finite number >= 0 (0 = off)")
    return out


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    """One of ``choices``; a comma-joined choice (``x,x_ref``) may come in any order."""
    by_parts = {frozenset(c.split(",")): c for c in choices}

    def parse(value: str) -> str:
        found = by_parts.get(frozenset(value.replace(" ", "").split(",")))
        if found is None:
            raise ValueError("one of " + ", ".join(repr(c) for c in choices))
        return found
    return parse


def _params(value: str):
    """``resnet18`` (a named list) or ``64x3x7x7;64;1000x512`` (explicit shapes)."""
    lists = _param_lists()
    if value in lists:
        return value
    shapes = []
    for part in value.split(";"):
        dims = part.strip().split("x")
        if not part.strip() or not all(re.fullmatch(r"[0-9]+", d) and int(d) > 0 for d in dims):
            raise ValueError(
                f"a parameter list name ({', '.join(lists)}) or shapes like 64x3x7x7;64;1000x512 "
                f"(positive sizes joined by x, tensors by ;), bad entry {part!r}"
            )
        shapes.append(tuple(int(d) for d in dims))
    return shapes


def value_parser(key: SpecKey) -> Callable[[str], Any]:
    """The parser of a declared key's values (raises ValueError saying what it expects)."""
    if key.kind == "choice":
        return _choice(key.choices)
    return {"int": _positive_int, "dtype": _dtype_name, "flag": _flag, "number": _number,
            "params": _params}[key.kind]


def spec_keys(op: str) -> Dict[str, SpecKey]:
    """The spec keys ``op`` declares (SpecError for an unknown op)."""
    if op not in OP_NAMES:
        raise SpecError(f"unknown op {op!r}; expected one of {', '.join(OP_NAMES)}")
    return declaration(op).spec


def complete_spec(op: str, given: Dict[str, Any]) -> Dict[str, Any]:
    """The spec with every key of ``op`` that has a default (None-default keys only when given).
    A value given as a torch dtype or a non-canonical name is stored by its canonical name."""
    keys = spec_keys(op)
    unknown = sorted(set(given) - set(keys))
    if unknown:
        raise SpecError(f"unknown key(s) {unknown} for {op}; expected {', '.join(keys)}")
    spec = {key: k.default for key, k in keys.items() if k.default is not None}
    for key, value in given.items():
        if value is None:
            continue
        if keys[key].kind == "dtype":
            value = _dtype_name(str(value).replace("torch.", ""))
        spec[key] = value
    return spec


def parse_shape(text: str) -> Tuple[str, Dict[str, Any]]:
    """``op:key=val,key=val`` -> (op, complete spec). Raises SpecError naming the bad part.

    A comma-separated piece without ``=`` continues the previous value (``grad=x,x_ref``).
    """
    op, sep, rest = text.partition(":")
    op = op.strip()
    if op not in OP_NAMES:
        raise SpecError(f"--shape {text!r}: unknown op {op!r}; expected one of {', '.join(OP_NAMES)} "
                        "followed by ':key=val,...'")
    keys = spec_keys(op)
    pairs: List[List[str]] = []
    for piece in rest.split(",") if sep and rest.strip() else []:
        if "=" in piece:
            key, _, value = piece.partition("=")
            pairs.append([key.strip(), value.strip()])
        elif pairs and piece.strip():
            pairs[-1][1] += "," + piece.strip()
        else:
            raise SpecError(f"--shape {text!r}: expected key=value, got {piece!r}")
    given: Dict[str, Any] = {}
    for key, value in pairs:
        if key not in keys:
            raise SpecError(f"--shape {text!r}: unknown key {key!r} for {op}; expected one of {', '.join(keys)}")
        if key in given:
            raise SpecError(f"--shape {text!r}: key {key!r} given twice")
        try:
            given[key] = value_parser(keys[key])(value)
        except ValueError as e:
            raise SpecError(f"--shape {text!r}: {key} must be {e}, got {value!r}") from None
    return op, complete_spec(op, given)


def _params_text(params) -> str:
    if isinstance(params, str):
        return params
    text = ";".join("x".join(map(str, s)) for s in params)
    return text if len(text) <= 60 else f"{len(params)} tensors"


def format_shape(op: str, spec: Dict[str, Any]) -> str:
    """The shape column: the spec's keys other than dtype, in --shape syntax."""
    parts = []
    for key, declared in spec_keys(op).items():
        if key == "dtype" or key not in spec:
            continue
        value = spec[key]
        if declared.kind == "params":
            value = _params_text(value)
        elif declared.kind == "dtype":
            value = SHORT_DTYPE[value]
        elif isinstance(value, bool):
            value = int(value)
        elif isinstance(value, float):
            value = f"{value:g}"
        parts.append(f"{key}={value}")
    return ",".join(parts)


def format_case(op: str, spec: Dict[str, Any]) -> str:
    """The --shape argument that reproduces this case."""
    return f"{op}:{format_shape(op, spec)},dtype={SHORT_DTYPE[spec['dtype']]}"


def module_spec(op: str, spec: Dict[str, Any]) -> Dict[str, Any]:
    """The spec as the op's ``launches`` take it: dtypes as torch dtypes, params as shape lists."""
    import torch

    out = dict(spec)
    for key, declared in spec_keys(op).items():
        if declared.kind == "dtype" and isinstance(spec.get(key), str):
            out[key] = getattr(torch, spec[key])
        if declared.kind == "params" and isinstance(spec.get(key), str):
            out[key] = list(_param_lists()[spec[key]])
    return out


def shape_help() -> str:
    """The --shape keys of every op, with defaults (the command's epilog)."""
    lines = ["--shape keys (default in brackets; dtypes fp32/fp16/bf16, flags 0/1):"]
    for op in OP_NAMES:
        parts = []
        for key, declared in spec_keys(op).items():
            default = declared.default
            if default is None:
                parts.append(key)
            else:
                shown = SHORT_DTYPE.get(default, default) if isinstance(default, str) else default
                parts.append(f"{key} [{int(shown) if isinstance(shown, bool) else shown}]")
        lines.append(f"  {op}: " + ", ".join(parts))
    lines.append(f"  params: {' | '.join(_param_lists())} | shapes like 64x3x7x7;64;1000x512")
    return "\n".join(lines)
