"""A fused training update: scales and the optimizer's update in one compiled call.

``plan.compile_step(optimizer)`` returns a callable that replaces ``optimizer.step()``:
one ``torch.compile(fullgraph=True)`` function computes the scales and applies the scaled
gradient inside the optimizer's own update (SGD with momentum/Nesterov, Adam, AdamW), so
there is no separate pass that writes the gradients.

The scales need each weight's ``sum(W²)``. The update writes every weight anyway, so it
also returns the sum of squares of what it wrote, and the next step's scales start from
those (the generated ``factors_from_sq``; passed back in as one vector, which dynamo guards
once, not as a Python float per weight): no weight is read for its norm in steady state.
A weight is read again (eagerly, before the compiled call) on the first call, after
``plan.load_state_dict``, when the plan's runtime changed, and when the weight was changed
outside the step: its ``_version`` (bumped by every in-place op on it, so by
``model.load_state_dict``, ``torch.no_grad()`` edits and ``optimizer.step()``) or its
``data_ptr`` (``p.data = ...``) differs from the one recorded after the step wrote it. An
in-place edit through ``p.data`` bumps no version: the next step uses the sum from before
the edit, and returns the right one (it sums what it writes), so such an edit is one step
late. Weights the optimizer does not update are read every step.

On the CPU, SGD over contiguous float32 parameters is one generated C++ kernel instead
(:mod:`~fxbackmatch.apply.cpu_update`, ``CPU_KERNEL``), with inductor's update for the rest.
On CUDA, SGD is the runtime's graphed scales and few-launch multiply, then torch's fused SGD
kernel (:mod:`~fxbackmatch.apply.cuda_update`, ``FOREACH_DEVICES``): there the compiled update
is bound by launches and guards, not bytes.

The update is compiled with :class:`~fxbackmatch.apply.schedule.ClusterUpdates`, an inductor
pre-fusion pass that keeps each parameter's nodes together, so each parameter is one loop:
weight, gradient and state read once, written once, the sum accumulated on the way. Adam's
bias corrections are computed for all parameters before the call (``adam_bias``) and passed
in, so the loops load them instead of evaluating ``pow`` per vector.

The optimizer's state (``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``) is the
optimizer's own, so ``optimizer.state_dict()`` and switching back to ``optimizer.step()``
keep working. Learning rates are passed as tensors: schedulers do not trigger recompiles.
Momentum (SGD) and betas (Adam) are compiled in until something changes them (OneCycleLR's
``cycle_momentum``), then passed as tensors from that step on: one more compile, no more.
A parameter group added later (``add_param_group``) or a changed compiled-in setting
(``nesterov``, ``eps``, ``weight_decay``) builds the update again at the next call.

Per step, the Python around the compiled call is the plan's identity check, the gradient and
state lookups and the staleness marks (read once a step: the step's own ``_version`` bumps
are learned and added), ~0.4 ms for ResNet-50's 161 parameters on a 2-core CPU, cold in cache
after the update streamed the weights (docs/benchmarks.md).
"""
from __future__ import annotations

from itertools import repeat
from operator import attrgetter, is_, itemgetter
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..runtime.build import applied_after, only_of
from ..runtime.codegen import multiplied
from ..runtime.norms import sumsq, sumsq_many
from ..runtime.transfer import tensor_on, to_device
from . import cpu_update
from .cuda_update import SGDForeachStep
from .updates import adam_bias, adam_update, sgd_update, weight_sq
from .schedule import compile_options

if TYPE_CHECKING:
    from ..plan import Plan
    from ..runtime.chain import Runtime

__all__ = ["CPU_KERNEL", "CUDA_OPTIONS", "FOREACH_DEVICES", "FusedStep", "KEEP_MAX_PARAMS", "compile_step"]

#: without the scheduler pass (``apply.schedule``; an inductor without the pre-fusion hook),
#: updates of at most this many parameters keep each weight's sum from its own write and larger
#: ones read the weights at the start of the step instead: from ~30 parameters on, inductor
#: then writes the momentum buffers in a second loop that re-reads gradient and buffer, which
#: costs more (ResNet-50: 1.5× a compiled SGD step) than reading the weights once (1.35×).
#: With the pass every update keeps its sums (ResNet-50: ~1.05×, docs/benchmarks.md).
KEEP_MAX_PARAMS = 16

