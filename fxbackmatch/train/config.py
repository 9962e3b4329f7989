"""The training configuration and its building blocks: :class:`TrainConfig` (validated,
saved as ``config.json``), method names (``backmatch@adamw``, ``+measured``), models,
learning-rate schedule, the shared mini-batch order and small file helpers."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CliError
from .data import DEFAULT_DATA, epoch_batches  # noqa: F401  (epoch_batches: harness name)

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
#: the models the paper trains (LeNet with BN, §3.3; VGG 11–19, §4): their runs use the
#: paper's conventions unless ``--conventions`` says otherwise; every other model the default
PAPER_MODELS = ("lenet-bn", "vgg11", "vgg13", "vgg16", "vgg19")
#: the named conventions a run may use (:data:`fxbackmatch.analysis.conventions.CONVENTIONS`)
CONVENTION_NAMES = ("default", "paper")


def model_key(name: str) -> str:
    """A model name without the accepted ``-bn-paper`` suffix (``vgg11-bn-paper`` -> ``vgg11``)."""
    return name[: -len("-bn-paper")] if name.endswith("-bn-paper") else name


def default_conventions(model: str) -> str:
    """``"paper"`` for a model the paper trains (:data:`PAPER_MODELS`), else ``"default"``."""
    return "paper" if model_key(model) in PAPER_MODELS else "default"


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
    #: the conventions the plans use, ``"default"`` or ``"paper"``; ``None``: the model's
    #: (:func:`default_conventions`), fixed by :meth:`validate` (so ``config.json`` names it)
    conventions: str | None = None
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
    #: write each run's checkpoint after every N-th epoch and after its last (0: the last only)
    checkpoint_every: int = 1

    #: options that may differ when a run is resumed
    RESUMABLE = ("epochs", "device", "compile", "plan_compile", "eval_batch_size", "progress", "out", "amp",
                 "channels_last", "checkpoint_every")

    @property
    def augmentation(self) -> str:
        """``augment`` as one of :data:`~fxbackmatch.train.pipeline.AUGMENTATIONS`."""
        if isinstance(self.augment, bool):
            return "rotate" if self.augment else "none"
        return str(self.augment)

    def on_cuda(self, flag: bool | None) -> bool:
        """A device-dependent switch: ``flag``, or whether the device is CUDA when ``None``."""
        return bool(flag) if flag is not None else torch.device(self.device).type == "cuda"

    @property
    def conventions_name(self) -> str:
        """The conventions of this run's plans: ``conventions``, else the model's default."""
        return self.conventions or default_conventions(self.model)

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
        if self.checkpoint_every < 0:
            raise CliError(f"--checkpoint-every must be ≥ 0 (0: after the last epoch only), got {self.checkpoint_every}")
        if self.lr_decay_every < 0:
            raise CliError("--lr-decay-every must be ≥ 0 (0: fixed learning rate)")
        if self.schedule not in ("step", "cosine"):
            raise CliError(f"--schedule must be step or cosine, got {self.schedule!r}")
        from .pipeline import AUGMENTATIONS

        if self.augmentation not in AUGMENTATIONS:
            raise CliError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        build_model(self.model, 10, self.width, check_only=True)
        if self.conventions is not None and self.conventions not in CONVENTION_NAMES:
            raise CliError(f"--conventions must be one of {', '.join(CONVENTION_NAMES)}, got {self.conventions!r}")
        self.conventions = self.conventions_name
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

    key = model_key(name)
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


def make_generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one purpose (0: shuffle, 1: augmentation) of one seed."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + 7919 * (stream + 1)) % (2**63))


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


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def run_dir(out: Path, method: str, seed: int) -> Path:
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
    d.setdefault("conventions", "paper")  # saved before the option: prepare's default was the paper's
    cfg = TrainConfig.from_dict(d)
    cfg.out = str(out_dir)
    return cfg


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


