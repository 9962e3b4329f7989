"""timm models of different families at 32×32 through ``prepare``, under the default and the
paper's conventions, and whether each trains (the zoo's column): writes docs/zoo_timm.md.

    python benchmarks/timm_sweep.py [--only vit_tiny_patch16_224,...] [--results runs/timm.jsonl]

"trains" is :func:`fxbackmatch.zoo.trains`: 20 SGD-momentum steps at lr 2e-3 on real CIFAR-10
batches of 16, every loss finite and below 3× the first, no conv/linear weight moving more
than its norm in step 1. Weights are timm's own init (``pretrained=False``), 10 classes; a
model that takes ``img_size`` is built for 32×32. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from zoo_sweep import cifar_batches, load_results  # noqa: E402

from fxbackmatch.analysis.guards import SCALE_RANGE  # noqa: E402
from fxbackmatch.zoo import ZooResult, sweep_model  # noqa: E402

#: (family, model): vision transformers, MLP-style models, modern CNNs
MODELS = [
    ("ViT", "vit_tiny_patch16_224"), ("ViT (DeiT)", "deit_tiny_patch16_224"), ("ViT (CaiT, layer scale)", "cait_xxs24_224"),
    ("ViT (XCiT, cross-covariance: F.normalize)", "xcit_nano_12_p8_224"), ("ViT (EVA-02: RoPE, SwiGLU)", "eva02_tiny_patch14_224"),
    ("ViT (PiT, pooling)", "pit_ti_224"), ("LeViT", "levit_128s"), ("Swin", "swin_tiny_patch4_window7_224"),
    ("Twins", "twins_svt_small"), ("MLP-Mixer", "mixer_b16_224"), ("ResMLP (addcmul affine)", "resmlp_12_224"),
    ("gMLP", "gmlp_s16_224"), ("PoolFormer", "poolformer_s12"), ("ConvMixer", "convmixer_768_32"),
    ("ConvNeXt", "convnext_atto"), ("ConvNeXt-V2 (GRN)", "convnextv2_atto"), ("EfficientNet", "efficientnet_b0"),
    ("MobileNet-V3", "mobilenetv3_small_100"), ("RegNet-Y", "regnety_002"), ("ResNet-D", "resnet18d"),
    ("GhostNet", "ghostnet_100"), ("RepVGG", "repvgg_a0"), ("EdgeNeXt", "edgenext_xx_small"), ("FastViT", "fastvit_t8"),
    ("NFNet (scaled weight standardization)", "nfnet_l0"), ("CoAtNet", "coatnet_0_rw_224"), ("MobileViT", "mobilevit_xxs"),
    ("DenseNet", "densenet121"),
]


def build(name: str) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    try:
        return timm.create_model(name, pretrained=False, num_classes=10, img_size=32)
    except TypeError:
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=10)


def _g(x) -> str:
    return "—" if x is None else f"{x:.2g}"


def _ok(r: ZooResult) -> bool:
    return (r.outcome == "ok" and r.trains == "ok" and r.scale_min is not None
            and SCALE_RANGE[0] <= r.scale_min and r.scale_max <= SCALE_RANGE[1])


def _cell(r: ZooResult) -> str:
    if r.outcome != "ok":
        return f"{r.outcome}: {r.message[:70]}"
    if not (SCALE_RANGE[0] <= r.scale_min and r.scale_max <= SCALE_RANGE[1]):
        return f"scales {_g(r.scale_min)}..{_g(r.scale_max)}; {r.trains}"
    return str(r.trains)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/zoo_timm.md")
    ap.add_argument("--only", default="")
    ap.add_argument("--results", default="runs/timm.jsonl")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/cifar10-jpeg.npz"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    only = set(args.only.split(",")) if args.only else None
    batches = cifar_batches(args.data)
    res = Path(args.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    done = load_results(res)
    for family, name in MODELS:
        if only and name not in only:
            continue
        for conv in ("default", "paper"):
            if (conv, name) in done:
                continue
            t = time.perf_counter()
            try:
                r = sweep_model(name, batches, conventions=conv, model=build(name), side=32)
            except Exception as e:  # a row saying what failed, never a crashed sweep
                r = ZooResult(name, type(e).__name__, str(e).splitlines()[0], 0, 0, False, 0.0, 0.0)
            r.seconds = time.perf_counter() - t
            done[(conv, name)] = r
            with res.open("a") as f:
                f.write(json.dumps({"conventions": conv, **dataclasses.asdict(r)}) + "\n")
            print(f"{conv:8s} {name:32s} {r.outcome:12s} {r.covered}/{r.total} scales {_g(r.scale_min)}..{_g(r.scale_max)} "
                  f"trains={r.trains} {r.message[:60]}", flush=True)
    rows = [(f, n, done.get(("default", n)), done.get(("paper", n))) for f, n in MODELS]
    rows = [r for r in rows if r[2] is not None and r[3] is not None]
    n_def, n_pap = sum(_ok(d) for _, _, d, _ in rows), sum(_ok(p) for _, _, _, p in rows)
    lines = [
        "# timm models at 32×32 through `prepare`, and whether they train",
        "",
        f"Generated by `python benchmarks/timm_sweep.py` on {machine()} "
        f"({sum((d.seconds or 0) + (p.seconds or 0) for _, _, d, p in rows):.0f} s in all), timm "
        f"{__import__('timm').__version__}. `pretrained=False` (timm's own init), 10 classes, built for 32×32 where the",
        "model takes `img_size`. Columns as in [zoo.md](zoo.md): **ok** = prepares with the defaults, every",
        f"scale in [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}] at init, and trains (20 SGD-momentum steps at lr 2e-3 on CIFAR-10",
        "batches of 16: every loss finite and below 3× the first, no conv/linear weight moving more than its norm in step 1).",
        "",
        f"**{n_def}/{len(rows)} ok under the default conventions; {n_pap}/{len(rows)} under `conventions=\"paper\"`.**",
        "",
        "| family | model | params (M) | covered | default: min / median / max scale | default | paper: max scale | paper |",
        "|---|---|---:|---:|---|---|---:|---|",
    ]
    for fam, name, d, p in rows:
        lines.append(
            f"| {fam} | {name} | {d.n_params_m:.1f} | {d.covered}/{d.total} | {_g(d.scale_min)} / {_g(d.scale_median)} / "
            f"{_g(d.scale_max)} | {'ok' if _ok(d) else _cell(d)} | {_g(p.scale_max)} | {'ok' if _ok(p) else _cell(p)} |")
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
