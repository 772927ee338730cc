#!/usr/bin/env bash
# The prepared GPU session of issue 8: one call that ends inside 7 minutes and returns two files,
# $OUT/session.log (everything printed) and $OUT/summary.json (every figure, merged).
#
#   OUT=$OUT bash benchmarks/gpu_session.sh              # on the GPU machine; carry .device/timm (timm's train.py)
#   SMALL=1 OUT=/tmp/out bash benchmarks/gpu_session.sh  # a dry run of every step on a CPU, tiny settings
#
# Steps, in order of priority; each runs under `timeout` with at most what is left of BUDGET seconds:
#   1. machine        GPU, driver, CPU model, software versions
#   2. gpu_tests      the test suite's GPU-only tests (those that skip without CUDA or torchvision)
#   3. data           `rectrain synth --kind imagenet`: ImageNet-like JPEGs in train/<class>, val/<class>
#   4. e2e_area       ours end to end (`rectrain bench e2e`), --rect_mode area, with the settings in $OURS
#   5. timm           timm's train.py on the same folder (benchmarks/bench_timm.py), same batch, workers, steps
#   6. e2e_short_side ours in short_side mode
#   7. model          the model step alone (`rectrain bench model`): fused vs foreach SGD, MFU
#   8. ablation       the seed's Speed Comparison table (`rectrain bench ablation`); finished rows survive a timeout
#   9. summary        summary.json, the tables, and the headline ratios, printed last
# Extras, run only when ONLY names them: check (`rectrain check` at this batch), gpu_decode (nvJPEG vs workers).
# Knobs (environment): BUDGET (seconds, default 390 of the 420), ONLY (the steps to run, e.g. ONLY="data ablation"
# for a second call when the first ran out of time), OURS (extra `rectrain train` flags for steps 4 and 6, e.g.
# "--compile" or "--decode gpu"), STEPS/SKIP (timed/untimed steps of 4-6), E2E_CAP (seconds for each of 4 and 6,
# default 120; --compile's warm-up of 9 shapes needs ~300 of them), ROWS (ablation rows), PY (python).
set -u -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/rectrain_out}
SMALL=${SMALL:-0}
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
W=$(nproc)
WORK=/tmp/rectrain_session
DATA=$WORK/data
RES=$WORK/results
RESERVE=15  # seconds kept for the summary
mkdir -p "$OUT"
rm -rf "$WORK" && mkdir -p "$RES"
exec > >(tee "$OUT/session.log") 2>&1

if [ "$SMALL" = 1 ]; then  # CPU dry run: tiny model and data, every step exercised
    BUDGET=${BUDGET:-1200}; STEPS=${STEPS:-4}; SKIP=${SKIP:-2}; BATCH=8; CLASSES=4; PER_CLASS=24; VAL=2
    MODEL="--device cpu --arch resnet18 --width 8 --target_size 64"
    ABL="--device cpu --arch resnet18 --width 8 --target_size 64 --steps 2 --warmup 1"
    ROWS=${ROWS:-fp32,amp,rect,batch_aug,channels_last,gpu_decode,area}  # compile: minutes on a CPU
    BENCH_MODEL="--device cpu --arch resnet18 --width 8 --batch_size 8 --shapes 64x64 --steps 2 --warmup 1"
    TIMM_DEVICE="--device cpu"; INTERVAL=2
else                       # GPU: ResNet-50, batch 256, 224 px, all cores
    BUDGET=${BUDGET:-390}; STEPS=${STEPS:-30}; SKIP=${SKIP:-10}; BATCH=256; CLASSES=100; PER_CLASS=128; VAL=4
    MODEL=""
    ABL="--steps 15 --warmup 3 --max_shapes 3"  # 3 most common shapes: autotuning and compilation fit the session
    ROWS=${ROWS:-fp32,amp,rect,batch_aug,channels_last,compile,gpu_decode,area}
    BENCH_MODEL="--shapes 224x224 --dtypes bf16 --optimizers foreach,fused --steps 30 --warmup 10"
    TIMM_DEVICE=""; INTERVAL=5
fi
OURS=${OURS:-}
ONLY=${ONLY:-gpu_tests data e2e_area timm e2e_short_side model ablation}

