#!/usr/bin/env bash
# Every GPU measurement in one command: environment, Triton tests on CUDA, then the benchmarks.
#
#   bash benchmarks/gpu_session.sh OUTDIR            on a CUDA machine (about 9 minutes on an H100)
#   bash benchmarks/gpu_session.sh OUTDIR --smoke    every step with tiny shapes on the CPU (checks the script)
#
# Steps, each under its own `timeout`, all inside GPU_SESSION_SECONDS (default 540 s; a step gets
# what is left if that is less than its budget):
#   1. install the wheels in .whl/ (fla-core + flash-linear-attention, if present) into OUTDIR/site
#   2. versions, nvidia-smi, `import xinzhou` (the repo root is put on PYTHONPATH; no pip install)
#   3. the kernel tests on CUDA (XINZHOU_AUTOTUNE=0: one config per kernel)  (budget  80 s)
#   4. benchmarks/bench_lightning.py $BENCH_LIGHTNING_ARGS                  (budget 180 s)
#   5. benchmarks/bench_moe.py $BENCH_MOE_ARGS                              (budget  60 s)
#   6. benchmarks/bench_ops.py (fused norm / loss / SwiGLU vs PyTorch)      (budget  40 s)
#   7. benchmarks/bench_model.py $BENCH_MODEL_ARGS (default --quick)        (budget 160 s)
# The *_ARGS variables add arguments (e.g. BENCH_LIGHTNING_ARGS="--seq-lens 8192 32768"); set them
# before the command: `BENCH_MODEL_ARGS= bash benchmarks/gpu_session.sh OUTDIR` runs bench_model's
# full plan (more than its budget: give it more time with GPU_SESSION_SECONDS).
# Files in OUTDIR: session.log (steps 1-3, 6 and the summary), bench_{lightning,moe,model}.{log,json}
# and bench_ops.json. A step that fails or runs out of time is logged and the next one still runs;
# the exit status is nonzero if any step failed. The last lines printed summarise every table.

set -u -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash benchmarks/gpu_session.sh OUTDIR [--smoke]" >&2
    exit 2
fi
RUN_DIR=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "gpu_session.sh: cannot create $1" >&2; exit 2; }
SMOKE=0
[ "${2:-}" = "--smoke" ] && SMOKE=1
PY=${PYTHON:-python3}
TOTAL=${GPU_SESSION_SECONDS:-540}
BENCH_MODEL_ARGS=${BENCH_MODEL_ARGS---quick}  # set but empty: the full plan
LOG=$RUN_DIR/session.log
: >"$LOG"
FAILED=0
SUMMARY=()

log() { echo "$*" | tee -a "$LOG"; }

# step NAME BUDGET_S LOGFILE CMD...: run CMD under timeout (the smaller of its budget and the time
# left), output to the terminal and appended to LOGFILE; records its exit status
step() {
    local name=$1 budget=$2 logfile=$3
    shift 3
    local left=$((TOTAL - SECONDS - 5))
    local limit=$((budget < left ? budget : left))
    if [ "$limit" -lt 15 ]; then
        log "=== $name: skipped, ${left}s left of ${TOTAL}s"
        SUMMARY+=("$name: skipped (no time left)")
        FAILED=1
        return
    fi
    log "=== $name (limit ${limit}s, started at ${SECONDS}s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$logfile"
    local rc=$?
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && log "=== $name: TIMED OUT after ${limit}s"
    log "=== $name: exit $rc at ${SECONDS}s"
    SUMMARY+=("$name: exit $rc")
    [ "$rc" -eq 0 ] || FAILED=1
}

read -r -a LIGHTNING_ARGS <<<"${BENCH_LIGHTNING_ARGS:-}"
read -r -a MOE_ARGS <<<"${BENCH_MOE_ARGS:-}"
OPS_ARGS=()
if [ "$SMOKE" = 1 ]; then
    LIGHTNING_ARGS+=(--device cpu --smoke)
    MOE_ARGS+=(--device cpu --smoke)
    OPS_ARGS+=(--device cpu --smoke)
    MODEL_ARGS=(--device cpu --smoke)
    log "smoke mode: CPU, tiny shapes (checks the script, times nothing)"
else
    read -r -a MODEL_ARGS <<<"$BENCH_MODEL_ARGS"
