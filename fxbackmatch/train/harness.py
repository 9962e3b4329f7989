"""The training harness of the paper's experiments (§3.3, §4): every method starts from the
same initial weights and sees the same mini-batches (and the same augmentation draws).

For each seed the model is built once (``torch.manual_seed(seed)`` then the constructor)
and deep-copied for every method; the shuffle order and the augmentation come from CPU
generators seeded from the seed alone, so they are identical across methods. Every method
— ``sgd`` included — runs through ``fxbackmatch.prepare(model, rule=method)`` and
``plan.attach(optimizer, weight_decay)``: weight decay is added to the gradient first,
then the layer-wise scale multiplies it, then the momentum SGD step runs.

Output directory layout::

    OUT/config.json                      the TrainConfig (read back by --resume)
    OUT/<method>-seed<seed>/checkpoint.pt  after every ``checkpoint_every``-th epoch (default:
                                           every one) and the last: model, optimizer, plan
                                           state, generator/RNG states, metrics so far
    OUT/metrics.csv, OUT/metrics.jsonl   one row per (method, seed, epoch)
    OUT/summary.json                     best/final test accuracy mean±std over seeds
    OUT/curves.png                       train loss and test error (needs matplotlib)

``epoch_seconds`` is the wall time of the training pass of an epoch (evaluation
excluded); ``images_per_s`` is training images over that time. Each run's facts
(``TrainResult.runs``) add ``epoch_wall_seconds``, the whole wall time of every epoch this
call trained (training, evaluation, checkpoint, logs): what a time budget needs
(``benchmarks/table2.py``).
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import CliError
from .data import ImageData, subset_indices
from .pipeline import load_cached
from .config import (  # noqa: F401  (re-exported: fxbackmatch.train.harness names)
    CHECKPOINT_VERSION,
    DEFAULT_LRS,
    MEASURED,
    METRIC_FIELDS,
    MODELS,
    OPTIMIZERS,
    TrainConfig,
    TrainResult,
    atomic_write,
    build_model,
    epoch_batches,
    finite_or_none,
    initial_model,
    load_config,
    lr_at,
    make_generator,
    method_factors,
    run_dir,
    split_method,
    state_digest,
)
from .run import (  # noqa: F401  (re-exported: fxbackmatch.train.harness names)
    Run,
)
from .outputs import (  # noqa: F401  (re-exported: fxbackmatch.train.harness names)
    LAYER_FIELDS,
    collect_layers,
    layer_heatmap,
    mean_std,
    plot_curves,
    pyplot,
    row_text,
    summarize,
    summary_table,
    write_layer_heatmap,
    write_metrics,
)

__all__ = [
    "DEFAULT_LRS",
    "OPTIMIZERS",
    "split_method",
    "method_factors",
    "METRIC_FIELDS",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "initial_model",
    "epoch_batches",
    "lr_at",
    "state_digest",
    "load_config",
    "train",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- driver
def train(cfg: TrainConfig, *, resume: bool = False, console: Console | None = None,
          data: ImageData | None = None) -> TrainResult:
    """Train every (seed, method) of ``cfg`` and write the outputs under ``cfg.out``.

    ``resume=True`` continues the runs found in ``cfg.out`` from their checkpoints (a run
    that already has ``cfg.epochs`` epochs is kept as it is); the result is bitwise the
    one of an uninterrupted run on the same device. ``data`` skips loading ``cfg.data``.
    """
    cfg.validate()
    console = console or Console(stderr=True)
    out = Path(cfg.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    cfg.out = str(out)
    if resume:
        if not (out / "config.json").is_file():
            raise CliError(f"cannot resume: {str(out / 'config.json')!r} not found")
    elif any(out.glob("*/checkpoint.pt")):
        raise CliError(f"{str(out)!r} already holds a run; continue it with --resume {out} or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.json", json.dumps(cfg.to_dict(), indent=1) + "\n")

    device = torch.device(cfg.device)
    if data is None:
        data = load_cached(cfg.data, cfg.subset)
    elif cfg.subset is not None:
        tr = torch.from_numpy(subset_indices(data.train_y.cpu().numpy(), cfg.subset))
        te = torch.from_numpy(subset_indices(data.test_y.cpu().numpy(), cfg.subset))
        data = ImageData(data.train_x[tr], data.train_y[tr], data.test_x[te], data.test_y[te],
                         data.classes, data.source)
    console.log(data.describe())
    console.log(f"{cfg.model}: the plans use conventions={cfg.conventions_name!r}")
    data = data.to(device)

    all_rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    runs: dict[str, dict[str, Any]] = {}

    def rows_flat() -> list[dict[str, Any]]:
        return [r for s in cfg.seeds for m in cfg.methods for r in all_rows.get((m, s), [])]

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("{task.fields[stats]}"),
        console=console, disable=not (cfg.progress and console.is_terminal),
    )
    log_epochs = progress.disable  # no live bars (no terminal, or --no-progress): one log line per epoch
    reported = False
    with progress:
        pcon = progress.console
        for seed in cfg.seeds:
            init = None
            for method in cfg.methods:
                ckpt = run_dir(out, method, seed) / "checkpoint.pt"
                if init is None:
                    init = initial_model(cfg, seed, data.num_classes)
                run = Run(cfg, method, seed, copy.deepcopy(init), data, device, out)
                if resume and ckpt.is_file():
                    run.load(ckpt)
                    if run.epoch < cfg.epochs:
                        pcon.log(f"resuming {method} seed {seed} after epoch {run.epoch}")
                all_rows[(method, seed)] = run.rows
                if method == "backmatch" and not reported:
                    pcon.rule(f"back-matching factors of {cfg.model} (seed {seed}, current weights)")
                    if pcon.is_terminal:
                        run.plan.report(console=pcon)
                    else:  # plain text, 100 columns, not squeezed into the console's width
                        pcon.print(str(run.plan), markup=False, highlight=False, soft_wrap=True)
                    reported = True
                walls = []
                while run.epoch < cfg.epochs:
                    t_epoch = time.perf_counter()
                    row = run.train_epoch(progress)
                    if log_epochs:
                        pcon.log(row_text(row), highlight=False)
                    all_rows[(method, seed)] = run.rows
                    every = cfg.checkpoint_every
                    if run.epoch == cfg.epochs or (every and run.epoch % every == 0):
                        run.save()
                    write_metrics(out, rows_flat())
                    walls.append(time.perf_counter() - t_epoch)
                runs[f"{method}/{seed}"] = {**run.info, "checkpoint": str(ckpt), "epochs": run.epoch,
                                            "conventions": cfg.conventions_name, "epoch_wall_seconds": walls}
                if run.handle is not None:
                    run.handle.remove()
                del run
    rows = rows_flat()
    write_metrics(out, rows)
    summary = summarize(cfg, rows)
    summary["runs"] = runs
    atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    png = plot_curves(out, cfg, rows)
    layer_rows = collect_layers(out, cfg)
    write_layer_heatmap(out, cfg, layer_rows)
    console.print(summary_table(summary))
    console.log(f"outputs in {out}" + ("" if png is None else f" (curves: {png.name})"))
    return TrainResult(out, rows, summary, runs)
