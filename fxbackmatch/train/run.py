"""One (method, seed) run: :class:`Run` holds the model, optimizer, attached plan and
generators, trains an epoch, evaluates, and saves / loads its checkpoint."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from ..errors import CliError
from .data import ImageData
from .pipeline import DeviceLoader
from .config import CHECKPOINT_VERSION, TrainConfig, finite_or_none, lr_at, make_generator, method_factors, run_dir, split_method, state_digest

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- one epoch
def evaluate(model: nn.Module, data: ImageData, bs: int, autocast=contextlib.nullcontext,
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


class Run:
    """One (method, seed): model, optimizer, attached plan and generators."""

    def __init__(self, cfg: TrainConfig, method: str, seed: int, model: nn.Module, data: ImageData,
                 device: torch.device, out: Path) -> None:
        from ..api import prepare
        from ..errors import FxBackmatchError

        self.cfg, self.method, self.seed, self.data, self.device = cfg, method, seed, data, device
        self.dir = run_dir(out, method, seed)
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
                                factors=method_factors(method), refresh=cfg.measure_every,
                                conventions=cfg.conventions_name)
        except FxBackmatchError as e:
            raise CliError(f"fxbackmatch cannot prepare {cfg.model}: {str(e).splitlines()[0]}") from e
        log.info("%s seed %d on %s: conventions=%s", method, seed, cfg.model, cfg.conventions_name)
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
        # compiled for the full training batches only: the epoch's last, smaller batch and the
        # evaluation run eagerly, so a process compiles one graph per architecture, once (a new
        # instance of the model, the next run's, reuses it)
        self.net = torch.compile(self.model) if cfg.compile else self.model
        self.shuffle = make_generator(seed, 0)
        self.aug = make_generator(seed, 1)
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
                    out = (self.net if y.shape[0] == cfg.batch_size else self.model)(x)
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
        test_loss, test_acc = evaluate(self.model, data, cfg.eval_batch_size, self._autocast,
                                        torch.channels_last if self.channels_last else torch.contiguous_format)
        train_loss = float(loss_sum) / max(seen, 1)
        if not math.isfinite(train_loss):
            log.warning("%s seed %d epoch %d: the training loss is not finite", self.method, self.seed, self.epoch + 1)
        row = {
            "method": self.method, "seed": self.seed, "epoch": self.epoch + 1,
            "train_loss": finite_or_none(train_loss), "train_acc": float(correct) / max(seen, 1),
            "test_loss": finite_or_none(test_loss), "test_acc": test_acc, "lr": lr,
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
                "rel_update": finite_or_none(float((p.detach().double() - start[n].double()).norm()) / w0) if w0 > 0 else None,
                "lr_scale": finite_or_none(lr * scales.get(n, 1.0)),
                "m": finite_or_none(rec.m) if rec and rec.m is not None else None,
                "s": rec.s if rec else None,
            })
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / "layers.jsonl").open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


