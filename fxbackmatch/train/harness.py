"""The training harness of the paper's experiments (§3.3, §4): every method starts from the
same initial weights and sees the same mini-batches (and the same augmentation draws).

For each seed the model is built once (``torch.manual_seed(seed)`` then the constructor)
and deep-copied for every method; the shuffle order and the augmentation come from CPU
generators seeded from the seed alone, so they are identical across methods. Every method
— ``sgd`` included — runs through ``fxbackmatch.prepare(model, rule=method)`` and
``plan.attach(optimizer, weight_decay)``: weight decay is added to the gradient first,
then the layer-wise scale multiplies it, then the momentum SGD step runs.

Output directory layout::

    OUT/config.json                      the TrainConfig (read back by --resume)
    OUT/<method>-seed<seed>/checkpoint.pt  after every epoch: model, optimizer, plan state,
                                           generator/RNG states, metrics so far
    OUT/metrics.csv, OUT/metrics.jsonl   one row per (method, seed, epoch)
    OUT/summary.json                     best/final test accuracy mean±std over seeds
    OUT/curves.png                       train loss and test error (needs matplotlib)

``epoch_seconds`` is the wall time of the training pass of an epoch (evaluation
excluded); ``images_per_s`` is training images over that time.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from ..errors import CliError
from .data import DEFAULT_DATA, ImageData, subset_indices
from .pipeline import DeviceLoader, load_cached

__all__ = [
    "DEFAULT_LRS",
    "OPTIMIZERS",
    "split_method",
    "method_factors",
    "METRIC_FIELDS",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "initial_model",
    "epoch_batches",
    "lr_at",
    "state_digest",
    "load_config",
    "train",
]

log = logging.getLogger(__name__)

#: Global learning rates of the paper: SGD 0.1 and back-matching 0.02 (§3.3, LeNet);
#: LARS 2 on top of trust coefficient 0.001 and LSALR 0.1 (§4).
DEFAULT_LRS: dict[str, float] = {
    "sgd": 0.1, "backmatch": 0.02, "lars": 2.0, "lsalr": 0.1,
    "sgd@adamw": 1e-3, "backmatch@adamw": 0.02, "lamb": 1e-2, "lars@adamw": 2.0,
}

#: optimizers a method may name after "@" (``backmatch@adamw``); a rule of absolute step
#: length (``lamb``) defaults to AdamW, every other rule to SGD-momentum.
OPTIMIZERS = ("sgd", "adamw")


#: a method name's suffix for measured factors: ``backmatch+measured`` (``factors="measured"``)
MEASURED = "+measured"


def split_method(method: str) -> tuple[str, str]:
    """``"backmatch@adamw"`` -> ``("backmatch", "adamw")``; ``"lamb"`` -> ``("lamb", "adamw")``.

    With AdamW, the rule sets each layer's step length (``attach(mode="length")``);
    ``sgd@adamw`` is plain AdamW. A ``+measured`` suffix on the rule
    (``backmatch+measured``) is left out here; :func:`method_factors` reads it.
    """
    from ..analysis.methods import length_unit

    rule, _, opt = method.partition("@")
    rule = rule.removesuffix(MEASURED)
    if not opt:
        opt = "adamw" if length_unit(rule) == "absolute" else "sgd"
    return rule, opt

def method_factors(method: str) -> str:
    """``"measured"`` for ``backmatch+measured[@opt]`` (every layer's ``m`` measured on the
    live batch every ``measure_every`` steps), else ``"derived"``."""
    return "measured" if method.partition("@")[0].endswith(MEASURED) else "derived"


METRIC_FIELDS = ("method", "seed", "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr",
                 "epoch_seconds", "images_per_s")

CHECKPOINT_VERSION = 1
MODELS = ("lenet-bn", "vgg11", "vgg13", "vgg16", "vgg19", "resnet18-paper")


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as ``config.json`` in the output directory."""

    data: str = DEFAULT_DATA
    model: str = "lenet-bn"
    width: float = 1.0
    methods: tuple[str, ...] = ("sgd", "backmatch", "lars", "lsalr")
    lr: dict[str, float] = field(default_factory=dict)
    epochs: int = 30
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 128
    eval_batch_size: int = 1000
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    #: "none", "crop" (4-pixel padded random crop and flip, drawn on the device) or "rotate"
    #: (the paper's §4: flip and a rotation in ±max_rotation degrees); True means "rotate"
    augment: bool | str = False
    max_rotation: float = 10.0
    #: "step" (× lr_decay every lr_decay_every epochs; 0: fixed) or "cosine" (to 0 over epochs)
    schedule: str = "step"
    lr_decay_every: int = 0
    lr_decay: float = 0.2
    trust_coefficient: float = 1e-3
    measure_every: int = 10
    subset: int | None = None
    device: str = "cpu"
    compile: bool = False
    plan_compile: bool | None = None
    #: bf16 autocast for the forward pass (None: on for cuda, off elsewhere)
    amp: bool | None = None
    #: channels-last images and weights (None: on for cuda, off elsewhere)
    channels_last: bool | None = None
    out: str | None = None
    progress: bool = True

    #: options that may differ when a run is resumed
    RESUMABLE = ("epochs", "device", "compile", "plan_compile", "eval_batch_size", "progress", "out", "amp",
                 "channels_last")

    @property
    def augmentation(self) -> str:
        """``augment`` as one of :data:`~fxbackmatch.train.pipeline.AUGMENTATIONS`."""
        if isinstance(self.augment, bool):
            return "rotate" if self.augment else "none"
        return str(self.augment)

    def on_cuda(self, flag: bool | None) -> bool:
        """A device-dependent switch: ``flag``, or whether the device is CUDA when ``None``."""
        return bool(flag) if flag is not None else torch.device(self.device).type == "cuda"

    def lr_for(self, method: str) -> float:
        """The global learning rate of ``method`` (``lr`` overrides, else the paper's)."""
        if method in self.lr:
            return float(self.lr[method])
        if "*" in self.lr:
            return float(self.lr["*"])
        if method in DEFAULT_LRS:
            return DEFAULT_LRS[method]
        base = method.replace(MEASURED, "")
        if base != method and base in DEFAULT_LRS:
            return DEFAULT_LRS[base]
        raise CliError(f"no default learning rate for method {method!r}; pass --lr {method}=RATE")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["methods"] = list(self.methods)
        d["seeds"] = list(self.seeds)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("methods", "seeds"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def validate(self) -> None:
        """Raise :class:`CliError` on a bad option."""
        from ..analysis.methods import METHODS

        if not self.methods:
            raise CliError("--methods is empty")
        bad = [m for m in self.methods if split_method(m)[0] not in METHODS or split_method(m)[1] not in OPTIMIZERS]
        if bad:
            raise CliError(
                f"unknown method {bad[0]!r}; choose from {', '.join(sorted(METHODS))}, each optionally "
                f"followed by @optimizer ({', '.join(OPTIMIZERS)}), e.g. backmatch@adamw"
            )
        odd = [m for m in self.methods if method_factors(m) == "measured" and split_method(m)[0] != "backmatch"]
        if odd:
            raise CliError(f"{odd[0]!r}: only back-matching has factors to measure; name it backmatch+measured")
        if self.measure_every < 1:
            raise CliError(f"--measure-every must be ≥ 1, got {self.measure_every}")
        wrong = [m for m in self.methods if split_method(m) == ("lamb", "sgd")]
        if wrong:
            raise CliError("lamb sets step lengths for AdamW; name it lamb (or lamb@adamw)")
        if len(set(self.methods)) != len(self.methods):
            raise CliError("--methods lists a method twice")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise CliError("--seeds must list distinct integers")
        for m in self.methods:
            self.lr_for(m)
        unknown = [k for k in self.lr if k != "*" and k not in self.methods]
        if unknown:
            log.warning("--lr names %s, which is not among --methods", ", ".join(unknown))
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise CliError("--epochs, --batch-size and --eval-batch-size must be positive")
        if self.width <= 0:
            raise CliError(f"--width must be positive, got {self.width}")
        if self.lr_decay_every < 0:
            raise CliError("--lr-decay-every must be ≥ 0 (0: fixed learning rate)")
        if self.schedule not in ("step", "cosine"):
            raise CliError(f"--schedule must be step or cosine, got {self.schedule!r}")
        from .pipeline import AUGMENTATIONS

        if self.augmentation not in AUGMENTATIONS:
            raise CliError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        build_model(self.model, 10, self.width, check_only=True)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise CliError(f"--device {self.device}: CUDA is not available on this machine")


@dataclass
class TrainResult:
    """What :func:`train` returns: the output directory, all metric rows, the summary and
    per-run facts (``init_digest``: SHA-256 of the initial state dict; ``first_batch``:
    the indices of the very first mini-batch; ``checkpoint``: its path)."""

    out: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    runs: dict[str, dict[str, Any]]


# ---------------------------------------------------------------------------- building blocks
def build_model(name: str, num_classes: int, width: float = 1.0, *, check_only: bool = False) -> nn.Module | None:
    """``lenet-bn``, ``vgg11``/``vgg13``/``vgg16``/``vgg19`` (the paper's VGG, ``width``
    scales channels; ``-bn-paper`` suffix accepted) or ``tv:NAME`` (any torchvision
    classification model, ``weights=None``)."""
    from ..models import lenet_bn, vgg_paper

    key = name[: -len("-bn-paper")] if name.endswith("-bn-paper") else name
    if key.startswith("tv:") or key.startswith("torchvision:"):
        import torchvision.models as tvm

        tv_name = key.split(":", 1)[1]
        if tv_name not in tvm.list_models():
            raise CliError(f"unknown torchvision model {tv_name!r} (see torchvision.models.list_models())")
        if width != 1.0:
            raise CliError("--width applies to the built-in models (lenet-bn, vgg*, resnet18-paper), not tv:NAME")
        if check_only:
            return None
        try:
            return tvm.get_model(tv_name, weights=None, num_classes=num_classes)
        except Exception as e:  # constructors raise many kinds for bad kwargs
            raise CliError(f"building torchvision model {tv_name!r} failed: {type(e).__name__}: {e}") from e
    if key == "lenet-bn":
        return None if check_only else lenet_bn(num_classes=num_classes, width=width)
    if key in ("vgg11", "vgg13", "vgg16", "vgg19"):
        return None if check_only else vgg_paper(key, num_classes=num_classes, width=width)
    if key in ("resnet18-paper", "resnet18"):
        from ..models import resnet18_paper

        return None if check_only else resnet18_paper(num_classes=num_classes, width=width)
    raise CliError(f"unknown model {name!r}; choose from {', '.join(MODELS)} or tv:NAME (a torchvision model)")


def initial_model(cfg: TrainConfig, seed: int, num_classes: int) -> nn.Module:
    """The initial weights of ``seed``: ``torch.manual_seed(seed)`` then the constructor."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes, cfg.width)
    assert model is not None
    return model


def _gen(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one purpose (0: shuffle, 1: augmentation) of one seed."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + 7919 * (stream + 1)) % (2**63))


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A seeded permutation of ``range(n)`` cut into batches; a last batch of one image is
    dropped (BatchNorm cannot train on it)."""
    perm = torch.randperm(n, generator=generator)
    batches = list(perm.split(batch_size))
    if len(batches) > 1 and batches[-1].numel() < 2:
        batches.pop()
    return batches


def lr_at(cfg: TrainConfig, method: str, epoch: int) -> float:
    """Learning rate of (0-based) ``epoch``: fixed, × ``lr_decay`` every ``lr_decay_every``,
    or (``schedule="cosine"``) ``lr·(1 + cos(π·epoch/epochs))/2``."""
    lr = cfg.lr_for(method)
    if cfg.schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    if cfg.lr_decay_every > 0:
        lr *= cfg.lr_decay ** (epoch // cfg.lr_decay_every)
    return lr


def state_digest(module: nn.Module) -> str:
    """SHA-256 (16 hex digits) of a module's state dict: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _run_dir(out: Path, method: str, seed: int) -> Path:
    return out / f"{method}-seed{seed}"


def load_config(out_dir: str | os.PathLike) -> TrainConfig:
    """The :class:`TrainConfig` saved in ``out_dir/config.json`` (for resuming)."""
    p = Path(out_dir) / "config.json"
    if not p.is_file():
        raise CliError(f"cannot resume: {str(p)!r} not found (is {str(out_dir)!r} a training output directory?)")
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CliError(f"cannot resume: {str(p)!r} is unreadable ({type(e).__name__}: {e})") from e
    cfg = TrainConfig.from_dict(d)
    cfg.out = str(out_dir)
    return cfg


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- one epoch
def _evaluate(model: nn.Module, data: ImageData, bs: int, autocast=contextlib.nullcontext,
              memory_format: torch.memory_format = torch.contiguous_format) -> tuple[float, float]:
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=data.test_x.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.test_x.device)
    with torch.no_grad():
        for i in range(0, data.test_x.shape[0], bs):
            x = data.normalize(data.test_x[i:i + bs].contiguous(memory_format=memory_format))
            y = data.test_y[i:i + bs]
            with autocast():
                out = model(x)
            loss += F.cross_entropy(out.float(), y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
    n = data.test_x.shape[0]
    return float(loss) / n, float(correct) / n


class _Run:
    """One (method, seed): model, optimizer, attached plan and generators."""

    def __init__(self, cfg: TrainConfig, method: str, seed: int, model: nn.Module, data: ImageData,
                 device: torch.device, out: Path) -> None:
        from ..api import prepare
        from ..errors import FxBackmatchError

        self.cfg, self.method, self.seed, self.data, self.device = cfg, method, seed, data, device
        self.dir = _run_dir(out, method, seed)
        self.channels_last = cfg.on_cuda(cfg.channels_last)
        self.amp = cfg.on_cuda(cfg.amp)
        self.model = model.to(device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.loader = DeviceLoader(data, cfg.batch_size, cfg.augmentation, max_rotation=cfg.max_rotation,
                                   channels_last=self.channels_last)
        plan_compile = cfg.plan_compile if cfg.plan_compile is not None else device.type == "cuda"
        example = torch.zeros((2, *data.image_shape), device=device)
        try:
            rule, optimizer = split_method(method)
            self.plan = prepare(self.model, example, rule=rule, compile=plan_compile,
                                trust_coefficient=cfg.trust_coefficient, strict=False,
                                factors=method_factors(method), refresh=cfg.measure_every)
        except FxBackmatchError as e:
            raise CliError(f"fxbackmatch cannot prepare {cfg.model}: {str(e).splitlines()[0]}") from e
        if self.plan.uncovered:
            log.warning("%s: %d parameter(s) not covered by any rule keep scale 1: %s", cfg.model,
                        len(self.plan.uncovered), ", ".join(self.plan.uncovered[:5]))
        if optimizer == "adamw":  # decoupled decay inside AdamW; the rule sets the step length
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr_for(method), betas=(cfg.momentum, 0.999),
                                         weight_decay=cfg.weight_decay)
            self.handle = None if rule == "sgd" else self.plan.attach(self.opt, mode="length")
        else:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr_for(method), momentum=cfg.momentum,
                                       nesterov=cfg.nesterov, weight_decay=0.0)
            self.handle = self.plan.attach(self.opt, weight_decay=cfg.weight_decay)
        self.net = torch.compile(self.model) if cfg.compile else self.model
        self.shuffle = _gen(seed, 0)
        self.aug = _gen(seed, 1)
        self.torch_rng = torch.Generator().manual_seed(seed).get_state()  # global RNG for dropout etc.
        self.cuda_rng: torch.Tensor | None = None
        self.epoch = 0
        self.rows: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {"init_digest": state_digest(self.model), "first_batch": None}

    # -------------------------------------------------------------- persistence
    def state(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "method": self.method,
            "seed": self.seed,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "plan": self.plan.state_dict(),
            "shuffle_rng": self.shuffle.get_state(),
            "augment_rng": self.aug.get_state(),
            "torch_rng": self.torch_rng,
            "cuda_rng": self.cuda_rng,
            "metrics": list(self.rows),
            "info": dict(self.info),
        }

    def save(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "checkpoint.pt"
        tmp = path.with_name("checkpoint.pt.tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, path)
        return path

    def load(self, path: Path) -> None:
        from ..errors import PlanMismatchError

        try:
            st = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:  # torch.load raises many kinds on a damaged file
            raise CliError(f"cannot resume: checkpoint {str(path)!r} is unreadable ({type(e).__name__}: {e})") from e
        if st.get("version") != CHECKPOINT_VERSION or st.get("method") != self.method or st.get("seed") != self.seed:
            raise CliError(f"cannot resume: {str(path)!r} is not a checkpoint of {self.method}, seed {self.seed}")
        try:
            self.plan.load_state_dict(st["plan"])
            self.model.load_state_dict(st["model"])
            self.opt.load_state_dict(st["optimizer"])
        except (PlanMismatchError, RuntimeError, ValueError, KeyError) as e:
            raise CliError(f"cannot resume from {str(path)!r}: {str(e).splitlines()[0]}") from e
        self.shuffle.set_state(st["shuffle_rng"].cpu())
        self.aug.set_state(st["augment_rng"].cpu())
        self.torch_rng = st["torch_rng"].cpu()
        self.cuda_rng = None if st.get("cuda_rng") is None else st["cuda_rng"].cpu()
        self.epoch = int(st["epoch"])
        self.rows = list(st["metrics"])
        self.info = dict(st.get("info") or {})

    # -------------------------------------------------------------- training
    def _autocast(self):
        """bf16 autocast on the run's device when ``amp`` is on; a no-op context otherwise."""
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _swap_rng(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Install this run's global RNG state; return the previous one."""
        prev = torch.get_rng_state()
        prev_cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        torch.set_rng_state(self.torch_rng)
        if self.device.type == "cuda":
            if self.cuda_rng is None:
                torch.cuda.manual_seed(self.seed)
            else:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
        return prev, prev_cuda

    def _restore_rng(self, prev: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        self.torch_rng = torch.get_rng_state()
        if self.device.type == "cuda":
            self.cuda_rng = torch.cuda.get_rng_state(self.device)
            if prev[1] is not None:
                torch.cuda.set_rng_state(prev[1], self.device)
        torch.set_rng_state(prev[0])

    def train_epoch(self, progress: Progress) -> dict[str, Any]:
        cfg, data, dev = self.cfg, self.data, self.device
        lr = lr_at(cfg, self.method, self.epoch)
        for g in self.opt.param_groups:
            g["lr"] = lr
        ep = self.loader.plan(self.shuffle, self.aug)
        batches = ep.batches
        if self.info.get("first_batch") is None:
            self.info["first_batch"] = batches[0].tolist()
        n_img = sum(int(b.numel()) for b in batches)
        task = progress.add_task(f"{self.method} s{self.seed} ep {self.epoch + 1}/{cfg.epochs}",
                                 total=len(batches), stats="")
        prev = self._swap_rng()
        self.model.train()
        start = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        seen = 0
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        refresh = max(1, len(batches) // 20)
        try:
            for step, (xb, y) in enumerate(self.loader.iterate(ep)):
                x = self.loader.augment_float(data.normalize(xb), self.aug)
                with self._autocast():
                    out = self.net(x)
                    loss = F.cross_entropy(out.float(), y)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                b = y.shape[0]
                seen += b
                loss_sum += loss.detach().double() * b
                correct += (out.detach().argmax(1) == y).sum()
                if (step + 1) % refresh == 0 or step + 1 == len(batches):
                    el = time.perf_counter() - t0
                    progress.update(task, completed=step + 1, stats=(
                        f"loss {float(loss_sum) / seen:.4f}  acc {float(correct) / seen:.4f}  "
                        f"{seen / max(el, 1e-9):,.0f} img/s"))
        finally:
            self._restore_rng(prev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        secs = time.perf_counter() - t0
        test_loss, test_acc = _evaluate(self.net, data, cfg.eval_batch_size, self._autocast,
                                        torch.channels_last if self.channels_last else torch.contiguous_format)
        train_loss = float(loss_sum) / max(seen, 1)
        if not math.isfinite(train_loss):
            log.warning("%s seed %d epoch %d: the training loss is not finite", self.method, self.seed, self.epoch + 1)
        row = {
            "method": self.method, "seed": self.seed, "epoch": self.epoch + 1,
            "train_loss": _finite(train_loss), "train_acc": float(correct) / max(seen, 1),
            "test_loss": _finite(test_loss), "test_acc": test_acc, "lr": lr,
            "epoch_seconds": secs, "images_per_s": n_img / max(secs, 1e-9),
        }
        progress.update(task, stats=(f"loss {train_loss:.4f}  acc {row['train_acc']:.4f}  "
                                     f"{row['images_per_s']:,.0f} img/s  │ test acc {test_acc:.4f}"))
        self.rows.append(row)
        self._log_layers(start, lr)
        self.epoch += 1
        return row

    @torch.no_grad()
    def _log_layers(self, start: dict[str, torch.Tensor], lr: float) -> None:
        """Per parameter, this epoch: the relative update ``‖ΔW‖/‖W‖`` (epoch start to end),
        the effective rate ``lr·scale`` and (rules with a chain) the layer's ``m`` and ``s`` —
        appended to ``<run>/layers.jsonl``."""
        # the scales of the epoch's last step (a gradient-reading rule recomputed now would
        # see the already rescaled gradients); the current ones where nothing was rescaled
        from ..errors import NonFiniteWeightError

        try:
            scales = {**self.plan.scales(), **self.plan.applied_scales()}
            layer_of = {p: rec for rec in self.plan.layers for p, _ in rec.params}
        except NonFiniteWeightError:  # a diverged run: log what moved, keep the sweep going
            scales, layer_of = {n: math.nan for n in start}, {}
        rows = []
        for n, p in self.model.named_parameters():
            if n not in start:
                continue
            w0 = float(start[n].double().norm())
            rec = layer_of.get(n)
            rows.append({
                "method": self.method, "seed": self.seed, "epoch": self.epoch + 1, "param": n,
                "layer": rec.name if rec else None,
                "rel_update": _finite(float((p.detach().double() - start[n].double()).norm()) / w0) if w0 > 0 else None,
                "lr_scale": _finite(lr * scales.get(n, 1.0)),
                "m": _finite(rec.m) if rec and rec.m is not None else None,
                "s": rec.s if rec else None,
            })
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / "layers.jsonl").open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


# ---------------------------------------------------------------------------- outputs
def _row_text(r: dict[str, Any]) -> str:
    def f(x: float | None, spec: str) -> str:
        return "nan" if x is None else format(x, spec)

    return (f"{r['method']} seed {r['seed']} epoch {r['epoch']}: train loss {f(r['train_loss'], '.4f')} "
            f"acc {r['train_acc']:.4f} │ test loss {f(r['test_loss'], '.4f')} acc {r['test_acc']:.4f} │ "
            f"lr {r['lr']:g} │ {r['epoch_seconds']:.1f} s, {r['images_per_s']:,.0f} img/s")


def _write_metrics(out: Path, rows: Sequence[dict[str, Any]]) -> None:
    buf_csv = out / "metrics.csv.tmp"
    with open(buf_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(METRIC_FIELDS))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in METRIC_FIELDS})
    os.replace(buf_csv, out / "metrics.csv")
    _atomic_write(out / "metrics.jsonl", "".join(json.dumps({k: r.get(k) for k in METRIC_FIELDS}) + "\n" for r in rows))


def _mean_std(xs: Sequence[float]) -> dict[str, Any]:
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
            "best_test_acc": _mean_std(best),
            "final_test_acc": _mean_std(final),
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


def _curves(out: Path, cfg: TrainConfig, rows: Sequence[dict[str, Any]]) -> Path | None:
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


def _collect_layers(out: Path, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Every run's per-layer diagnostics, in one ``layers.csv`` (the last value of each
    (method, seed, epoch, param): a resumed epoch overwrites its row)."""
    rows: dict[tuple, dict[str, Any]] = {}
    for m in cfg.methods:
        for seed in cfg.seeds:
            path = _run_dir(out, m, seed) / "layers.jsonl"
            if path.is_file():
                for line in path.read_text().splitlines():
                    r = json.loads(line)
                    rows[(r["method"], r["seed"], r["epoch"], r["param"])] = r
    flat = list(rows.values())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LAYER_FIELDS)
    w.writeheader()
    w.writerows(flat)
    _atomic_write(out / "layers.csv", buf.getvalue())
    return flat


def _layer_heatmap(out: Path, cfg: TrainConfig, rows: Sequence[dict[str, Any]]) -> Path | None:
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


def _summary_table(summary: dict[str, Any]) -> Table:
    t = Table(title="test accuracy over seeds (mean ± std)")
    for c in ("method", "lr", "seeds", "best", "final", "s/epoch"):
        t.add_column(c, justify="left" if c == "method" else "right")

    def ms(d: dict[str, Any]) -> str:
        return "—" if d["mean"] is None else f"{100 * d['mean']:.2f} ± {100 * d['std']:.2f}"

    for m, d in summary["methods"].items():
        t.add_row(m, f"{d['lr']:g}", str(len(d["seeds"])), ms(d["best_test_acc"]), ms(d["final_test_acc"]),
                  "—" if d["mean_epoch_seconds"] is None else f"{d['mean_epoch_seconds']:.2f}")
    return t


# ---------------------------------------------------------------------------- driver
def train(cfg: TrainConfig, *, resume: bool = False, console: Console | None = None,
          data: ImageData | None = None) -> TrainResult:
    """Train every (seed, method) of ``cfg`` and write the outputs under ``cfg.out``.

    ``resume=True`` continues the runs found in ``cfg.out`` from their checkpoints (a run
    that already has ``cfg.epochs`` epochs is kept as it is); the result is bitwise the
    one of an uninterrupted run on the same device. ``data`` skips loading ``cfg.data``.
    """
    cfg.validate()
    console = console or Console(stderr=True)
    out = Path(cfg.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    cfg.out = str(out)
    if resume:
        if not (out / "config.json").is_file():
            raise CliError(f"cannot resume: {str(out / 'config.json')!r} not found")
    elif any(out.glob("*/checkpoint.pt")):
        raise CliError(f"{str(out)!r} already holds a run; continue it with --resume {out} or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "config.json", json.dumps(cfg.to_dict(), indent=1) + "\n")

    device = torch.device(cfg.device)
    if data is None:
        data = load_cached(cfg.data, cfg.subset)
    elif cfg.subset is not None:
        tr = torch.from_numpy(subset_indices(data.train_y.cpu().numpy(), cfg.subset))
        te = torch.from_numpy(subset_indices(data.test_y.cpu().numpy(), cfg.subset))
        data = ImageData(data.train_x[tr], data.train_y[tr], data.test_x[te], data.test_y[te],
                         data.classes, data.source)
    console.log(data.describe())
    data = data.to(device)

    all_rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    runs: dict[str, dict[str, Any]] = {}

    def rows_flat() -> list[dict[str, Any]]:
        return [r for s in cfg.seeds for m in cfg.methods for r in all_rows.get((m, s), [])]

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("{task.fields[stats]}"),
        console=console, disable=not (cfg.progress and console.is_terminal),
    )
    log_epochs = progress.disable  # no live bars (no terminal, or --no-progress): one log line per epoch
    reported = False
    with progress:
        pcon = progress.console
        for seed in cfg.seeds:
            init = None
            for method in cfg.methods:
                ckpt = _run_dir(out, method, seed) / "checkpoint.pt"
                if init is None:
                    init = initial_model(cfg, seed, data.num_classes)
                run = _Run(cfg, method, seed, copy.deepcopy(init), data, device, out)
                if resume and ckpt.is_file():
                    run.load(ckpt)
                    if run.epoch < cfg.epochs:
                        pcon.log(f"resuming {method} seed {seed} after epoch {run.epoch}")
                all_rows[(method, seed)] = run.rows
                if method == "backmatch" and not reported:
                    pcon.rule(f"back-matching factors of {cfg.model} (seed {seed}, current weights)")
                    if pcon.is_terminal:
                        run.plan.report(console=pcon)
                    else:  # plain text, 100 columns, not squeezed into the console's width
                        pcon.print(str(run.plan), markup=False, highlight=False, soft_wrap=True)
                    reported = True
                while run.epoch < cfg.epochs:
                    row = run.train_epoch(progress)
                    if log_epochs:
                        pcon.log(_row_text(row), highlight=False)
                    all_rows[(method, seed)] = run.rows
                    run.save()
                    _write_metrics(out, rows_flat())
                runs[f"{method}/{seed}"] = {**run.info, "checkpoint": str(ckpt), "epochs": run.epoch}
                if run.handle is not None:
                    run.handle.remove()
                del run
    rows = rows_flat()
    _write_metrics(out, rows)
    summary = summarize(cfg, rows)
    summary["runs"] = runs
    _atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    png = _curves(out, cfg, rows)
    layer_rows = _collect_layers(out, cfg)
    _layer_heatmap(out, cfg, layer_rows)
    console.print(_summary_table(summary))
    console.log(f"outputs in {out}" + ("" if png is None else f" (curves: {png.name})"))
    return TrainResult(out, rows, summary, runs)
