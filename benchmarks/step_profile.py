"""Is the device kept busy? Where one training step of the Table 2 harness spends its time.

For each method, the harness's own run (``fxbackmatch.train.run.Run``: the device-resident
CIFAR pipeline, the attached plan, Nesterov SGD, bf16 autocast and channels-last on CUDA)
trains ``--steps`` steps three times: once to warm up (compiles, cuDNN autotuning), once
timed without the profiler (the wall time per step), once under ``torch.profiler``. It
prints the wall time per step, the device's kernel time per step and their ratio — the
share of the step the device is busy — then the ops with the most device time and the most
host time. On the CPU there is no device column: the host is the device.

    python benchmarks/step_profile.py --data data/cifar10-jpeg.npz --device cuda --steps 50
    python benchmarks/step_profile.py --data pack.npz --device cpu --width 0.0625 --steps 3   # a dry run
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import table2  # noqa: E402
from fxbackmatch.train.config import initial_model  # noqa: E402
from fxbackmatch.train.data import ImageData  # noqa: E402
from fxbackmatch.train.pipeline import load_cached  # noqa: E402
from fxbackmatch.train.run import Run  # noqa: E402


def _device_us(evt) -> float:
    """An event's own device time in µs (torch ≥ 2.4 names it ``self_device_time_total``)."""
    v = getattr(evt, "self_device_time_total", None)
    return float(v if v is not None else getattr(evt, "self_cuda_time_total", 0.0))


def profile_method(args: argparse.Namespace, data: ImageData, method: str, out: Path) -> str:
    """The report of one method: its wall time, device time and busiest ops per step."""
    ns = argparse.Namespace(data=args.data, width=args.width, batch_size=args.batch_size,
                            weight_decay=1e-4, augment="crop", device=args.device,
                            compile="on" if args.compile else "off")
    cfg = table2.config(ns, args.model, method, 0, 3, out / method)
    cfg.validate()
    device = torch.device(args.device)
    run = Run(cfg, method, 0, initial_model(cfg, 0, data.num_classes), data, device, out / method)
    progress = Progress(disable=True)
    run.train_epoch(progress)  # warm-up: compiles, cuDNN's autotuning
    timed = run.train_epoch(progress)
    steps = len(run.loader)
    wall = timed["epoch_seconds"] / steps
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        run.train_epoch(progress)
    if run.handle is not None:
        run.handle.remove()
    events = prof.key_averages()
    model = f"{args.model} (torch.compile)" if args.compile else args.model
    lines = [f"## {model} {method}, {args.device}, batch {args.batch_size}: {steps} steps per epoch"]
    lines.append(f"wall per step (unprofiled)    : {wall * 1e3:.3f} ms  ({args.batch_size / wall:,.0f} img/s)")
    if device.type == "cuda":
        busy = sum(_device_us(e) for e in events) / 1e6 / steps  # the evaluation batch included
        lines.append(f"device kernel time per step   : {busy * 1e3:.3f} ms")
        lines.append(f"device busy share of the step : {100 * busy / wall:.1f} %")
        lines += ["", "ops with the most device time:",
                  events.table(sort_by="self_device_time_total" if hasattr(events[0], "self_device_time_total")
                               else "self_cuda_time_total", row_limit=12)]
    lines += ["", "ops with the most host time:", events.table(sort_by="self_cpu_time_total", row_limit=12), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/cifar10-jpeg.npz")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="vgg11")
    ap.add_argument("--methods", default="sgd,backmatch")
    ap.add_argument("--steps", type=int, default=50, help="training steps per profiled epoch")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = ap.parse_args(argv)
    torch.backends.cudnn.benchmark = True
    full = load_cached(args.data)
    n = args.steps * args.batch_size
    if full.train_x.shape[0] < n:
        ap.error(f"{args.data} holds {full.train_x.shape[0]} training images, fewer than {args.steps} batches")
    # the first `steps` batches' images; one test batch (each epoch ends with an evaluation)
    data = ImageData(full.train_x[:n], full.train_y[:n], full.test_x[:args.batch_size], full.test_y[:args.batch_size],
                     full.classes, full.source).to(args.device)
    print(f"# step profile: {table2.device_facts(args.device)}")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            print(profile_method(args, data, method, Path(tmp)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
