"""The training harness (issue 5): data loaders on files written here, every method for
two steps, the paper's protocol (same init, same batches), CLI, bitwise resume."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fxbackmatch.cli import CliError, _parser, main
from fxbackmatch.train import (
    DataError,
    TrainConfig,
    augment_batch,
    config_from_args,
    epoch_batches,
    initial_model,
    load_config,
    load_data,
    state_digest,
    subset_indices,
    train,
)

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth colour gradients (JPEG keeps them close), uint8 (n, 3, 32, 32)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    a = torch.rand(n, 3, 3, generator=g)
    img = a[..., 0, None, None] * 200 * xx + a[..., 1, None, None] * 55 * yy + a[..., 2, None, None] * 0
    return img.round().clamp(0, 255).to(torch.uint8)


def write_npz(path: Path, n_train: int = 24, n_test: int = 12, corrupt_jpeg: bool = False):
    from torchvision.io import encode_jpeg

    arrays = {}
    truth = {}
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        imgs = smooth_images(n, seed)
        labels = np.sort(np.arange(n) % 10).astype(np.uint8)  # sorted by class, like the real file
        blobs = [encode_jpeg(im, quality=95).numpy() for im in imgs]
        if corrupt_jpeg:
            blobs[1] = np.frombuffer(b"not a jpeg at all", dtype=np.uint8)
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        arrays[f"{split}_jpeg"] = np.concatenate(blobs).astype(np.uint8)
        arrays[f"{split}_offsets"] = offsets
        arrays[f"{split}_labels"] = labels
        truth[split] = (imgs, labels)
    arrays["classes"] = np.array(CLASSES)
    np.savez(path, **arrays)
    return truth


def write_torchvision(root: Path, kind: str = "cifar10", per_file: int = 3) -> dict:
    """A tiny directory in torchvision's CIFAR python format (not the official files)."""
    rng = np.random.default_rng(0)
    if kind == "cifar10":
        base, train, test = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
        key, meta, meta_key, names = "labels", "batches.meta", "label_names", CLASSES
    else:
        base, train, test = root / "cifar-100-python", ["train"], ["test"]
        key, meta, meta_key, names = "fine_labels", "meta", "fine_label_names", [f"c{i}" for i in range(100)]
    base.mkdir(parents=True)
    out = {"train": ([], []), "test": ([], [])}
    for split, files in (("train", train), ("test", test)):
        for j, fname in enumerate(files):
            data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, len(names), size=per_file)]
            with open(base / fname, "wb") as f:
                pickle.dump({"batch_label": fname, "data": data, key: labels}, f, protocol=2 if j % 2 else 5)
            out[split][0].append(data)
            out[split][1].extend(labels)
    with open(base / meta, "wb") as f:
        pickle.dump({meta_key: names}, f, protocol=2)
    return {s: (np.concatenate(d).reshape(-1, 3, 32, 32), np.array(l)) for s, (d, l) in out.items()}


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> tuple[Path, dict]:
    p = tmp_path_factory.mktemp("data") / "tiny.npz"
    return p, write_npz(p)


def tiny_config(npz: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(npz), subset=16, batch_size=8, epochs=1, seeds=(0,), progress=False, out=str(out),
                eval_batch_size=8)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- data
def test_npz_loader_decodes_shapes_labels_and_pixels(tiny_npz):
    path, truth = tiny_npz
    d = load_data(str(path))
    assert d.train_x.shape == (24, 3, 32, 32) and d.train_x.dtype == torch.uint8
    assert d.test_x.shape == (12, 3, 32, 32)
    assert d.train_y.dtype == torch.int64
    assert d.train_y.tolist() == truth["train"][1].tolist()
    assert d.test_y.tolist() == truth["test"][1].tolist()
    assert d.classes == CLASSES and d.num_classes == 10
    err = (d.train_x.float() - truth["train"][0].float()).abs().mean()
    assert err < 3.0  # JPEG at quality 95 on smooth images
    assert d.mean.shape == (3,) and torch.all(d.std > 0)
    z = d.normalize(d.train_x)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    # the statistics themselves, computed another way (float64, population std on [0, 1])
    px = d.train_x.double() / 255
    torch.testing.assert_close(d.std.double(), px.std(dim=(0, 2, 3), correction=0), rtol=1e-5, atol=0)
    torch.testing.assert_close(z.double().std(dim=(0, 2, 3), correction=0), torch.ones(3, dtype=torch.float64),
                               rtol=1e-4, atol=0)


