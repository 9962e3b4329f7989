#!/usr/bin/env bash
# The ResNet-18 (paper-style) short run of docs/results.md: SGD and back-matching, each at
# three learning rates (log-spaced, ~3x apart), 2 epochs on a class-balanced 5,000-image subset
# (this CPU runs ResNet-18 at ~150 images/s), seed 0, same weights and batches.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/resnet18-grid}
i=0
for pair in "sgd=0.01,backmatch=0.001" "sgd=0.03,backmatch=0.003" "sgd=0.1,backmatch=0.01"; do
  python -m fxbackmatch train --model resnet18-paper --methods sgd,backmatch --lr "$pair" \
      --epochs 2 --subset 5000 --seeds 0 --no-progress --out "$out/$i"
  i=$((i + 1))
done
