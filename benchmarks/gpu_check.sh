#!/usr/bin/env bash
# The GPU check: every kind through train/resume/evaluate/sample on cuda, the image RealNVP
# on Fashion-MNIST for a fixed time (eager and --compile) with images/s and test bits/dim,
# a Fashion-MNIST VAE epoch, fit_guide + diagnose with data on the GPU, and the coupling
# throughput table at batch 256 and 4096; then one summary table. At most about 8 minutes
# ($GPU_CHECK_BUDGET, 480 s, for the sections; each has its own limit too). Each section
# runs on its own (under `timeout`): a failure or a skip is a row of the table, not the end
# of the check.
#
#   benchmarks/gpu_check.sh                    # on a machine with a GPU (and the bench extra)
#   GPU_CHECK_DATA=/path/to/fashion-mnist benchmarks/gpu_check.sh
#   benchmarks/gpu_check.sh --cpu-smoke        # everything tiny, on the CPU: the script runs
#
# Fashion-MNIST is read from $GPU_CHECK_DATA (a folder holding the four official IDX files,
# .gz or not), else where pyro_genext looks ($PYRO_GENEXT_DATA, the cache, a download).
# Logs and the table go to $OUT when it is set (else runs/gpu_check). Other knobs:
# GPU_CHECK_SECONDS (eager RealNVP, 120), GPU_CHECK_COMPILED_SECONDS (45),
# GPU_CHECK_COMPILE_MODE (auto: reduce-overhead on a GPU), GPU_CHECK_BUDGET (480), PYTHON.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUTDIR=${OUT:-runs/gpu_check}  # three files: gpu_check.log, gpu_check.jsonl, summary.txt
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # the runs' checkpoints, each section's log
mkdir -p "$OUTDIR"
RESULTS="$OUTDIR/gpu_check.jsonl"
LOG="$OUTDIR/gpu_check.log"
: >"$RESULTS"
: >"$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

SMOKE=0 SCALE=1
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
if [ $SMOKE = 1 ]; then
    DEV=cpu; FLAGS=(--smoke); SECONDS_EAGER=5; SECONDS_COMPILED=0; SCALE=5 GPU_CHECK_BUDGET=${GPU_CHECK_BUDGET:-1500}
    TP256=(--quick --device cpu --impls floor,ours); TP4096=()
else
    DEV=cuda; FLAGS=(); SECONDS_EAGER=${GPU_CHECK_SECONDS:-120}; SECONDS_COMPILED=${GPU_CHECK_COMPILED_SECONDS:-45}
    TP256=(--device cuda --clock wall --batch 256 --repeats 3 --min-time 0.1  # compiled: at 4096
           --impls floor,ours,ours-default,nflows,normflows,zuko,pyro)
    TP4096=(--device cuda --clock wall --batch 4096 --dims 784 --widths 1024 --repeats 3 --min-time 0.1)
fi
START=$(date +%s)
ROOT=()
[ -n "${GPU_CHECK_DATA:-}" ] && ROOT=(--root "$GPU_CHECK_DATA")
COMMON=(--device "$DEV" --results "$RESULTS" --work "$WORK/runs" "${ROOT[@]}" "${FLAGS[@]}")

BUDGET=${GPU_CHECK_BUDGET:-480}  # seconds for all sections together (the summary after them)
section() {  # section NAME LIMIT_SECONDS COMMAND...: within the limit and what the budget has left
    local name=$1 limit=$2; shift 2
    limit=$(( limit * SCALE ))
    local left=$(( BUDGET - ($(date +%s) - START) ))
    [ $left -lt $limit ] && limit=$left
    if [ $limit -lt 20 ]; then
        echo "=== $name: skipped, the budget of $BUDGET s is spent"
        echo "{\"section\": \"$name\", \"name\": \"(section)\", \"ok\": false, \"error\": \"skipped: budget spent\"}" >>"$RESULTS"
        return
    fi
    echo "=== $name ($(date -u +%H:%M:%S), at most ${limit} s)" | tee -a "$LOG"
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    cat "$WORK/$name.log" >>"$LOG"
    tail -n 25 "$WORK/$name.log"
    if [ $rc -ne 0 ]; then
        echo "{\"section\": \"$name\", \"name\": \"(section)\", \"ok\": false, \"error\": \"exit status $rc, see gpu_check.log\"}" >>"$RESULTS"
    fi
}

if [ $DEV = cuda ]; then
    $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" \
        | tee -a "$LOG"
fi
section cli 100 $PY benchmarks/gpu_check.py cli "${COMMON[@]}" --compiled skip
section vae 60 $PY benchmarks/gpu_check.py vae "${COMMON[@]}"
section guide 60 $PY benchmarks/gpu_check.py guide "${COMMON[@]}"
section realnvp 200 $PY benchmarks/gpu_check.py realnvp "${COMMON[@]}" --seconds "$SECONDS_EAGER"
section throughput_256 100 $PY benchmarks/throughput.py "${TP256[@]}"
if [ ${#TP4096[@]} -gt 0 ]; then
    section throughput_4096 60 $PY benchmarks/throughput.py "${TP4096[@]}"
fi
if [ "$SECONDS_COMPILED" != 0 ]; then  # last: the compiled runs take what the budget has left
    section cli_compiled 100 $PY benchmarks/gpu_check.py cli "${COMMON[@]}" --compiled only
    section realnvp_compiled 200 $PY benchmarks/gpu_check.py realnvp "${COMMON[@]}" --compile \
        --compile-mode "${GPU_CHECK_COMPILE_MODE:-auto}" --seconds "$SECONDS_COMPILED"
fi
echo
echo "=== summary ($(( $(date +%s) - START )) s in all)" | tee "$OUTDIR/summary.txt"
$PY benchmarks/gpu_check.py summary "${COMMON[@]}" | tee -a "$OUTDIR/summary.txt"
for t in throughput_256 throughput_4096; do
    if [ -f "$WORK/$t.log" ]; then
        echo "--- $t (benchmarks/throughput.py)" | tee -a "$OUTDIR/summary.txt"
        grep -v '^\s*$' "$WORK/$t.log" | tee -a "$OUTDIR/summary.txt"
    fi
done
rm -rf "$WORK"
