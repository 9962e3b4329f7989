"""CIFAR data for the training harness: decoded once into a uint8 tensor kept in memory,
normalized (and optionally augmented) per batch on the training device.

Two sources:

* the project's ``cifar10-jpeg.npz`` (JPEG bytes packed in a NumPy archive, read with
  ``allow_pickle=False`` and decoded with :func:`torchvision.io.decode_jpeg`);
* torchvision's ``CIFAR10`` / ``CIFAR100`` python-pickle format under a local root
  (``torchvision-cifar10:ROOT``, ``torchvision-cifar100:ROOT``, or a ROOT directory that
  holds ``cifar-10-batches-py`` / ``cifar-100-python``). Nothing is downloaded.

About torchvision's format: with ``download=False`` torchvision's ``CIFAR10`` checks the
MD5 of every batch file against the official release and refuses anything else. When the
checksums match we use torchvision's own class. When the files are there but are not the
official release (a re-pack, or the small files the tests write), we read the same
format ourselves with a *restricted* unpickler that only resolves the few NumPy names an
array needs — so a non-official file cannot run code while it is read — and log that the
checksums did not match.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CliError

__all__ = [
    "epoch_batches",
    "DataError",
    "ImageData",
    "load_data",
    "load_npz",
    "load_torchvision",
    "augment_batch",
    "subset_indices",
    "DEFAULT_DATA",
]

log = logging.getLogger(__name__)

DEFAULT_DATA = "../shared/datasets/cifar10-jpeg.npz"

NPZ_KEYS = ("train_jpeg", "test_jpeg", "train_offsets", "test_offsets", "train_labels", "test_labels", "classes")

_TV_FORMATS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": ("batches.meta", "label_names"),
        "labels": "labels",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": ("meta", "fine_label_names"),
        "labels": "fine_labels",
    },
}


class DataError(CliError):
    """The data set is missing, unreadable or not in the expected format (one line)."""


@dataclass
class ImageData:
    """A train and a test split as uint8 images (N, 3, H, W) and int64 labels.

    ``mean``/``std`` are per-channel statistics of the training images on the [0, 1]
    scale; :meth:`normalize` applies them to a uint8 batch.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    source: str
    mean: torch.Tensor = field(default=None)  # type: ignore[assignment]
    std: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.mean is None or self.std is None:
            self.mean, self.std = channel_stats(self.train_x)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> "ImageData":
        """The same data on ``device`` (statistics included)."""
        d = torch.device(device)
        return ImageData(
            self.train_x.to(d), self.train_y.to(d), self.test_x.to(d), self.test_y.to(d),
            list(self.classes), self.source, self.mean.to(d), self.std.to(d),
        )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32, per-channel ``(x/255 - mean)/std``."""
        mean = self.mean.to(x.device).view(1, -1, 1, 1)
        std = self.std.to(x.device).view(1, -1, 1, 1)
        return (x.float().div_(255.0) - mean).div_(std)

    def describe(self) -> str:
        c, h, w = self.image_shape
        return (
            f"{self.source}: {len(self.train_y)} train / {len(self.test_y)} test images, "
            f"{c}×{h}×{w}, {self.num_classes} classes"
        )


def channel_stats(x: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (population) of uint8 images on the [0, 1] scale, float32."""
    if x.numel() == 0:
        raise DataError("the training split is empty")
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    sq = torch.zeros(c, dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        b = x[i:i + chunk].to(torch.float64).div_(255.0).transpose(0, 1).reshape(c, -1)
        s += b.sum(1).cpu()
        sq += b.pow(2).sum(1).cpu()
    n = x.numel() // c
    mean = s / n
    var = (sq / n - mean.pow(2)).clamp_min(0.0)
    std = var.sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def subset_indices(labels: np.ndarray, subset: int | None) -> np.ndarray:
    """Indices (ascending) of a class-balanced subset of ``subset`` images.

    The chosen images are the first ``subset`` of a fixed round-robin order over the
    classes (the first image of every class, then the second of every class, …, each in
    file order). The packed CIFAR-10 archive is sorted by class, so a plain "first N"
    would hold one class only. ``None`` keeps every image.
    """
    n = labels.shape[0]
    if subset is None or subset >= n:
        return np.arange(n)
    if subset <= 0:
        raise DataError(f"--subset must be positive, got {subset}")
    lab = labels.astype(np.int64)
    order = np.argsort(lab, kind="stable")
    sorted_lab = lab[order]
    starts = np.searchsorted(sorted_lab, sorted_lab, side="left")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - starts
    chosen = np.lexsort((np.arange(n), lab, rank))[:subset]
    return np.sort(chosen)


# ---------------------------------------------------------------------------- npz
def load_npz(path: str | os.PathLike, subset: int | None = None) -> ImageData:
    """Read the packed-JPEG CIFAR archive and decode it into uint8 tensors (only the
    class-balanced ``subset`` of each split when given, see :func:`subset_indices`)."""
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"data file {str(p)!r} not found (expected the packed-JPEG CIFAR-10 archive; "
            f"pass --data PATH or --data torchvision-cifar10:ROOT)"
        )
    if p.is_dir():
        raise DataError(f"data path {str(p)!r} is a directory, not an .npz file")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in NPZ_KEYS if k not in z.files]
            if missing:
                raise DataError(f"data file {str(p)!r} lacks array(s) {', '.join(missing)}: not a packed-JPEG CIFAR archive")
            arrays = {k: z[k] for k in NPZ_KEYS}
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise DataError(f"data file {str(p)!r} is corrupt or not an .npz archive ({type(e).__name__}: {e})") from e
    classes = [str(c) for c in arrays["classes"].tolist()]
    splits = []
    for split in ("train", "test"):
        splits.append(_decode_split(p, split, arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"],
                                    arrays[f"{split}_labels"], subset, len(classes)))
    (trx, try_), (tex, tey) = splits
    return ImageData(trx, try_, tex, tey, classes, f"npz {p.name}")


