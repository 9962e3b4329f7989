"""Issue 12's CPU-sized training comparisons: AdamW, AdamW with back-matching's step-length
mode, LAMB, SGD-momentum and back-matching with SGD-momentum — each at its best learning
rate from the same small grid, from the same initial weights and batches.

* ``gpt``: a character-level GPT (Hugging Face GPT-2 architecture, 2 layers, width 64,
  context 64, byte vocabulary) on the Python standard library's own source files, split by
  file into train / validation (every 10th file validates);
* ``vit``: torchvision's VisionTransformer (patch 4, 2 layers, width 64) on a CIFAR-10 subset
  from ``../shared/datasets/cifar10-jpeg.npz``.

Writes ``docs/adaptive_<task>.json`` and ``docs/adaptive_<task>.png`` (validation curves of
each method at its best rate), prints a table.

    python benchmarks/adaptive_compare.py gpt     # 200 steps, every method at every rate of GRID
    python benchmarks/adaptive_compare.py vit
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

import fxbackmatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: one learning-rate grid for every method (log-spaced, a decade apart)
GRID = (3e-4, 3e-3, 3e-2, 3e-1, 3.0)
#: method -> (optimizer, rule)
METHODS = {
    "adamw": ("adamw", None),
    "backmatch@adamw": ("adamw", "backmatch"),
    "lamb": ("adamw", "lamb"),
    "sgd": ("sgd", None),
    "backmatch": ("sgd", "backmatch"),  # the default conventions
    "backmatch-paper": ("sgd", "backmatch", "paper"),  # the paper's conventions
}


# ------------------------------------------------------------------------------ tasks
def gpt_task(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel, logging

    logging.set_verbosity_error()
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train = b"".join(f.read_bytes() for i, f in enumerate(files) if i % 10)
    val = b"".join(f.read_bytes() for i, f in enumerate(files) if not i % 10)
    tr = torch.frombuffer(bytearray(train), dtype=torch.uint8).long()
    va = torch.frombuffer(bytearray(val), dtype=torch.uint8).long()
    ctx, batch = 64, 16

    def batches(data, n, gen):
        idx = torch.randint(0, len(data) - ctx - 1, (n, batch), generator=gen)
        return [torch.stack([data[i:i + ctx + 1] for i in row]) for row in idx]

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=256, n_positions=ctx,
                                       bos_token_id=0, eos_token_id=0))
    info = f"{len(files) - len(files) // 10 - 1} train / {len(files) // 10 + 1} validation files, {len(tr) / 1e6:.1f} MB / {len(va) / 1e6:.2f} MB"

    def loss_fn(m, b):
        logits = m(b[:, :-1], use_cache=False).logits
        return F.cross_entropy(logits.reshape(-1, 256), b[:, 1:].reshape(-1)), None

    def prep(m, rule, conventions="default"):
        return fxbackmatch.prepare(m, (tr[:2 * ctx].view(2, ctx),), example_kwargs={"use_cache": False},
                                   outputs="logits", rule=rule, compile=False, conventions=conventions)

    return model, (lambda n, g: batches(tr, n, g)), batches(va, 8, torch.Generator().manual_seed(99)), loss_fn, prep, info


def vit_task(seed: int):
    import torchvision

    from fxbackmatch.train.data import load_npz

    data = load_npz(ROOT.parent / "shared/datasets/cifar10-jpeg.npz", subset=10000)
    x, y = data.normalize(data.train_x), data.train_y
    pick = torch.randperm(len(data.test_y), generator=torch.Generator().manual_seed(99))[:2000]  # sorted by class
    xv, yv = data.normalize(data.test_x[pick]), data.test_y[pick]
    batch = 32
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10)
    info = f"CIFAR-10 {len(y)} train / {len(yv)} test images (subset)"

    def batches(n, g):
        idx = torch.randint(0, len(y), (n, batch), generator=g)
        return [(x[i], y[i]) for i in idx]

    def loss_fn(m, b):
        logits = m(b[0])
        return F.cross_entropy(logits, b[1]), (logits.argmax(1) == b[1]).float().mean()

    val = [(xv[i:i + 250], yv[i:i + 250]) for i in range(0, len(yv), 250)]

    def prep(m, rule, conventions="default"):
        return fxbackmatch.prepare(m, x[:2], rule=rule, compile=False, conventions=conventions)

    return model, batches, val, loss_fn, prep, info


# ------------------------------------------------------------------------------- runs
def run(task, method: str, lr: float, steps: int, eval_every: int, seed: int) -> dict:
    model0, train_batches, val, loss_fn, prep, _ = task
    model = copy.deepcopy(model0)
    opt_kind, rule, *conventions = METHODS[method]
    if opt_kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if rule is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # range warnings are reported by the plan's flags
            plan = prep(model, rule, *conventions)
        plan.attach(opt, mode="length" if opt_kind == "adamw" else "grad")
    batches = train_batches(steps, torch.Generator().manual_seed(seed))
    curve, t0, diverged = [], time.perf_counter(), False
    for step, b in enumerate(batches, 1):
        opt.zero_grad()
        loss, _ = loss_fn(model, b)
        if not math.isfinite(float(loss)):
            diverged = True
            break
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            curve.append((step, *evaluate(model, val, loss_fn)))
    per_step = (time.perf_counter() - t0) / max(1, step)
    final = curve[-1] if curve and not diverged else (step, float("nan"), float("nan"))
    return {"method": method, "lr": lr, "curve": curve, "val_loss": final[1], "val_acc": final[2],
            "s_per_step": per_step, "diverged": diverged}


@torch.no_grad()
def evaluate(model, val, loss_fn) -> tuple[float, float]:
    model.eval()
    losses, accs = [], []
    for b in val:
        loss, acc = loss_fn(model, b)
        losses.append(float(loss))
        accs.append(float(acc) if acc is not None else float("nan"))
    model.train()
    return sum(losses) / len(losses), sum(accs) / len(accs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=("gpt", "vit"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--out", default="", help="results file (default docs/adaptive_<task>.json)")
    ap.add_argument("--grid", default="", help="comma-separated rates instead of GRID (to bracket an optimum at its edge)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    grid = tuple(float(r) for r in args.grid.split(",")) if args.grid else GRID
    task = (gpt_task if args.task == "gpt" else vit_task)(args.seed)
    print(machine())
    print(task[-1])
    results = []
    t_all = time.perf_counter()
    for method in args.methods:
        for lr in grid:
            r = run(task, method, lr, args.steps, args.eval_every, args.seed)
            results.append(r)
            print(f"{method:16} lr {lr:<7g} val loss {r['val_loss']:.4f} acc {r['val_acc']:.3f} "
                  f"{r['s_per_step'] * 1e3:6.1f} ms/step{' DIVERGED' if r['diverged'] else ''}", flush=True)
    best = {}
    for r in results:
        cur = best.get(r["method"])
        if not r["diverged"] and math.isfinite(r["val_loss"]) and (cur is None or r["val_loss"] < cur["val_loss"]):
            best[r["method"]] = r
    print(f"\nbest rate per method ({args.steps} steps, seed {args.seed}; total {time.perf_counter() - t_all:.0f} s):")
    for m in args.methods:
        r = best.get(m)
        print(f"  {m:16} " + ("all rates diverged" if r is None else
                              f"lr {r['lr']:<7g} val loss {r['val_loss']:.4f} acc {r['val_acc']:.3f}"))
    out = Path(args.out) if args.out else ROOT / "docs" / f"adaptive_{args.task}.json"
    out.write_text(json.dumps({"machine": machine(), "task": task[-1], "steps": args.steps, "seed": args.seed,
                               "grid": grid, "total_s": time.perf_counter() - t_all,
                               "results": results}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for m, r in best.items():
            ax.plot([c[0] for c in r["curve"]], [c[1] for c in r["curve"]], label=f"{m} (lr {r['lr']:g})")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{args.task}: each method at its best rate")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
