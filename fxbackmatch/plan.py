"""The :class:`Plan`: what ``prepare`` computed once, applied every step."""
from __future__ import annotations

import copy
import hashlib
import logging
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

import dataclasses
import math
import warnings

from .analysis.walk import GAMMA_MODES, MOMENT_PREFIX, RELU_MODES, TAPS_MODES, Analysis, LayerRecord, analyze
from .errors import FxBackmatchError, ScaleRangeWarning
from .analysis.guards import SCALE_RANGE, out_of_range, unnormalized_layers
from .runtime.codegen import GeneratedFactors, generate
from .errors import PlanMismatchError, PlanNotReadyError
from .analysis.expr import Mono
from .analysis.methods import scale_of
from .runtime.reference import atom_values, eval_mono
from .analysis.registry import REGISTRY, RuleRegistry
from .runtime.chain import Runtime
from .capture.graph import capture
from .capture.tracing import unwrap_model

__all__ = ["Plan"]

log = logging.getLogger(__name__)

STATE_VERSION = 1

#: ``"derived"``: every layer's backward factor ``m`` from the rules (the paper's chain);
#: ``"measured"``: ``m`` measured on the live batch every ``refresh`` steps (``mean diag(JᵀJ)``
#: by autograd, :mod:`fxbackmatch.measure.factors`) — the rules still give ``s``, roles and the layers'
#: own normal-matrix factors
FACTORS = ("derived", "measured")
MEASURED_PREFIX = "fxbackmatch.measured:"
MEASURED_NOTE = "m measured"

NO_NORM_NOTE = "no norm above"
#: a layer whose s counts the real tokens of the last batch (``token_mask``)
TOKEN_NOTE = "s × real-token share"


