"""Learning-rate sweeps: every (method, rate) of a grid trains as a run of its own — same
seeds, initial weights and batches as every other cell — in parallel processes with one
thread each, resumable cell by cell; one table, one sensitivity plot and the curves of each
method at its best rate at the end.

    fxbackmatch train --model lenet-bn --epochs 5 --lr-grid sgd=0.01,0.03,0.1 \\
        --lr-grid backmatch=0.003,0.01,0.03 --jobs 2 --out runs/lenet-sweep
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import io
import json
import math
import multiprocessing as mp
import statistics
from pathlib import Path
from typing import Any, Sequence

from .harness import TrainConfig, atomic_write, layer_heatmap, pyplot, train

__all__ = ["sweep", "SWEEP_FIELDS"]

SWEEP_FIELDS = ("method", "lr", "seeds", "best_test_acc", "best_std", "final_test_acc", "final_std", "diverged")


def _cell_dir(out: Path, method: str, lr: float) -> Path:
    return out / "sweep" / f"{method}-lr{lr:g}"


def _run_cell(cfg_dict: dict[str, Any], threads: int) -> str:
    """One cell in its own process: ``threads`` torch threads, then ``train`` (resuming a
    partial cell)."""
    import torch

    torch.set_num_threads(threads)
    cfg = TrainConfig.from_dict(cfg_dict)
    resume = (Path(cfg.out) / "config.json").is_file()
    train(cfg, resume=resume)
    return cfg.out


def sweep(cfg: TrainConfig, grid: dict[str, Sequence[float]], *, jobs: int = 1) -> list[dict[str, Any]]:
    """Train every (method, lr) of ``grid``; return (and write ``sweep.csv``) one row per
    cell with the best and final test accuracy over the seeds; draw ``sensitivity.png``,
    ``curves.png`` (each method's best cell, mean ± std per epoch) and ``layers.png`` (each
    method's best cell, relative update per layer and epoch).

    A cell whose ``summary.json`` exists is read back, not trained again (resumable)."""
    out = Path(cfg.out or "runs/sweep")
    out.mkdir(parents=True, exist_ok=True)
    cells = [(m, float(lr)) for m, lrs in grid.items() for lr in lrs]
    todo = []
    for m, lr in cells:
        sub = dataclasses.replace(cfg, methods=(m,), lr={m: lr}, out=str(_cell_dir(out, m, lr)), progress=False)
        sub.validate()
        if not (Path(sub.out) / "summary.json").is_file():
            todo.append(sub.to_dict())
    threads = 1 if jobs > 1 else 0
    if jobs > 1 and len(todo) > 1:
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            for f in [pool.submit(_run_cell, d, threads) for d in todo]:
                f.result()
    else:
        for d in todo:
            sub = TrainConfig.from_dict(d)
            train(sub, resume=(Path(sub.out) / "config.json").is_file())
    rows = []
    for m, lr in cells:
        summary = json.loads((_cell_dir(out, m, lr) / "summary.json").read_text())
        s = summary["methods"][m]
        best, final = s["best_test_acc"], s["final_test_acc"]
        rows.append({
            "method": m, "lr": lr, "seeds": len(s["seeds"]),
            "best_test_acc": best.get("mean"), "best_std": best.get("std"),
            "final_test_acc": final.get("mean"), "final_std": final.get("std"),
            "diverged": final.get("mean") is None or not math.isfinite(final.get("mean") or math.nan)
            or _ends_non_finite(_cell_dir(out, m, lr) / "metrics.csv"),
        })
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SWEEP_FIELDS)
    w.writeheader()
    w.writerows(rows)
    atomic_write(out / "sweep.csv", buf.getvalue())
    _sensitivity(out, cfg, rows)
    best = _best_cells(rows)
    _best_curves(out, cfg, best)
    _best_layers(out, cfg, best)
    return rows


def _best_cells(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Method -> its row with the best final accuracy among the cells that did not diverge."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["final_test_acc"] is None or r["diverged"]:
            continue
        if r["method"] not in best or r["final_test_acc"] > best[r["method"]]["final_test_acc"]:
            best[r["method"]] = r
    return best


def _ends_non_finite(metrics_csv: Path) -> bool:
    """Whether any seed's last epoch has a non-finite (empty) training loss."""
    last: dict[str, dict[str, str]] = {}
    with open(metrics_csv) as f:
        for r in csv.DictReader(f):
            last[r["seed"]] = r
    return any(not r["train_loss"] for r in last.values())


def _best_curves(out: Path, cfg: TrainConfig, best: dict[str, dict[str, Any]]) -> Path | None:
    """Test accuracy per epoch of each method at its best rate (by final accuracy): the mean
    over seeds with a ±1 std band — the tuned comparison in one picture."""
    plt = pyplot()
    if plt is None or not best:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m, cell in best.items():
        per_epoch: dict[int, list[float]] = {}
        with open(_cell_dir(out, m, cell["lr"]) / "metrics.csv") as f:
            for r in csv.DictReader(f):
                per_epoch.setdefault(int(r["epoch"]), []).append(100 * float(r["test_acc"]))
        ep = sorted(per_epoch)
        mean = [statistics.fmean(per_epoch[e]) for e in ep]
        std = [statistics.stdev(per_epoch[e]) if len(per_epoch[e]) > 1 else 0.0 for e in ep]
        line, = ax.plot(ep, mean, label=f"{m} (lr {cell['lr']:g})")
        ax.fill_between(ep, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{cfg.model}: each method at its best rate (mean ± std, {len(cfg.seeds)} seed(s))")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _best_layers(out: Path, cfg: TrainConfig, best: dict[str, dict[str, Any]]) -> Path | None:
    """``layers.png``: each method's best cell's per-layer heat map, side by side."""
    rows: list[dict[str, Any]] = []
    panels: list[tuple[str, str]] = []
    for m, cell in best.items():
        path = _cell_dir(out, m, cell["lr"]) / "layers.csv"
        if not path.is_file():
            continue
        with open(path) as f:
            rows += [{"method": r["method"], "seed": int(r["seed"]), "epoch": int(r["epoch"]), "param": r["param"],
                      "rel_update": float(r["rel_update"] or "nan")} for r in csv.DictReader(f)]
        panels.append((m, f"{m} (lr {cell['lr']:g})"))
    return layer_heatmap(rows, panels, cfg.seeds[0], out / "layers.png") if panels else None


def _sensitivity(out: Path, cfg: TrainConfig, rows: Sequence[dict[str, Any]]) -> Path | None:
    """Final and best test accuracy against the learning rate, a line per method."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("final_test_acc", "best_test_acc")):
        for m in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["lr"], r[key]) for r in rows if r["method"] == m and r[key] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=m)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"{key.split('_')[0]} test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{cfg.model}: learning-rate sensitivity ({cfg.epochs} epochs, {len(cfg.seeds)} seed(s))")
    fig.tight_layout()
    path = out / "sensitivity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
