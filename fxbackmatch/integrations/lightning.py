"""Lightning: a callback that prepares a plan for the LightningModule and attaches it.

>>> trainer = L.Trainer(callbacks=[BackmatchCallback(weight_decay=5e-4)])  # doctest: +SKIP

Order against clipping (lightning 2.6, ``plugins/precision/precision.py``):
``Precision.optimizer_step`` calls ``optimizer.step(closure=partial(_wrap_closure, ...))`` and
``_wrap_closure`` runs the training closure (forward, backward) and then ``_after_closure``:
``on_before_optimizer_step`` hooks, then ``configure_gradient_clipping`` (``gradient_clip_val``).
The plan's step pre-hook wraps that whole closure, so the rescale runs *after* it: clipping,
``on_before_optimizer_step`` and gradient-norm logging see the raw gradients, and the step uses
the clipped, then rescaled ones. With a ``GradScaler`` (``precision="16-mixed"``,
``plugins/precision/amp.py``) the closure runs first, then ``scaler.unscale_``, the same hooks
and clipping, then ``scaler.step(optimizer)``, whose ``optimizer.step()`` rescales: the same
order. Manual optimization (``self.optimizers().step()``) goes through the same
``optimizer_step`` with an empty closure; clip there by hand (``self.clip_gradients``) before
``step()`` — it too sees raw gradients.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
from torch import nn

from ..api import prepare
from ..errors import PlanNotReadyError
from ..plan import Plan
from ._common import attach_all

__all__ = ["BackmatchCallback"]


class BackmatchCallback(pl.Callback):
    """Prepare a back-matching plan at ``on_fit_start`` and attach it to the optimizers.

    ``example_input``: a tensor or tuple of tensors for the prepared module's ``forward``;
    default: the LightningModule's ``example_input_array``, else the module's first forward
    call completes the plan (it must be a call of *that* module: ``self(x)`` in
    ``training_step`` for the default ``module=None``). ``module``: the attribute name (dotted)
    of the submodule to prepare instead of the whole LightningModule (e.g. ``"net"`` when
    ``training_step`` calls ``self.net(x)``). ``weight_decay``: added to the gradient before
    the rescale (``mode="grad"``; keep the optimizer's own at 0). ``mode``: ``None`` picks
    ``"length"`` for adaptive optimizers (Adam, AdamW, RMSprop, ...) and ``"grad"`` for
    SGD-like ones, per optimizer; ``target`` goes to ``mode="length"``. Other keyword arguments
    go to :func:`fxbackmatch.prepare` (``rule=``, ``compile=``, ``outputs=``, ...).

    The plan is attached to every optimizer of ``trainer.optimizers`` that trains one of the
    module's parameters, in automatic and manual optimization alike, and detached at
    ``on_fit_end`` (or on an exception). ``plan`` and ``handles`` are kept on the callback.
    """

    def __init__(
        self,
        example_input: torch.Tensor | Sequence[torch.Tensor] | None = None,
        *,
        weight_decay: float = 0.0,
        mode: str | None = None,
        target: str = "momentum",
        module: str | None = None,
        **prepare_kwargs: Any,
    ) -> None:
        super().__init__()
        self.example_input = example_input
        self.weight_decay = float(weight_decay)
        self.mode = mode
        self.target = target
        self.module = module
        self.prepare_kwargs = prepare_kwargs
        self.plan: Plan | None = None
        self.handles: list = []

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._detach()
        net = self._target(pl_module)
        if self.plan is None or self.plan.model is not net:
            self.plan = prepare(net, self._example(pl_module, net), **self.prepare_kwargs)
        self.handles = attach_all(
            self.plan, trainer.optimizers, weight_decay=self.weight_decay, mode=self.mode, target=self.target,
        )

    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer,
    ) -> None:
        # runs inside the closure, before the rescale: a clearer error than the hook's
        if self.plan is not None and self.handles and not self.plan.ready:
            name = self.module or type(pl_module).__name__
            raise PlanNotReadyError(
                f"BackmatchCallback: {name} has not run a forward call, so its plan is not "
                f"complete at the first optimizer step.\n  What to do: pass "
                f"BackmatchCallback(example_input=...), set `example_input_array` on the "
                f"LightningModule, or name the submodule training_step calls with module='...'."
            )

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._detach()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._detach()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._detach()

    # ------------------------------------------------------------------ helpers
    def _detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _target(self, pl_module: "pl.LightningModule") -> nn.Module:
        if self.module is None:
            return pl_module
        try:
            net = pl_module.get_submodule(self.module)
        except AttributeError as e:
            raise AttributeError(
                f"BackmatchCallback(module={self.module!r}): {type(pl_module).__name__} has no "
                f"submodule of that name.\n  What to do: name an attribute path that "
                f"named_modules() lists, e.g. 'net' or 'backbone.encoder'."
            ) from e
        return net

    def _example(self, pl_module: "pl.LightningModule", net: nn.Module):
        x = self.example_input
        if isinstance(x, Mapping):
            raise TypeError(
                "BackmatchCallback(example_input=...) takes a tensor or a tuple of tensors for "
                "forward's leading positional arguments, not a dict.\n  What to do: pass "
                "example_input=(x,) or leave it out (the first forward call completes the plan)."
            )
        if x is None and self.module is None:
            x = getattr(pl_module, "example_input_array", None)
        if x is None or isinstance(x, Mapping):  # a dict of kwargs cannot be traced positionally
            return None  # the module's first forward call completes the plan
        xs = (x,) if isinstance(x, torch.Tensor) else tuple(x)
        device = next((p.device for p in net.parameters()), None)
        return tuple(t.to(device) if isinstance(t, torch.Tensor) and device is not None else t for t in xs)
