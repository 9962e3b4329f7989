"""The paper's Table 2 protocol (§4.2) within a time budget: SGD against back-matching on
the paper's VGG nets, CIFAR-10, from the same initial weights and the same batches.

Protocol: batch 128, Nesterov momentum 0.9, weight decay 1e-4, augmentation (default: the
4-pixel padded random crop and flip, drawn on the device), a cosine schedule over the
epochs that fit (the paper's ×0.2 every 60 epochs is for 300-epoch runs), SGD at 0.1 (§4.1)
and back-matching at 2e-3 (§4.2). On CUDA: bf16 autocast and channels-last.

For each job (model, seed) the script first trains every method for two epochs (the
probe; a later job of the same model reuses its model's probe), then gives the job as many
epochs as fit in what is left of ``--budget-s`` (at most ``--max-epochs``, at least
``--min-epochs`` or the job is skipped) and trains every method that long. The estimate
(:func:`epochs_that_fit`) takes from each method's probe the second epoch's whole wall time
(training, evaluation, checkpoint), the first epoch's excess over it (a new plan's compile,
which every final run pays again; once-per-process costs such as the model's compile and
cuDNN's autotuning only the first method's probe pays, so its run is counted at the others'
largest excess), and the call's cost outside its epochs (building the run, the report, the
plots).

``--compile auto`` (the device script's choice on CUDA) decides per model whether to
``torch.compile`` it: the first method's probe runs eagerly, then compiled, and the faster
second epoch wins (compiled must be ≥ 5 % faster: its compile is already paid, but a
slower graph is not worth the risk); a compile that fails, or a compiled probe that runs
past 40 % of the time left (at least a minute; no limit with ``--epochs``), falls back to
eager. A job that fails is logged and the next one runs. The
harness compiles the full training batches only, so a process compiles one graph per
architecture and the final runs reuse it. It writes:

    OUT/table2.md      the table in docs/results.md's format, with the GPU and torch version
    OUT/table2.json    the same figures
    OUT/<job>/<method>/...   the harness's outputs (metrics.csv, summary.json)

    python benchmarks/table2.py --device cuda --budget-s 330 --compile auto --out $OUT/table2
    python benchmarks/table2.py --device cpu --epochs 2 --subset 256 --width 0.125   # a dry run
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import platform
import signal
import statistics
import sys
import threading
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


#: the clock of the budget (a test replaces it)
now = time.monotonic


def config(args: argparse.Namespace, model: str, method: str, seed: int, epochs: int, out: Path,
           compile: bool | None = None) -> TrainConfig:
    return TrainConfig(
        data=args.data, model=model, width=args.width, methods=(method,), lr={method: LRS[method]},
        epochs=epochs, seeds=(seed,), batch_size=args.batch_size, nesterov=True, weight_decay=args.weight_decay,
        augment=args.augment, schedule="cosine", subset=None, device=args.device,
        compile=(args.compile == "on") if compile is None else compile, out=str(out), progress=False,
        checkpoint_every=0,  # the runs are never resumed: one checkpoint at the end (VGG-16's: 118 MB)
    )


def device_facts(device: str) -> str:
    d = torch.device(device)
    name = torch.cuda.get_device_name(d) if d.type == "cuda" else (platform.processor() or platform.machine())
    return f"{name}, torch {torch.__version__}"


def probe(args, data, model: str, seed: int, method: str, compile: bool, out: Path, console: Console) -> dict:
    """Two epochs of one method: ``epoch`` (the second epoch's whole wall time),
    ``first_extra`` (the first epoch's excess over it) and ``fixed`` (the call's time
    outside its epochs), in seconds."""
    t = now()
    res = train(config(args, model, method, seed, 2, out, compile), console=console, data=data)
    wall = now() - t
    walls = res.runs[f"{method}/{seed}"]["epoch_wall_seconds"]
    p = {"epoch": walls[-1], "first_extra": max(0.0, walls[0] - walls[-1]), "fixed": max(0.0, wall - sum(walls)),
         "compile": compile}
    console.log(f"probe {model} {method}{' (torch.compile)' if compile else ''}: {p['epoch']:.2f} s per epoch "
                f"(training {res.rows[-1]['epoch_seconds']:.2f} s), first epoch +{p['first_extra']:.1f} s, "
                f"{p['fixed']:.1f} s outside the epochs")
    return p


def epochs_that_fit(probes: dict[str, dict], left: float, max_epochs: int, margin: float = 0.95) -> int:
    """How many epochs of every method fit in ``left`` seconds (at most ``max_epochs``):
    each final run pays its call's fixed cost and its first epoch's excess once, then its
    epochs. The first probe (the first key) alone paid the once-per-process costs in its
    first epoch, so its run is counted at the largest excess of the others (its own where
    it is alone)."""
    first, *rest = probes.values()
    extra = [p["first_extra"] for p in rest]
    once = sum(p["fixed"] for p in probes.values()) + sum(extra) + max(extra or [first["first_extra"]])
    per_epoch = sum(p["epoch"] for p in probes.values())
    return max(0, min(max_epochs, int((margin * left - once) / max(per_epoch, 1e-9))))


class ProbeTimeout(BaseException):
    """A probe past its time limit (a ``BaseException``: no ``except Exception`` on the way
    out of torch or the library swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`ProbeTimeout` in the main thread once ``seconds`` have passed (SIGALRM;
    no limit where ``seconds`` is not finite, without SIGALRM, or off the main thread). A
    timer armed outside is restored after."""
    if (not math.isfinite(seconds) or not hasattr(signal, "setitimer")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return

    def fire(signum, frame):
        raise ProbeTimeout(f"still running after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, fire)
    try:
        outer = signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, *outer)
    finally:
        signal.signal(signal.SIGALRM, previous)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _drop_compiled(console: Console, model: str, e: BaseException) -> None:
    console.log(f"torch.compile failed on {model} ({_first_line(e)}); training eagerly")
    torch._dynamo.reset()  # nothing half-built stays for the plans' own compiles
    try:  # a compile cut short may leave inductor's workers compiling beside the eager runs
        from torch._inductor.async_compile import shutdown_compile_workers
        shutdown_compile_workers()
    except Exception:  # an older or newer torch without it: the workers only cost CPU
        pass


def probe_job(args, data, model: str, seed: int, out: Path, console: Console,
              compile_limit: float = float("inf")) -> dict[str, dict]:
    """Every method's probe. With ``--compile auto`` the first method's decides the mode:
    it is probed eagerly, then compiled within ``compile_limit`` seconds; where any compiled
    probe fails or runs out of time, every method is probed eagerly instead."""
    methods = args.methods.split(",")
    if args.compile != "auto":
        return {m: probe(args, data, model, seed, m, args.compile == "on", out / "probe" / m, console) for m in methods}
    eager = {methods[0]: probe(args, data, model, seed, methods[0], False, out / "probe" / f"{methods[0]}-eager",
                               console)}
    try:
        with time_limit(compile_limit):
            first = probe(args, data, model, seed, methods[0], True, out / "probe" / f"{methods[0]}-compiled",
                          console)
        if first["epoch"] < 0.95 * eager[methods[0]]["epoch"]:
            probes = {methods[0]: first}
            for m in methods[1:]:  # the graph is built: each probe costs its two epochs
                with time_limit(compile_limit):
                    probes[m] = probe(args, data, model, seed, m, True, out / "probe" / f"{m}-compiled", console)
            console.log(f"{model}: torch.compile for its runs")
            return probes
    except (Exception, ProbeTimeout) as e:  # an inductor failure or an endless compile must not cost the table
        _drop_compiled(console, model, e)
    console.log(f"{model}: eager for its runs")
    for m in methods[1:]:
        eager[m] = probe(args, data, model, seed, m, False, out / "probe" / m, console)
    return eager


def run_job(args, data, model: str, seed: int, epochs: int | None, deadline: float, out: Path,
            console: Console, probes: dict[str, dict] | None = None) -> dict | None:
    """Train every method for ``epochs`` (else as many as fit before ``deadline`` by the
    model's ``probes``, which also say whether to compile); ``None`` if skipped."""
    methods = args.methods.split(",")
    compile = probes[methods[0]]["compile"] if probes else args.compile == "on"
    if epochs is None:
        left = deadline - now()
        epochs = epochs_that_fit(probes, left, args.max_epochs)
        console.log(f"{model} seed {seed}: {left:.0f} s left, "
                    f"{sum(p['epoch'] for p in probes.values()):.2f} s per epoch of all methods -> {epochs} epochs")
        if epochs < args.min_epochs:
            console.log(f"skipping {model} seed {seed}: fewer than {args.min_epochs} epochs fit")
            return None
    rows = {}
    for m in methods:
        res = train(config(args, model, m, seed, epochs, out / m, compile), console=console, data=data)
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
    return {"model": model, "seed": seed, "epochs": epochs, "compile": compile, "methods": rows}


def table(results: list[dict], facts: str, args: argparse.Namespace, wall: float) -> str:
    compiled = sorted({r["model"] for r in results if r.get("compile")})
    lines = [
        f"**Machine:** {facts}. **Protocol:** batch {args.batch_size}, Nesterov 0.9, weight decay "
        f"{args.weight_decay:g}, augmentation `{args.augment}`, cosine schedule, SGD lr 0.1, back-matching "
        f"lr 2e-3{', bf16 autocast, channels-last' if args.device.startswith('cuda') else ''}"
        f"{f', width {args.width:g}' if args.width != 1 else ''}{f', subset {args.subset}' if args.subset else ''}; "
        f"same initial weights and batches per seed"
        f"{'; torch.compile: ' + ', '.join(compiled) if compiled else ''}. Script wall time {wall:.0f} s.",
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
    ap.add_argument("--compile", default="off", choices=("off", "on", "auto"),
                    help="torch.compile the model; auto: where the first method's probe is faster so")
    ap.add_argument("--out", default="runs/table2")
    args = ap.parse_args(argv)
    t0 = now()
    deadline = t0 + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True, width=160)
    logging.getLogger("fxbackmatch").setLevel(logging.WARNING)
    torch.backends.cudnn.benchmark = True
    data = load_cached(args.data, args.subset).to(args.device)
    console.log(f"{data.describe()} on {args.device} after {now() - t0:.1f} s")
    facts = device_facts(args.device)
    results: list[dict] = []
    probed: dict[str, dict[str, dict]] = {}  # per model: its methods' probes
    for job in args.jobs.split(","):
        model, _, seed = job.partition(":")
        job_out = out / f"{model}-seed{seed or 0}"
        if args.epochs is None and deadline - now() < 60:  # a new model's probe alone may take that
            console.log(f"no time left for {job}")
            break
        if model not in probed and (args.epochs is None or args.compile == "auto"):
            # a compile may take at most 40 % of what is left (and not under a minute)
            probed[model] = probe_job(args, data, model, int(seed or 0), job_out, console,
                                      max(60.0, 0.4 * (deadline - now())) if args.epochs is None else float("inf"))
        try:
            r = run_job(args, data, model, int(seed or 0), args.epochs, deadline, job_out, console, probed.get(model))
        except Exception as e:  # one job's failure keeps the others' rows (and the next job's chance)
            console.log(f"job {job} failed: {_first_line(e)}")
            console.print_exception(max_frames=8)
            continue
        if r is None:
            break
        results.append(r)
        # after every job, so that a run cut short keeps what finished
        (out / "table2.json").write_text(json.dumps({"facts": facts, "results": results}, indent=1) + "\n")
        (out / "table2.md").write_text(table(results, facts, args, now() - t0))
    console.print((out / "table2.md").read_text() if results else "no job finished")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
