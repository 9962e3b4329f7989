"""Input-pipeline throughput: the harness's earlier per-step loader against the
device-resident pipeline (:mod:`fxbackmatch.train.pipeline`), images per second of
normalized, augmented training batches, all in this one process (interleaved repeats,
median), on CIFAR-10's 50,000 training images.

    python benchmarks/bench_loader.py                  # CPU
    python benchmarks/bench_loader.py --device cuda --channels-last

``earlier``: what the harness did per step before the pipeline — index the uint8 set,
normalize, and (``rotate``) the flip + rotation of :func:`augment_batch`.
``pipeline``: :class:`DeviceLoader` — one copy of the epoch's draws, then per batch a gather
(crop + flip in one) and the normalization.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import machine, sync  # noqa: E402

from fxbackmatch.train import augment_batch, epoch_batches  # noqa: E402
from fxbackmatch.train.pipeline import DeviceLoader, load_cached  # noqa: E402


def earlier(data, bs: int, seed: int, rotate: bool) -> int:
    """The harness's loop before the pipeline: index, normalize, augment per step."""
    shuffle, aug = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    n = 0
    for idx in epoch_batches(data.train_x.shape[0], bs, shuffle):
        idx = idx.to(data.train_x.device, non_blocking=True)
        x = data.normalize(data.train_x[idx])
        if rotate:
            x = augment_batch(x, aug)
        n += x.shape[0]
    return n


def pipeline(data, bs: int, seed: int, augment: str, channels_last: bool) -> int:
    loader = DeviceLoader(data, bs, augment, channels_last=channels_last)
    shuffle, aug = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    n = 0
    for x, _ in loader.epoch(shuffle, aug):
        x = loader.augment_float(data.normalize(x), aug)
        n += x.shape[0]
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/cifar10-jpeg.npz")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--images", type=int, default=10000, help="training images per epoch measured")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    data = load_cached(args.data, args.images).to(args.device)
    cases = {
        "earlier, no augmentation": lambda s: earlier(data, args.batch_size, s, False),
        "pipeline, no augmentation": lambda s: pipeline(data, args.batch_size, s, "none", args.channels_last),
        "earlier, flip + rotation": lambda s: earlier(data, args.batch_size, s, True),
        "pipeline, flip + rotation": lambda s: pipeline(data, args.batch_size, s, "rotate", args.channels_last),
        "pipeline, crop + flip": lambda s: pipeline(data, args.batch_size, s, "crop", args.channels_last),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.reps + 1):  # the first round warms up
        for k, fn in cases.items():
            sync()
            t = time.perf_counter()
            n = fn(r)
            sync()
            if r:
                times[k].append(n / (time.perf_counter() - t))
    print(f"# machine: {machine()}, device {args.device}, batch {args.batch_size}, {args.images} images, "
          f"median of {args.reps}")
    base = statistics.median(times["earlier, flip + rotation"])
    for k, v in times.items():
        m = statistics.median(v)
        print(f"{k:28s} {m:12,.0f} images/s   {m / base:6.2f}× earlier flip + rotation")


if __name__ == "__main__":
    main()