def test_subset_is_class_balanced_and_deterministic(tiny_npz):
    path, _ = tiny_npz
    labels = np.sort(np.arange(50) % 10)
    idx = subset_indices(labels, 20)
    assert np.bincount(labels[idx], minlength=10).tolist() == [2] * 10
    assert subset_indices(labels, 20).tolist() == idx.tolist()
    d = load_data(str(path), subset=10)
    assert d.train_x.shape[0] == 10 and sorted(d.train_y.tolist()) == list(range(10))


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_torchvision_format_loader(tmp_path, kind, caplog):
    truth = write_torchvision(tmp_path, kind)
    d = load_data(f"torchvision-{kind}:{tmp_path}")
    n_train = 15 if kind == "cifar10" else 3
    assert d.train_x.shape == (n_train, 3, 32, 32) and d.test_x.shape == (3, 3, 32, 32)
    assert torch.equal(d.train_x, torch.from_numpy(truth["train"][0]))  # lossless format
    assert d.train_y.tolist() == truth["train"][1].tolist()
    assert d.test_y.tolist() == truth["test"][1].tolist()
    assert d.num_classes == (10 if kind == "cifar10" else 100)
    assert "restricted unpickler" in caplog.text  # not the official MD5s
    d2 = load_data(str(tmp_path))  # a root directory is recognised too
    assert torch.equal(d2.test_x, d.test_x)


def test_torchvision_format_refuses_foreign_pickle_globals(tmp_path):
    write_torchvision(tmp_path, "cifar10")

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f)
    with pytest.raises(DataError, match="not allowed"):
        load_data(f"torchvision-cifar10:{tmp_path}")