#: the compiled SGD update on the CPU as one generated C++ kernel where it fits (:mod:`.cpu_update`;
#: docs/benchmarks.md: 1.00–1.05× a compiled SGD step, inductor's 1.13–1.15×); ``False``: inductor's
CPU_KERNEL = True

#: device types on which the fused SGD step is :class:`~.cuda_update.SGDForeachStep` (the
#: runtime's rescale, then torch's fused SGD kernel) instead of a compiled update: where the
#: compiled update is launch- and guard-bound (an H200: 1.66× a compiled SGD step, 11× torch's
#: fused SGD step; docs/benchmarks.md). Read when the update is built; empty: inductor's update
FOREACH_DEVICES: set[str] = {"cuda"}

#: inductor options added for a compiled update whose parameters live on CUDA (Adam, or SGD
#: where ``FOREACH_DEVICES`` leaves CUDA to it; read when the update is compiled: at the first
#: call, after the model moved, after a change that rebuilds it). Empty: measured on an H200,
#: the compiled update is launch-bound (one kernel per parameter, 1.66× a compiled SGD step;
#: docs/benchmarks.md); ``{"combo_kernels": True}`` is what ``bench_rescale.py --combo`` tries
CUDA_OPTIONS: dict[str, Any] = {}


#: the group entries a schedule may move, passed to the compiled update as float64 tensors
#: (the learning rate always; OneCycleLR's momentum and betas, a weight-decay schedule), and
#: those compiled into it (a change, like a new parameter group, builds the update again). The
#: entries after ``lr`` are compiled in as well until they first change: read from memory,
#: they let inductor fuse different parameters' updates side by side and split each from its
#: writes (34 loops for 34 parameters become 43, ``tests/test_schedule.py``)
_PASSED = {"sgd": ("lr", "momentum"), "adam": ("lr", "betas"), "adamw": ("lr", "betas", "weight_decay")}
_BAKED = {"sgd": ("nesterov", "dampening", "weight_decay", "maximize"),
          "adam": ("eps", "weight_decay", "amsgrad", "maximize"), "adamw": ("eps", "amsgrad", "maximize")}


