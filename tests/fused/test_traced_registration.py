"""The GPU-side registrations of every op traced as on a card, on a CPU machine.

``traced_registration.py`` runs in a subprocess with ``TRITON_INTERPRET`` unset, so the similarity,
alignment and PGD ops are ``torch.library.triton_op``s as on a GPU, and AOTAutograd (opcheck's
``test_aot_dispatch_*``) and ``torch.compile(fullgraph=True)`` trace their bodies with Fake and
Functional tensors; the kernels are stubbed. Before the fix, every D that is a multiple of 16 (the
real 384/512/768) failed there with "Cannot access data pointer of Tensor".
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("traced_registration.py")
D_VALUES = (32, 512, 768)
CASES = [
    f"{op}.D{D}"
    for D in D_VALUES
    for op in ("similarity.opcheck", "similarity.compile", "alignment.anchors.opcheck", "alignment.anchors.compile",
               "alignment.gram.opcheck", "alignment.gram.compile", "pgd.opcheck", "pgd.compile",
               "update.opcheck", "importance.opcheck")
]


@pytest.fixture(scope="module")
def traced():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_op_traces_as_on_a_card(traced, case):
    assert traced[case] == "ok", traced[case]


def test_the_gpu_registration_was_the_one_traced(traced):
    # triton_op (not the interpreter's opaque custom_op) for the three ops built on one-tensor kernels
    assert traced["_triton_ops"] == ["fused::anchor_similarity_fwd", "fused::l2_pgd_step",
                                     "fused::structure_alignment_fwd"]
    assert traced["_stub_launches"] > len(CASES)  # the launches ran (stubbed) in the eager halves
    assert traced["_launch_devices"] == ["cpu"]


def test_no_traced_tensor_is_cached(traced):
    assert traced["_anchor_cache_traced"] is False
