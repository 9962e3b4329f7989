"""Train on CIFAR with back-matching and its competitors (the paper's protocol).

A thin wrapper around ``python -m fxbackmatch train`` — same options, same code::

    python examples/train_cifar.py --model lenet-bn --epochs 30 --seeds 0,1,2 \
        --methods sgd,backmatch,lars,lsalr

Run ``python examples/train_cifar.py --help`` for every option.
"""
from __future__ import annotations

import sys

from fxbackmatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