def test_missing_and_corrupt_data_give_one_line_errors(tmp_path):
    with pytest.raises(CliError, match="not found") as e:
        load_data(str(tmp_path / "nope.npz"))
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(CliError, match="corrupt") as e:
        load_data(str(bad))
    assert "\n" not in str(e.value)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(CliError, match="lacks array"):
        load_data(str(other))
    badjpeg = tmp_path / "badjpeg.npz"
    write_npz(badjpeg, 4, 2, corrupt_jpeg=True)
    with pytest.raises(CliError, match="JPEG decoding failed") as e:
        load_data(str(badjpeg))
    assert "\n" not in str(e.value)
    with pytest.raises(CliError, match="not found"):
        load_data(f"torchvision-cifar10:{tmp_path / 'nothing'}")
    write_torchvision(tmp_path / "tv", "cifar10")
    (tmp_path / "tv" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x05garbage")
    with pytest.raises(CliError, match="corrupt"):
        load_data(f"torchvision-cifar10:{tmp_path / 'tv'}")


def test_cli_error_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["train", "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("fxbackmatch: error:") and "not found" in err and "\n" not in err
    rc = main(["train", "--model", "alexnet-ish", "--out", str(tmp_path / "o2")])
    assert rc == 2 and "unknown model" in capsys.readouterr().err


def test_augment_is_seeded_and_shape_preserving():
    x = torch.randn(4, 3, 32, 32)
    a = augment_batch(x, torch.Generator().manual_seed(3), 10.0)
    b = augment_batch(x, torch.Generator().manual_seed(3), 10.0)
    assert a.shape == x.shape and torch.equal(a, b)
    flipped = augment_batch(x, torch.Generator().manual_seed(3), 0.0)
    for i in range(4):  # with no rotation, each image is itself or its mirror
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def four_methods(tiny_npz, tmp_path_factory):
    """Each method, 2 steps (16 images, batch 8), from the same init on the same batches."""
    path, _ = tiny_npz
    cfg = tiny_config(path, tmp_path_factory.mktemp("run4"), methods=("sgd", "backmatch", "lars", "lsalr"),
                      weight_decay=5e-4)
    return cfg, train(cfg)


def test_every_method_trains_two_steps(four_methods):
    cfg, res = four_methods
    assert [r["method"] for r in res.rows] == list(cfg.methods)
    init = initial_model(cfg, 0, 10).state_dict()
    finals = {}
    for m in cfg.methods:
        row = next(r for r in res.rows if r["method"] == m)
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["test_loss"])
        assert 0.0 <= row["test_acc"] <= 1.0 and row["lr"] == cfg.lr_for(m)
        ck = torch.load(Path(cfg.out) / f"{m}-seed0" / "checkpoint.pt", weights_only=True)
        assert ck["epoch"] == 1 and len(ck["optimizer"]["state"]) > 0
        moved = [k for k, v in ck["model"].items() if v.is_floating_point() and not torch.equal(v, init[k])]
        assert any(k.endswith("weight") for k in moved), m
        finals[m] = ck["model"]["0.weight"]
    # the layer-wise scales make a difference: same init and batches, different weights
    assert not torch.equal(finals["sgd"], finals["backmatch"])


def first_step_model(cfg: TrainConfig, res, data, method: str) -> torch.nn.Module:
    """The run's initial model with the gradients of ``method``'s first batch (train mode)."""
    import torch.nn.functional as F

    first = torch.tensor(res.runs[f"{method}/0"]["first_batch"])
    model = initial_model(cfg, 0, 10).train()
    F.cross_entropy(model(data.normalize(data.train_x[first])), data.train_y[first]).backward()
    return model


def test_each_method_first_step_by_hand(tiny_npz, tmp_path):
    """The harness's first update of each SGD method (one step: 16 images, batch 16) equals a
    plain eager step from the same init on the same batch: ``g' = g + wd·p`` (attach adds the
    decay first), times the method's scale — 1 for ``sgd``; the plain formulas for ``lars``
    (``τ‖W‖/‖g'‖``) and ``lsalr`` (``1 + log(1 + 1/‖g'‖)``); a separately prepared plan's
    for ``backmatch`` — then ``p − lr·g'`` (the momentum buffer starts at ``g'``)."""
    from fxbackmatch import prepare

    path, _ = tiny_npz
    wd = 5e-4
    methods = ("sgd", "backmatch", "lars", "lsalr")
    cfg = tiny_config(path, tmp_path, methods=methods, batch_size=16, weight_decay=wd)
    assert cfg.momentum > 0 and not cfg.nesterov
    res = train(cfg)
    data = load_data(str(path), subset=16)
    with open(Path(cfg.out) / "layers.csv") as f:
        logged = {(r["method"], r["param"]): r for r in csv.DictReader(f)}
    for m in methods:
        model = first_step_model(cfg, res, data, m)
        if m == "backmatch":  # LeNet-BN, the paper's model: the harness uses its conventions
            plan = prepare(initial_model(cfg, 0, 10), torch.zeros(2, *data.image_shape), compile=False, conventions="paper")
            scales = plan.scales()
        lr = cfg.lr_for(m)
        ck = torch.load(Path(cfg.out) / f"{m}-seed0" / "checkpoint.pt", weights_only=True)["model"]
        for n, p in model.named_parameters():
            g = p.grad.double() + wd * p.detach().double()
            w_norm, g_norm = float(p.detach().double().norm()), float(g.norm())
            scale = {"sgd": 1.0, "lars": cfg.trust_coefficient * w_norm / g_norm if w_norm and g_norm else 1.0,
                     "lsalr": 1 + math.log(1 + 1 / g_norm),
                     "backmatch": scales[n] if m == "backmatch" else None}[m]
            want = (p.detach().double() - lr * scale * g).float()
            torch.testing.assert_close(ck[n], want, rtol=1e-5, atol=1e-7, msg=f"{m}: {n}")
            # layers.csv's effective rate is the rate of that step (for LARS and LSALR: of the raw
            # gradient, not of the one already rescaled)
            assert float(logged[(m, n)]["lr_scale"]) == pytest.approx(lr * scale, rel=1e-5), (m, n)


def test_adamw_methods_train_with_the_step_length_mode(tiny_npz, tmp_path):
    """``backmatch@adamw`` and ``lamb`` run AdamW with the rule setting each layer's step
    length; ``sgd@adamw`` is plain AdamW. Oracle, the first step by hand (16 images, batch
    16): AdamW's own step is ``u = −lr·(wd·W + g/(|g|+eps))``; ``sgd@adamw`` takes it,
    ``backmatch@adamw`` takes its direction at length ``lr·scale·‖g‖`` (the first moment over
    ``1 − β₁`` is ``g``), ``lamb`` at length ``lr·‖W‖`` (a zero weight keeps ``u``)."""
    from fxbackmatch import prepare

    path, _ = tiny_npz
    wd = 5e-4
    cfg = tiny_config(path, tmp_path, methods=("sgd@adamw", "backmatch@adamw", "lamb"), weight_decay=wd,
                      batch_size=16)
    res = train(cfg)
    data = load_data(str(path), subset=16)
    for m in cfg.methods:
        row = next(r for r in res.rows if r["method"] == m)
        assert math.isfinite(row["train_loss"]) and row["lr"] == cfg.lr_for(m)
        ck = torch.load(Path(cfg.out) / f"{m}-seed0" / "checkpoint.pt", weights_only=True)
        assert any("exp_avg_sq" in st for st in ck["optimizer"]["state"].values())  # AdamW's state
        model = first_step_model(cfg, res, data, m)
        scales = prepare(initial_model(cfg, 0, 10), torch.zeros(2, *data.image_shape), compile=False,
                         conventions=cfg.conventions_name).scales()
        lr, eps = cfg.lr_for(m), 1e-8
        for n, p in model.named_parameters():
            w, g = p.detach().double(), p.grad.double()
            u = -lr * (wd * w + g / (g.abs() + eps))
            length = {"sgd@adamw": float(u.norm()), "backmatch@adamw": lr * scales[n] * float(g.norm()),
                      "lamb": lr * float(w.norm()) if float(w.norm()) > 0 else float(u.norm())}[m]
            moved = ck["model"][n].double() - w
            assert float(moved.norm()) == pytest.approx(length, rel=1e-4), (m, n)
            if float(u.norm()) > 0:
                cos = float((moved * u).sum() / (moved.norm() * u.norm()))
                assert cos > 1 - 1e-6, (m, n, cos)
    with pytest.raises(CliError, match="@optimizer"):
        dataclasses.replace(cfg, methods=("backmatch@rmsprop",)).validate()


def test_per_layer_diagnostics_against_the_checkpoints(four_methods):
    """layers.csv: per method, epoch and parameter, the relative update ‖ΔW‖/‖W‖ — checked
    against the initial weights and the saved checkpoint — the effective rate lr·scale and,
    for back-matching, the layer's m and s."""
    cfg, res = four_methods
    with open(Path(cfg.out) / "layers.csv") as f:
        rows = list(csv.DictReader(f))
    init = initial_model(cfg, 0, 10).state_dict()
    assert {r["method"] for r in rows} == set(cfg.methods)
    for m in ("sgd", "backmatch"):
        ck = torch.load(Path(cfg.out) / f"{m}-seed0" / "checkpoint.pt", weights_only=True)["model"]
        mine = {r["param"]: r for r in rows if r["method"] == m and r["epoch"] == "1"}
        assert set(mine) == {n for n, p in initial_model(cfg, 0, 10).named_parameters()}
        for n, r in mine.items():
            want = float((ck[n].double() - init[n].double()).norm() / init[n].double().norm())
            assert float(r["rel_update"]) == pytest.approx(want, rel=1e-6), (m, n)
    sgd = [r for r in rows if r["method"] == "sgd"]
    assert all(float(r["lr_scale"]) == pytest.approx(cfg.lr_for("sgd")) for r in sgd)
    # LARS reads the gradient: its rate is the one applied at the last step, not τ‖W‖/‖s·g‖ = 1
    lars = [r for r in rows if r["method"] == "lars" and r["param"].endswith("weight")]
    assert lars and all(float(r["lr_scale"]) != pytest.approx(cfg.lr_for("lars"), rel=1e-3) for r in lars)
    bm = [r for r in rows if r["method"] == "backmatch" and r["param"] == "0.weight"]
    assert bm and float(bm[0]["s"]) == 196.0 and float(bm[0]["m"]) > 0
    # m by hand: the supplementary material's chain (the paper's conventions, which the harness
    # uses for LeNet-BN) at the weights the run ended with
    from oracles import lenet_closed_form_m

    final = initial_model(cfg, 0, 10)
    final.load_state_dict(torch.load(Path(cfg.out) / "backmatch-seed0" / "checkpoint.pt", weights_only=True)["model"])
    want_m = lenet_closed_form_m(final)
    got_m = {r["layer"]: float(r["m"]) for r in rows if r["method"] == "backmatch" and r["param"].endswith("weight")
             and r["layer"] in want_m}
    assert set(got_m) == set(want_m)
    for layer, m in want_m.items():
        assert got_m[layer] == pytest.approx(m, rel=1e-6), layer
    assert (Path(cfg.out) / "layers.png").is_file() or not _has_matplotlib()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_width_scales_every_builtin_model():
    from fxbackmatch.train.harness import build_model

    lenet = build_model("lenet-bn", 10, 0.5)
    assert lenet[0].out_channels == 3 and lenet[9].out_features == 60
    res = build_model("resnet18-paper", 10, 0.25)
    assert res.conv1.out_channels == 16 and res.fc.in_features == 128
    assert res(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(CliError, match="built-in"):
        build_model("tv:resnet18", 10, 0.5)


def test_same_initial_weights_and_batches_for_every_method(four_methods):
    cfg, res = four_methods
    runs = [res.runs[f"{m}/0"] for m in cfg.methods]
    assert len({r["init_digest"] for r in runs}) == 1
    assert runs[0]["init_digest"] == state_digest(initial_model(cfg, 0, 10))
    assert all(r["first_batch"] == runs[0]["first_batch"] for r in runs)
    assert len(runs[0]["first_batch"]) == 8
    # the order comes from the seed alone
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(epoch_batches(16, 8, g1), epoch_batches(16, 8, g2)))


def test_outputs_written(four_methods):
    cfg, res = four_methods
    out = Path(cfg.out)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and set(rows[0]) == {"method", "seed", "epoch", "train_loss", "train_acc", "test_loss",
                                               "test_acc", "lr", "epoch_seconds", "images_per_s"}
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == set(cfg.methods)
    s = summary["methods"]["backmatch"]
    assert s["best_test_acc"]["std"] == 0.0 and s["final_test_acc"]["mean"] == res.rows[1]["test_acc"]
    secs = [float(r["epoch_seconds"]) for r in rows if r["method"] == "backmatch"]
    assert s["mean_epoch_seconds"] == pytest.approx(sum(secs) / len(secs), rel=1e-6)  # from metrics.csv
    assert load_config(out).methods == cfg.methods
    for m in cfg.methods:  # an epoch's whole wall time holds its training pass, and more
        walls = res.runs[f"{m}/0"]["epoch_wall_seconds"]
        secs = [r["epoch_seconds"] for r in res.rows if r["method"] == m]
        assert len(walls) == len(secs) == cfg.epochs and all(w > t for w, t in zip(walls, secs))
    with pytest.raises(CliError, match="already holds a run"):
        train(cfg)


def test_resume_is_bitwise_identical(tiny_npz, tmp_path):
    path, _ = tiny_npz
    kw = dict(methods=("backmatch", "lars"), batch_size=6, augment=True, nesterov=True, weight_decay=5e-4,
              lr_decay_every=1, lr_decay=0.5)
    straight = train(tiny_config(path, tmp_path / "a", epochs=2, **kw))
    train(tiny_config(path, tmp_path / "b", epochs=1, **kw))
    cfg = load_config(tmp_path / "b")
    cfg.epochs = 2
    resumed = train(cfg, resume=True)
    for m in kw["methods"]:
        a = torch.load(tmp_path / "a" / f"{m}-seed0" / "checkpoint.pt", weights_only=True)
        b = torch.load(tmp_path / "b" / f"{m}-seed0" / "checkpoint.pt", weights_only=True)
        assert a["epoch"] == b["epoch"] == 2
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (m, k)
        for pid, st in a["optimizer"]["state"].items():
            assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])
        assert torch.equal(a["shuffle_rng"], b["shuffle_rng"]) and torch.equal(a["augment_rng"], b["augment_rng"])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("epoch_seconds", "images_per_s")} for r in rows]  # noqa: E731
    assert strip(straight.rows) == strip(resumed.rows)
    assert [len(resumed.runs[f"{m}/0"]["epoch_wall_seconds"]) for m in kw["methods"]] == [1, 1]  # this call's
    assert [r["lr"] for r in resumed.rows if r["method"] == "lars"] == [2.0, 1.0]


