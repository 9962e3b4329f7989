#!/usr/bin/env bash
# One script for a session that has a GPU (device tool), sized to 9 minutes of device time:
#   1. the CUDA tests;
#   2. bench_rescale on the GPU: ResNet-50, batch 256, bf16 autocast (the rescale as a share of
#      the step; the fused step — on CUDA the foreach step — against the compiled and the
#      torch-fused SGD steps; then Adam's step-length mode against AdamW's step, with the
#      few-launch foreach core (CUDA's default) and with the compiled per-tensor kernel; last,
#      the fused step on the compiled update it replaced; a timeout may cut these two without
#      losing the rest);
#   3. step_profile: the Table 2 harness's VGG-11 step, wall time against the device's kernel
#      time (is the device kept busy?), appended to profile.txt;
#   4. the paper's Table 2 protocol (benchmarks/table2.py) in the time that is left: VGG-16
#      SGD vs back-matching, then VGG-11's second seed (its first ran), if time is left; with
#      --compile auto, each model's probe times an epoch eagerly and compiled (would Table 2 fit
#      more epochs so?) and its runs take the faster (table2_log.txt says which).
# Results under $OUT: gpu.txt, gpu_tests.txt, bench_rescale.txt, profile.txt (where the rescale's
# host time goes, then where a training step's time goes), table2_log.txt, table2.md, table2.json,
# log.txt (8: the most that come back).
#
# On the device (from the repo root, after `mkdir -p data && cp ../shared/datasets/cifar10-jpeg.npz data/`):
#   run(command="bash benchmarks/device_run.sh", carry=["data"], timeout_s=590)
# Shorter runs: BUDGET=SECONDS, JOBS=vgg16:0 (the table's jobs), EPOCHS=N (fixed, no probe),
# COMPILE=off|on|auto (the model's torch.compile in Table 2; default auto).
# A CPU dry run of every step (tiny models, 2 epochs; tests/test_pipeline.py):
#   DRY=1 DATA=path/to/pack.npz OUT=/tmp/out bash benchmarks/device_run.sh
set -u
OUT=${OUT:-out}
BUDGET=${BUDGET:-540}          # seconds for the whole script
DATA=${DATA:-data/cifar10-jpeg.npz}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export FXBACKMATCH_CACHE=${FXBACKMATCH_CACHE:-data/cache}
PY=${PYTHON:-python3}
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
say() { echo "[$(( $(date +%s) - START )) s] $*" | tee -a "$OUT/log.txt"; }

if [ "${DRY:-0}" = 1 ]; then
  DEVICE=cpu
  TESTS=(-m cuda tests/test_optim.py)
  BENCH=(--models resnet18 --device cpu --batch 8 --reps 2 --train-reps 1 --amp --length --compiled-update --rounds 2)
  STEP=(--device cpu --width 0.0625 --batch-size 16 --steps 3)
  TABLE=(--device cpu --epochs 2 --subset 64 --batch-size 16 --width 0.0625 --jobs vgg11:0 --compile auto)
else
  DEVICE=cuda
  TESTS=(-m cuda tests/test_optim.py tests/test_pipeline.py tests/test_cuda.py)
  BENCH=(--models resnet50 --device cuda --batch 256 --reps 20 --train-reps 10 --amp --length --compiled-update)
  STEP=(--device cuda --steps 50)
  # VGG-11 seed 0 ran 46 epochs on 2026-12-04 (docs/results.md): next, VGG-16 long, then a second seed
  TABLE=(--device cuda --jobs "${JOBS:-vgg16:0,vgg11:1,vgg11:0}" --min-epochs 15 --max-epochs 60 ${EPOCHS:+--epochs $EPOCHS}
         --compile "${COMPILE:-auto}")
fi

say "start: budget ${BUDGET} s, device ${DEVICE}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
} > "$OUT/gpu.txt" 2>&1
say "$(tail -1 "$OUT/gpu.txt")"

# decode the JPEG pack once (cached under $FXBACKMATCH_CACHE) while nothing else runs
timeout 60 $PY -c "from fxbackmatch.train.pipeline import load_cached; print(load_cached('$DATA').describe())" \
  >> "$OUT/log.txt" 2>&1
say "data decoded"

timeout -k 5 120 $PY -m pytest -q -p no:cacheprovider "${TESTS[@]}" > "$OUT/gpu_tests.txt" 2>&1
say "cuda tests: rc $? — $(tail -1 "$OUT/gpu_tests.txt")"

timeout -k 5 180 $PY benchmarks/bench_rescale.py "${BENCH[@]}" --profile "$OUT/profile.txt" > "$OUT/bench_rescale.txt" 2>&1
say "bench_rescale: rc $?"

# is the device kept busy? the harness's VGG-11 step: wall vs kernel time, busiest ops
timeout -k 5 90 $PY benchmarks/step_profile.py --data "$DATA" "${STEP[@]}" >> "$OUT/profile.txt" 2>&1
say "step_profile: rc $?"

T=$(( $(left) - 15 ))
say "table2 with ${T} s"
# the harness's per-run outputs (checkpoints, per-layer logs) stay outside $OUT: at most 8
# files come back, so the table and its per-epoch rows (table2.json) are what travels
RUNS=${RUNS:-$(mktemp -d)}
timeout -k 10 $(( T + 30 )) $PY benchmarks/table2.py --data "$DATA" --budget-s "$T" --out "$RUNS/table2" "${TABLE[@]}" \
  > "$OUT/table2_log.txt" 2>&1
say "table2: rc $?"
cp "$RUNS/table2/table2.md" "$RUNS/table2/table2.json" "$OUT/" 2>/dev/null
say "done"
