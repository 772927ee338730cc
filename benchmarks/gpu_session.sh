#!/usr/bin/env bash
# The prepared GPU session of issue 16: one call that ends inside 7 minutes and returns at most 3 files,
# $OUT/session.log (everything printed), $OUT/summary.json (every figure, merged) and $OUT/check.txt.
#
#   OUT=$OUT bash benchmarks/gpu_session.sh              # on the GPU machine; carry .device/timm (timm's train.py)
#                                                        # and .whl (the turbojpeg wheel: benchmarks/device_wheels.sh)
#   SMALL=1 OUT=/tmp/out bash benchmarks/gpu_session.sh  # a dry run of every step on a CPU, tiny settings
#
# Steps, in order of priority; each runs under `timeout` with at most what is left of BUDGET seconds:
#   1. machine       GPU, driver, CPU model, software versions; the wheels in .whl/ installed into /tmp/site
#   2. data          `rectrain synth --kind imagenet`: ImageNet-like JPEGs in train/<class>, val/<class>
#   3. check         `rectrain check` at this batch: the decoder the run will use (--decoder auto), the loader probe
#   4. timm          timm's train.py on the same folder (benchmarks/bench_timm.py), same batch, workers, steps
#   5. e2e_area      ours end to end (`rectrain bench e2e`), --rect_mode area, the compiled step (per_shape), the
#                    default decoder, 16 workers, a fresh compile cache: the warm-up with a COLD cache
#   6. e2e_area_w12  the same with 12 workers and the same cache folder: the warm-up with a WARM cache
#   7. e2e_dynamic   the same as 5 with --compile_shapes dynamic (one graph for every H x W), a fresh cache: compile
#                    time and step speed against 5's one graph per shape
#   8. summary       summary.json, the tables, and the headline ratios (ours / timm, ours / 6,000 images/s), last
# Steps 5-7 train on the area buckets up to --max_ratio $RATIO (default 1.34: 256x192, 224x224, 192x256), so that
# three cold compilations of one graph per shape (about 35 s each on an H200) fit the call beside the rest; the
# summary scales the compile times to the default table (--max_ratio 2: 9 shapes).
# Extras, run only when ONLY names them: gpu_tests (the GPU-only tests), e2e_short_side, model (`bench model`),
# ablation (`bench ablation`), gpu_decode (nvJPEG vs the workers).
# Knobs (environment): BUDGET (seconds, default 390 of the 420), ONLY (the steps to run, e.g. ONLY="data e2e_dynamic"
# for a second call), RATIO (--max_ratio of steps 5-7), COMPILE (the compile flags of steps 5-7, default
# "--compile on"), OURS (extra `rectrain train` flags for steps 5-7), W12 (the workers of step 6, default 12),
# STEPS/SKIP (timed/untimed steps of 4-7), E2E_CAP (seconds for each of 5 and 7, default 200), ROWS (ablation
# rows), PY (python).
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

if [ "$SMALL" = 1 ]; then  # CPU dry run: tiny model and data, every step exercised (eager: Inductor on a CPU
    # takes minutes per graph; COMPILE="--compile on" tries it)
    BUDGET=${BUDGET:-1200}; STEPS=${STEPS:-4}; SKIP=${SKIP:-2}; BATCH=8; CLASSES=4; PER_CLASS=24; VAL=2
    MODEL="--device cpu --arch resnet18 --width 8 --target_size 64"
    COMPILE=${COMPILE:---compile off}
    ABL="--device cpu --arch resnet18 --width 8 --target_size 64 --steps 2 --warmup 1"
    ROWS=${ROWS:-fp32,amp,rect,batch_aug,channels_last,gpu_decode,area}  # compile: minutes on a CPU
    BENCH_MODEL="--device cpu --arch resnet18 --width 8 --batch_size 8 --shapes 64x64 --steps 2 --warmup 1"
    TIMM_DEVICE="--device cpu"; INTERVAL=2
else                       # GPU: ResNet-50, batch 256, 224 px, all cores
    BUDGET=${BUDGET:-390}; STEPS=${STEPS:-30}; SKIP=${SKIP:-10}; BATCH=256; CLASSES=100; PER_CLASS=128; VAL=4
    MODEL=""
    COMPILE=${COMPILE:---compile on}
    ABL="--steps 15 --warmup 3 --max_shapes 3"  # 3 most common shapes: autotuning and compilation fit the session
    ROWS=${ROWS:-fp32,amp,rect,batch_aug,channels_last,compile,gpu_decode,area}
    BENCH_MODEL="--shapes 224x224 --dtypes bf16 --optimizers foreach,fused --steps 30 --warmup 10"
    TIMM_DEVICE=""; INTERVAL=5
