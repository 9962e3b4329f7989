"""The device-resident CIFAR pipeline: crop/flip against a per-image loop, device-independent
batches, augmentation statistics against the rotation loader, the decoded cache, the
cosine schedule and the device script's CPU dry run."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fxbackmatch.train import TrainConfig, augment_batch, epoch_batches, lr_at
from fxbackmatch.train.data import DataError, ImageData
from fxbackmatch.train.pipeline import DeviceLoader, crop_flip, load_cached

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


def random_data(n: int = 64, seed: int = 0, h: int = 8) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, h, h), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 10
    return ImageData(x, y, x[:8].clone(), y[:8].clone(), [str(i) for i in range(10)], "random")


def test_crop_flip_equals_a_per_image_loop():
    d = random_data(16)
    g = torch.Generator().manual_seed(3)
    pad = 3
    off = torch.randint(0, 2 * pad + 1, (16, 2), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    fill = torch.tensor([10, 20, 30], dtype=torch.uint8)
    got = crop_flip(d.train_x, off[:, 0], off[:, 1], flip, pad, fill)
    for i in range(16):
        img = d.train_x[i].long()
        padded = torch.stack([F.pad(img[c], (pad,) * 4, value=int(fill[c])) for c in range(3)])
        want = padded[:, off[i, 0]:off[i, 0] + 8, off[i, 1]:off[i, 1] + 8]
        if flip[i]:
            want = want.flip(-1)
        assert torch.equal(got[i].long(), want), i
    assert got.dtype == torch.uint8 and got.is_contiguous(memory_format=torch.channels_last)


def test_zero_offset_at_the_pad_and_no_flip_is_the_identity():
    d = random_data(8)
    z = torch.full((8,), 4)
    got = crop_flip(d.train_x, z, z, torch.zeros(8, dtype=torch.bool), 4, torch.zeros(3, dtype=torch.uint8))
    assert torch.equal(got, d.train_x)


def _epoch(loader: DeviceLoader, seed: int):
    return [(x.clone(), y.clone()) for x, y in loader.epoch(torch.Generator().manual_seed(seed),
                                                            torch.Generator().manual_seed(seed + 1))]


def test_batches_depend_only_on_the_seed_and_leave_the_global_rng_alone():
    d = random_data(40)
    loader = DeviceLoader(d, 16, "crop")
    state = torch.get_rng_state()
    a, b = _epoch(loader, 5), _epoch(loader, 5)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(a) == 3 and [len(y) for _, y in a] == [16, 16, 8]
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    c = _epoch(loader, 6)
    assert not torch.equal(a[0][0], c[0][0])
    # the permutation is the harness's epoch_batches (unaugmented runs keep their old batches)
    idx = epoch_batches(40, 16, torch.Generator().manual_seed(5))
    plain = _epoch(DeviceLoader(d, 16, "none"), 5)
    assert all(torch.equal(x, d.train_x[i]) and torch.equal(y, d.train_y[i]) for (x, y), i in zip(plain, idx))
    # every image of the epoch appears once, labels follow their images
    assert sorted(torch.cat([y for _, y in a]).tolist()) == sorted(d.train_y.tolist())


def test_a_last_batch_of_one_image_is_dropped():
    loader = DeviceLoader(random_data(33), 16, "crop")
    assert len(loader) == 2 and len(_epoch(loader, 0)) == 2


def test_crop_statistics_match_the_rotation_loader():
    """Flip rate 1/2, offsets uniform on [0, 8], and the normalized batches' per-channel mean
    (the padding is the mean colour) as in the rotation loader (zero fill after normalizing)."""
    n = 4000
    d = random_data(n, h=16)
    g = torch.Generator().manual_seed(0)
    ep = DeviceLoader(d, 500, "crop").plan(torch.Generator().manual_seed(1), g)
    off, flip = ep.draws
    assert abs(flip.float().mean().item() - 0.5) < 4 * 0.5 / math.sqrt(n)  # 4 standard errors
    assert off.min() == 0 and off.max() == 8
    assert abs(off.float().mean().item() - 4.0) < 4 * math.sqrt(20 / 3) / math.sqrt(2 * n)
    crop = torch.cat([d.normalize(x) for x, _ in DeviceLoader(d, 500, "crop").iterate(ep)])
    gen = torch.Generator().manual_seed(2)
    rot = torch.cat([augment_batch(d.normalize(d.train_x[i:i + 500]), gen) for i in range(0, n, 500)])
    plain = d.normalize(d.train_x)
    for t in (crop, rot):
        m = t.mean(dim=(0, 2, 3))
        assert torch.allclose(m, plain.mean(dim=(0, 2, 3)), atol=0.02), m


def test_unknown_augmentation_is_a_clear_error():
    with pytest.raises(DataError, match="unknown augmentation 'cutout'; choose from none, crop, rotate"):
        DeviceLoader(random_data(8), 4, "cutout")


def test_cosine_schedule_and_augment_flag_compatibility():
    cfg = TrainConfig(methods=("sgd",), lr={"sgd": 0.1}, epochs=4, schedule="cosine")
    assert [lr_at(cfg, "sgd", e) for e in range(4)] == pytest.approx([0.1, 0.1 * (1 + 2 ** -0.5) / 2, 0.05,
                                                                      0.1 * (1 - 2 ** -0.5) / 2])
    assert TrainConfig(augment=True).augmentation == "rotate"
    assert TrainConfig(augment=False).augmentation == "none"
    assert TrainConfig(augment="crop").augmentation == "crop"


def _write_pack(path: Path, n: int = 20) -> None:
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(0)
    arrays = {}
    for split in ("train", "test"):
        imgs = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        blobs = [encode_jpeg(im, quality=95).numpy() for im in imgs]
        arrays[f"{split}_jpeg"] = np.concatenate(blobs)
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        arrays[f"{split}_labels"] = (np.arange(n) % 10).astype(np.uint8)
    arrays["classes"] = np.array([f"c{i}" for i in range(10)])
    np.savez(path, **arrays)


def test_decoded_pack_is_cached_keyed_by_content(tmp_path, monkeypatch):
    pack = tmp_path / "pack.npz"
    _write_pack(pack)
    cache = tmp_path / "cache"
    first = load_cached(pack, directory=cache)
    (entry,) = cache.glob("*.pt")

    import fxbackmatch.train.pipeline as pipeline

    def no_decode(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(pipeline, "load_data", no_decode)
    again = load_cached(pack, directory=cache)
    for k in ("train_x", "train_y", "test_x", "test_y", "mean", "std"):
        assert torch.equal(getattr(first, k), getattr(again, k)), k
    assert again.classes == first.classes
    monkeypatch.undo()
    entry.write_bytes(b"damaged")  # a damaged entry is rebuilt, not trusted
    rebuilt = load_cached(pack, directory=cache)
    assert torch.equal(rebuilt.train_x, first.train_x)
    _write_pack(pack, n=12)  # a changed pack gets its own key
    assert load_cached(pack, directory=cache).train_x.shape[0] == 12
    assert len(list(cache.glob("*.pt"))) == 2


@pytest.mark.cuda
def test_cuda_batches_equal_cpu_batches():
    d = random_data(64)
    cpu = _epoch(DeviceLoader(d, 16, "crop"), 3)
    gpu = _epoch(DeviceLoader(d.to("cuda"), 16, "crop", channels_last=True), 3)
    assert all(torch.equal(a.cpu(), b.cpu()) and torch.equal(ya, yb.cpu()) for (a, ya), (b, yb) in zip(cpu, gpu))


@pytest.mark.cuda
def test_cuda_harness_epoch_with_bf16_and_channels_last(tmp_path):
    from fxbackmatch.train import train

    d = random_data(64, h=32)
    cfg = TrainConfig(model="vgg11", width=0.0625, methods=("sgd", "backmatch"), epochs=2, batch_size=16,
                      augment="crop", schedule="cosine", device="cuda", out=str(tmp_path), progress=False)
    res = train(cfg, data=d)
    assert all(math.isfinite(r["train_loss"]) for r in res.rows)
    assert res.runs["sgd/0"]["init_digest"] == res.runs["backmatch/0"]["init_digest"]


@pytest.mark.slow
def test_device_script_dry_run(tmp_path):
    """``benchmarks/device_run.sh`` end to end on the CPU (DRY=1): every step runs and the
    table has a row per method with the 2 epochs asked for."""
    pack = tmp_path / "pack.npz"
    _write_pack(pack, n=80)
    out = tmp_path / "out"
    env = {**os.environ, "DRY": "1", "DATA": str(pack), "OUT": str(out), "PYTHON": sys.executable,
           "FXBACKMATCH_CACHE": str(tmp_path / "cache"), "RUNS": str(tmp_path / "runs")}
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "device_run.sh")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    log = (out / "log.txt").read_text()
    assert "cuda tests: rc 0" in log and "bench_rescale: rc 0" in log and "table2: rc 0" in log, log
    bench = (out / "bench_rescale.txt").read_text()
    assert "fused step / compiled SGD step" in bench
    assert "fused step with the compiled update / compiled SGD step: median" in bench, bench  # measured, not failed
    assert "resnet18: AdamW step" in bench and "compiled : median" in bench, bench  # the length mode's pair
    profile = (out / "profile.txt").read_text()
    assert "rescale_grads_" in profile and "Self CPU" in profile  # cProfile's functions, then torch's ops
    assert "step_profile: rc 0" in log and "## vgg11 backmatch, cpu, batch 16: 3 steps per epoch" in profile
    t2log = " ".join((out / "table2_log.txt").read_text().split())  # rich wraps long lines
    assert "probe vgg11 sgd (torch.compile):" in t2log and "vgg11: " in t2log and " for its runs" in t2log, t2log
    assert "wall per step (unprofiled)" in profile
    assert len([f for f in out.rglob("*") if f.is_file()]) <= 8  # the most the device tool brings back
    rows = [line for line in (out / "table2.md").read_text().splitlines() if line.startswith("| vgg11 | 0 |")]
    assert [row.split("|")[3].strip() for row in rows] == ["SGD", "back-matching"]
    assert all(row.split("|")[5].strip() == "2" for row in rows)
    for d in json.loads((out / "table2.json").read_text())["results"][0]["methods"].values():
        secs = [c["epoch_seconds"] for c in d["curve"]]  # the median, not a mean the first epoch's warm-up pulls
        assert d["s_per_epoch"] == statistics.median(secs) and d["first_epoch_s"] == secs[0]


@pytest.mark.slow
def test_the_compiled_harness_compiles_one_graph_per_architecture(tmp_path):
    """``benchmarks/table2.py``'s budget rests on this: with ``compile=True`` only the full
    training batches run the compiled model (the epoch's last, smaller batch and the
    evaluation run eagerly), so a process compiles one graph, a new instance of the model
    (the next method's run) reuses it, and the run trains as the eager one does."""
    from torch._dynamo.utils import counters

    from fxbackmatch.train import train

    torch._dynamo.reset()
    d = random_data(40, h=32)  # batch 16: two full batches, then one of 8

    def run(method: str, compile: bool):
        cfg = TrainConfig(model="lenet-bn", width=0.25, methods=(method,), epochs=2, batch_size=16,
                          eval_batch_size=8, augment="crop", device="cpu", compile=compile,
                          out=str(tmp_path / f"{method}-{compile}"), progress=False)
        before = counters["stats"]["unique_graphs"]
        res = train(cfg, data=d)
        return res, counters["stats"]["unique_graphs"] - before

    sgd, graphs_sgd = run("sgd", True)
    bm, graphs_bm = run("backmatch", True)
    assert (graphs_sgd, graphs_bm) == (1, 0)
    for compiled, method in ((sgd, "sgd"), (bm, "backmatch")):
        eager, graphs = run(method, False)
        assert graphs == 0
        for a, b in zip(compiled.rows, eager.rows):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
            assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)
