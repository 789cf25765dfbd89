"""``python -m fused preflight``: compile every kernel of every op for every target card, with no
GPU, and check statically what the card would say (PERFORMANCE.md "Static GPU checks").

For each case (an op and a shape spec) and each target (:data:`fused._targets.TARGETS`: sm_80,
86, 89, 90, 100, 120 and AMD Instinct gfx90a, gfx942, gfx950), the op's own plan code
(``DECLARATION.launches`` in its module, :mod:`fused._ops`) gives the launches its launcher would
run on that card, on ``meta`` tensors; each is compiled for the target (a stand-in driver names
it) and read by the vendor's reader, then gated:

* :mod:`~fused.preflight.specs`   the ``--shape`` grammar, from each op's declared spec keys
* :mod:`~fused.preflight.grid`    the default grid: each op's declared cases
* :mod:`~fused.preflight.nvidia`  the NVIDIA reader (cuobjdump -res-usage, nvdisasm)
* :mod:`~fused.preflight.amd`     the AMD reader (the amdgcn assembly and its metadata)
* :mod:`~fused.preflight.gates`   the gates (compile, shared, registers, spills, mma, wgmma,
  vector128, load; the table is there)
* :mod:`~fused.preflight.check`   compiling, reading and gating, over worker processes
* :mod:`~fused.preflight.report`  the table, the summary, the JSON
* :mod:`~fused.preflight.cli`     the command line

Adding an op touches its module (a ``DECLARATION``) and one line of the op registry; adding a
target, one line of :data:`fused._targets.TARGETS` (and a reader for a new vendor).

These checks say that a kernel will launch and take the fast instruction paths; only a run on the
card says how fast it is.
"""

from fused.preflight.check import (  # noqa: F401
    StandInDriver,
    TargetChecker,
    check_launches,
    group_rows,
    interpreter_on,
    live_card,
    require_compiler,
    run,
    run_cases,
)
from fused.preflight.cli import main, parse_targets  # noqa: F401
from fused.preflight.gates import GATES, failed_gates, required_vectors  # noqa: F401
from fused.preflight.grid import default_cases  # noqa: F401
from fused.preflight.report import format_summary, format_table, summarise, write_json  # noqa: F401
from fused.preflight.specs import (  # noqa: F401
    SpecError,
    complete_spec,
    format_case,
    format_shape,
    module_spec,
    parse_shape,
)