def _decode_split(p: Path, split: str, jpeg: np.ndarray, offsets: np.ndarray, labels: np.ndarray,
                  subset: int | None, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    name = f"{str(p)!r} ({split})"
    if jpeg.dtype != np.uint8 or jpeg.ndim != 1:
        raise DataError(f"data file {name}: {split}_jpeg must be a 1-D uint8 array")
    if offsets.ndim != 1 or offsets.shape[0] != labels.shape[0] + 1:
        raise DataError(f"data file {name}: {split}_offsets must have one more entry than {split}_labels")
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != jpeg.shape[0] or np.any(np.diff(offsets) <= 0):
        raise DataError(f"data file {name}: {split}_offsets do not partition {split}_jpeg")
    if labels.shape[0] == 0:
        raise DataError(f"data file {name} has no images")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise DataError(f"data file {name}: labels outside 0..{n_classes - 1}")
    idx = subset_indices(labels, subset)
    lab = labels[idx].astype(np.int64)
    flat = torch.from_numpy(jpeg)
    chunks = [flat[offsets[i]:offsets[i + 1]] for i in idx.tolist()]
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its image codecs (TorchCodec)
            warnings.filterwarnings("ignore", message=".*image decoding and encoding", category=DeprecationWarning)
            imgs = decode_jpeg(chunks, mode=ImageReadMode.RGB)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data file {name}: JPEG decoding failed: {first}") from e
    shapes = {tuple(t.shape) for t in imgs}
    if len(shapes) != 1:
        raise DataError(f"data file {name}: images of different sizes {sorted(shapes)[:3]}")
    return torch.stack(imgs), torch.from_numpy(lab)


# ---------------------------------------------------------------------------- torchvision format
class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only what a pickled dict of NumPy arrays, lists and strings needs."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR batch file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{str(path)!r} is corrupt or not a CIFAR python batch ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{str(path)!r} is not a CIFAR python batch (holds {type(obj).__name__}, not a dict)")
    # Python 2 pickles read with latin1 may keep bytes keys
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_tv_split(base: Path, fmt: dict, split: str) -> tuple[np.ndarray, list[int]]:
    datas, labels = [], []
    for fname in fmt[split]:
        entry = _read_pickle(base / fname)
        if "data" not in entry or fmt["labels"] not in entry:
            raise DataError(f"{str(base / fname)!r} lacks 'data' or '{fmt['labels']}': not a CIFAR python batch")
        d = np.asarray(entry["data"])
        if d.dtype != np.uint8 or d.ndim != 2 or d.shape[1] != 3 * 32 * 32:
            raise DataError(f"{str(base / fname)!r}: 'data' must be uint8 of shape (N, 3072), got {d.dtype} {d.shape}")
        lab = list(entry[fmt["labels"]])
        if len(lab) != d.shape[0]:
            raise DataError(f"{str(base / fname)!r}: {len(lab)} labels for {d.shape[0]} images")
        datas.append(d)
        labels.extend(int(v) for v in lab)
    return np.concatenate(datas).reshape(-1, 3, 32, 32), labels


