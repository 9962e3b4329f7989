"""The paper's Table 2 protocol (§4.2) within a time budget: SGD against back-matching on
the paper's VGG nets, CIFAR-10, from the same initial weights and the same batches.

Protocol: batch 128, Nesterov momentum 0.9, weight decay 1e-4, augmentation (default: the
4-pixel padded random crop and flip, drawn on the device), a cosine schedule over the
epochs that fit (the paper's ×0.2 every 60 epochs is for 300-epoch runs), SGD at 0.1 (§4.1)
and back-matching at 2e-3 (§4.2). On CUDA: bf16 autocast and channels-last.

For each job (model, seed) the script first trains every method for two epochs and takes
the second epoch's time (the first holds compilation), then gives the job as many epochs
as fit in what is left of ``--budget-s`` (at most ``--max-epochs``, at least
``--min-epochs`` or the job is skipped) and trains every method that long. It writes:

    OUT/table2.md      the table in docs/results.md's format, with the GPU and torch version
    OUT/table2.json    the same figures
    OUT/<job>/<method>/...   the harness's outputs (metrics.csv, summary.json)

    python benchmarks/table2.py --device cuda --budget-s 330 --out $OUT/table2
    python benchmarks/table2.py --device cpu --epochs 2 --subset 256 --width 0.125   # a dry run
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fxbackmatch.train.harness import TrainConfig, train  # noqa: E402
from fxbackmatch.train.pipeline import load_cached  # noqa: E402

#: the paper's Table 2 (CIFAR-10 test accuracy, %, best of five trials)
PAPER = {
    "vgg11": {"sgd": 92.63, "backmatch": 92.69},
    "vgg13": {"sgd": 93.90, "backmatch": 94.08},
    "vgg16": {"sgd": 93.72, "backmatch": 94.22},
    "vgg19": {"sgd": 93.66, "backmatch": 93.98},
}
LRS = {"sgd": 0.1, "backmatch": 2e-3}
NAMES = {"sgd": "SGD", "backmatch": "back-matching"}


def config(args: argparse.Namespace, model: str, method: str, seed: int, epochs: int, out: Path) -> TrainConfig:
    return TrainConfig(
        data=args.data, model=model, width=args.width, methods=(method,), lr={method: LRS[method]},
        epochs=epochs, seeds=(seed,), batch_size=args.batch_size, nesterov=True, weight_decay=args.weight_decay,
        augment=args.augment, schedule="cosine", subset=None, device=args.device, compile=args.compile,
        out=str(out), progress=False,
    )


def device_facts(device: str) -> str:
    d = torch.device(device)
    name = torch.cuda.get_device_name(d) if d.type == "cuda" else (platform.processor() or platform.machine())
    return f"{name}, torch {torch.__version__}"


def run_job(args, data, model: str, seed: int, epochs: int | None, deadline: float, out: Path,
            console: Console) -> dict | None:
    """Probe (unless ``epochs`` is given), then train every method; ``None`` if skipped."""
    methods = args.methods.split(",")
    if epochs is None:
        per_epoch = 0.0
        for m in methods:
            t = time.perf_counter()
            res = train(config(args, model, m, seed, 2, out / "probe" / m), console=console, data=data)
            wall = time.perf_counter() - t
            second = res.rows[-1]["epoch_seconds"]
            # the second epoch's training pass, plus its share of evaluation and bookkeeping
            per_epoch += second + max(0.0, wall - sum(r["epoch_seconds"] for r in res.rows)) / 2
            console.log(f"probe {model} {m}: {second:.2f} s/epoch training, {wall:.1f} s for 2 epochs")
        left = deadline - time.monotonic()
        epochs = min(args.max_epochs, int(0.92 * left / max(per_epoch, 1e-9)))
        console.log(f"{model} seed {seed}: {left:.0f} s left, {per_epoch:.2f} s per epoch of all methods "
                    f"-> {epochs} epochs")
        if epochs < args.min_epochs:
            console.log(f"skipping {model} seed {seed}: fewer than {args.min_epochs} epochs fit")
            return None
    rows = {}
    for m in methods:
        res = train(config(args, model, m, seed, epochs, out / m), console=console, data=data)
        s = res.summary["methods"][m]
        rs = res.rows
        rows[m] = {
            "lr": LRS[m], "epochs": len(rs), "best": 100 * s["best_test_acc"]["mean"],
            "final": 100 * s["final_test_acc"]["mean"], "train_loss": rs[-1]["train_loss"],
            # the median: the first epoch of a process also pays cuDNN's autotuning and the compiles
            "s_per_epoch": statistics.median(r["epoch_seconds"] for r in rs), "first_epoch_s": rs[0]["epoch_seconds"],
            "images_per_s": s["mean_images_per_s"],
            "best_epoch": max(rs, key=lambda r: r["test_acc"])["epoch"],
            "curve": [{k: r[k] for k in ("epoch", "lr", "train_loss", "train_acc", "test_acc", "epoch_seconds")}
                      for r in rs],
        }
    return {"model": model, "seed": seed, "epochs": epochs, "methods": rows}


def table(results: list[dict], facts: str, args: argparse.Namespace, wall: float) -> str:
    lines = [
        f"**Machine:** {facts}. **Protocol:** batch {args.batch_size}, Nesterov 0.9, weight decay "
        f"{args.weight_decay:g}, augmentation `{args.augment}`, cosine schedule, SGD lr 0.1, back-matching "
        f"lr 2e-3{', bf16 autocast, channels-last' if args.device.startswith('cuda') else ''}"
        f"{f', width {args.width:g}' if args.width != 1 else ''}{f', subset {args.subset}' if args.subset else ''}; "
        f"same initial weights and batches per seed. Script wall time {wall:.0f} s.",
        "",
        "| model | seed | method | lr | epochs | s / epoch (median) | best test acc. (%) | final test acc. (%) "
        "| train loss (last) | paper (Table 2) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for m, d in r["methods"].items():
            paper = PAPER.get(r["model"], {}).get(m)
            loss = "nan" if d["train_loss"] is None else f"{d['train_loss']:.3f}"
            lines.append(
                f"| {r['model']} | {r['seed']} | {NAMES.get(m, m)} | {d['lr']:g} | {d['epochs']} | "
                f"{d['s_per_epoch']:.2f} | {d['best']:.2f} (epoch {d['best_epoch']}) | {d['final']:.2f} | {loss} | "
                f"{'—' if paper is None else f'{paper:.2f}'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/cifar10-jpeg.npz")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--jobs", default="vgg11:0,vgg16:0,vgg11:1", help="MODEL:SEED,... in order of priority")
    ap.add_argument("--methods", default="sgd,backmatch")
    ap.add_argument("--budget-s", type=float, default=330.0, help="wall seconds for the whole script")
    ap.add_argument("--epochs", type=int, default=None, help="fixed epochs per job (no probe): a dry run")
    ap.add_argument("--min-epochs", type=int, default=10)
    ap.add_argument("--max-epochs", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--augment", default="crop", choices=("none", "crop", "rotate"))
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--subset", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--out", default="runs/table2")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True, width=160)
    logging.getLogger("fxbackmatch").setLevel(logging.WARNING)
    torch.backends.cudnn.benchmark = True
    data = load_cached(args.data, args.subset).to(args.device)
    console.log(f"{data.describe()} on {args.device} after {time.monotonic() - t0:.1f} s")
    facts = device_facts(args.device)
    results: list[dict] = []
    for job in args.jobs.split(","):
        model, _, seed = job.partition(":")
        if args.epochs is None and deadline - time.monotonic() < 30:
            console.log(f"no time left for {job}")
            break
        r = run_job(args, data, model, int(seed or 0), args.epochs, deadline, out / f"{model}-seed{seed or 0}", console)
        if r is None:
            break
        results.append(r)
        # after every job, so that a run cut short keeps what finished
        (out / "table2.json").write_text(json.dumps({"facts": facts, "results": results}, indent=1) + "\n")
        (out / "table2.md").write_text(table(results, facts, args, time.monotonic() - t0))
    console.print((out / "table2.md").read_text() if results else "no job finished")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