def test_cli_options_and_resume_conflicts(tiny_npz, tmp_path):
    path, _ = tiny_npz
    args = _parser().parse_args(["train", "--data", str(path), "--lr", "sgd=0.5,backmatch=0.01", "--seeds", "1,2",
                                 "--methods", "sgd,backmatch", "--nesterov", "--out", str(tmp_path)])
    cfg, resume = config_from_args(args)
    assert not resume and cfg.lr_for("sgd") == 0.5 and cfg.lr_for("backmatch") == 0.01
    assert cfg.seeds == (1, 2) and cfg.nesterov and cfg.momentum == 0.9 and cfg.batch_size == 128
    assert TrainConfig(lr={"*": 0.3}).lr_for("lars") == 0.3
    assert TrainConfig().lr_for("lars") == 2.0 and TrainConfig().lr_for("backmatch") == 0.02
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    args = _parser().parse_args(["train", "--resume", str(tmp_path), "--batch-size", "64"])
    with pytest.raises(CliError, match="batch-size"):
        config_from_args(args)
    args = _parser().parse_args(["train", "--resume", str(tmp_path), "--epochs", "7"])
    cfg2, resume = config_from_args(args)
    assert resume and cfg2.epochs == 7 and cfg2.lr == cfg.lr and cfg2.out == str(tmp_path)