class Plan:
    """Per-layer gradient scales of one model, under its current weights.

    Build it with :func:`fxbackmatch.prepare`. ``scales()`` evaluates them with the plain
    eager reference; ``rescale_grads_()`` runs the generated (compiled) function;
    ``attach(optimizer)`` does that inside every ``optimizer.step()``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        leaf_modules: Sequence = (),
        rule: str = "backmatch",
        adapt: str = "all",
        variance: str = "weights",
        strict: bool = True,
        compile: bool = True,
        trust_coefficient: float = 1e-3,
        registry: RuleRegistry | None = None,
        capture: str = "auto",
        gamma: str = "one",
        outputs: Any = None,
        cap: float | None = None,
        relu: str = "paper",
        unnormalized: str = "exact",
        factors: str = "derived",
        taps: str = "all",
        refresh: int = 10,
        probes: int = 4,
        token_mask: str | int | None = None,
        moments: str = "derived",
        span: str = "full",
    ) -> None:
        from .capture.graph import CAPTURES
        from .analysis.span import SPANS

        if capture not in CAPTURES:
            raise ValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
        self.capture_mode = capture
        self.capture: str | None = None
        if adapt not in ("all", "weights"):
            raise ValueError(f"adapt must be 'all' or 'weights', got {adapt!r}")
        from .analysis.methods import METHODS

        if rule not in METHODS:
            raise ValueError(f"unknown rule {rule!r}; choose one of {sorted(METHODS)}")
        self.wrapped = model
        self.model = unwrap_model(model)
        self.leaf_modules = tuple(leaf_modules)
        self.rule = rule
        self.adapt = adapt
        self.variance = variance
        from .analysis.walk import UNNORMALIZED_MODES

        for key, value, allowed in (("gamma", gamma, GAMMA_MODES), ("relu", relu, RELU_MODES),
                                    ("unnormalized", unnormalized, UNNORMALIZED_MODES), ("factors", factors, FACTORS),
                                    ("taps", taps, TAPS_MODES), ("moments", moments, ("derived", "batch")),
                                    ("span", span, SPANS)):
            if value not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
        self.gamma, self.relu, self.unnormalized, self.taps = gamma, relu, unnormalized, taps
        if refresh < 1 or probes < 1:
            raise ValueError(f"refresh and probes must be ≥ 1, got {refresh} and {probes}")
        self.factors, self.refresh_every, self.probes = factors, int(refresh), int(probes)
        self.moments = moments
        self.span = span
        self._example_batch = 1
        self._measured: dict[str, torch.Tensor] = {}
        self._last_call: tuple | None = None
        self._steps = 0
        if token_mask is not None and not isinstance(token_mask, (str, int)):
            raise ValueError(f"token_mask must name a keyword input or give a positional index, got {token_mask!r}")
        self.token_mask = token_mask
        self._token_bt: tuple[int, int] | None = None  # (B, T) of the example mask
        self._example_mask: torch.Tensor | None = None
        self._mask_pos: int | None = None  # forward's positional index of a named mask
        self.outputs = outputs
        if cap is not None and not (math.isfinite(cap) and cap > 1):
            raise ValueError(f"cap must be a finite number > 1 (scales are kept in [1/cap, cap]), got {cap!r}")
        self.cap = cap
        self.strict = strict
        self.compile = compile
        self.trust_coefficient = trust_coefficient
        self.registry = registry or REGISTRY
        self.input_shapes: tuple[tuple[int, ...], ...] | None = None
        self._analysis: Analysis | None = None
        self._hook = None
        self._attached: list = []
        self._last_updates: dict[str, torch.Tensor] = {}  # parameter -> ‖ΔW‖/‖W‖ of the last step
        self._applied: torch.Tensor | None = None  # the scales of the last rescale_grads_
        self._state_loads = 0  # load_state_dict calls: a fused step re-reads its weights after one

    # ------------------------------------------------------------------ building
    def _build(self, example_inputs: Sequence[torch.Tensor], example_kwargs: dict | None = None) -> None:
        _refuse_sharded(self.model)
        if self.token_mask is not None:  # before capture: a wrong name fails fast and clearly
            from .analysis.tokens import check_mask, find_mask, position_of

            if isinstance(self.token_mask, str):
                self._mask_pos = position_of(self.model, self.token_mask)
            mask = find_mask(self.token_mask, example_inputs, example_kwargs or {}, self._mask_pos)
            self._token_bt = check_mask(self.token_mask, mask)
            self._example_mask = mask.detach()
        gm, self.capture = capture(
            self.model, example_inputs, self.registry.has_module_rule, self.leaf_modules, self.capture_mode,
            example_kwargs=example_kwargs, has_rule=self.registry.has, lookup=self.registry.lookup,
        )
        self.example_kwargs = {k: v for k, v in (example_kwargs or {}).items() if not isinstance(v, torch.Tensor)}
        self._analysis = analyze(
            gm, self.model, self.registry, strict=self.strict, variance=self.variance,
            gamma=self.gamma, outputs=self.outputs, relu=self.relu, unnormalized=self.unnormalized,
            taps=self.taps, moments="measured" if self.factors == "measured" else self.moments,
        )
        bare = unnormalized_layers(gm, self.registry, [r.node for r in self._analysis.layers])
        self._analysis.layers = [
            dataclasses.replace(r, notes=r.notes + (NO_NORM_NOTE,)) if r.node in bare else r
            for r in self._analysis.layers
        ]
        if self.factors == "measured":  # the report says which layers' m is measured
            self._analysis.layers = [dataclasses.replace(r, notes=r.notes + (MEASURED_NOTE,))
                                     for r in self._analysis.layers]
        for n in gm.graph.nodes:  # keep shapes, drop the fake tensors
            n.meta.pop("val", None)
        if self.capture == "hooks":
            self._analysis.notes.insert(
                0, "captured with hooks (torch.fx could not trace): modules in execution order, "
                "functional ops between them unseen, chain assumed"
            )
        self.input_shapes = tuple(tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor))
        from .analysis.span import batch_of

        self._example_batch = batch_of(list(example_inputs), dict(example_kwargs or {})) or 1
        if self.token_mask is not None:
            from .analysis.tokens import is_token_shape

            self._analysis.layers = [
                dataclasses.replace(r, notes=r.notes + (TOKEN_NOTE,)) if is_token_shape(r.output_shape, self._token_bt)
                else r for r in self._analysis.layers
            ]
        self._finish()
        if self._measures:
            self.refresh(*example_inputs, **(example_kwargs or {}))
        if self._measures or self.token_mask is not None or self.span == "batch":
            self.wrapped.register_forward_pre_hook(_CallRecorder(self), with_kwargs=True)
        self._warn_range()

    def _warn_range(self) -> None:
        """Warn (once per prepare) about scales outside the documented range at these weights."""
        try:
            flags = self.flags
        except FxBackmatchError:  # non-finite weights: reported when the scales are used
            return
        if flags:
            more = f" (and {len(flags) - 3} more)" if len(flags) > 3 else ""
            warnings.warn(
                f"fxbackmatch: {len(flags)} scale(s) of {type(self.model).__name__} lie outside "
                f"{list(SCALE_RANGE)} at the current weights: " + "; ".join(flags[:3]) + more
                + ".\n  What to do: check the report (plan.report()); pass cap= to prepare to "
                "bound the scales, or register a rule for the layer kind named.",
                ScaleRangeWarning, stacklevel=4,
            )

    @property
    def flags(self) -> list[str]:
        """Scales outside :data:`~fxbackmatch.analysis.guards.SCALE_RANGE` under the current weights,
        before any ``cap``, each with its layer and the approximations behind it."""
        a = self._need()
        vals = self._atom_values()
        raw = {n: eval_mono(e, vals) for n, e in self._scale_expr.items()}
        return out_of_range(raw, a.layers)

    def _finish(self) -> None:
        a = self._analysis
        params = dict(self.model.named_parameters())
        self._params = params
        opts = {"trust_coefficient": self.trust_coefficient}
        self._scale_expr: dict[str, Mono] = {}
        self._roles: dict[str, str] = {}
        if self._measures:
            self._measure_atoms(a)
        for name in params:
            uses = a.uses.get(name)
            if not uses:
                continue
            if self.factors == "measured":
                uses = [self._measured_use(a, u) for u in uses]
            self._roles[name] = uses[0].role
            if self.adapt == "weights" and uses[0].role != "weight":
                continue
            self._scale_expr[name] = scale_of(self.rule, a.atoms, name, uses, opts)
        self._targets = list(self._scale_expr)
        self._applied = None
        self._owners = {n: _owner(self.model, n) for n in self._targets}
        self._links = _module_links(self.model, self._targets)
        self._shapes = {n: tuple(params[n].shape) for n in self._targets}
        self._generated: GeneratedFactors = generate(
            a.atoms.atoms, [(n, self._scale_expr[n]) for n in self._targets],
            title=f"{type(self.model).__name__}, rule={self.rule}, {len(self._targets)} scaled parameters",
            cap=self.cap, chains=_chains(a),
        )
        buffers = dict(self.model.named_buffers())
        buffers.update(self._measured)
        self._runtime = Runtime(self._generated, params, buffers, self._targets, self.compile)
        if self._token_bt is not None:
            from .analysis.tokens import token_targets

            flags = token_targets(self._targets, a.uses, a.layers, self._token_bt)
            self._token_flags = torch.tensor(flags, dtype=torch.float64)
        if self.span == "batch":
            from .analysis.span import span_table

            self._span_fan, self._span_rows = span_table(self._targets, a.uses, a.layers, self._shapes)
        if self._token_bt is not None or self.span == "batch":
            self._runtime.multiplier = self._multiplier
        self.fingerprint = _fingerprint(a.gm, params)
        log.debug("fxbackmatch: prepared %s with %d layers", type(self.model).__name__, len(a.layers))

    def _arm(self) -> None:
        """Complete the plan from the model's first forward call (one-shot pre-hook)."""
        self._hook = _LazyBuild(self)
        self.wrapped.register_forward_pre_hook(self._hook, with_kwargs=True)

    # ------------------------------------------------------------------ measured factors
    @property
    def _measures(self) -> bool:
        """Whether this plan has atoms measured on the live batch (refreshed every K steps)."""
        return self.factors == "measured" or (self.moments == "batch" and bool(self._analysis and self._analysis.moment_nodes))

    def _measure_atoms(self, a: Analysis) -> None:
        layers = [MEASURED_PREFIX + rec.node for rec in a.layers] if self.factors == "measured" else []
        keys = layers + [MOMENT_PREFIX + n for n in a.moment_nodes]
        for key in keys:
            if key not in self._measured:
                self._measured[key] = torch.ones((), dtype=torch.float64)
            a.atoms.stat(key)

    def _measured_use(self, a: Analysis, use):
        """The use with its layer's derived ``m`` replaced by the measured one (the layer's
        own factors — a weight's ``E[a²]``, a layer scale's — kept)."""
        rec = next(r for r in a.layers if r.node == use.node)
        m = Mono.atom(a.atoms.stat(MEASURED_PREFIX + rec.node))
        return dataclasses.replace(use, m=m * (use.m / rec.m_expr))

    def refresh(self, *inputs: Any, probes: int | None = None, seed: int | None = None, **kwargs: Any) -> dict[str, float]:
        """Measure every layer's ``m`` on this batch (``factors="measured"``), and the input
        moments ``E[a²]`` its weights' scales divide by, and use them from now on; returns
        layer node -> measured ``m``. Attached, it runs by itself every ``refresh`` steps on
        the last batch the model saw. BatchNorm statistics and the RNG are left as they were;
        no ``.grad`` is touched."""
        from .measure.factors import measure_factors

        a = self._need()
        if not self._measures:
            raise FxBackmatchError("refresh() needs prepare(..., factors='measured') or moments='batch' "
                                   "(on a graph with pooling, means or attention)")
        if self.capture == "hooks":
            raise FxBackmatchError(
                "factors='measured' and moments='batch' need a graph that runs (torch.fx or "
                "torch.export); this plan was captured with hooks.\n  What to do: make the model "
                "traceable by torch.fx or torch.export (capture='fx' / 'export' say why it is not), "
                "or prepare without these options."
            )
        flat = self._fit_batch(self._flat_inputs(inputs, kwargs))
        devices = [p.device for p in self._params.values() if p.device.type == "cuda"][:1]
        with torch.random.fork_rng(devices=devices):
            layers = [r.node for r in a.layers] if self.factors == "measured" else []
            got = measure_factors(a.gm, self.model, flat, a.output_nodes, layers,
                                  a.moment_nodes, probes=probes or self.probes,
                                  seed=self._steps if seed is None else seed)
        with torch.no_grad():
            for prefix, values in ((MEASURED_PREFIX, got.m), (MOMENT_PREFIX, got.moments)):
                for node, value in values.items():
                    t = self._measured.get(prefix + node)
                    if t is not None and value and value > 0:  # a zero keeps the last value
                        t.fill_(value)
        return got.m

    def _step_hook(self) -> None:
        """Called by the attached hooks before each rescale: refresh every ``refresh`` steps."""
        if self._measures and self._last_call is not None and self._steps % self.refresh_every == 0:
            args, kwargs = self._last_call
            try:
                self.refresh(*args, **kwargs)
            except PlanMismatchError as e:  # e.g. an epoch's short last batch on an export graph
                warnings.warn(f"fxbackmatch: measured factors kept from the last refresh: {e}",
                              RuntimeWarning, stacklevel=3)
        self._steps += 1

    @property
    def ready(self) -> bool:
        return self._analysis is not None

    def _need(self) -> Analysis:
        if self._analysis is None:
            raise PlanNotReadyError(
                f"this plan for {type(self.model).__name__} was prepared without example inputs "
                f"and the model has not run yet.\n  What to do: run one forward pass first "
                f"(the plan completes itself from it), or call "
                f"fxbackmatch.prepare(model, example_inputs)."
            )
        return self._analysis

    # ------------------------------------------------------------------ public API
    @property
    def layers(self) -> tuple[LayerRecord, ...]:
        """Per-layer records in forward order, with ``m`` evaluated under current weights."""
        a = self._need()
        vals = self._atom_values()
        recs = [r.with_m(eval_mono(r.m_expr, vals)) for r in a.layers]
        order = {n.name: i for i, n in enumerate(a.gm.graph.nodes)}
        return tuple(sorted(recs, key=lambda r: order.get(r.node, 0)))

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

    def _atom_values(self) -> list[float]:
        a = self._need()
        model = self.model

        def tensor(ref: str) -> torch.Tensor:
            if ref in self._params:
                return self._params[ref]
            return self._measured[ref] if ref in self._measured else model.get_buffer(ref)

        def grad(ref: str):
            return self._params[ref].grad

        return atom_values(a.atoms.atoms, tensor, grad)

    def _multiplier(self) -> torch.Tensor | None:
        """The per-target multipliers of this step: the token share and the batch span."""
        mask = self._current_mask() if self._token_bt is not None else None
        out = None
        if isinstance(mask, torch.Tensor):
            from .analysis.tokens import token_multiplier

            out = token_multiplier(mask, self._token_flags)
        if self.span == "batch":
            from .analysis.span import batch_of, span_multiplier

            batch = batch_of(*self._last_call) if self._last_call is not None else None
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            # data-parallel ranks average their gradients: the normal matrix spans all their rows
            rows = self._span_rows
            if out is not None:  # token-wise layers share their weight over the real tokens only
                rows = rows.to(out.device) / out  # out = 1/f on those, 1 elsewhere
            mult = span_multiplier((batch or self._example_batch) * world, self._span_fan.to(rows.device), rows)
            out = mult if out is None else out * mult
        return out

    def _current_mask(self) -> torch.Tensor | None:
        from .analysis.tokens import find_mask

        mask = self._example_mask
        if self._last_call is not None:
            mask = find_mask(self.token_mask, *self._last_call, self._mask_pos)
        return mask if isinstance(mask, torch.Tensor) else None

    def scales(self) -> dict[str, float]:
        """Parameter name -> multiplier ``1/(m·s)`` under the current weights (eager, float64).

        Every trainable parameter is listed; those not scaled have 1.0.

        >>> plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32))  # doctest: +SKIP
        >>> plan.scales()["fc3.weight"]                                   # doctest: +SKIP
        1.0
        """
        self._check()
        vals = self._atom_values()
        out = {n: 1.0 for n, p in self._params.items() if p.requires_grad}
        mult = self._runtime.multiplier() if self._runtime.multiplier is not None else None
        mult = None if mult is None else dict(zip(self._targets, mult.tolist()))
        for n, expr in self._scale_expr.items():
            v = eval_mono(expr, vals) * (1.0 if mult is None else mult[n])
            out[n] = v if self.cap is None else min(max(v, 1.0 / self.cap), self.cap)
        return out

    def measure(self, *inputs: torch.Tensor, probes: int = 16, seed: int = 0, values: bool = False,
                **kwargs: Any) -> list[dict[str, Any]]:
        """The rule's ``m`` beside the measured one (``mean diag(JᵀJ)`` by autograd, see
        :mod:`fxbackmatch.measure.factors`) on a real batch, per layer (per value with
        ``values=True``). Touches no ``.grad``; restores BatchNorm statistics.

        >>> for row in plan.measure(x): print(row["layer"], row["rule_m"], row["measured_m"])  # doctest: +SKIP
        """
        from .measure.factors import measure_values

        a = self._need()
        inputs = self._fit_batch(self._flat_inputs(inputs, kwargs))
        if self.capture == "hooks":
            raise FxBackmatchError(
                f"plan.measure needs the traced graph; this plan of {type(self.model).__name__} "
                f"was captured with hooks.\n  What to do: make the model traceable (or register "
                f"rules for the untraceable parts as leaf modules) and prepare with capture='fx'."
            )
        if values:
            picked = [(n.name, n.name, n.meta["fxbackmatch.m"], _kind_of(n, a.gm)) for n in a.gm.graph.nodes if "fxbackmatch.m" in n.meta]
        else:
            picked = [(r.name, r.node, r.m_expr, r.kind) for r in self.layers]
        measured = measure_values(
            a.gm, self.model, inputs, a.output_nodes, [p[1] for p in picked], probes=probes, seed=seed
        )
        vals = self._atom_values()
        rows = []
        for name, node, expr, kind in picked:
            rule_m = eval_mono(expr, vals)
            got = measured.get(node)
            rows.append({
                "layer": name, "node": node, "kind": kind, "rule_m": rule_m, "measured_m": got,
                "ratio": (rule_m / got) if got else None,
            })
        return rows

    def _flat_inputs(self, args: Sequence[Any], kwargs: dict) -> list[Any]:
        """The graph's placeholders from a call's arguments (export graphs take the
        flattened ``(args, kwargs)``; the example's non-tensor keywords fill in)."""
        if self.capture != "export":
            return list(args)
        from torch.fx._pytree import tree_flatten_spec

        spec = self._analysis.gm.meta.get("fxbackmatch.in_spec")
        merged = {**getattr(self, "example_kwargs", {}), **kwargs}
        flat = tree_flatten_spec((tuple(args), merged), spec) if spec is not None else list(args)
        n = sum(1 for x in self._analysis.gm.graph.nodes if x.op == "placeholder")
        return list(flat)[:n]

    def _fit_batch(self, flat: list[Any]) -> list[Any]:
        """An export graph is specialized to the example's shapes: a larger batch is measured
        on its first ``B`` samples (the example's batch); a smaller one cannot run it."""
        if self.capture != "export":
            return flat
        from .capture.shapes import shape_of

        out = []
        places = [x for x in self._analysis.gm.graph.nodes if x.op == "placeholder"]
        for node, x in zip(places, flat):
            want = shape_of(node)
            if isinstance(x, torch.Tensor) and want is not None and tuple(x.shape) != tuple(want):
                if x.dim() != len(want) or not want or tuple(x.shape[1:]) != tuple(want[1:]) or x.shape[0] < want[0]:
                    raise PlanMismatchError(
                        f"input '{node.name}' has shape {tuple(x.shape)}; the torch.export graph of "
                        f"{type(self.model).__name__} was captured at {tuple(want)} and runs only "
                        f"there (or on the first {want[0]} samples of a larger batch).\n  What to "
                        f"do: prepare with example inputs of the smallest batch you train with."
                    )
                x = x[: want[0]]
            out.append(x)
        return out

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteWeightError` naming the first weight with a non-finite norm.

        ``rescale_grads_()`` never synchronizes with the host, so it does not check: scales
        that depend on a non-finite weight come out NaN/inf and make the step non-finite,
        which a GradScaler skips. ``scales()`` and the report check (they sync anyway).
        """
        self._need()
        self._atom_values()

    def scale_tensor(self) -> torch.Tensor:
        """The generated function's scales (float64, on the parameters' device), in the
        order of :attr:`targets`."""
        self._check()
        return self._runtime.scales()

    @property
    def targets(self) -> tuple[str, ...]:
        self._need()
        return tuple(self._targets)

    def rescale_grads_(self, only: set[int] | None = None) -> None:
        """Multiply every covered ``p.grad`` in place by its scale (``None`` grads skipped;
        with ``only``, just the parameters whose ``id`` is in it)."""
        self._check()
        self._applied = self._runtime.rescale_(only)

    def applied_scales(self) -> dict[str, float]:
        """Target name -> the scale the last :meth:`rescale_grads_` multiplied by (empty
        before the first). Unlike :meth:`scales`, right for rules that read the gradient
        (LARS, LSALR) after the gradients were rescaled."""
        if self._applied is None:
            return {}
        return dict(zip(self._targets, self._applied.tolist()))

    def attach(
        self, optimizer: torch.optim.Optimizer, weight_decay: float = 0.0, *,
        mode: str = "grad", target: str = "momentum",
    ):
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
        from .apply.optim import attach

        return attach(self, optimizer, weight_decay, mode=mode, target=target)

    def track_updates(self, optimizer: torch.optim.Optimizer):
        """Record each parameter's relative update ``‖ΔW‖/‖W‖`` at every ``optimizer.step()``
        (any optimizer, attached or not; one copy of the parameters is kept during the step);
        :meth:`last_updates` and the report show the last values. Returns a handle with
        ``remove()``.

        >>> tracker = plan.track_updates(opt)  # doctest: +SKIP
        >>> loss.backward(); opt.step(); plan.last_updates()["fc1.weight"]  # doctest: +SKIP
        0.0123
        """
        from .apply.tracking import UpdateTracker

        return UpdateTracker(self, optimizer)

    def last_updates(self) -> dict[str, float]:
        """Parameter name -> ``‖ΔW‖/‖W‖`` of the last tracked step (empty before any)."""
        return {n: float(v) for n, v in self._last_updates.items()}

    def compile_step(self, optimizer: torch.optim.Optimizer, weight_decay: float = 0.0):
        """A compiled callable that replaces ``optimizer.step()``: scales and update fused.

        Supports SGD (momentum, Nesterov) and Adam/AdamW; see :mod:`fxbackmatch.apply.fused`.

        >>> step = plan.compile_step(torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9))  # doctest: +SKIP
        >>> loss.backward(); step()                                                                # doctest: +SKIP
        """
        from .apply.fused import FusedStep

        per_step = [f"{k}={v!r}" for k, v, default in (
            ("token_mask", self.token_mask, None), ("span", self.span, "full"), ("moments", self.moments, "derived"),
            ("factors", self.factors, "derived")) if v != default]
        if per_step:
            raise FxBackmatchError(
                f"compile_step fuses the scales computed from the weights alone; this plan has "
                f"{', '.join(per_step)}, which reads each step's batch (its size, mask or measured "
                f"statistics).\n  What to do: use plan.attach(optimizer), which applies them every step."
            )
        return FusedStep(self, optimizer, weight_decay, compile=self.compile)

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

    # ------------------------------------------------------------------ safety
    def _check(self) -> None:
        self._need()
        try:
            self._check_identity()
        except PlanMismatchError:
            if not self._follow_sharded():
                raise

    def _follow_sharded(self) -> bool:
        """Follow parameters that ``fully_shard`` replaced by DTensors of the same global
        shape (a plan prepared before sharding); anything else stays an error."""
        from .runtime.chain import _is_dtensor

        params = dict(self.model.named_parameters())
        changed = False
        for n in self._targets:
            cur = params.get(n)
            if cur is None or tuple(cur.shape) != self._shapes[n]:
                return False
            if cur is not self._params.get(n):
                if not _is_dtensor(cur):
                    return False
                changed = True
        if not changed:
            return False
        self._finish()
        log.info("fxbackmatch: plan follows %s into its sharded parameters", type(self.model).__name__)
        return True

    def _check_identity(self) -> None:
        for parent, key, child in self._links:
            if parent._modules.get(key) is not child:
                raise PlanMismatchError(
                    f"submodule '{key}' of {type(parent).__name__} was replaced after prepare.\n"
                    f"  What to do: call fxbackmatch.prepare(model, ...) again for the changed model."
                )
        for n in self._targets:
            mod, attr, p = self._owners[n]
            cur = mod._parameters.get(attr)
            if cur is not p or tuple(cur.shape) != self._shapes[n]:
                raise PlanMismatchError(
                    f"parameter '{n}' was replaced or resized after prepare "
                    f"(was {self._shapes[n]}, now "
                    f"{None if cur is None else tuple(cur.shape)}).\n  What to do: call "
                    f"fxbackmatch.prepare(model, ...) again for the changed model."
                )

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """What is needed to resume: options and a fingerprint of graph and shapes (no code)."""
        self._need()
        return {
            "version": STATE_VERSION,
            "rule": self.rule,
            "adapt": self.adapt,
            "variance": self.variance,
            "gamma": self.gamma,
            "relu": self.relu,
            "unnormalized": self.unnormalized,
            "factors": self.factors,
            "moments": self.moments,
            "span": self.span,
            "taps": self.taps,
            "token_mask": self.token_mask,
            "trust_coefficient": self.trust_coefficient,
            "fingerprint": self.fingerprint,
            "input_shapes": [list(s) for s in (self.input_shapes or ())],
            "targets": list(self._targets),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check ``state`` belongs to this model and plan; raise :class:`PlanMismatchError` if not."""
        self._need()
        if state.get("version") != STATE_VERSION:
            raise PlanMismatchError(f"plan state version {state.get('version')} is not {STATE_VERSION}")
        if state.get("fingerprint") != self.fingerprint:
            raise PlanMismatchError(
                "this plan state was saved for a different model (its graph or parameter shapes "
                "differ).\n  What to do: load it into the model it was saved with, or start a "
                "new plan with fxbackmatch.prepare."
            )
        defaults = {"gamma": "one", "relu": "paper", "unnormalized": "exact", "factors": "derived", "taps": "all", "token_mask": None,
                    "moments": "derived", "span": "full"}  # older states
        for key in ("rule", "adapt", "variance", "trust_coefficient", "gamma", "relu", "unnormalized", "factors",
                    "taps", "token_mask", "moments", "span"):
            if state.get(key, defaults.get(key)) != getattr(self, key):
                raise PlanMismatchError(
                    f"plan state has {key}={state.get(key)!r} but this plan has "
                    f"{key}={getattr(self, key)!r}; prepare with the same options to resume."
                )
        self._state_loads += 1  # resumed: the weights were likely loaded too

    def __deepcopy__(self, memo):
        """A copy for a copy of the model: a waiting plan's pre-hook travels with the model's
        hooks (``copy.deepcopy(model)`` gives the copy a plan of its own that completes from
        the copy's first call); a ready plan regenerates its runtime for the copied tensors."""
        cls = self.__class__
        new = cls.__new__(cls)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k in ("_runtime", "_attached", "_generated", "_last_call"):
                continue
            setattr(new, k, copy.deepcopy(v, memo))
        new._attached = []
        new._last_call = None
        if new._analysis is not None:
            new._finish()
        return new

    def __reduce_ex__(self, protocol):
        raise TypeError(
            f"a fxbackmatch Plan does not pickle (it holds the graph, the rule registry and "
            f"compiled code).\n  What to do: save plan.state_dict() beside the model's and, after "
            f"loading, call fxbackmatch.prepare(model, ...) and plan.load_state_dict(state) — it "
            f"checks that the model and options match. torch.save(model) itself works: a waiting "
            f"plan's hook is saved as a no-op."
        )


class _LazyBuild:
    """The one-shot forward pre-hook of a plan prepared without example inputs: an object
    (not a closure), so ``copy.deepcopy(model)`` hands the copy's hook a copy of the plan,
    and ``torch.save(model)`` saves it as a no-op."""

    def __init__(self, plan: "Plan") -> None:
        self.plan = plan

    def __call__(self, module, args, kwargs):
        keys = [k for k, h in list(module._forward_pre_hooks.items()) if h is self]
        for store in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
            hooks = getattr(module, store, {})
            for key in keys:
                hooks.pop(key, None)
        self.plan._hook = None
        self.plan._build(args, kwargs)

    def __deepcopy__(self, memo):
        new = _LazyBuild.__new__(_LazyBuild)
        memo[id(self)] = new
        new.plan = copy.deepcopy(self.plan, memo)
        return new

    def __reduce__(self):  # pickling (torch.save(model)): a no-op hook
        return (_inert_hook_factory, ())


class _CallRecorder:
    """Forward pre-hook of a measured plan: keeps a reference to the last call's inputs (the
    batch the next refresh measures on). Copies with its plan; saved as a no-op."""

    def __init__(self, plan: "Plan") -> None:
        self.plan = plan

    def __call__(self, module, args, kwargs):
        from .capture.graph import capturing

        if not capturing():  # a prepare tracing this model runs it on proxies / fake tensors
            self.plan._last_call = (args, kwargs)

    def __deepcopy__(self, memo):
        new = _CallRecorder.__new__(_CallRecorder)
        memo[id(self)] = new
        new.plan = copy.deepcopy(self.plan, memo)
        return new

    def __reduce__(self):
        return (_inert_hook_factory, ())


def _inert_hook(module, args, kwargs=None):
    return None


def _inert_hook_factory():
    return _inert_hook


def _kind_of(node, gm) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target))


def _chains(a: Analysis) -> dict[str, str]:
    """Each scaled parameter's chain in words, for the generated code's comments."""
    from .runtime.explain import describe_uses

    return describe_uses(a)


def _refuse_sharded(model: nn.Module) -> None:
    """FSDP2 modules run lazy initialization and collectives on any forward call, so tracing
    a sharded model would change it: prepare before ``fully_shard`` (the plan follows)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for name, m in model.named_modules():
        if isinstance(m, FSDPModule):
            from .errors import PlanMismatchError

            raise PlanMismatchError(
                f"module '{name or type(model).__name__}' is already sharded by fully_shard; "
                f"preparing it would run FSDP's forward hooks and change its state.\n  What to "
                f"do: call fxbackmatch.prepare(model, ...) before fully_shard — the plan follows "
                f"the parameters into their sharded form at the next rescale."
            )


def _owner(model: nn.Module, name: str):
    path, _, attr = name.rpartition(".")
    mod = model.get_submodule(path) if path else model
    return mod, attr, mod._parameters[attr]


def _module_links(model: nn.Module, names) -> list[tuple[nn.Module, str, nn.Module]]:
    """Every (parent, child name, child) link on the paths to the targets' owners."""
    links: dict[tuple[int, str], tuple[nn.Module, str, nn.Module]] = {}
    for name in names:
        mod = model
        for key in name.split(".")[:-1]:
            child = mod._modules[key]
            links[(id(mod), key)] = (mod, key, child)
            mod = child
    return list(links.values())


def _fingerprint(gm, params: dict[str, nn.Parameter]) -> str:
    h = hashlib.sha256()
    h.update(gm.code.encode())
    for n, p in params.items():
        h.update(f"{n}:{tuple(p.shape)}:{p.requires_grad};".encode())
    return h.hexdigest()[:16]
