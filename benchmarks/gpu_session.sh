#!/usr/bin/env bash
# One prepared device session (at most 8 files under $OUT come back, so results share files): the suite on the GPU machine's torch, the model-step ceiling, augmentation
# overhead, loader throughput, and end-to-end training from JPEG files. Results land in $OUT/*.txt.
#   OUT=/tmp/out bash benchmarks/gpu_session.sh            # on the GPU machine
#   SMALL=1 OUT=/tmp/out bash benchmarks/gpu_session.sh    # a quick dry run on a CPU
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/rectrain_out}; mkdir -p "$OUT"
S=${SMALL:-0}
W=$(nproc)
DATA=/tmp/rectrain_inet
sec() { echo; echo "=== $* ($(date +%T))"; }
{
sec machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU"
python -c "import torch, sys, PIL; print('torch', torch.__version__, 'python', sys.version.split()[0], 'pillow', PIL.__version__)"
echo "cores $W"; lscpu | grep -m1 'Model name'
} 2>&1 | tee "$OUT/machine.txt"

sec "test suite on this machine's torch" | tee -a "$OUT/machine.txt"
timeout 240 python -m pytest -q -x -p no:cacheprovider 2>&1 | tail -6 | tee -a "$OUT/machine.txt"

if [ "$S" = 1 ]; then STEP="--device cpu --arch resnet18 --width 16 --batch_size 16 --shapes 64x64 --steps 2 --warmup 1"
else STEP="--steps 15 --warmup 6"; fi
sec "bench_step $STEP" | tee "$OUT/step.txt"
timeout 150 python benchmarks/bench_step.py $STEP 2>&1 | tee -a "$OUT/step.txt"

if [ "$S" = 1 ]; then AUG="--device cpu --iters 2"; else AUG=""; fi
sec "bench_augment $AUG" | tee "$OUT/augment.txt"
timeout 120 python benchmarks/bench_augment.py $AUG 2>&1 | tee -a "$OUT/augment.txt"

if [ "$S" = 1 ]; then N=4; C=10; else N=64; C=100; fi
sec "synth + scan ($C classes x $N ImageNet-like JPEGs)" | tee "$OUT/loader.txt"
rm -rf $DATA
( time python -m rectrain synth --out $DATA --classes $C --train_per_class $N --val_per_class 8 --kind imagenet --workers $W ) 2>&1 | tail -4 | tee -a "$OUT/loader.txt"
timeout 60 python -m rectrain scan --data_dir $DATA --split train 2>&1 | tail -25 | tee -a "$OUT/loader.txt"

if [ "$S" = 1 ]; then LB="--batches 2 --batch_size 8"; else LB="--batches 8 --batch_size 64"; fi
sec "bench_loader per core (1 worker each) $LB" | tee -a "$OUT/loader.txt"
timeout 150 python benchmarks/bench_loader.py --data_dir $DATA --workers 1 $LB 2>&1 | tee -a "$OUT/loader.txt"
sec "rectrain bench loader --workers $W" | tee -a "$OUT/loader.txt"
timeout 90 python -m rectrain bench loader --data_dir $DATA --workers $W $LB 2>&1 | tee -a "$OUT/loader.txt"

if [ "$S" = 1 ]; then E2E="--batch_size 8 --target_size 64 --arch resnet18 --width 8 --device cpu"; else E2E="--batch_size 256"; fi
sec "end-to-end: train_g4.dn_12xlarge.py 2 epochs from JPEG, $E2E" | tee "$OUT/e2e.txt"
timeout 240 python train_g4.dn_12xlarge.py --data_dir $DATA --epochs 2 --workers $W --print_freq 5 \
    --output /tmp/rectrain_runs --run_name e2e $E2E 2>&1 | tr '\r' '\n' | grep -v 'batch/s' | tee -a "$OUT/e2e.txt"
cp /tmp/rectrain_runs/e2e/metrics.csv "$OUT/e2e_metrics.csv" 2>/dev/null
cp /tmp/rectrain_runs/e2e/summary.json "$OUT/e2e_summary.json" 2>/dev/null

sec "fp16 + GradScaler: stop at step 8, resume to the end of epoch 1" | tee "$OUT/fp16.txt"
timeout 90 python -m rectrain train --data_dir $DATA --epochs 1 --amp_dtype fp16 --max_steps 8 --workers $W \
    --print_freq 4 --output /tmp/rectrain_runs --run_name fp16 $E2E 2>&1 | tr '\r' '\n' | grep -v 'batch/s' | tail -5 | tee -a "$OUT/fp16.txt"
timeout 90 python -m rectrain train --data_dir $DATA --epochs 1 --amp_dtype fp16 --resume auto --workers $W \
    --print_freq 4 --output /tmp/rectrain_runs --run_name fp16 $E2E 2>&1 | tr '\r' '\n' | grep -v 'batch/s' | tail -6 | tee -a "$OUT/fp16.txt"
echo "=== done $(date +%T)"
