"""The :class:`Plan`: what ``prepare`` computed once, applied every step.

A plan is data — the captured graph, its analysis, the scale expressions, the generated
code and the runtime that evaluates it — plus documented methods that delegate to the
stage doing the work: :mod:`fxbackmatch.runtime.build` (building, checks, eager scales),
:mod:`fxbackmatch.measure.batch` (the live batch: measured factors, multipliers),
:mod:`fxbackmatch.apply` (optimizers, state) and :mod:`fxbackmatch.report`.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .analysis.conventions import Conventions
from .analysis.registry import REGISTRY, RuleRegistry
from .analysis.walk import Analysis, LayerRecord
from .apply import fused, optim, tracking
from .apply import state as saving
from .capture.hooks import inert_hook_factory
from .capture.tracing import unwrap_model
from .measure import batch
from .runtime import build

__all__ = ["Plan"]

#: models saved by 0.1 with a waiting plan's hook unpickle through this name
_inert_hook_factory = inert_hook_factory


class Plan:
    """Per-layer gradient scales of one model, under its current weights.

    Build it with :func:`fxbackmatch.prepare`. ``scales()`` evaluates them with the plain
    eager reference; ``rescale_grads_()`` runs the generated (compiled) function;
    ``attach(optimizer)`` does that inside every ``optimizer.step()``.
    """

    def __init__(
        self, model: nn.Module, *, leaf_modules: Sequence = (), rule: str = "backmatch", adapt: str = "all",
        strict: bool = False, compile: bool = True, trust_coefficient: float = 1e-3, registry: RuleRegistry | None = None,
        capture: str = "auto", outputs: Any = None, factors: str = "derived", refresh: int = 10, probes: int = 4,
        token_mask: str | int | None = None, conventions: Conventions | None = None,
    ) -> None:
        build.check_options(capture=capture, adapt=adapt, rule=rule, factors=factors, refresh=refresh, probes=probes,
                            token_mask=token_mask)
        self.conventions = c = conventions if conventions is not None else Conventions()  # what prepare resolved
        self.capture_mode, self.capture = capture, None  # capture: the one used, once built
        self.wrapped, self.model = model, unwrap_model(model)
        self.leaf_modules = tuple(leaf_modules)
        self.rule, self.adapt, self.variance = rule, adapt, c.variance
        self.gamma, self.relu, self.unnormalized, self.taps = c.gamma, c.relu, c.unnormalized, c.taps
        self.factors, self.refresh_every, self.probes = factors, int(refresh), int(probes)
        self.moments, self.span, self.token_mask, self.outputs, self.cap = c.moments, c.span, token_mask, outputs, c.cap
        self.strict, self.compile, self.trust_coefficient = strict, compile, trust_coefficient
        self.registry = registry or REGISTRY
        self.input_shapes: tuple[tuple[int, ...], ...] | None = None
        self._analysis: Analysis | None = None
        self._example_batch = 1
        self._measured: dict[str, torch.Tensor] = {}  # measured atoms (factors/moments), refreshed in place
        self._last_call: tuple | None = None  # (args, kwargs) of the model's last forward call
        self._steps = 0
        self._token_bt: tuple[int, int] | None = None  # (B, T) of the example mask
        self._example_mask: torch.Tensor | None = None
        self._mask_pos: int | None = None  # forward's positional index of a named mask
        self._hook = None
        self._attached: list = []
        self._last_updates: dict[str, torch.Tensor] = {}  # parameter -> ‖ΔW‖/‖W‖ of the last step
        self._applied: torch.Tensor | None = None  # the scales of the last rescale_grads_
        self._applied_grads: list | None = None  # the gradients it left (gradient-reading rules)
        self._round: tuple | None = None  # optimizers over parts: the round's gradients and scales
        self._state_loads = 0  # load_state_dict calls: a fused step re-reads its weights after one

    # ------------------------------------------------------------------ building (runtime.build)
    def _build(self, example_inputs: Sequence[torch.Tensor], example_kwargs: dict | None = None) -> None:
        build.build(self, example_inputs, example_kwargs)

    def _finish(self) -> None:
        build.finish(self)

    def _arm(self) -> None:
        """Complete the plan from the model's first forward call (one-shot pre-hook)."""
        build.arm(self)

    def _need(self) -> Analysis:
        return build.need(self)

    def _check(self) -> None:
        build.check(self)

    def _atom_values(self) -> list[float]:
        return build.atom_values(self)

    # ------------------------------------------------------------------ the live batch (measure.batch)
    def _multiplier(self) -> torch.Tensor | None:
        return batch.multiplier(self)

    def _step_hook(self) -> None:
        batch.step_hook(self)

    def refresh(self, *inputs: Any, probes: int | None = None, seed: int | None = None, **kwargs: Any) -> dict[str, float]:
        """Measure every layer's ``m`` on this batch (``factors="measured"``), and the input
        moments ``E[a²]`` its weights' scales divide by, and use them from now on; returns
        layer node -> measured ``m``. Attached, it runs by itself every ``refresh`` steps on
        the last batch the model saw. BatchNorm statistics and the RNG are left as they were;
        no ``.grad`` is touched."""
        return batch.refresh(self, inputs, kwargs, probes=probes, seed=seed)

    def measure(self, *inputs: torch.Tensor, probes: int = 16, seed: int = 0, values: bool = False,
                **kwargs: Any) -> list[dict[str, Any]]:
        """The rule's ``m`` beside the measured one (``mean diag(JᵀJ)`` by autograd, see
        :mod:`fxbackmatch.measure.factors`) on a real batch, per layer (per value with
        ``values=True``). Touches no ``.grad``; restores BatchNorm statistics.

        >>> for row in plan.measure(x): print(row["layer"], row["rule_m"], row["measured_m"])  # doctest: +SKIP
        """
        return batch.measure(self, inputs, kwargs, probes=probes, seed=seed, values=values)

    @property
    def ready(self) -> bool:
        return self._analysis is not None

    @property
    def flags(self) -> list[str]:
        """Scales outside :data:`~fxbackmatch.analysis.guards.SCALE_RANGE` under the current weights,
        before any ``cap``, each with its layer and the approximations behind it."""
        return build.flags(self)

    @property
    def layers(self) -> tuple[LayerRecord, ...]:
        """Per-layer records in forward order, with the ``m`` the scales use: the rule's under the
        current weights, or with ``factors="measured"`` the last measurement."""
        return build.layer_records(self)

    @property
    def uncovered(self) -> tuple[str, ...]:
        """Trainable parameters no rule covers (their scale is 1); reasons in ``uncovered_reasons``."""
        return tuple(self._need().uncovered)

    @property
    def uncovered_reasons(self) -> dict[str, str]:
        return dict(self._need().uncovered)

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(self._need().notes)

    @property
    def code(self) -> str:
        """The generated source of the per-step factor function."""
        self._need()
        return self._generated.code

    @property
    def graph_module(self):
        return self._need().gm

    @property
    def roles(self) -> dict[str, str]:
        """Role of every covered parameter: weight, bias, norm_scale or norm_shift."""
        self._need()
        return dict(self._roles)

    @property
    def targets(self) -> tuple[str, ...]:
        self._need()
        return tuple(self._targets)

    def scales(self) -> dict[str, float]:
        """Parameter name -> multiplier ``1/(m·s)`` under the current weights (eager, float64).

        Every trainable parameter is listed; those not scaled have 1.0. A rule that reads
        the gradients (LARS, LSALR) reads them as they are, except gradients the last
        :meth:`rescale_grads_` multiplied in place and nothing changed since: their scales are
        then the ones applied (:meth:`applied_scales`, the runtime's; read again, the rescaled
        gradients would give another rate).

        >>> plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32))  # doctest: +SKIP
        >>> plan.scales()["fc3.weight"]                                   # doctest: +SKIP
        1.0
        """
        return build.eager_scales(self)

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteWeightError` naming the first weight with a non-finite norm.

        ``rescale_grads_()`` never synchronizes with the host, so it does not check: scales
        that depend on a non-finite weight come out NaN/inf and make the step non-finite,
        which a GradScaler skips. ``scales()`` and the report check (they sync anyway).
        """
        self._atom_values()

    def scale_tensor(self) -> torch.Tensor:
        """The generated function's scales (float64, on the parameters' device), in the
        order of :attr:`targets`."""
        self._check()
        return self._runtime.scales()

    def rescale_grads_(self, only: set[int] | None = None) -> None:
        """Multiply every covered ``p.grad`` in place by its scale (``None`` grads skipped;
        with ``only``, just the parameters whose ``id`` is in it)."""
        build.rescale(self, only)

    def applied_scales(self) -> dict[str, float]:
        """Target name -> the scale the last :meth:`rescale_grads_` or fused step
        (:meth:`compile_step`) multiplied it by (empty before the first; with several
        optimizers, each target's from its own optimizer's last step). Unlike :meth:`scales`, right for rules that read the gradient
        (LARS, LSALR) after the gradients were rescaled."""
        return {} if self._applied is None else dict(zip(self._targets, self._applied.tolist()))

    # ------------------------------------------------------------------ optimizers (apply)
    def attach(self, optimizer: torch.optim.Optimizer, weight_decay: float = 0.0, *, mode: str = "grad",
               target: str = "momentum"):
        """Rescale inside every ``optimizer.step()``; returns a handle with ``remove()``.

        ``mode="grad"`` (SGD and its momentum variants): the pre-step hook first adds
        ``weight_decay·W`` to each gradient, then rescales (the paper's order, §3.2); use the
        optimizer's own ``weight_decay=0`` with it. An adaptive optimizer (Adam, AdamW,
        RMSprop, ...) cancels that rescale and gets an :class:`AdaptiveOptimizerWarning`.

        ``mode="length"`` (Adam & co): the optimizer keeps its direction and each layer's
        update gets the length the rule asks for, ``lr · scale · ‖ḡ‖`` with ``ḡ`` the
        optimizer's first moment over ``1 − β₁`` (``target="momentum"``) or the raw gradient
        (``target="grad"``); ``rule="lamb"`` with AdamW is LAMB. See :mod:`fxbackmatch.apply.length`.

        >>> handle = plan.attach(torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9))  # doctest: +SKIP
        >>> handle = plan.attach(torch.optim.AdamW(net.parameters(), lr=2e-3), mode="length")  # doctest: +SKIP
        """
        return optim.attach(self, optimizer, weight_decay, mode=mode, target=target)

    def track_updates(self, optimizer: torch.optim.Optimizer):
        """Record each parameter's relative update ``‖ΔW‖/‖W‖`` at every ``optimizer.step()``
        (any optimizer, attached or not; one copy of the parameters is kept during the step);
        :meth:`last_updates` and the report show the last values. Returns a handle with
        ``remove()``.

        >>> tracker = plan.track_updates(opt)  # doctest: +SKIP
        >>> loss.backward(); opt.step(); plan.last_updates()["fc1.weight"]  # doctest: +SKIP
        0.0123
        """
        return tracking.UpdateTracker(self, optimizer)

    def last_updates(self) -> dict[str, float]:
        """Parameter name -> ``‖ΔW‖/‖W‖`` of the last tracked step (empty before any)."""
        return {n: float(v) for n, v in self._last_updates.items()}

    def compile_step(self, optimizer: torch.optim.Optimizer, weight_decay: float = 0.0):
        """A compiled callable that replaces ``optimizer.step()``: scales and update fused.

        Supports SGD (momentum, Nesterov) and Adam/AdamW; see :mod:`fxbackmatch.apply.fused`.

        >>> step = plan.compile_step(torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9))  # doctest: +SKIP
        >>> loss.backward(); step()                                                                # doctest: +SKIP
        """
        return fused.compile_step(self, optimizer, weight_decay)

    def report(self, compare: Sequence[str] = (), *, width: int | None = None, console=None):
        """Print the per-layer factor table (rich); see :mod:`fxbackmatch.report.render`."""
        from .report.render import print_report

        return print_report(self, compare=compare, width=width, console=console)

    def to_dict(self, compare: Sequence[str] = ()) -> dict[str, Any]:
        """The report's figures as a JSON-serializable dict."""
        from .report.render import plan_to_dict

        return plan_to_dict(self, compare=compare)

    def __str__(self) -> str:
        if not self.ready:
            return f"<fxbackmatch.Plan for {type(self.model).__name__}: waiting for the first forward call>"
        from .report.render import render_text

        return render_text(self)

    def __repr__(self) -> str:
        state = f"{len(self._analysis.layers)} layers" if self.ready else "not ready"
        return f"<fxbackmatch.Plan {type(self.model).__name__} rule={self.rule} {state}>"

    # ------------------------------------------------------------------ persistence (apply.state)
    def state_dict(self) -> dict[str, Any]:
        """What is needed to resume: options and a fingerprint of graph and shapes (no code)."""
        return saving.state_dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check ``state`` belongs to this model and plan; raise :class:`PlanMismatchError` if not."""
        saving.load_state_dict(self, state)

    def __deepcopy__(self, memo):
        """A copy for a copy of the model: a waiting plan's pre-hook travels with the model's
        hooks (``copy.deepcopy(model)`` gives the copy a plan of its own that completes from
        the copy's first call); a ready plan regenerates its runtime for the copied tensors."""
        return saving.deepcopy_plan(self, memo)

    def __reduce_ex__(self, protocol):
        raise TypeError(saving.NO_PICKLE)