fi

# 1. fla wheels, for machines without network access (see benchmarks/RESULTS.md)
if compgen -G ".whl/*.whl" >/dev/null; then
    log "installing wheels from .whl/: $(cd .whl && echo *.whl)"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$RUN_DIR/site" \
        .whl/*.whl 2>&1 | tee -a "$LOG"; then
        export PYTHONPATH=$RUN_DIR/site${PYTHONPATH:+:$PYTHONPATH}
    else
        log "WARNING: wheel install failed: fla columns will read n/a"
    fi
else
    log "no .whl/ folder: fla is used only if the image has it"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# 2. environment
{
    echo "=== environment ($(date -u +%FT%TZ), $(hostname))"
    echo "PYTHONPATH=$PYTHONPATH"
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs",
          "capability", torch.cuda.get_device_capability(0))
for name in ("triton", "transformers", "einops", "fla"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as e:
        print(name, "NOT IMPORTABLE:", type(e).__name__, str(e)[:200])
try:
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla  # noqa: F401
    print("fla.ops.simple_gla: chunk_simple_gla, fused_recurrent_simple_gla import")
except Exception as e:
    print("fla.ops.simple_gla NOT IMPORTABLE:", type(e).__name__, str(e)[:200])
import xinzhou, xinzhou.ops.lightning  # noqa: E401,F401
print("xinzhou from", xinzhou.__file__)
EOF
    if command -v nvidia-smi >/dev/null; then  # read-only queries: never change the card's settings
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used \
            --format=csv
    else
        echo "no nvidia-smi"
    fi
} 2>&1 | tee -a "$LOG"

# 3-7
# the kernel tests on CUDA, one launch config per kernel (autotuning every test shape would take minutes)
step "pytest (kernels on CUDA)" 80 "$LOG" env XINZHOU_AUTOTUNE=0 "$PY" -m pytest -x -q \
    tests/test_lightning_triton.py tests/test_norm.py tests/test_cross_entropy.py tests/test_moe.py \
    tests/test_scheduler.py::test_decode_graphs_on_cuda_replay_the_eager_step
step "bench_lightning ${LIGHTNING_ARGS[*]}" 180 "$RUN_DIR/bench_lightning.log" \
    "$PY" benchmarks/bench_lightning.py "${LIGHTNING_ARGS[@]}" --out "$RUN_DIR/bench_lightning.json"
step "bench_moe ${MOE_ARGS[*]}" 60 "$RUN_DIR/bench_moe.log" \
    "$PY" benchmarks/bench_moe.py "${MOE_ARGS[@]}" --out "$RUN_DIR/bench_moe.json"
step "bench_ops" 40 "$LOG" "$PY" benchmarks/bench_ops.py "${OPS_ARGS[@]}" --out "$RUN_DIR/bench_ops.json"
step "bench_model ${MODEL_ARGS[*]}" 160 "$RUN_DIR/bench_model.log" \
    "$PY" benchmarks/bench_model.py "${MODEL_ARGS[@]}" --out "$RUN_DIR/bench_model.json"

# summary: the tables again, last, so the end of the output holds them
{
    echo
    echo "=================== summary (${SECONDS}s) ==================="
    for s in "${SUMMARY[@]}"; do echo "$s"; done
    if [ -f "$RUN_DIR/bench_lightning.log" ]; then
        echo "--- lightning (times ms; decode us)"
        grep -E '^(relative error|peak bf16|B=|decode )' "$RUN_DIR/bench_lightning.log"
    fi
    [ -f "$RUN_DIR/bench_moe.log" ] && echo "--- moe" && sed -n '/^MoE block/,/^wrote/p' "$RUN_DIR/bench_moe.log"
    echo "--- fused ops" && grep -E '^(rms_norm|cross_entropy|swiglu) ' "$LOG"
    if [ -f "$RUN_DIR/bench_model.log" ]; then
        echo "--- model"
        grep -E '^(logits|peak bf16|train |prefill |decode )' "$RUN_DIR/bench_model.log"
    fi
    echo "files in $RUN_DIR: $(cd "$RUN_DIR" && ls -p | grep -v / | tr '\n' ' ')"
} 2>&1 | tee -a "$LOG"
exit "$FAILED"
