"""The factor analysis: walk the graph from the loss outputs down and build every layer's
backward factor ``m`` and sharing factor ``s`` (Algorithm 1, generalized to DAGs).

What flows backwards along every edge is a :class:`~fxbackmatch.analysis.records.Flow`: the factor
``m`` (1 at each loss output; each rule multiplies it by its ``δa/δ'a``), and the fractions of
positions (``frac``) and channels (``chan``) of the value that carry gradient.

**Forks are least squares over the stacked Jacobians.** A value read by ``k`` ops has the
Jacobian ``J = [J_1; …; J_k]``, so ``JᵀJ = Σ J_iᵀJ_i``: under the paper's approximation
``J_iᵀJ_i ≈ m_i·I`` on the elements consumer ``i`` reads, the factor at an element is the
*sum* of the factors of the consumers that read it, and the value's scalar ``m`` is the mean
over the elements that carry gradient:
``m = Σ_i cover_i·m_i / cover``, with ``cover_i`` the share of elements consumer ``i`` reads
and ``cover = min(1, Σ cover_i)`` (exact when the consumers read all of it or disjoint
parts). A residual ``h + f(h)`` gives ``m_h = m_y + m_f``; a silent branch adds nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .context import RuleContext, fetch_attr, param_view_source, positions  # noqa: F401 (positions: 0.1 API)
from ..errors import (
    FxBackmatchError,
    NoWeightedLayerError,
    RuleError,
    UncoveredParameterError,
    UnsupportedOpError,
)
from .expr import ONE, AtomTable, Mono
from .gaps import fill_gap
from .records import ROLES, Flow, LayerRecord, ParamUse
from .registry import RuleRegistry
from ..capture.shapes import shape_of
from ..capture.topology import backward_order, build_digraph, carries_tensor, live_nodes, select_outputs
from .variance import VarianceEstimator
from .conventions import (
    ACTIVATION_MODES, FLOOR_MODES, GAMMA_MODES, MOMENT_MODES, RELU_MODES, TAPS_MODES, UNNORMALIZED_MODES, VARIANCES,
    check_choice,
)

__all__ = ["LayerRecord", "ParamUse", "Analysis", "RuleContext", "analyze", "GAMMA_MODES", "RELU_MODES",
           "UNNORMALIZED_MODES", "TAPS_MODES", "MOMENT_MODES", "MOMENT_PREFIX"]

#: (the modes of each convention are documented in :mod:`.conventions` and re-exported here)

#: buffer-name prefix of a measured forward moment atom (``fxbackmatch.moment:<node>``)
MOMENT_PREFIX = "fxbackmatch.moment:"


@dataclass
class Analysis:
    """Everything the walk produced; consumed by :class:`~fxbackmatch.plan.Plan`."""

    gm: fx.GraphModule
    atoms: AtomTable
    layers: list[LayerRecord]
    uses: dict[str, list[ParamUse]]
    uncovered: dict[str, str]
    notes: list[str]
    param_names: dict[int, str]
    variance: str
    outputs: list[str]  # labels of the loss outputs, as the user named them
    output_nodes: list[str] = field(default_factory=list)
    gamma: str = "one"
    moment_nodes: list[str] = field(default_factory=list)  # values whose E[a²] is a measured atom


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        t = node.target
        return f"function {getattr(t, '__module__', '')}.{getattr(t, '__name__', t)}"
    return f"method '.{node.target}()'"


def _register_hint(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"fxbackmatch.register_rule(module={type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return f"fxbackmatch.register_rule(function={getattr(node.target, '__name__', node.target)})"
    return f"fxbackmatch.register_rule(method={node.target!r})"


class _Walker:
    def __init__(self, gm, registry: RuleRegistry, model: nn.Module, strict: bool, variance: str, gamma: str,
                 relu: str = "paper", unnormalized: str = "exact", taps: str = "all",
                 moments: str = "derived", activations: str = "paper", floor: str = "none"):
        self.gm = gm
        self.activations = activations
        self.floor = floor
        self.moments = moments
        self.moment_nodes: list[str] = []
        self.registry = registry
        self.strict = strict
        self.variance = variance
        self.gamma = gamma
        self.relu = relu
        self.unnormalized = unnormalized
        self.taps = taps
        self.atoms = AtomTable()
        self.params: dict[str, nn.Parameter] = {}
        self.param_names: dict[int, str] = {}
        for name, p in model.named_parameters():  # frozen ones too: their norms enter m
            self.param_names[id(p)] = name
            self.params[name] = p
        self.contrib: dict[fx.Node, list[tuple[Flow, fx.Node]]] = {}
        self.layers: list[LayerRecord] = []
        self.uses: dict[str, list[ParamUse]] = {}
        self.uncovered: dict[str, str] = {}
        self.notes: list[str] = []
        self.node_notes: dict[fx.Node, list[str]] = {}
        self.layer_nodes: set[fx.Node] = set()
        self.claimed: set[tuple[fx.Node, fx.Node]] = set()  # (get_attr node, user)
        self.m_at: dict[fx.Node, Mono] = {}
        self.live = live_nodes(gm, model)
        self.batch = next(
            (n.meta["val"].shape[0] for n in gm.graph.nodes if n.op == "placeholder"
             and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() > 0), 1
        )
        self._moment = VarianceEstimator(
            gm, registry, self.atoms, lambda n, r: RuleContext(self, n, r, Flow(ONE)),
            measure_at=self._batch_moment if moments == "batch" else None,
        )

    # --- callbacks of RuleContext
    def claim(self, p, user: fx.Node, get_attr: fx.Node | None = None) -> str | None:
        if not isinstance(p, nn.Parameter):
            return None
        if get_attr is not None:
            self.claimed.add((get_attr, user))
        return self.param_names.get(id(p))

    def contribute(self, node: fx.Node, flow: Flow, src: fx.Node) -> None:
        if node not in self.live:  # no trainable parameter below: nothing to scale there
            return
        self.contrib.setdefault(node, []).append((flow, src))

    def note(self, node: fx.Node, text: str) -> None:
        got = self.node_notes.setdefault(node, [])
        if text not in got:
            got.append(text)

    def channel_dim_below(self, node: fx.Node, depth: int = 0) -> int | None:
        if not isinstance(node, fx.Node) or depth > 64 or not node.op.startswith("call"):
            return None
        rule = self.registry.lookup(node, self.gm)
        if rule is None:
            return None
        if rule.channel_dim is not None:
            return rule.channel_dim
        if rule.transparent or rule.layout:
            ins = [a for a in node.all_input_nodes if carries_tensor(a) and a.op != "get_attr"]
            return self.channel_dim_below(ins[0], depth + 1) if ins else None
        return None

    def add_layer(self, ctx: RuleContext, kind, params, weight, s, c, input_node, notes):
        node = ctx.node
        self.layer_nodes.add(node)
        name = str(node.target) if node.op == "call_module" else node.name
        if self.gm.meta.get("fxbackmatch.capture") == "export" and weight and "." in weight:
            # export graphs have no modules: name the layer by its weight's owner
            owner = weight.rsplit(".", 1)[0]
            name = owner if all(r.name != owner for r in self.layers) else f"{owner} ({node.name})"
        for t in notes:
            self.note(node, t)
        names = []
        for entry in params:
            pname, role, ps = entry[:3]
            extra = entry[3] if len(entry) > 3 else ONE
            if pname is None:
                continue
            if role not in ROLES:
                raise ValueError(f"unknown parameter role {role!r}; use one of {ROLES}")
            if not self.params[pname].requires_grad:
                self.note(node, f"frozen {role}")
                continue
            self.uses.setdefault(pname, []).append(ParamUse(pname, role, ctx.m_out * extra, float(ps), node.name))
            names.append((pname, role))
        self.layers.append(
            LayerRecord(
                name=name,
                kind=kind,
                node=node.name,
                weight_shape=tuple(self.params[weight].shape) if weight else None,
                input_shape=shape_of(input_node) if input_node is not None else None,
                output_shape=shape_of(node),
                s=float(s),
                c=float(c),
                params=tuple(names),
                notes=(),  # filled from node_notes when the walk ends
                m_expr=ctx.m_out,
            )
        )

    def value_now(self, mono: Mono) -> float | None:
        """``mono`` evaluated at the current parameters and buffers (``None`` if it reads a
        gradient or a measured moment); used for the constants a rule fixes at prepare."""
        vals: dict[int, float | None] = {}

        def atom(i: int) -> float | None:
            if i in vals:
                return vals[i]
            a = self.atoms.atoms[i]
            v: float | None = None
            try:
                if a.kind == "weight_sumsq":
                    v = max(float(self.params[a.ref].detach().double().square().sum()), a.param)
                elif a.kind in ("stat_mean", "stat_inv_mean") and not a.ref.startswith(MOMENT_PREFIX):
                    t = fetch_attr(self.gm, a.ref).detach().double()
                    v = float(t.mean()) if a.kind == "stat_mean" else float((t + a.param).clamp_min(1e-12).reciprocal().mean())
                elif a.kind == "sum":
                    parts = [term(m) for _, m in a.terms]
                    v = None if any(p is None for p in parts) else sum(w * p for (w, _), p in zip(a.terms, parts))
            except Exception:  # a buffer this graph does not hold: no value now
                v = None
            vals[i] = v
            return v

        def term(m: Mono) -> float | None:
            out = math.exp(m.log_const)
            for i, p in m.powers:
                v = atom(i)
                if v is None:
                    return None
                out *= max(v, 1e-12) ** p
            return out

        return term(mono)

    def _batch_moment(self, node: fx.Node) -> Mono:
        """A measured ``E[a²]`` atom for ``node`` (filled by the plan on the live batch)."""
        if node.name not in self.moment_nodes:
            self.moment_nodes.append(node.name)
            self.note(node, "E[a²] measured on the batch (it averages over positions)")
        return Mono.atom(self.atoms.stat(MOMENT_PREFIX + node.name))

    def variance_below(self, node: fx.Node) -> tuple[Mono | None, str]:
        val = node.meta.get("val")
        if self.moments == "measured" and isinstance(val, torch.Tensor) and val.is_floating_point():
            if node.name not in self.moment_nodes:
                self.moment_nodes.append(node.name)
            return Mono.atom(self.atoms.stat(MOMENT_PREFIX + node.name)), "E[a²] measured on the batch"
        if self.variance != "measured":
            got = self._moment(node)
            if got is not None:
                return got, "Var from weights below"
            return None, f"no estimate of E[a²] below '{node.name}'"
        return None, "variance='measured'"

    # --- the walk
    def run(self, outputs: Any = None) -> Analysis:
        g = build_digraph(self.gm)
        for i, n in enumerate(self.gm.graph.nodes):
            n.meta["fxbackmatch.index"] = i
        outs, labels = select_outputs(self.gm, outputs)
        for o in outs:
            self.contribute(o, Flow(ONE), o)
        for node in backward_order(g):
            if node.op in ("output", "placeholder", "get_attr"):
                continue
            got = self.contrib.get(node)
            if not got or not carries_tensor(node):
                continue
            flow = self._combine(node, [f for f, _ in got])
            self.m_at[node] = flow.m
            node.meta["fxbackmatch.m"] = flow.m
            node.meta["fxbackmatch.frac"] = flow.frac
            node.meta["fxbackmatch.chan"] = flow.chan
            rule = self.registry.lookup(node, self.gm)
            if rule is None:
                self._no_rule(node, flow)
                continue
            if self.unnormalized == "virtual" and node in self.bare and flow.m != ONE:
                flow = self._virtual_norm(node, rule, flow)
            try:
                rule(RuleContext(self, node, rule, flow))
            except FxBackmatchError:
                raise
            except Exception as e:
                raise RuleError(
                    f"rule {rule.name} ({_describe(node, self.gm)}) failed at node "
                    f"{node.format_node()}: {type(e).__name__}: {e}\n  What to do: register a "
                    f"rule that handles this use with {_register_hint(node, self.gm)}(..., "
                    f"override=True), or keep the module opaque with leaf_modules=."
                ) from e
        self._check_params(g)
        if not self.layers:
            raise NoWeightedLayerError(
                f"{self.gm.__class__.__name__} has no layer that a rule rescales (no Linear, "
                f"Conv or norm layer on a gradient path).\n  What to do: register a rule for "
                f"your weighted layer with fxbackmatch.register_rule(module=YourLayer)."
            )
        self._finish_notes()
        return Analysis(
            gm=self.gm,
            atoms=self.atoms,
            layers=self.layers,
            uses=self.uses,
            uncovered=self.uncovered,
            notes=self.notes,
            param_names=self.param_names,
            variance=self.variance,
            moment_nodes=self.moment_nodes,
            outputs=labels,
            output_nodes=[o.name for o in outs],
            gamma=self.gamma,
        )

    @property
    def bare(self) -> set[fx.Node]:
        """Weighted-layer nodes with no normalization above (see :mod:`fxbackmatch.analysis.guards`)."""
        if not hasattr(self, "_bare"):
            from .guards import unnormalized_layers

            names = unnormalized_layers(self.gm, self.registry, [n.name for n in self.gm.graph.nodes if n.op.startswith("call")])
            self._bare = {n for n in self.gm.graph.nodes if n.name in names}
        return self._bare

    def _virtual_norm(self, node: fx.Node, rule, flow: Flow) -> Flow:
        """``m / Var[y]`` at a weighted layer's output, as if a BN followed it."""
        ctx = RuleContext(self, node, rule, flow)
        row = rule.row_norm(ctx)
        if row is None or not ctx.inputs:
            return flow
        below = self._moment(ctx.inputs[0])
        var = row if below is None else row * below
        self.note(node, "virtual norm above")
        return replace(flow, m=flow.m / var)

    def _combine(self, node: fx.Node, flows: list[Flow]) -> Flow:
        """The stacked-Jacobian (least-squares) combination of a value's consumers."""
        if len(flows) == 1:
            return flows[0]
        cover = min(1.0, sum(f.cover for f in flows))
        frac = min(1.0, sum(f.frac for f in flows))
        chan = min(1.0, cover / frac) if frac > 0 else 1.0
        if cover <= 0:
            return Flow(flows[0].m, 0.0, 0.0)
        m = self.atoms.sum_of(((f.cover / cover, f.m) for f in flows), label=f"fork at '{node.name}': Σ m_i")
        return Flow(m, frac, chan)

    def _finish_notes(self) -> None:
        by_node = {n.name: n for n in self.node_notes}
        for i, rec in enumerate(self.layers):
            n = by_node.get(rec.node)
            if n is not None:
                self.layers[i] = replace(rec, notes=tuple(self.node_notes[n]))
        for n, texts in self.node_notes.items():
            if n in self.layer_nodes:
                continue
            for t in texts:
                self.notes.append(f"{n.name}: {t}")

    def _no_rule(self, node: fx.Node, flow: Flow) -> None:
        """An op with no rule: ``strict=True`` refuses it; otherwise the gap is filled
        (:func:`~fxbackmatch.analysis.gaps.fill_gap`: the generic elementwise rule, or the op's
        own factor measured on the batch) and the report says how."""
        what = _describe(node, self.gm)
        if self.strict:
            raise UnsupportedOpError(
                f"no fxbackmatch rule for {what} at node {node.format_node()}\n"
                f"  What to do: register one with {_register_hint(node, self.gm)} "
                f"(see fxbackmatch.analysis.registry), or pass strict=False to fill the gap (an "
                f"elementwise op gets the mean-field rule, any other op's factor is measured on the "
                f"batch; its parameters stay at scale 1)."
            )
        from .rules.activations import elementwise_rule  # here: the rules import the gap helpers

        fill_gap(self, node, flow, what, elementwise_rule)

    def _check_params(self, g) -> None:
        # parameters reached through get_attr (directly or through views) by a node whose rule
        # did not claim them
        for n in self.gm.graph.nodes:
            if n.op != "get_attr":
                continue
            p = fetch_attr(self.gm, n.target)
            name = self.param_names.get(id(p))
            if not isinstance(p, nn.Parameter) or name is None or not p.requires_grad:
                continue
            for user in n.users:
                if (n, user) in self.claimed or name in self.uncovered:
                    continue
                reader = _view_reader(user, n)
                if user not in self.m_at and reader not in self.m_at:
                    continue  # no gradient reaches this use
                via = "" if reader is user else f", read by node {reader.format_node()} ({_describe(reader, self.gm)})"
                msg = (
                    f"parameter '{name}' is used by node {user.format_node()} "
                    f"({_describe(user, self.gm)}){via}, and no rule owns it as a parameter"
                )
                if self.strict:
                    raise UncoveredParameterError(
                        msg + "\n  What to do: wrap the computation in an nn.Module and register "
                        "a rule for it (fxbackmatch.register_rule), or pass strict=False to keep "
                        "this parameter at scale 1 (it is then listed in plan.uncovered)."
                    )
                self.uncovered[name] = msg
        for name, p in self.params.items():
            if p.requires_grad and name not in self.uses and name not in self.uncovered:
                self.uncovered[name] = "no gradient path from the loss outputs reaches it in the traced forward"