def test_cli_subprocess_writes_metrics(tiny_npz, tmp_path):
    path, _ = tiny_npz
    out = tmp_path / "cli"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(
        [sys.executable, "-m", "fxbackmatch", "train", "--data", str(path), "--subset", "16", "--batch-size", "8",
         "--eval-batch-size", "8", "--epochs", "1", "--methods", "sgd,backmatch", "--out", str(out), "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["sgd", "backmatch"]
    assert (out / "summary.json").is_file()


def test_lr_sweep_cells_equal_single_runs_and_resume(tiny_npz, tmp_path):
    """Each cell of a sweep is the run one would train alone (same init and batches):
    its accuracy equals a direct ``train``; a second call trains nothing; two processes
    give the same table."""
    from fxbackmatch.train.sweep import sweep

    path, _ = tiny_npz
    cfg = tiny_config(path, tmp_path / "sw", methods=("sgd", "backmatch"))
    rows = sweep(cfg, {"sgd": (0.01, 0.1), "backmatch": (0.02,)})
    assert [(r["method"], r["lr"]) for r in rows] == [("sgd", 0.01), ("sgd", 0.1), ("backmatch", 0.02)]
    alone = train(tiny_config(path, tmp_path / "alone", methods=("sgd",), lr={"sgd": 0.1}))
    acc = alone.summary["methods"]["sgd"]["final_test_acc"]["mean"]
    assert rows[1]["final_test_acc"] == acc
    with open(tmp_path / "sw" / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    for png in ("sensitivity.png", "curves.png", "layers.png"):
        assert (tmp_path / "sw" / png).is_file() or not _has_matplotlib()
    stamp = (tmp_path / "sw" / "sweep" / "sgd-lr0.1" / "summary.json").stat().st_mtime_ns
    assert sweep(cfg, {"sgd": (0.01, 0.1), "backmatch": (0.02,)}) == rows
    assert (tmp_path / "sw" / "sweep" / "sgd-lr0.1" / "summary.json").stat().st_mtime_ns == stamp
    par = sweep(tiny_config(path, tmp_path / "par", methods=("sgd",)), {"sgd": (0.01, 0.1)}, jobs=2)
    assert [r["final_test_acc"] for r in par] == [r["final_test_acc"] for r in rows[:2]]


def test_cli_lr_grid(tiny_npz, tmp_path):
    path, _ = tiny_npz
    rc = main(["train", "--data", str(path), "--subset", "16", "--batch-size", "8", "--epochs", "1",
               "--seeds", "0", "--eval-batch-size", "8", "--no-progress", "--out", str(tmp_path / "g"),
               "--lr-grid", "sgd=0.01,0.1"])
    assert rc == 0
    with open(tmp_path / "g" / "sweep.csv") as f:
        assert [r["lr"] for r in csv.DictReader(f)] == ["0.01", "0.1"]
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "--lr-grid", "sgd=fast"])


def test_measured_method_first_step_by_hand(tiny_npz, tmp_path):
    """``backmatch+measured``: every layer's ``m`` measured on the live batch (here every
    step); its first update equals a hand loop — forward, backward, ``plan.refresh`` on the
    same batch with the harness's probe seed (the step count, 0), ``p -= lr·scale·g`` — and
    differs from the derived rule's."""
    import torch.nn.functional as F

    from fxbackmatch import prepare

    path, _ = tiny_npz
    lr = 0.05
    cfg = tiny_config(path, tmp_path, methods=("backmatch+measured",), batch_size=16, measure_every=1,
                      lr={"backmatch+measured": lr})
    res = train(cfg)
    ck = torch.load(Path(cfg.out) / "backmatch+measured-seed0" / "checkpoint.pt", weights_only=True)["model"]
    data = load_data(str(path), subset=16)
    first = torch.tensor(res.runs["backmatch+measured/0"]["first_batch"])
    x, y = data.normalize(data.train_x[first]), data.train_y[first]
    model = initial_model(cfg, 0, 10).train()
    plan = prepare(model, torch.zeros(2, *x.shape[1:]), factors="measured", refresh=1,
                   conventions="paper")  # LeNet-BN, the paper's model: the harness uses its conventions
    derived = prepare(initial_model(cfg, 0, 10).train(), torch.zeros(2, *x.shape[1:]), conventions="paper").scales()
    F.cross_entropy(model(x), y).backward()
    plan.refresh(x, seed=0)
    scales = plan.scales()
    for n, p in model.named_parameters():
        want = p.detach() - lr * scales[n] * p.grad
        torch.testing.assert_close(ck[n], want, rtol=1e-5, atol=1e-7, msg=n)
    assert abs(scales["0.weight"] / derived["0.weight"] - 1) > 0.01  # measured ≠ derived
    with pytest.raises(CliError, match="only back-matching"):
        dataclasses.replace(cfg, methods=("sgd+measured",)).validate()


def test_a_diverging_cell_is_marked_not_fatal(tiny_npz, tmp_path):
    """A learning rate that makes the weights NaN (here inf) ends its cell with empty (non-finite)
    losses and ``diverged`` in sweep.csv; the sweep and its plots go on."""
    from fxbackmatch.train.sweep import sweep

    path, _ = tiny_npz
    cfg = tiny_config(path, tmp_path / "dv", methods=("backmatch",), epochs=2)
    rows = sweep(cfg, {"backmatch": (math.inf, 0.02)})
    assert [r["diverged"] for r in rows] == [True, False]
    with open(tmp_path / "dv" / "sweep" / "backmatch-lrinf" / "metrics.csv") as f:
        assert [r["train_loss"] for r in csv.DictReader(f)][-1] == ""


@pytest.mark.parametrize("every, saved", [(2, [2, 3]), (0, [3]), (1, [1, 2, 3])])
def test_checkpoint_every_writes_every_nth_epoch_and_the_last(tiny_npz, tmp_path, monkeypatch, every, saved):
    from fxbackmatch.train.run import Run

    path, _ = tiny_npz
    epochs_saved = []
    save = Run.save
    monkeypatch.setattr(Run, "save", lambda self: (epochs_saved.append(self.epoch), save(self))[1])
    cfg = tiny_config(path, tmp_path / "run", methods=("backmatch",), epochs=3, checkpoint_every=every)
    res = train(cfg)
    assert epochs_saved == saved
    ck = torch.load(tmp_path / "run" / "backmatch-seed0" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 3 and len(ck["metrics"]) == 3 and [r["epoch"] for r in res.rows] == [1, 2, 3]
    with pytest.raises(CliError, match="checkpoint-every"):
        tiny_config(path, tmp_path / "bad", checkpoint_every=-1).validate()


def test_resume_after_an_unsaved_epoch_retrains_it_bitwise(tiny_npz, tmp_path, monkeypatch):
    """With ``checkpoint_every=2`` a run stopped during epoch 4 resumes from epoch 2's
    checkpoint and retrains epoch 3: the same weights and rows as a run never stopped."""
    from fxbackmatch.train.run import Run

    path, _ = tiny_npz
    kw = dict(methods=("backmatch",), batch_size=6, augment=True, nesterov=True, weight_decay=5e-4, epochs=4,
              checkpoint_every=2)
    straight = train(tiny_config(path, tmp_path / "a", **kw))
    real = Run.train_epoch

    def stop_in_epoch_4(self, progress):
        if self.epoch == 3:
            raise KeyboardInterrupt
        return real(self, progress)

    monkeypatch.setattr(Run, "train_epoch", stop_in_epoch_4)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(path, tmp_path / "b", **kw))
    assert torch.load(tmp_path / "b" / "backmatch-seed0" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    monkeypatch.setattr(Run, "train_epoch", real)
    resumed = train(load_config(tmp_path / "b"), resume=True)
    assert len(resumed.runs["backmatch/0"]["epoch_wall_seconds"]) == 2  # epochs 3 and 4
    a = torch.load(tmp_path / "a" / "backmatch-seed0" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "backmatch-seed0" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("epoch_seconds", "images_per_s")} for r in rows]  # noqa: E731
    assert strip(straight.rows) == strip(resumed.rows)
    rows_of = lambda run: list(csv.DictReader((tmp_path / run / "layers.csv").read_text().splitlines()))  # noqa: E731
    assert sorted({int(r["epoch"]) for r in rows_of("b")}) == [1, 2, 3, 4]
    assert len(rows_of("b")) == len(rows_of("a"))  # the retrained epoch 3 once