class FusedStep:
    """Callable replacing ``optimizer.step()`` for SGD(momentum) and Adam/AdamW."""

    def __init__(self, plan: "Plan", optimizer: torch.optim.Optimizer, weight_decay: float = 0.0, compile: bool = True):
        self.plan, self.optimizer, self.weight_decay = plan, optimizer, float(weight_decay)
        kind = type(optimizer)
        flavours = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}
        if kind not in flavours:
            raise TypeError(f"compile_step supports torch.optim.SGD, Adam and AdamW, not {kind.__name__}; use attach()")
        self._flavour = flavours[kind]
        self._compile = compile
        self._take_params()
        if self.kind == "adam":
            import warnings

            from ..errors import AdaptiveOptimizerWarning

            warnings.warn(
                f"fxbackmatch: compile_step fuses a gradient rescale into {kind.__name__}, whose "
                f"normalization cancels it.\n  What to do: plan.attach(optimizer, mode='length') "
                f"gives each layer's update back-matching's length.",
                AdaptiveOptimizerWarning, stacklevel=3,
            )
        self._dev: torch.device | None = None  # the runtime's device, what the update is built for
        self._grad_dev: torch.device | None = None  # the first gradient's, to notice a move cheaply
        self._hyper_val: tuple = ()
        self._bias_in: tuple = ()
        self._passed = False  # momentum / betas / AdamW's decay passed as tensors, from their first change on
        self._baked: list | None = None  # those compiled into the update, per group
        self._bind(plan._runtime)

    @property
    def kind(self) -> str:
        """``"sgd"`` or ``"adam"`` (Adam and AdamW share the update)."""
        return "sgd" if self._flavour == "sgd" else "adam"

    def _take_params(self) -> None:
        """The optimizer's parameters, their groups and the groups' compiled-in settings."""
        groups = self.optimizer.param_groups
        for g in groups:
            if self.kind == "sgd" and (g["dampening"] or g["weight_decay"] or g["maximize"] or not g["momentum"]):
                raise ValueError(
                    "compile_step supports SGD with momentum > 0, dampening=0, maximize=False and "
                    "weight_decay=0 (pass weight_decay to compile_step); use attach() otherwise"
                )
            if self.kind == "adam" and (g["amsgrad"] or g["maximize"] or (
                    type(self.optimizer) is torch.optim.Adam and g["weight_decay"])):
                raise ValueError(
                    "compile_step supports Adam/AdamW without amsgrad/maximize (Adam: pass "
                    "weight_decay to compile_step); use attach() otherwise"
                )
        self.params = [p for g in groups for p in g["params"]]
        _one_device(self.params)
        self.group_of = [gi for gi, g in enumerate(groups) for _ in g["params"]]
        self._layout = self._layout_of(groups)
        self._hyper_key: tuple | None = None  # the values _hyper_val was made from
        self._group_idx: torch.Tensor | None = None  # each parameter's group, on the device

    def _layout_of(self, groups: list[dict]) -> list[tuple]:
        """What the compiled update takes from the groups once: which parameter lists, which
        settings (``_BAKED``); ``add_param_group``, a new list or a changed setting changes it."""
        baked = _BAKED[self._flavour]
        return [(id(g["params"]), len(g["params"]), *[g[k] for k in baked]) for g in groups]

    def _bind(self, rt: "Runtime") -> None:
        """Where the runtime's targets and weights sit among the optimizer's parameters."""
        self._rt = rt
        pos = {id(p): k for k, p in enumerate(rt.targets)}
        self.index = [pos.get(id(p), -1) for p in self.params]
        #: the ids of this optimizer's parameters where it steps only some targets, or None: all
        self._only = only_of(rt.targets, self.params)
        # weights the update writes keep their sums: compiled with the scheduler pass that puts
        # each parameter's update in one loop, or small enough to fuse without it (KEEP_MAX_PARAMS)
        self._options = compile_options() if self._compile else {}
        keep = bool(self._options) or len(self.params) <= KEEP_MAX_PARAMS
        written = {id(p) for p in self.params} if keep else set()
        #: weights the update writes (their sums are kept) and those read every step
        self._kept_at = [j for j, w in enumerate(rt.weights) if id(w) in written]
        self._read_at = [j for j, w in enumerate(rt.weights) if id(w) not in written]
        self._kept = [rt.weights[j] for j in self._kept_at]
        self._read = [rt.weights[j] for j in self._read_at]
        kept = {id(w): k for k, w in enumerate(self._kept)}
        self._slot = [kept.get(id(p), -1) for p in self.params]  # parameter -> its kept sum, or -1
        self._sq: list[torch.Tensor] | None = None  # float64 sum(W²) of each kept weight
        self._marks: list[tuple[int, int]] = []  # (_version, data_ptr) of each, after the step wrote it
        self._now: list[tuple[int, int]] = []  # the marks before this step
        self._bumps: list[int] | None = None  # what the compiled step adds to each kept weight's _version
        self._loads = self.plan._state_loads
        self._fn: Callable | None = None
        self._grad_dev = None  # a new runtime: its device is read again at the next call
        self._kernel_off = False  # the C++ update does not apply (a layout it cannot take)
        self.cpu_code: str | None = None  # the generated C++ update, when it is the one used

    def _state(self):
        st = self.optimizer.state
        if self.kind == "sgd":
            try:  # every step after the first
                bufs = list(map(_BUF, map(st.__getitem__, self.params)))
                if not any(map(is_, bufs, repeat(None))):
                    return (bufs,)
            except KeyError:
                pass
            bufs = []
            for p in self.params:
                s = st[p]
                if s.get("momentum_buffer") is None:
                    s["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(s["momentum_buffer"])
            return (bufs,)
        m1, m2, steps = [], [], []
        for p in self.params:
            s = st[p]
            if "step" not in s:
                s["step"] = torch.tensor(0.0, dtype=torch.float32)
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            m1.append(s["exp_avg"])
            m2.append(s["exp_avg_sq"])
            steps.append(s["step"])
        return (m1, m2, steps, *adam_bias(steps, *self._bias_in))

    def _second(self) -> list[tuple]:
        """Per group, the ``_PASSED`` entries after ``lr`` (betas unpacked): compiled in until
        they first change."""
        keys = _PASSED[self._flavour][1:]
        return [tuple(v for k in keys for v in (g[k] if k == "betas" else (g[k],))) for g in self.optimizer.param_groups]

    def _hyper(self, dev: torch.device) -> tuple:
        """The groups' ``_PASSED`` entries as float64 tensors, one list per entry (betas
        unpacked), made again only when one changed; for Adam also learning rate and betas per
        parameter, :func:`adam_bias`'s inputs (``_bias_in``). A change of an entry compiled
        into the update (``_baked``) drops the update, to be built with it passed."""
        second = self._second()
        vals = [(g["lr"], *sec) for g, sec in zip(self.optimizer.param_groups, second)]
        if any(isinstance(v, torch.Tensor) for row in vals for v in row) or (dev, vals) != self._hyper_key:
            self._hyper_key = (dev, vals)
            if self._baked is not None and second != self._baked:  # a schedule moved momentum, betas, decay
                self._passed, self._fn = True, None  # passed from now on: built again
            cols = [[to_device(v.detach().to(torch.float64), dev) if isinstance(v, torch.Tensor)
                     else tensor_on(v, torch.float64, dev) for v in col] for col in zip(*vals)]  # no host sync
            if self.kind == "adam":
                if self._group_idx is None or self._group_idx.device != dev:  # made once per layout
                    self._group_idx = tensor_on(self.group_of, torch.long, dev)
                group = self._group_idx
                self._bias_in = tuple(torch.stack(col)[group] for col in cols[:3])
                if self._flavour == "adam":  # Adam's weight decay is compile_step's (the groups' is 0)
                    cols.append([torch.zeros((), dtype=torch.float64, device=dev)] * len(vals))
            self._hyper_val = tuple(cols)
        return self._hyper_val

    def _kept_sq(self) -> list[torch.Tensor]:
        """The kept weights' sums, re-read where stale (or all of them: first call, a loaded
        plan state)."""
        if self._sq is None or self._loads != self.plan._state_loads:
            self._now, self._bumps = _marks(self._kept), None
            return self._read_sq(self._kept)
        marks = self._now = _marks(self._kept)
        if marks == self._marks:  # nothing wrote a weight since the step did
            return self._sq
        self._bumps = None  # learn the step's own version bumps again
        stale = [k for k, m in enumerate(marks) if m != self._marks[k]]
        sq = list(self._sq)
        for k, s in zip(stale, self._read_sq([self._kept[k] for k in stale])):
            sq[k] = s
        return sq

    def _read_sq(self, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """float64 ``sum(W²)``: the runtime's foreach read when compiled, float64 chunks eagerly."""
        return sumsq_many(weights) if self._compile else [sumsq(w) for w in weights]

    def _build(self):
        rt = self.plan._runtime
        factors = rt.gen.from_sq
        groups = self.optimizer.param_groups
        index, group_of, wd, slot = self.index, self.group_of, self.weight_decay, self._slot
        read_at, kept_at, n_w, n_kept = self._read_at, self._kept_at, len(rt.weights), len(self._kept)
        per_step, cap = rt.multiplier is not None, rt.post_cap
        plain = factors

        def finish(out, consts):  # the plan's per-step multiplier (span, token share), if any, and the cap after it
            return multiplied(out, consts["mult"], cap) if per_step else out

        def factors(sq, grads, stats, consts):  # noqa: F811
            return finish(plain(sq, grads, stats, consts), consts)

        self._bumps = None  # a new graph: learn its version bumps again
        self.cpu_code = None
        on_cpu = self._dev is not None and self._dev.type == "cpu"
        if self.kind == "sgd" and self._dev is not None and self._dev.type in FOREACH_DEVICES:
            return SGDForeachStep(self.plan, self.optimizer, self.params, self.weight_decay, finish, self._only)
        if self.kind == "sgd" and self._compile and CPU_KERNEL and on_cpu and not self._kernel_off:
            fn = self._build_kernel(finish)
            if fn is not None:
                return fn
            self._kernel_off = True  # this layout does not fit: tried again after _bind (new runtime or groups)
        second = self._second()
        if any(isinstance(v, torch.Tensor) for row in second for v in row):
            self._passed = True
        self._baked = None if self._passed else second
        baked = None if self._passed else [[float(v) for v in col] for col in zip(*second)]
        if self.kind == "sgd":
            nesterov = [bool(g["nesterov"]) for g in groups]
            baked_m = baked[0] if baked else None

            def step(read, kept, stats, consts, params, grads, lrs, momenta, bufs):
                scales = factors(weight_sq(read, read_at, kept.unbind(0), kept_at, n_w), [], stats, consts)
                new_sq = [None] * n_kept
                sgd_update(params, grads, bufs, scales, index, lrs, baked_m or momenta, group_of, wd, nesterov,
                            slot, new_sq)
                return new_sq, scales
        else:
            eps = [float(g["eps"]) for g in groups]
            decoupled = self._flavour == "adamw"
            if baked and not decoupled:
                baked.append([0.0] * len(groups))

            def step(read, kept, stats, consts, params, grads, lrs, b1s, b2s, wds, m1, m2, steps, step_size, bc2_sqrt):
                scales = factors(weight_sq(read, read_at, kept.unbind(0), kept_at, n_w), [], stats, consts)
                new_sq = [None] * n_kept
                b1s, b2s, wds = baked or (b1s, b2s, wds)
                adam_update(params, grads, m1, m2, steps, scales, index, lrs, b1s, b2s, wds, group_of, wd, eps,
                             decoupled, slot, new_sq, step_size, bc2_sqrt)
                return new_sq, scales

        if not self._compile:
            return step
        extra = CUDA_OPTIONS if self._dev is not None and self._dev.type == "cuda" else {}
        return torch.compile(step, fullgraph=True, dynamic=False, options={**self._options, **extra})

    def _build_kernel(self, finish: Callable) -> Callable | None:
        """The SGD update as a generated C++ kernel (:func:`.cpu_update.sgd_step`) behind the
        factor chain on Python floats (:func:`.cpu_update.host_chain`) and ``finish`` (the
        per-step multiplier), or ``None`` where either does not apply."""
        rt = self.plan._runtime
        chain = cpu_update.host_chain(rt.gen, self._read_at, self._kept_at)
        if chain is None:
            return None

        def scales_of(read, kept, stats, consts):
            return finish(chain(read, kept, stats), consts)

        def inductors(*args):  # a layout the kernel cannot take: inductor's update from now on
            self._kernel_off, self._fn = True, None
            self._fn = self._build()
            return self._fn(*args)

        nesterov = [bool(g["nesterov"]) for g in self.optimizer.param_groups]
        step = cpu_update.sgd_step(self.params, self.index, self.group_of, nesterov, self._slot,
                                   self.weight_decay, scales_of, inductors)
        if step is not None:
            self._baked, self.cpu_code = None, step.code  # momentum is passed every step
        return step

    @property
    def param_groups(self) -> list[dict]:
        """The optimizer's groups: what ``GradScaler.unscale_`` reads, so that
        ``scaler.step(step)`` unscales the gradients, skips a step with inf/NaN gradients and
        otherwise calls :meth:`step` (``scaler.step(optimizer)`` would run the optimizer's own
        step, without the plan)."""
        return self.optimizer.param_groups

    def step(self) -> None:
        """The same as calling the fused step (the name ``GradScaler.step`` calls)."""
        self()

    @torch.no_grad()
    def __call__(self) -> None:
        self.plan._check()
        rt = self.plan._runtime
        if rt.gen.grad_refs:
            raise ValueError("compile_step supports gradient-independent rules (backmatch, sgd)")
        if self._layout_of(self.optimizer.param_groups) != self._layout:  # add_param_group, a changed setting
            self._take_params()
            self._bind(rt)
        elif rt is not self._rt:  # the plan regenerated its runtime
            self._bind(rt)
        grads = list(map(_GRAD, self.params))
        if any(map(is_, grads, repeat(None))):
            raise RuntimeError("compile_step needs a gradient for every parameter; use attach() when some are None")
        if grads[0].device != self._grad_dev:  # first call, or the model moved
            _one_device(self.params)
            self._grad_dev = grads[0].device
            if rt.device() != self._dev:  # built for its device (CUDA_OPTIONS)
                self._dev, self._fn = rt.device(), None
        if self._fn is None:
            self._fn = self._build()
        dev = self._dev
        consts = rt._consts_on(dev)
        self.plan._step_hook()  # measured moments / factors: refreshed in place every `refresh` steps
        if rt.multiplier is not None:
            mult = rt.multiplier()
            n = len(rt.targets)
            mult = torch.ones(n, dtype=torch.float64, device=dev) if mult is None else to_device(mult.double(), dev)
            consts = {**consts, "mult": mult}
        if isinstance(self._fn, SGDForeachStep):  # reads the weights and the groups itself
            self.plan._applied = applied_after(self.plan, self._fn(consts, grads, *self._state()), self._only)
            self.optimizer._opt_called = True
            return
        hyper = self._hyper(dev)
        if self._fn is None:  # _hyper saw a compiled-in setting move
            self._fn = self._build()
        stats = [rt.buffers[r] for r in rt.stat_refs]
        # the kept sums as one vector: one input for dynamo's guards, not one per weight (0-d CPU
        # tensors are even guarded as Python floats, ~1 µs each: ResNet-50's 161 cost ~0.2 ms a step)
        kept = self._kept_sq()  # a list of 0-d sums, or the vector the C++ update returned
        if not isinstance(kept, torch.Tensor):
            kept = torch.stack(kept) if kept else torch.zeros(0, dtype=torch.float64, device=dev)
        self._sq, scales = self._fn(self._read, kept, stats, consts, self.params, grads, *hyper, *self._state())
        self.plan._applied = applied_after(self.plan, scales, self._only)  # plan.applied_scales()
        # the marks the next step expects: the step's own version bumps are the same every step,
        # so they are read once (on a step that re-read a sum) and added after that; a wrong
        # guess only makes the next step re-read those sums
        if self._bumps is None:
            self._marks = _marks(self._kept)
            self._bumps = [a[0] - b[0] for a, b in zip(self._marks, self._now)]
        else:
            self._marks = list(map(_bumped, self._now, self._bumps))
        self._loads = self.plan._state_loads
        self.optimizer._opt_called = True  # tell LR schedulers the optimizer stepped


def _one_device(params: list[torch.Tensor]) -> None:
    """Raise unless every parameter lives on one device: the update stacks the weights' sums
    and multiplies each gradient by a scale computed on one device."""
    devices = sorted({str(p.device) for p in params})
    if len(devices) > 1:
        raise ValueError(
            f"compile_step needs every parameter on one device; this optimizer's are on "
            f"{', '.join(devices)} (a model split across devices: device_map, pipeline stages).\n"
            f"  What to do: plan.attach(optimizer) rescales such a model, then optimizer.step() updates it."
        )


def _marks(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """What changes when a tensor is written outside the step: its version, its storage."""
    return [(t._version, t.data_ptr()) for t in tensors]


def _bumped(mark: tuple[int, int], bump: int) -> tuple[int, int]:
    return (mark[0] + bump, mark[1])


_GRAD = attrgetter("grad")
_BUF = itemgetter("momentum_buffer")


def compile_step(plan: "Plan", optimizer: torch.optim.Optimizer, weight_decay: float = 0.0) -> FusedStep:
    """A :class:`FusedStep` for ``optimizer``. Plans whose scales read each step's batch
    (``span="batch"``, a token mask) multiply them by the step's multiplier inside the fused
    update; measured moments and factors are refreshed every ``refresh`` steps, as ``attach``
    does. Every parameter must live on one device (a model split across devices: ``attach``).
    With several optimizers over parts of one model, each step computes its scales when it
    runs (after the earlier parts moved), where ``attach`` gives every part the round's first
    scales; ``plan.applied_scales()`` keeps each target's from its own optimizer's step. With a
    ``GradScaler`` (float16 autocast), step through the scaler: ``scaler.step(step)`` — it
    unscales the gradients and skips steps with inf/NaN — then ``scaler.update()``; calling
    ``step()`` directly would apply the loss-scaled gradients."""
    return FusedStep(plan, optimizer, weight_decay, compile=plan.compile)