def _view_reader(user: fx.Node, src: fx.Node) -> fx.Node:
    """The node that reads parameter ``src`` through the chain of views starting at ``user``
    (``self.alpha.view(1, -1).expand(B, -1)`` → the op that takes the expanded tensor); ``user``
    itself where it is no such view."""
    node = user
    while param_view_source(node) is src and len(node.users) == 1:
        node = next(iter(node.users))
    return node


def analyze(
    gm: fx.GraphModule,
    model: nn.Module,
    registry: RuleRegistry,
    *,
    strict: bool = False,
    variance: str = "weights",
    gamma: str = "one",
    outputs: Any = None,
    relu: str = "paper",
    unnormalized: str = "exact",
    taps: str = "all",
    moments: str = "derived",
    activations: str = "paper",
    floor: str = "none",
) -> Analysis:
    """Walk ``gm`` (with shapes propagated) and return the symbolic factors of every layer.

    ``outputs`` selects the graph outputs that enter the loss (see :func:`select_outputs`);
    ``None`` takes every tensor output.
    """
    for key, value, allowed in (("variance", variance, VARIANCES), ("gamma", gamma, GAMMA_MODES),
                                ("relu", relu, RELU_MODES), ("unnormalized", unnormalized, UNNORMALIZED_MODES),
                                ("taps", taps, TAPS_MODES), ("moments", moments, MOMENT_MODES),
                                ("activations", activations, ACTIVATION_MODES), ("floor", floor, FLOOR_MODES)):
        check_choice(key, value, allowed)
    return _Walker(gm, registry, model, strict, variance, gamma, relu, unnormalized, taps, moments,
                   activations, floor).run(outputs)