def load_torchvision(root: str | os.PathLike, kind: str = "cifar10", subset: int | None = None) -> ImageData:
    """CIFAR-10/100 in torchvision's python format under ``root`` (never downloads).

    Official files (MD5s match) are read by torchvision's own ``CIFAR10``/``CIFAR100``;
    files in the same format that are not the official release are read with a restricted
    unpickler (see the module docstring).
    """
    if kind not in _TV_FORMATS:
        raise DataError(f"unknown torchvision data set {kind!r}; use cifar10 or cifar100")
    fmt = _TV_FORMATS[kind]
    root = Path(root)
    base = root / fmt["folder"]
    needed = [*fmt["train"], *fmt["test"], fmt["meta"][0]]
    missing = [f for f in needed if not (base / f).is_file()]
    if missing:
        raise DataError(
            f"torchvision {kind.upper()} data not found under {str(root)!r}: missing "
            f"{fmt['folder']}/{missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            + " (nothing is downloaded; unpack the official python archive there)"
        )
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
    try:
        tr = cls(str(root), train=True, download=False)
        te = cls(str(root), train=False, download=False)
    except RuntimeError as e:
        log.warning("%s under %s: %s; not the official release (MD5 mismatch), reading the same format "
                    "with a restricted unpickler", kind.upper(), root, str(e).split(".")[0])
        trx, try_ = _read_tv_split(base, fmt, "train")
        tex, tey = _read_tv_split(base, fmt, "test")
        meta = _read_pickle(base / fmt["meta"][0])
        if fmt["meta"][1] not in meta:
            raise DataError(f"{str(base / fmt['meta'][0])!r} lacks '{fmt['meta'][1]}'") from None
        classes = [str(c) for c in meta[fmt["meta"][1]]]
    else:
        trx, try_ = tr.data.transpose(0, 3, 1, 2), list(tr.targets)
        tex, tey = te.data.transpose(0, 3, 1, 2), list(te.targets)
        classes = list(tr.classes)
    out = []
    for x, y, split in ((trx, try_, "train"), (tex, tey, "test")):
        if len(y) == 0:
            raise DataError(f"torchvision {kind.upper()} under {str(root)!r} has an empty {split} split")
        ya = np.asarray(y, dtype=np.int64)
        if ya.min() < 0 or ya.max() >= len(classes):
            raise DataError(f"torchvision {kind.upper()} under {str(root)!r}: {split} labels outside 0..{len(classes) - 1}")
        idx = subset_indices(ya, subset)
        out.append((torch.from_numpy(np.ascontiguousarray(x[idx])), torch.from_numpy(ya[idx])))
    (a, b), (c, d) = out
    return ImageData(a, b, c, d, classes, f"torchvision {kind.upper()} {root}")


# ---------------------------------------------------------------------------- dispatch
def load_data(spec: str | os.PathLike, subset: int | None = None) -> ImageData:
    """Load the data named by ``spec``.

    * ``path/to/file.npz`` — the packed-JPEG archive;
    * ``torchvision-cifar10:ROOT`` / ``torchvision-cifar100:ROOT`` — torchvision's format;
    * a directory ``ROOT`` holding ``cifar-10-batches-py`` or ``cifar-100-python``.
    """
    s = os.fspath(spec)
    for prefix in ("torchvision-", "tv-"):
        if s.startswith(prefix) and ":" in s:
            kind, _, root = s[len(prefix):].partition(":")
            if not root:
                raise DataError(f"--data {s!r}: give the root directory after the colon")
            return load_torchvision(root, kind.lower(), subset)
    p = Path(s)
    if s == DEFAULT_DATA and not p.exists():  # the default is relative to the repository root
        alt = Path(__file__).resolve().parents[2] / DEFAULT_DATA
        if alt.exists():
            p = alt
    if p.is_dir():
        for kind, fmt in _TV_FORMATS.items():
            if (p / fmt["folder"]).is_dir():
                return load_torchvision(p, kind, subset)
        raise DataError(f"data directory {s!r} holds neither cifar-10-batches-py nor cifar-100-python")
    return load_npz(p, subset)


# ---------------------------------------------------------------------------- augmentation
def augment_batch(x: torch.Tensor, generator: torch.Generator, max_degrees: float = 10.0) -> torch.Tensor:
    """Random horizontal flip (p = 1/2) and a rotation uniform in ±``max_degrees`` per image
    (bilinear, zero fill, i.e. the mean colour after normalization). The random numbers
    come from ``generator`` (on the CPU), so runs that share its state see the same
    augmented batches."""
    b = x.shape[0]
    flip = torch.rand(b, generator=generator) < 0.5
    angles = (torch.rand(b, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(max_degrees)
    flip = flip.to(x.device)
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if max_degrees > 0:
        cos, sin = angles.cos(), angles.sin()
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        theta = theta.to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A seeded permutation of ``range(n)`` cut into batches; a last batch of one image is
    dropped (BatchNorm cannot train on it)."""
    perm = torch.randperm(n, generator=generator)
    batches = list(perm.split(batch_size))
    if len(batches) > 1 and batches[-1].numel() < 2:
        batches.pop()
    return batches
