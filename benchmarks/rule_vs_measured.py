"""Per-layer rule ``m`` against the measured ``m`` (``plan.measure``: ``mean diag(JᵀJ)`` by
autograd) under the paper's and the default conventions, on the paper's VGG-16, ResNet-50, a
small ViT and a character GPT-2 (issue 21). Prints a markdown table: per model and set, the
geometric mean of rule m / measured m over the layers, its range, and the share of layers
within 2× of the measurement.

    python benchmarks/rule_vs_measured.py [--probes 8] [--batch 32]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

import fxbackmatch  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10-jpeg.npz"


def models(batch: int):
    import torchvision

    from fxbackmatch.models import vgg_paper
    from fxbackmatch.train.data import load_npz

    data = load_npz(DATA, subset=max(200, batch))
    x = data.normalize(data.train_x[:batch])
    torch.manual_seed(0)
    yield "paper VGG-16 (CIFAR-10)", vgg_paper(16), (x,), {}
    torch.manual_seed(0)
    yield "ResNet-50 (torchvision, CIFAR-10 32×32)", torchvision.models.resnet50(num_classes=10), (x,), {}
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=4, hidden_dim=64,
                                               mlp_dim=128, num_classes=10)
    vit.heads.head.reset_parameters()  # torchvision zeroes it: the measured m below a zero head is 0
    yield "small ViT (patch 4, 2 layers, width 64; head at torch's default init)", vit, (x,), {}
    from transformers import GPT2Config, GPT2LMHeadModel, logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=256, n_positions=64,
                                     bos_token_id=0, eos_token_id=0))
    ids = torch.randint(0, 256, (batch // 2, 64), generator=torch.Generator().manual_seed(0))
    yield "character GPT-2 (2 layers, width 64)", gpt, (ids,), {"use_cache": False}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--only", default="", help="comma-separated substrings of the model names to run")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    print(f"<!-- {machine()}, batch {args.batch}, {args.probes} probes -->")
    print("| model | conventions | layers | geo. mean rule m / measured m | range | within 2× |")
    print("|---|---|---:|---:|---|---:|")
    only = set(args.only.split(",")) if args.only else None
    for name, model, inputs, kwargs in models(args.batch):
        if only and not any(o in name for o in only):
            continue
        for conv in ("paper", "default"):
            t = time.perf_counter()
            kw = {"outputs": "logits"} if kwargs else {}
            plan = fxbackmatch.prepare(model, inputs, example_kwargs=kwargs or None, compile=False, conventions=conv, **kw)
            rows = plan.measure(*inputs, probes=args.probes, **kwargs)
            logs = [math.log(r["ratio"]) for r in rows if r["measured_m"] and r["rule_m"] and r["ratio"] > 0]
            if not logs:
                print(f"| {name} | {conv} | 0 | — | — | — |")
                continue
            g = math.exp(sum(logs) / len(logs))
            within = sum(abs(v) <= math.log(2) for v in logs) / len(logs)
            print(f"| {name} | {conv} | {len(logs)} | {g:.3g} | {math.exp(min(logs)):.3g} – {math.exp(max(logs)):.3g} | "
                  f"{within:.0%} |", flush=True)
            print(f"<!-- {name} {conv}: {time.perf_counter() - t:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