# step NAME CAP OUTFILE CMD...: run CMD under `timeout` (CAP seconds, or what is left before the summary's
# reserve), its stdout to OUTFILE ("-": the log); one line per step in steps.tsv (name, exit status, seconds).
step() {
    local name=$1 cap=$2 out=$3 limit start rc
    shift 3
    case " $ONLY " in *" $name "*) ;; *) return 0 ;; esac
    limit=$((BUDGET - SECONDS - RESERVE))
    [ "$limit" -gt "$cap" ] && limit=$cap
    if [ "$limit" -lt 10 ]; then
        echo "=== $name: not run, out of time (${SECONDS}s elapsed)"
        printf '%s\tnot run\t0\n' "$name" >> "$RES/steps.tsv"
        return 0
    fi
    echo; echo "=== $name ($(date +%T), limit ${limit}s, ${SECONDS}s elapsed)"
    start=$SECONDS
    if [ "$out" = - ]; then timeout --kill-after=10 "$limit" "$@"; else timeout --kill-after=10 "$limit" "$@" > "$out"; fi
    rc=$?
    [ "$rc" = 124 ] && echo "=== $name: stopped by its ${limit}s limit"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$RES/steps.tsv"
    return 0
}

echo "=== machine ($(date +%T))"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no GPU"
lscpu | grep -m1 'Model name'; echo "cores: $W"
"$PY" -c "import torch, sys, PIL; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0], 'pillow', PIL.__version__)"
"$PY" -c "import torchvision; print('torchvision', torchvision.__version__)" 2>/dev/null || echo "torchvision: not installed"
"$PY" -c "import timm; print('timm', timm.__version__)" 2>/dev/null || echo "timm: not installed"
echo "timm train.py copies: $(ls .device/timm 2>/dev/null | tr '\n' ' ')"

# The tests that skip without a GPU: those whose skipif reason names CUDA, the GPU or torchvision.
GPU_TESTS='
import re, sys, pytest
class OnlyGpuTests:
    def pytest_collection_modifyitems(self, config, items):
        gpu = lambda m: re.search(r"cuda|gpu|nvjpeg|torchvision", str(m.kwargs.get("reason", "")), re.I)
        items[:] = [it for it in items if any(gpu(m) for m in it.iter_markers("skipif"))]
sys.exit(pytest.main(["-q", "-rs", "-p", "no:cacheprovider", "tests"], plugins=[OnlyGpuTests()]))
'
step gpu_tests 90 "$RES/tests.log" "$PY" -c "$GPU_TESTS"
[ -f "$RES/tests.log" ] && { cat "$RES/tests.log"; tail -1 "$RES/tests.log" > "$RES/tests.txt"; }
step data 90 - "$PY" -m rectrain synth --out "$DATA" --classes $CLASSES --train_per_class $PER_CLASS \
    --val_per_class $VAL --kind imagenet --workers "$W"
e2e() {  # MODE: ours end to end, JSON to e2e_MODE.json
    step "e2e_$1" "${E2E_CAP:-120}" "$RES/e2e_$1.json" "$PY" -m rectrain bench e2e --data_dir "$DATA" --rect_mode "$1" \
        --batch_size $BATCH --workers "$W" --steps "$STEPS" --skip "$SKIP" --interval $INTERVAL $MODEL $OURS --json
}
e2e area
step timm 120 "$RES/timm.json" "$PY" benchmarks/bench_timm.py --data_dir "$DATA" --batch_size $BATCH --workers "$W" \
    --steps "$STEPS" --skip "$SKIP" $TIMM_DEVICE --json
e2e short_side
step model 60 "$RES/model.json" "$PY" -m rectrain bench model $BENCH_MODEL --json
step ablation 600 "$RES/ablation.json" "$PY" -m rectrain bench ablation --data_dir "$DATA" --batch_size $BATCH \
    --workers "$W" $ABL --rows "$ROWS" --partial "$RES/ablation_rows.jsonl" --json

# Extras, not in the default ONLY (a second call: ONLY="data check gpu_decode"): the pre-training checklist at
# this batch (GPU names, memory probe at the largest bucket), and nvJPEG decode+crop against the CPU workers.
step check 60 - "$PY" -m rectrain check --data_dir "$DATA" --batch_size $BATCH --workers "$W" \
    --output "$WORK/check_runs" $MODEL
step gpu_decode 90 - "$PY" benchmarks/bench_gpu_decode.py --data_dir "$DATA"

echo; echo "=== summary (${SECONDS}s elapsed)"
"$PY" benchmarks/session_summary.py "$RES" "$OUT/summary.json"
echo "=== done in ${SECONDS}s"
