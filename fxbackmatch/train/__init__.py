"""Training harness for the paper's CIFAR experiments: ``fxbackmatch train ...``.

Every method (``sgd``, ``backmatch``, ``lars``, ``lsalr``) starts from the same initial
weights and sees the same mini-batches; see :mod:`fxbackmatch.train.harness`. Holds the
configuration (:mod:`.config`), the data (:mod:`.data`, :mod:`.pipeline`), one run
(:mod:`.run`), its outputs (:mod:`.outputs`), the driver (:mod:`.harness`) and learning-rate
sweeps (:mod:`.sweep`). It may import every stage and the top level (``prepare``); only
:mod:`fxbackmatch.cli` imports it (lazily), and no stage does.

The paper's LeNet-BN experiment of §3.3 (no augmentation, fixed learning rate, batch 128,
momentum 0.9) for 30 epochs and 3 seeds::

    python -m fxbackmatch train --model lenet-bn --epochs 30 --seeds 0,1,2 \\
        --methods sgd,backmatch,lars,lsalr
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

from .data import DEFAULT_DATA, DataError, ImageData, augment_batch, load_data, load_npz, load_torchvision, subset_indices
from .harness import (
    DEFAULT_LRS,
    METRIC_FIELDS,
    TrainConfig,
    TrainResult,
    build_model,
    epoch_batches,
    initial_model,
    load_config,
    lr_at,
    state_digest,
    train,
)

__all__ = [
    "add_train_parser",
    "config_from_args",
    "train",
    "TrainConfig",
    "TrainResult",
    "DEFAULT_LRS",
    "DEFAULT_DATA",
    "METRIC_FIELDS",
    "DataError",
    "ImageData",
    "load_data",
    "load_npz",
    "load_torchvision",
    "augment_batch",
    "subset_indices",
    "build_model",
    "initial_model",
    "epoch_batches",
    "lr_at",
    "load_config",
    "state_digest",
]

EXAMPLES = """examples:
  # the paper's §3.3 LeNet-BN experiment: no augmentation, fixed LR, 30 epochs, 3 seeds
  fxbackmatch train --model lenet-bn --epochs 30 --seeds 0,1,2 --methods sgd,backmatch,lars,lsalr
  # §4 style: VGG11, augmentation, Nesterov, LR x0.2 every 60 epochs, on a GPU
  fxbackmatch train --model vgg11 --augment --nesterov --weight-decay 5e-4 \\
      --lr-decay-every 60 --lr-decay 0.2 --epochs 200 --device cuda
  # a quick look: 2 epochs on 2000 images
  fxbackmatch train --subset 2000 --epochs 2 --methods sgd,backmatch
  # continue an interrupted (or finished, with more --epochs) run
  fxbackmatch train --resume runs/20250101-120000 --epochs 60
  # a learning-rate sweep, 2 processes: sweep.csv and sensitivity.png
  fxbackmatch train --epochs 5 --lr-grid sgd=0.01,0.03,0.1 --lr-grid backmatch=0.003,0.01 --jobs 2
  # torchvision's CIFAR-100 python files under a local root, a torchvision model
  fxbackmatch train --data torchvision-cifar100:/data/cifar --model tv:resnet18