fi
RATIO=${RATIO:-1.34}
OURS=${OURS:-}
W12=${W12:-12}; [ "$W12" -gt "$W" ] && W12=$W
ONLY=${ONLY:-data check timm e2e_area e2e_area_w12 e2e_dynamic}

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
# Wheels the machine lacks (the turbojpeg wheel of the region decoder), fetched beforehand into .whl/ by
# benchmarks/device_wheels.sh; without them --decoder auto falls back to OpenCV, and `check` says so.
if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site && echo "installed into /tmp/site: $(ls .whl | tr '\n' ' ')"
else
    echo "no wheels in .whl/ (benchmarks/device_wheels.sh fetches them)"
fi
"$PY" -c "import torch, sys, PIL; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0], 'pillow', PIL.__version__)"
"$PY" -c "import torchvision; print('torchvision', torchvision.__version__)" 2>/dev/null || echo "torchvision: not installed"
"$PY" -c "import timm; print('timm', timm.__version__)" 2>/dev/null || echo "timm: not installed"
"$PY" -c "import turbojpeg; print('turbojpeg: importable')" 2>/dev/null || echo "turbojpeg: not installed"
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

# The pre-training check with the run's flags: which decoder --decoder auto picks, and the loader probe.
step check 60 "$RES/check.txt" "$PY" -m rectrain check --data_dir "$DATA" --batch_size $BATCH --workers "$W" \
    --rect_mode area --max_ratio "$RATIO" --output "$WORK/check_runs" $MODEL $OURS
if [ -f "$RES/check.txt" ]; then
    cat "$RES/check.txt"; cp "$RES/check.txt" "$OUT/check.txt"
    echo "=== decoder (rectrain check): $(grep -i 'decod' "$RES/check.txt" | tr -s ' ' | paste -sd ';' -)"
fi

step timm 120 "$RES/timm.json" "$PY" benchmarks/bench_timm.py --data_dir "$DATA" --batch_size $BATCH --workers "$W" \
    --steps "$STEPS" --skip "$SKIP" $TIMM_DEVICE --json

e2e() {  # NAME CAP WORKERS CACHE [FLAGS...]: ours end to end in area mode, JSON to NAME.json
    local name=$1 cap=$2 workers=$3 cache=$4
    shift 4
    step "$name" "$cap" "$RES/$name.json" "$PY" -m rectrain bench e2e --data_dir "$DATA" --rect_mode area \
        --max_ratio "$RATIO" --batch_size $BATCH --workers "$workers" --steps "$STEPS" --skip "$SKIP" \
        --interval $INTERVAL $MODEL $COMPILE --compile_cache "$cache" $OURS "$@" --json
}
e2e e2e_area "${E2E_CAP:-200}" "$W" "$WORK/cache_per_shape"        # cold: the folder is new
e2e e2e_area_w12 120 "$W12" "$WORK/cache_per_shape"                # warm: the graphs of e2e_area
e2e e2e_dynamic "${E2E_CAP:-200}" "$W" "$WORK/cache_dynamic" --compile_shapes dynamic

# Extras (ONLY="... e2e_short_side model ablation gpu_decode"): the seed's short_side buckets, the model step alone,
# the seed's Speed Comparison table, nvJPEG decode+crop against the CPU workers.
step e2e_short_side 150 "$RES/e2e_short_side.json" "$PY" -m rectrain bench e2e --data_dir "$DATA" \
    --rect_mode short_side --batch_size $BATCH --workers "$W" --steps "$STEPS" --skip "$SKIP" --interval $INTERVAL \
    $MODEL $OURS --json
step model 60 "$RES/model.json" "$PY" -m rectrain bench model $BENCH_MODEL --json
step ablation 600 "$RES/ablation.json" "$PY" -m rectrain bench ablation --data_dir "$DATA" --batch_size $BATCH \
    --workers "$W" $ABL --rows "$ROWS" --partial "$RES/ablation_rows.jsonl" --json
step gpu_decode 90 - "$PY" benchmarks/bench_gpu_decode.py --data_dir "$DATA"

echo; echo "=== summary (${SECONDS}s elapsed)"
"$PY" benchmarks/session_summary.py "$RES" "$OUT/summary.json"
echo "=== done in ${SECONDS}s"
