#!/usr/bin/env bash
# One script for a session that has a GPU (device tool): GPU tests, benchmarks and a short
# CIFAR-10 training, results under $OUT. Run from the repo root with PYTHONPATH=. after
# copying ../shared/datasets/cifar10-jpeg.npz to data/ (an ignored folder) and carrying it:
#   run(command="bash benchmarks/device_run.sh", carry=["data"], timeout_s=580)
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1
timeout 90 python -m pytest -q -m cuda tests > "$OUT/gpu_tests.txt" 2>&1
timeout 120 python benchmarks/bench_rescale.py --train-reps 5 > "$OUT/bench_rescale.txt" 2>&1
timeout 60 python benchmarks/bench_memory.py > "$OUT/bench_memory.txt" 2>&1
for m in sgd backmatch; do
  timeout 150 python -m fxbackmatch train --model vgg11 --methods $m --epochs 30 --data data/cifar10-jpeg.npz \
    --device cuda --plan-compile --augment --nesterov --weight-decay 1e-4 \
    --lr sgd=0.1,backmatch=0.002 --out "$OUT/vgg11-$m" --no-progress > "$OUT/train-$m.txt" 2>&1
done
ls -R "$OUT" | head -50
