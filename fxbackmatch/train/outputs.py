"""What a training writes besides checkpoints: metrics rows (CSV, JSONL), the summary over
seeds, the loss/error curves and the per-layer heatmaps (matplotlib, when installed)."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import statistics
from pathlib import Path
from typing import Any, Sequence

from rich.table import Table

from .config import METRIC_FIELDS, TrainConfig, atomic_write, run_dir

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- outputs
def row_text(r: dict[str, Any]) -> str:
    def f(x: float | None, spec: str) -> str:
        return "nan" if x is None else format(x, spec)

    return (f"{r['method']} seed {r['seed']} epoch {r['epoch']}: train loss {f(r['train_loss'], '.4f')} "
            f"acc {r['train_acc']:.4f} │ test loss {f(r['test_loss'], '.4f')} acc {r['test_acc']:.4f} │ "
            f"lr {r['lr']:g} │ {r['epoch_seconds']:.1f} s, {r['images_per_s']:,.0f} img/s")


def write_metrics(out: Path, rows: Sequence[dict[str, Any]]) -> None:
    buf_csv = out / "metrics.csv.tmp"
    with open(buf_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(METRIC_FIELDS))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in METRIC_FIELDS})
    os.replace(buf_csv, out / "metrics.csv")
    atomic_write(out / "metrics.jsonl", "".join(json.dumps({k: r.get(k) for k in METRIC_FIELDS}) + "\n" for r in rows))


def mean_std(xs: Sequence[float]) -> dict[str, Any]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "std": None, "values": []}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": list(xs)}


def summarize(cfg: TrainConfig, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per method: best and final test accuracy, mean ± sample std over seeds, and the mean
    epoch time."""
    methods: dict[str, Any] = {}
    for m in cfg.methods:
        best, final, secs, ips, eps = [], [], [], [], []
        for s in cfg.seeds:
            rs = [r for r in rows if r["method"] == m and r["seed"] == s]
            if not rs:
                continue
            rs.sort(key=lambda r: r["epoch"])
            best.append(max(r["test_acc"] for r in rs))
            final.append(rs[-1]["test_acc"])
            secs += [r["epoch_seconds"] for r in rs]
            ips += [r["images_per_s"] for r in rs]
            eps.append(rs[-1]["epoch"])
        methods[m] = {
            "lr": cfg.lr_for(m),
            "seeds": [s for s in cfg.seeds if any(r["method"] == m and r["seed"] == s for r in rows)],
            "epochs": eps,
            "best_test_acc": mean_std(best),
            "final_test_acc": mean_std(final),
            "mean_epoch_seconds": statistics.fmean(secs) if secs else None,
            "mean_images_per_s": statistics.fmean(ips) if ips else None,
        }
    return {"config": cfg.to_dict(), "methods": methods}


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_curves(out: Path, cfg: TrainConfig, rows: Sequence[dict[str, Any]]) -> Path | None:
    plt = pyplot()
    if plt is None:
        log.info("matplotlib is not installed: no curves.png (pip install 'fxbackmatch[plot]')")
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for m in cfg.methods:
        by_epoch: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            if r["method"] == m:
                by_epoch.setdefault(r["epoch"], []).append(r)
        if not by_epoch:
            continue
        ep = sorted(by_epoch)
        for ax, key, f in ((a1, "train_loss", lambda v: v), (a2, "test_acc", lambda v: 100.0 * (1.0 - v))):
            vals = [[f(r[key]) for r in by_epoch[e] if r[key] is not None] for e in ep]
            xs = [e for e, v in zip(ep, vals) if v]
            mean = [statistics.fmean(v) for v in vals if v]
            line, = ax.plot(xs, mean, label=f"{m} (lr {cfg.lr_for(m):g})")
            if len(cfg.seeds) > 1:
                sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals if v]
                ax.fill_between(xs, [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)],
                                color=line.get_color(), alpha=0.2)
    a1.set_yscale("log")
    a1.set_xlabel("epoch")
    a1.set_ylabel("train loss (no weight-decay term)")
    a2.set_xlabel("epoch")
    a2.set_ylabel("test error (%)")
    n_seeds = len(cfg.seeds)
    fig.suptitle(f"{cfg.model} on {Path(cfg.data).name}: mean over {n_seeds} seed{'s' * (n_seeds > 1)}")
    from matplotlib.ticker import MaxNLocator

    for ax in (a1, a2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


LAYER_FIELDS = ("method", "seed", "epoch", "param", "layer", "rel_update", "lr_scale", "m", "s")


def collect_layers(out: Path, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Every run's per-layer diagnostics, in one ``layers.csv`` (the last value of each
    (method, seed, epoch, param): a resumed epoch overwrites its row)."""
    rows: dict[tuple, dict[str, Any]] = {}
    for m in cfg.methods:
        for seed in cfg.seeds:
            path = run_dir(out, m, seed) / "layers.jsonl"
            if path.is_file():
                for line in path.read_text().splitlines():
                    r = json.loads(line)
                    rows[(r["method"], r["seed"], r["epoch"], r["param"])] = r
    flat = list(rows.values())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LAYER_FIELDS)
    w.writeheader()
    w.writerows(flat)
    atomic_write(out / "layers.csv", buf.getvalue())
    return flat


def write_layer_heatmap(out: Path, cfg: TrainConfig, rows: Sequence[dict[str, Any]]) -> Path | None:
    """``layers.png``: log10 of each weight's relative update per epoch (layer × epoch), one
    panel per method, seed ``cfg.seeds[0]`` — what each method does to each layer."""
    return layer_heatmap(rows, [(m, m) for m in cfg.methods], cfg.seeds[0], out / "layers.png")


def layer_heatmap(rows: Sequence[dict[str, Any]], panels: Sequence[tuple[str, str]], seed: int,
                  path: Path) -> Path | None:
    """Draw ``layers.csv`` rows (numbers, not strings) as heat maps, one panel per
    ``(method, title)``, on one colour scale; ``None`` without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    first = panels[0][0]
    weights = [r["param"] for r in rows if r["method"] == first and r["seed"] == seed and r["epoch"] == 1
               and r["param"].endswith("weight")]
    if not weights:
        return None
    epochs = sorted({r["epoch"] for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 0.25 * len(weights) + 2),
                             squeeze=False)
    for ax, (m, title) in zip(axes[0], panels):
        grid = [[math.nan] * len(epochs) for _ in weights]
        for r in rows:
            if r["method"] == m and r["seed"] == seed and r["param"] in weights and r["rel_update"]:
                grid[weights.index(r["param"])][epochs.index(r["epoch"])] = math.log10(r["rel_update"])
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=-4, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(epochs)), [str(e) for e in epochs], fontsize=7)
        ax.set_xlabel("epoch")
        ax.set_yticks(range(len(weights)), weights if ax is axes[0][0] else [], fontsize=6)
    fig.colorbar(im, ax=axes[0].tolist(), label="log10 ‖ΔW‖/‖W‖ per epoch")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def summary_table(summary: dict[str, Any]) -> Table:
    t = Table(title="test accuracy over seeds (mean ± std)")
    for c in ("method", "lr", "seeds", "best", "final", "s/epoch"):
        t.add_column(c, justify="left" if c == "method" else "right")

    def ms(d: dict[str, Any]) -> str:
        return "—" if d["mean"] is None else f"{100 * d['mean']:.2f} ± {100 * d['std']:.2f}"

    for m, d in summary["methods"].items():
        t.add_row(m, f"{d['lr']:g}", str(len(d["seeds"])), ms(d["best_test_acc"]), ms(d["final_test_acc"]),
                  "—" if d["mean_epoch_seconds"] is None else f"{d['mean_epoch_seconds']:.2f}")
    return t


