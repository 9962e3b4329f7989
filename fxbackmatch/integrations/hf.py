"""Hugging Face ``transformers.Trainer``: a callback that prepares a plan and attaches it.

>>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[BackmatchTrainerCallback()])  # doctest: +SKIP

Order against clipping (transformers 5.24, ``Trainer._run_epoch`` in ``trainer.py``): on a
sync step the trainer calls ``self._clip_grad_norm(model)`` when ``args.max_grad_norm > 0``
(``accelerator.clip_grad_norm_``, which unscales fp16 gradients first), then
``on_pre_optimizer_step`` callbacks, then ``self.optimizer.step()``. The plan's step pre-hook
runs inside that ``step()``: clipping and the logged ``grad_norm`` see the raw gradients, and
the update uses the clipped, then rescaled ones. Under fp16 accelerate's
``AcceleratedOptimizer.step`` calls ``scaler.step(optimizer)``, whose ``optimizer.step()``
runs the hook on unscaled gradients; a step the scaler skips stays skipped.
"""
from __future__ import annotations

import inspect
import keyword
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from ..api import prepare
from ..plan import Plan
from ._common import attach_all

__all__ = ["BackmatchTrainerCallback", "KeywordInputs"]


class KeywordInputs(nn.Module):
    """A traceable view of a model the trainer calls with keyword arguments (``model(**batch)``):
    ``KeywordInputs.wrap(model, ("input_ids",))`` has ``forward(input_ids)`` →
    ``model(input_ids=input_ids)``. Every other argument (``labels``, ...) keeps its default,
    so the trace follows the inference path. Parameter names gain the prefix ``model.``; the
    parameters are the model's own."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        super().__init__()
        self.model = model
        self.names = tuple(names)

    @classmethod
    def wrap(cls, model: nn.Module, names: Sequence[str]) -> "KeywordInputs":
        bad = [n for n in names if not str(n).isidentifier() or keyword.iskeyword(n) or n == "self"]
        if bad or not names:
            raise ValueError(f"input_names must be forward's argument names, got {tuple(names)!r}")
        # torch.fx traces named parameters, not *args: write forward with the names themselves
        src = (f"def forward(self, {', '.join(names)}):\n"
               f"    return self.model({', '.join(f'{n}={n}' for n in names)})\n")
        ns: dict[str, Any] = {}
        exec(src, ns)  # noqa: S102 - names are checked identifiers
        sub = type(type(model).__name__, (cls,), {"forward": ns["forward"], "__module__": __name__})
        return sub(model, names)


class BackmatchTrainerCallback(TrainerCallback):
    """Prepare a back-matching plan for the Trainer's model and attach it to its optimizer.

    ``example_inputs``: a dict ``{argument name: tensor}`` (or one tensor for forward's first
    argument); default: the model's first forward call in training completes the plan, read
    from the arguments ``input_names`` (default: forward's first parameter, e.g.
    ``input_ids``). ``weight_decay``: added to the gradient before the rescale (``mode="grad"``;
    set ``TrainingArguments(weight_decay=0)``). ``mode``: ``None`` picks ``"length"`` for
    adaptive optimizers (AdamW, the Trainer's default) and ``"grad"`` for SGD-like ones;
    ``target`` goes to ``mode="length"``. Other keyword arguments go to
    :func:`fxbackmatch.prepare` (``outputs="logits"``, ``rule=``, ``compile=``, ...).

    Attaches at ``on_train_begin`` to the optimizer the Trainer passes (accelerate's
    ``AcceleratedOptimizer`` is unwrapped to the torch optimizer) and detaches at
    ``on_train_end``. The plan is prepared on :class:`KeywordInputs` around the model, so
    ``plan.scales()`` names start with ``model.``; :meth:`scales` gives the model's own names.
    """

    def __init__(
        self,
        example_inputs: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
        *,
        input_names: Sequence[str] | None = None,
        weight_decay: float = 0.0,
        mode: str | None = None,
        target: str = "momentum",
        **prepare_kwargs: Any,
    ) -> None:
        self.example_inputs = example_inputs
        self.input_names = None if input_names is None else tuple(input_names)
        self.weight_decay = float(weight_decay)
        self.mode = mode
        self.target = target
        self.prepare_kwargs = prepare_kwargs
        self.plan: Plan | None = None
        self.handles: list = []
        self._pending = None  # the forward pre-hook waiting for the first call

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model: nn.Module | None = None, optimizer=None, **kwargs):
        self._detach()
        if model is None or optimizer is None:
            raise RuntimeError(
                "BackmatchTrainerCallback: the Trainer passed no model or optimizer to "
                "on_train_begin (DeepSpeed and delayed optimizer creation are not supported).\n"
                "  What to do: build the optimizer yourself, Trainer(..., optimizers=(opt, None)), "
                "and call plan.attach(opt) instead of using the callback."
            )
        if self.plan is not None and self.plan.model.model is model:
            self._attach(optimizer)
        elif self.example_inputs is not None:
            self._prepare(model, self._named(model, self.example_inputs))
            self._attach(optimizer)
        else:
            self._wait_for_forward(model, optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        self._detach()

    # ------------------------------------------------------------------ public helpers
    def scales(self) -> dict[str, float]:
        """``plan.scales()`` under the model's own parameter names."""
        if self.plan is None:
            raise RuntimeError("BackmatchTrainerCallback: no plan yet — train() has not started.")
        return {n.removeprefix("model."): s for n, s in self.plan.scales().items()}

    # ------------------------------------------------------------------ internals
    def _names(self, model: nn.Module) -> tuple[str, ...]:
        if self.input_names is not None:
            return self.input_names
        params = list(inspect.signature(model.forward).parameters)
        if not params:
            raise TypeError(f"{type(model).__name__}.forward takes no arguments: nothing to trace.")
        return (params[0],)

    def _named(self, model: nn.Module, inputs) -> dict[str, torch.Tensor]:
        if isinstance(inputs, torch.Tensor):
            return {self._names(model)[0]: inputs}
        return dict(inputs)

    def _prepare(self, model: nn.Module, named: Mapping[str, Any]) -> None:
        names = self._names(model)
        missing = [n for n in names if not isinstance(named.get(n), torch.Tensor)]
        if missing:
            raise ValueError(
                f"BackmatchTrainerCallback: no tensor for {missing} among the model's inputs "
                f"{sorted(named)}.\n  What to do: pass input_names=[...] naming the forward "
                f"arguments that carry the data (e.g. ['input_ids'] or ['pixel_values'])."
            )
        device = next((p.device for p in model.parameters()), None)
        xs = tuple(named[n].detach().to(device) for n in names)
        self.plan = prepare(KeywordInputs.wrap(model, names), xs, **self.prepare_kwargs)

    def _attach(self, optimizer) -> None:
        self.handles = attach_all(
            self.plan, [optimizer], weight_decay=self.weight_decay, mode=self.mode, target=self.target,
        )

    def _wait_for_forward(self, model: nn.Module, optimizer) -> None:
        sig = inspect.signature(model.forward)

        def first_call(module, args, kwargs):
            self._pending.remove()  # before preparing: tracing calls the model again
            self._pending = None
            bound = sig.bind_partial(*args, **kwargs)
            self._prepare(model, bound.arguments)
            self._attach(optimizer)

        self._pending = model.register_forward_pre_hook(first_call, with_kwargs=True)

    def _detach(self) -> None:
        if self._pending is not None:
            self._pending.remove()
            self._pending = None
        for h in self.handles:
            h.remove()
        self.handles = []
