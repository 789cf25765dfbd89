"""``python -m fused <command>``; commands: ``validate`` (see fused.validate) and ``preflight``
(see fused.preflight).

Without a CUDA device the Triton kernels can only run under the CPU interpreter, which
``triton.jit`` enables at decoration time. So, unless the user set ``TRITON_INTERPRET`` themselves,
it is switched on here, before any kernel module is imported, and the output says so.
``preflight`` compiles the kernels instead (for any arch, no GPU needed), so it never interprets:
its worker processes run with the variable removed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m fused", description="fused kernel library tools")
    parser.add_argument("command", choices=["validate", "preflight"],
                        help="validate: every op vs an fp64 oracle; preflight: compile every kernel for "
                             "each arch and check its resources statically (python -m fused preflight -h)")
    args = parser.parse_args(argv[:1])
    note = None
    if args.command == "validate":
        import torch

        if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
            from fused._ops import REGISTRY

            if any(op.module in sys.modules for op in REGISTRY):
                note = "note: kernel modules were imported before TRITON_INTERPRET could be set"
            else:
                os.environ["TRITON_INTERPRET"] = "1"
                note = ("note: no CUDA device: TRITON_INTERPRET=1 was set so the Triton kernels run in the "
                        "CPU interpreter (a correctness check, not a speed one)")
        from fused._dispatch import installed_interpreter_problem

        problem = installed_interpreter_problem()
        if problem is not None and os.environ.get("STAKES_IGNORE_VERSION_CHECK", "0") in ("", "0"):
            print(f"python -m fused validate: error: {problem.split(' The framework tests')[0]}", file=sys.stderr)
            return 2
        from fused.validate import main as validate_main

        return validate_main(argv[1:], note=note)
    if args.command == "preflight":
        from fused.preflight import main as preflight_main

        return preflight_main(argv[1:])
    return 2  # pragma: no cover - argparse rejects other commands


if __name__ == "__main__":
    sys.exit(main())
