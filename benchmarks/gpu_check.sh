#!/usr/bin/env bash
# GPU check (PERFORMANCE.md "On a GPU machine"): the static preflight (every kernel compiled for
# sm_80-sm_100 and the live card), kernel tests on the card, the fp64 validation, then the
# benchmarks and their plots, all in about 8 minutes. Uses the machine's own torch and triton
# (installs nothing). Run from the repository root:
#
#     PYTHONPATH=. bash benchmarks/gpu_check.sh
#
# Everything (logs, preflight.json, results.json/.csv, PNGs, summary.txt) goes to $OUT when set, else to
# benchmarks/results/<card>/. A failing test run is recorded and the benchmarks still run; the
# exit status is non-zero if any step failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
# The interpreter would make every "fused" timing an interpreter timing: never on a GPU machine.
unset TRITON_INTERPRET

TOTAL_S=${GPU_CHECK_TOTAL_S:-465}   # keep the whole script under 8 minutes
start=$(date +%s)
remaining() { echo $(( TOTAL_S - ($(date +%s) - start) )); }

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible to torch; nothing to check" >&2
    exit 2
fi
CARD=$(python -c "import torch; from benchmarks.measure import device_slug; print(device_slug(torch.device('cuda')))")
DEST="${OUT:-benchmarks/results/$CARD}"
mkdir -p "$DEST"
SUMMARY="$DEST/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

{
    nvidia-smi || true
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name(0))"
    git rev-parse HEAD 2>/dev/null || true
    git status --short 2>/dev/null || true
} > "$DEST/environment.txt" 2>&1
note "gpu_check on $CARD, results in $DEST"

failures=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $DEST/NAME.log, record the status
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s) rc
    set +e
    timeout --kill-after=10 "$limit" "$@" > "$DEST/$name.log" 2>&1
    rc=$?
    set -e
    tail -n 25 "$DEST/$name.log"
    if [ "$rc" -eq 0 ]; then
        note "[ok]     $name ($(( $(date +%s) - t0 )) s)"
    else
        [ "$rc" -eq 124 ] && why="timed out after ${limit} s" || why="exit $rc"
        note "[FAILED] $name: $why ($(( $(date +%s) - t0 )) s; see $name.log)"
        failures=$((failures + 1))
    fi
}

# 0. Static checks first (python -m fused preflight): every kernel of every op at its launcher's
#    configuration for sm_80, 86, 89, 90, 100 and for this card with its own driver (which also loads
#    each kernel): shared memory, registers, spills, 128-bit accesses, wgmma. A few hundred compiles,
#    one worker per arch; about a minute cold on a 16-core host.
JOBS=$(python -c "import os; print(max(1, min(6, (os.cpu_count() or 2) - 1)))")
step preflight 100 python -m fused preflight --json "$DEST/preflight.json" --jobs "$JOBS" --no-progress
# 1. Kernel tests on the card (bf16 cases run only on CUDA). The preflight's whole-grid test is
#    step 0 (with the live card), so it is not run twice.
step tests_fused 150 python -m pytest tests/fused -x -q -p no:cacheprovider \
    --deselect tests/fused/test_preflight.py::test_default_grid_passes_on_every_arch
# 2. Every op against the fp64 oracle.
step validate 75 python -m fused validate --json "$DEST/validate.json" --no-progress
# 3. Benchmarks: the remaining time, less a margin for the plots. The end-to-end rows run first, then
#    the cases with PERFORMANCE.md targets; --max-minutes stops starting new cases early, and results
#    are written after every case, so even a hard timeout leaves a table.
left=$(remaining)
bench_s=$(( left - 40 ))
[ "$bench_s" -lt 60 ] && bench_s=60
budget_min=$(python -c "print(max(0.5, ($bench_s - 75) / 60))")  # margin: one slow case + writing
step benchmarks "$bench_s" python -m benchmarks run --out "$DEST" --max-minutes "$budget_min"
# 4. Plots from whatever the benchmarks wrote.
if [ -f "$DEST/results.json" ]; then
    step plots 30 python -m benchmarks plot --in "$DEST"
else
    note "[FAILED] plots: no results.json"
    failures=$((failures + 1))
fi

note "total $(( $(date +%s) - start )) s, $failures failed step(s)"
[ "$failures" -eq 0 ]
