"""A CIFAR input pipeline that lives on the training device.

The design follows airbench's ``CifarLoader`` (Keller Jordan): the whole data set is a
uint8 tensor on the device, every batch is cut from it there, the augmentation is a few
tensor ops on the batch, and normalization happens in the training step. Two changes
make it fit this harness:

* **the random numbers come from CPU generators** (the permutation, each image's crop
  offset and flip are drawn for the whole epoch at its start, then copied once to the
  device), so a seed gives the same batches, bit for bit, on the CPU and on any device;
  airbench draws them on the GPU, which ties a run to one device kind;
* **the JPEG pack is decoded once** and cached as a uint8 tensor file in an ignored folder
  (``$FXBACKMATCH_CACHE``, else ``~/.cache/fxbackmatch``), keyed by the pack's SHA-256.

We do not use airbench itself: it is not on the GPU machines here (no downloads there),
its loader reads its own ``.pt`` layout and fetches CIFAR-10 with torchvision when that
file is missing, converts the set to fp16 on ``cuda`` at load (no CPU path), and draws its
augmentation on the GPU.

Augmentations (``augment=``):

* ``"crop"``: random crop with ``pad``-pixel padding (filled with the training set's mean
  colour, which normalizes to 0 as the rotation path's zero fill does) and a horizontal flip
  with probability 1/2 — the standard CIFAR augmentation, as one gather on the device;
* ``"rotate"``: the paper's §4 augmentation (flip and a rotation in ±``max_rotation``
  degrees, :func:`~fxbackmatch.train.data.augment_batch`);
* ``"none"``.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Iterator, NamedTuple

import torch

from .data import DataError, ImageData, augment_batch, epoch_batches, load_data

__all__ = ["AUGMENTATIONS", "DeviceLoader", "Epoch", "cache_dir", "crop_flip", "load_cached"]

log = logging.getLogger(__name__)

AUGMENTATIONS = ("none", "crop", "rotate")
_CACHE_VERSION = 1


def cache_dir() -> Path:
    """Where decoded packs are kept: ``$FXBACKMATCH_CACHE``, else ``~/.cache/fxbackmatch``."""
    env = os.environ.get("FXBACKMATCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fxbackmatch"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:20]


def load_cached(spec: str | os.PathLike, subset: int | None = None, directory: Path | None = None) -> ImageData:
    """:func:`~fxbackmatch.train.data.load_data`, with a packed-JPEG archive decoded once.

    The decoded uint8 tensors are saved under ``directory`` (default :func:`cache_dir`) as
    ``<name>-<sha256 of the pack>-<subset>.pt`` and read back with ``weights_only=True``; a
    changed pack gets a new key. Other sources (torchvision's format) hold raw pixels
    already and are read directly.
    """
    p = Path(os.fspath(spec))
    if p.suffix != ".npz" or not p.is_file():
        return load_data(spec, subset)
    directory = cache_dir() if directory is None else Path(directory)
    key = f"{p.stem}-{_file_digest(p)}-{'all' if subset is None else subset}-v{_CACHE_VERSION}.pt"
    target = directory / key
    if target.is_file():
        try:
            d = torch.load(target, map_location="cpu", weights_only=True)
            return ImageData(d["train_x"], d["train_y"], d["test_x"], d["test_y"], list(d["classes"]),
                             f"npz {p.name} (decoded, cached)", d["mean"], d["std"])
        except Exception as e:  # a damaged cache entry is rebuilt, never trusted
            log.warning("decoded cache %s is unreadable (%s: %s); decoding the pack again", target,
                        type(e).__name__, e)
    data = load_data(spec, subset)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
        torch.save({"train_x": data.train_x, "train_y": data.train_y, "test_x": data.test_x,
                    "test_y": data.test_y, "classes": list(data.classes), "mean": data.mean, "std": data.std}, tmp)
        os.replace(tmp, target)
    except OSError as e:  # a read-only home still trains, just without the cache
        log.warning("cannot write the decoded cache %s (%s); continuing without it", target, e)
    return data


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int,
              fill: torch.Tensor) -> torch.Tensor:
    """Crop each image of ``x`` (B, C, H, W) at offset ``(dy, dx)`` ∈ [0, 2·pad]² of its
    ``pad``-padded version (padding filled with ``fill``, one value per channel) and mirror
    it where ``flip``; one gather. The result has ``x``'s dtype and the channels-last
    memory layout (B, H, W, C in memory)."""
    b, c, h, w = x.shape
    if pad:
        xp = fill.to(device=x.device, dtype=x.dtype).view(1, c, 1, 1).expand(b, c, h + 2 * pad, w + 2 * pad).clone()
        xp[:, :, pad:pad + h, pad:pad + w] = x
    else:
        xp = x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = dy.view(b, 1) + ar_h  # (B, H)
    cols = dx.view(b, 1) + torch.where(flip.view(b, 1), (w - 1) - ar_w, ar_w)  # (B, W)
    out = xp[torch.arange(b, device=x.device).view(b, 1, 1), :, rows.view(b, h, 1), cols.view(b, 1, w)]
    return out.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W), channels-last in memory


class Epoch(NamedTuple):
    """One epoch's draws: index batches, and per position the crop offsets (N, 2) and flips."""

    batches: list[torch.Tensor]
    draws: tuple[torch.Tensor, torch.Tensor] | None


class DeviceLoader:
    """Training batches of an :class:`ImageData` already on the training device.

    ``epoch(shuffle, aug)`` yields ``(x, y)``: ``x`` uint8 (B, C, H, W) (normalize it in
    the step with :meth:`ImageData.normalize`), ``y`` int64. The permutation comes from
    ``shuffle`` and every augmentation draw from ``aug`` — both CPU generators — so the
    batches do not depend on the device. A last batch of one image is dropped (BatchNorm
    cannot train on it).
    """

    def __init__(self, data: ImageData, batch_size: int, augment: str = "none", *, pad: int = 4,
                 max_rotation: float = 10.0, channels_last: bool = False) -> None:
        if augment not in AUGMENTATIONS:
            raise DataError(f"unknown augmentation {augment!r}; choose from {', '.join(AUGMENTATIONS)}")
        if batch_size < 1 or pad < 0:
            raise DataError("the batch size must be positive and the padding non-negative")
        self.data, self.batch_size, self.augment = data, int(batch_size), augment
        self.pad, self.max_rotation, self.channels_last = int(pad), float(max_rotation), channels_last
        # the training set's mean colour as uint8: normalizes to ~0, like the rotation's zero fill
        self.fill = (data.mean * 255.0).round().clamp(0, 255).to(torch.uint8)

    def __len__(self) -> int:
        n, b = self.data.train_x.shape[0], self.batch_size
        full, rest = divmod(n, b)
        return full + (1 if rest > 1 or (rest == 1 and full == 0) else 0)

    def plan(self, shuffle: torch.Generator, aug: torch.Generator) -> Epoch:
        """The epoch's index batches (what :func:`~fxbackmatch.train.data.epoch_batches`
        draws from ``shuffle``); a crop epoch also draws every image's offset and flip from
        ``aug`` here, at once, so that the epoch needs one copy to the device."""
        n = self.data.train_x.shape[0]
        batches = epoch_batches(n, self.batch_size, shuffle)
        draws = None
        if self.augment == "crop":
            draws = (torch.randint(0, 2 * self.pad + 1, (n, 2), generator=aug), torch.rand(n, generator=aug) < 0.5)
        return Epoch(batches, draws)

    def epoch(self, shuffle: torch.Generator, aug: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the epoch's ``(x_uint8, y)`` batches on the data's device."""
        yield from self.iterate(self.plan(shuffle, aug))

    def iterate(self, epoch: Epoch) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of an :meth:`plan`, cut (and cropped) on the data's device."""
        d = self.data
        dev = d.train_x.device
        idx_all = torch.cat(epoch.batches).to(dev, non_blocking=True)
        draws = None
        if epoch.draws is not None:  # by position in the epoch
            n = idx_all.numel()
            draws = tuple(t[:n].to(dev, non_blocking=True) for t in epoch.draws)
        start = 0
        for k in (int(b.numel()) for b in epoch.batches):
            idx = idx_all[start:start + k]
            x = d.train_x[idx]
            if draws is not None:
                off, flip = draws[0][start:start + k], draws[1][start:start + k]
                x = crop_flip(x, off[:, 0], off[:, 1], flip, self.pad, self.fill)
            x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            yield x, d.train_y[idx]
            start += k

    def augment_float(self, x: torch.Tensor, aug: torch.Generator) -> torch.Tensor:
        """The float-side augmentation of a normalized batch (``"rotate"``), else ``x``."""
        if self.augment == "rotate":
            return augment_batch(x, aug, self.max_rotation)
        return x