"""


def _csv(conv):
    def parse(text: str):
        try:
            items = tuple(conv(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        if not items:
            raise argparse.ArgumentTypeError("the list is empty")
        return items

    return parse


def _grid(text: str) -> tuple[str, tuple[float, ...]]:
    """``backmatch=0.003,0.01,0.03``."""
    method, sep, rates = text.partition("=")
    try:
        values = tuple(float(v) for v in rates.split(",") if v.strip())
    except ValueError:
        values = ()
    if not sep or not method.strip() or not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--lr-grid needs METHOD=RATE,RATE,... with positive rates, got {text!r}")
    return method.strip(), values


def _lrs(text: str) -> dict[str, float]:
    """``0.05`` (every method) or ``sgd=0.1,backmatch=0.02``."""
    out: dict[str, float] = {}
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            if "=" in part:
                k, _, v = part.partition("=")
                out[k.strip()] = float(v)
            else:
                out["*"] = float(part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lr takes RATE or METHOD=RATE,..., got {text!r}")
    if not out:
        raise argparse.ArgumentTypeError("--lr is empty")
    return out


def add_train_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``train`` command to the ``fxbackmatch`` argparse subparsers ``sub``.

    Options left out keep the :class:`TrainConfig` defaults (or, with ``--resume``, the
    values saved with the run).
    """
    lr_defaults = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LRS.items())
    t = sub.add_parser(
        "train", help="train on CIFAR with sgd/backmatch/lars/lsalr from the same init and batches",
        description="Train with each layer-wise rate method from the same initial weights on the same "
                    "mini-batches (the paper's protocol) and write metrics, curves, summary and checkpoints.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = t.add_argument
    a("--data", help=f"packed-JPEG .npz, torchvision-cifar10:ROOT or torchvision-cifar100:ROOT (default {DEFAULT_DATA})")
    a("--subset", type=int, metavar="N", help="use a class-balanced subset of N train and N test images (the npz is sorted by class)")
    a("--model", help="lenet-bn (default), vgg11, vgg13, vgg16, vgg19, or tv:NAME (torchvision, weights=None)")
    a("--width", type=float, help="channel multiplier of lenet-bn, the vgg models and resnet18-paper (default 1)")
    a("--methods", type=_csv(str), help="comma-separated (default sgd,backmatch,lars,lsalr); RULE@adamw "
                                        "for AdamW, backmatch+measured for measured factors")
    a("--lr", type=_lrs, help=f"RATE or METHOD=RATE,... (defaults: {lr_defaults})")
    a("--lr-grid", action="append", type=_grid, metavar="METHOD=R1,R2,...",
      help="a learning-rate sweep: every rate of every named method trains as its own run "
           "(repeatable; writes sweep.csv and sensitivity.png)")
    a("--jobs", type=int, default=1, help="parallel processes of a sweep, one thread each (default 1)")
    a("--epochs", type=int, help="default 30")
    a("--seeds", type=_csv(int), help="comma-separated seeds (default 0)")
    a("--batch-size", type=int, help="default 128")
    a("--eval-batch-size", type=int, help="default 1000")
    a("--momentum", type=float, help="default 0.9")
    a("--nesterov", action="store_true", default=None, help="Nesterov momentum")
    a("--weight-decay", type=float, help="added to the gradient before the layer-wise rescale (default 0)")
    a("--augment", nargs="?", const="rotate", default=None, choices=("none", "crop", "rotate"),
      help="crop: 4-pixel padded random crop and flip, drawn on the device; rotate (the bare flag, the "
           "paper's §4): flip and rotation")
    a("--max-rotation", type=float, help="degrees of the random rotation with --augment (default 10)")
    a("--lr-decay-every", type=int, metavar="EPOCHS", help="multiply the LR by --lr-decay every EPOCHS (default 0: fixed)")
    a("--lr-decay", type=float, help="default 0.2")
    a("--schedule", choices=("step", "cosine"), help="step (default: --lr-decay-every) or cosine to 0 over --epochs")
    a("--trust-coefficient", type=float, help="LARS trust coefficient (default 0.001)")
    a("--measure-every", type=int, metavar="K",
      help="backmatch+measured: measure every layer's m on the live batch every K steps (default 10)")
    a("--conventions", choices=("default", "paper"),
      help="the plans' conventions (default: paper for the paper's models lenet-bn and vgg*, default otherwise)")
    a("--device", help="cpu (default), cuda, cuda:1 ...")
    a("--compile", action="store_true", default=None,
      help="torch.compile the model for the full training batches (one graph per architecture; "
           "the last, smaller batch and the evaluation run eagerly)")
    a("--plan-compile", action=argparse.BooleanOptionalAction, default=None,
      help="compile the factor function (default: on for cuda, off for cpu)")
    a("--amp", action=argparse.BooleanOptionalAction, default=None,
      help="bf16 autocast of the forward pass (default: on for cuda, off for cpu)")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None,
      help="channels-last images and weights (default: on for cuda, off for cpu)")
    a("--out", help="output directory (default runs/<timestamp>)")
    a("--checkpoint-every", type=int, metavar="N",
      help="write each run's checkpoint after every N-th epoch and after its last (default 1; 0: the last "
           "only); --resume continues from the last one written")
    a("--resume", metavar="DIR", help="continue the run in DIR from its checkpoints (its saved options apply)")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    t.set_defaults(func=_cmd_train)
    return t


_OPTION_FIELDS = ("data", "subset", "model", "width", "methods", "lr", "epochs", "seeds", "batch_size",
                  "eval_batch_size", "momentum", "nesterov", "weight_decay", "augment", "max_rotation",
                  "schedule", "lr_decay_every", "lr_decay", "amp", "channels_last", "trust_coefficient", "measure_every", "conventions", "device", "compile", "plan_compile",
                  "out", "progress", "checkpoint_every")


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """The :class:`TrainConfig` of parsed ``train`` arguments, and whether to resume."""
    from ..errors import CliError

    given = {k: getattr(args, k) for k in _OPTION_FIELDS if getattr(args, k, None) is not None}
    if args.resume:
        cfg = load_config(args.resume)
        if "out" in given and given["out"] != args.resume:
            raise CliError("--out and --resume name different directories; --resume DIR writes to DIR")
        given.pop("out", None)
        for k, v in given.items():
            if k not in TrainConfig.RESUMABLE and v != getattr(cfg, k):
                raise CliError(f"--{k.replace('_', '-')} differs from the resumed run's "
                               f"({getattr(cfg, k)!r}); only {', '.join(TrainConfig.RESUMABLE)} may change")
            setattr(cfg, k, v)
        return cfg, True
    return TrainConfig(**given), False


def _cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.logging import RichHandler

    console = Console(stderr=True)
    if not console.is_terminal:  # a log file: long lines rather than wrapped ones
        console = Console(stderr=True, width=max(console.width, 180))
    root = logging.getLogger("fxbackmatch")
    if not root.handlers:
        root.addHandler(RichHandler(console=console, show_path=False))
        root.setLevel(logging.INFO)
    if getattr(args, "lr_grid", None):
        from .sweep import sweep

        grid = dict(args.lr_grid)
        args.methods = tuple(grid)
        cfg, _ = config_from_args(args)
        rows = sweep(cfg, grid, jobs=max(1, args.jobs))
        for r in rows:
            console.print(f"{r['method']:>12} lr {r['lr']:<8g} final {r['final_test_acc']} best {r['best_test_acc']}")
        return 0
    cfg, resume = config_from_args(args)
    try:
        train(cfg, resume=resume, console=console)
    except KeyboardInterrupt:
        console.print(f"interrupted; continue with: fxbackmatch train --resume {cfg.out}")
        return 130
    return 0
