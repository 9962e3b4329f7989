"""The factor analysis: walk the graph from the outputs down and build every layer's
backward factor ``m`` and sharing factor ``s`` (Algorithm 1, generalized to DAGs).

Two quantities flow backwards along every edge:

* ``m`` — the backward factor at a value (a :class:`~fxbackmatch.expr.Mono`), 1 at each
  output; a rule multiplies it by its ``δa/δ'a``;
* ``frac`` — the fraction of the value's elements that carry gradient (1 at the outputs;
  a max/avg pooling keeps ``out/in`` of its input's locations). A weighted layer's sharing
  factor is ``s = frac · positions(output)``, e.g. ``s_cv1 = 784 · 1/4 = 196`` in LeNet.

Where a value has several consumers (a fork) the consumers' factors are combined by
``m = Σ √m_i / Σ 1/√m_i`` (:meth:`~fxbackmatch.expr.AtomTable.fork_mean`: back-matching sums
the matched signals ``δ'a = Σ δa_i/m_i`` with BP amplitudes ``δa_i ∝ √m_i``) — and the
gradient-carrying fractions by their sum, capped at 1 (disjoint slices add up; consumers
of the whole tensor give 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import (
    FxBackmatchError,
    NoWeightedLayerError,
    RuleError,
    UncoveredParameterError,
    UnsupportedOpError,
)
from .expr import ONE, AtomTable, Mono
from .registry import Rule, RuleRegistry
from .shapes import shape_of
from .topology import backward_order, build_digraph, carries_tensor, numel_of, output_nodes

__all__ = ["LayerRecord", "ParamUse", "Analysis", "RuleContext", "analyze"]

ROLES = ("weight", "bias", "norm_scale", "norm_shift")


@dataclass(frozen=True)
class ParamUse:
    """One use of a parameter by a layer: the scale of this use is ``1/(m·s)``."""

    name: str
    role: str
    m: Mono
    s: float


@dataclass(frozen=True)
class LayerRecord:
    """What the analysis decided for one layer (one FX node that owns parameters).

    ``m`` is the backward factor at the layer's output under the current weights (a float
    in :attr:`Plan.layers`); ``m_expr`` is its symbolic form.
    """

    name: str
    kind: str
    node: str
    weight_shape: tuple[int, ...] | None
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    s: float
    c: float
    params: tuple[tuple[str, str], ...]
    notes: tuple[str, ...]
    m_expr: Mono = field(repr=False, default=ONE)
    m: float | None = None

    def with_m(self, value: float) -> "LayerRecord":
        return replace(self, m=value)


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


class RuleContext:
    """What a rule sees for one node, and how it reports back (see :mod:`registry`)."""

    def __init__(self, analysis: "_Walker", node: fx.Node, rule: Rule, m_out: Mono, frac_out: float):
        self._w = analysis
        self.node = node
        self.rule = rule
        self.m_out = m_out
        self.frac_out = frac_out
        self.module: nn.Module | None = (
            analysis.gm.get_submodule(node.target) if node.op == "call_module" else None
        )
        self.atoms = analysis.atoms
        self.variance_mode = analysis.variance
        #: the node's tensor-valued inputs, in argument order (kwargs after args); parameters
        #: (get_attr of an nn.Parameter) are not inputs — rules claim them with param_from_arg
        self.inputs: list[fx.Node] = [
            a for a in _flat_nodes((node.args, node.kwargs))
            if carries_tensor(a) and not (a.op == "get_attr" and isinstance(_fetch_attr(analysis.gm, a.target), nn.Parameter))
        ]

    # ----- shapes -------------------------------------------------------------------
    @property
    def out_shape(self) -> tuple[int, ...] | None:
        return shape_of(self.node)

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        return shape_of(node)

    def numel(self, node: fx.Node) -> int:
        return numel_of(node)

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Positional-or-keyword argument of a call_function / call_method node."""
        if len(self.node.args) > index:
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    # ----- parameters ---------------------------------------------------------------
    def module_param(self, attr: str) -> str | None:
        """Canonical name of ``self.module.<attr>`` if it is a parameter (frozen ones too:
        their norms still enter ``m``; ``add_layer`` does not scale them)."""
        p = getattr(self.module, attr, None)
        return self._w.claim(p, self.node)

    def param_from_arg(self, arg: Any) -> str | None:
        """Canonical name of the parameter a ``get_attr`` argument refers to."""
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            p = _fetch_attr(self._w.gm, arg.target)
            return self._w.claim(p, self.node, arg)
        return None

    def buffer_from_arg(self, arg: Any) -> str | None:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return arg.target
        return None

    def param_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._w.params[name].shape)

    def numel_of_param(self, name: str) -> int:
        return self._w.params[name].numel()

    def sumsq(self, name: str) -> Mono:
        """``sum(W²)`` of parameter ``name``, as a per-step atom."""
        return Mono.atom(self.atoms.weight(name))

    def stat_mean(self, ref: str) -> Mono:
        """Mean of the buffer at qualified name ``ref`` (e.g. a BN ``running_var``)."""
        return Mono.atom(self.atoms.stat(ref))

    # ----- the walk -----------------------------------------------------------------
    def pass_to(self, node: fx.Node, m: Mono, frac: float) -> None:
        """Hand ``node`` (an input of this node) its backward factor and carrying fraction."""
        self._w.contribute(node, m, min(max(frac, 0.0), 1.0), self.node)

    def pass_all(self, m: Mono | None = None, frac: float | None = None) -> None:
        for inp in self.inputs:
            self.pass_to(inp, self.m_out if m is None else m, self.frac_out if frac is None else frac)

    def variance_below(self, node: fx.Node) -> tuple[Mono | None, str]:
        """``Var[a]`` of the value ``node`` for the BN rule (``None`` when the weights give no
        estimate, or with ``variance="measured"``), and a note saying how."""
        return self._w.variance_below(node)

    def add_layer(
        self,
        kind: str,
        params: list[tuple[str | None, str, float]],
        *,
        weight: str | None,
        s: float,
        c: float,
        input_node: fx.Node | None = None,
        notes: tuple[str, ...] = (),
    ) -> None:
        """Declare a layer. ``params`` are ``(name, role, s)``; ``None`` names are skipped."""
        self._w.add_layer(self, kind, params, weight, s, c, input_node, notes)


def _flat_nodes(args) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, lambda a: out.append(a))
    return out


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj: Any = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


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
    def __init__(self, gm, registry: RuleRegistry, model: nn.Module, strict: bool, variance: str):
        self.gm = gm
        self.registry = registry
        self.strict = strict
        self.variance = variance
        self.atoms = AtomTable()
        self.params: dict[str, nn.Parameter] = {}
        self.param_names: dict[int, str] = {}
        for name, p in model.named_parameters():  # frozen ones too: their norms enter m
            self.param_names[id(p)] = name
            self.params[name] = p
        self.contrib: dict[fx.Node, list[tuple[Mono, float, fx.Node]]] = {}
        self.layers: list[LayerRecord] = []
        self.uses: dict[str, list[ParamUse]] = {}
        self.uncovered: dict[str, str] = {}
        self.notes: list[str] = []
        self.claimed: set[tuple[fx.Node, fx.Node]] = set()  # (get_attr node, user)
        self.m_at: dict[fx.Node, Mono] = {}
        self.pending_notes: dict[fx.Node, list[str]] = {}
        self._var_memo: dict[fx.Node, Mono | None] = {}

    # --- bookkeeping used by RuleContext
    def claim(self, p, user: fx.Node, get_attr: fx.Node | None = None) -> str | None:
        if not isinstance(p, nn.Parameter):
            return None
        if get_attr is not None:
            self.claimed.add((get_attr, user))
        return self.param_names.get(id(p))

    def contribute(self, node: fx.Node, m: Mono, frac: float, src: fx.Node) -> None:
        self.contrib.setdefault(node, []).append((m, frac, src))

    def add_layer(self, ctx: RuleContext, kind, params, weight, s, c, input_node, notes):
        node = ctx.node
        name = str(node.target) if node.op == "call_module" else node.name
        notes = tuple(notes) + tuple(dict.fromkeys(self.pending_notes.get(node, ())))
        if any(self.atoms.atoms[i].kind == "sum" for i in ctx.m_out.atoms()):
            notes = tuple(notes) + ("fork-combined m",)
        names = []
        for pname, role, ps in params:
            if pname is None:
                continue
            if role not in ROLES:
                raise ValueError(f"unknown parameter role {role!r}; use one of {ROLES}")
            if not self.params[pname].requires_grad:
                notes = tuple(notes) + (f"frozen {role}",)
                continue
            self.uses.setdefault(pname, []).append(ParamUse(pname, role, ctx.m_out, float(ps)))
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
                notes=tuple(notes),
                m_expr=ctx.m_out,
            )
        )

    def variance_below(self, node: fx.Node) -> tuple[Mono | None, str]:
        """``Var[a]`` of value ``node`` from the weights that produce it (row-homogeneous):
        a weighted layer's ``||W||²_{2,μ}`` (its input normalized by the BN below it), a norm
        layer's ``mean(γ²)``, looking through transparent ops, and the channel-weighted mean
        over the parts of a concatenation. Anything else (an addition, an input) has no
        estimate: the caller falls back to the measured variance."""
        if self.variance != "measured":
            got = self._variance(node, 0)
            if got is not None:
                return got, "Var≈‖W‖²row below"
        return None, f"no weighted layer right below '{node.name}'"

    def _variance(self, node, depth: int) -> Mono | None:
        if not isinstance(node, fx.Node) or depth > 256 or not node.op.startswith("call"):
            return None
        if node in self._var_memo:
            return self._var_memo[node]
        rule = self.registry.lookup(node, self.gm)
        out: Mono | None = None
        if rule is not None and rule.row_norm is not None:
            out = rule.row_norm(RuleContext(self, node, rule, ONE, 1.0))
            if out is not None:
                self.pending_notes.setdefault(node, []).append("BN above: Var≈‖W‖²row")
        elif rule is not None and rule.transparent:
            ins = [a for a in _flat_nodes((node.args, node.kwargs)) if carries_tensor(a) and a.op != "get_attr"]
            out = self._variance(ins[0], depth + 1) if ins else None
        elif node.op == "call_function" and node.target in (torch.cat, torch.concat):
            parts = [a for a in _flat_nodes(node.args[0]) if carries_tensor(a)]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            sizes = [shape_of(p)[dim] if shape_of(p) else 0 for p in parts]
            vars_ = [self._variance(p, depth + 1) for p in parts]
            if dim in (1, -3) and parts and all(v is not None for v in vars_) and sum(sizes):
                total = sum(sizes)
                out = self.atoms.sum_of(
                    ((n / total, v) for n, v in zip(sizes, vars_)), label=f"Var of cat '{node.name}'"
                )
        self._var_memo[node] = out
        return out

    # --- the walk
    def run(self) -> Analysis:
        g = build_digraph(self.gm)
        for i, n in enumerate(self.gm.graph.nodes):
            n.meta["fxbackmatch.index"] = i
        outs = output_nodes(self.gm)
        for o in outs:
            self.contribute(o, ONE, 1.0, o)
        for node in backward_order(g):
            if node.op in ("output", "placeholder", "get_attr"):
                continue
            got = self.contrib.get(node)
            if not got or not carries_tensor(node):
                continue
            if len(got) == 1:
                m, frac = got[0][0], got[0][1]
            else:
                m = self.atoms.fork_mean([c[0] for c in got], label=f"fork at '{node.name}'")
                frac = min(1.0, sum(c[1] for c in got))
            self.m_at[node] = m
            node.meta["fxbackmatch.m"] = m
            node.meta["fxbackmatch.frac"] = frac
            rule = self.registry.lookup(node, self.gm)
            if rule is None:
                self._no_rule(node, m, frac)
                continue
            try:
                rule(RuleContext(self, node, rule, m, frac))
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
        return Analysis(
            gm=self.gm,
            atoms=self.atoms,
            layers=self.layers,
            uses=self.uses,
            uncovered=self.uncovered,
            notes=self.notes,
            param_names=self.param_names,
            variance=self.variance,
        )

    def _no_rule(self, node: fx.Node, m: Mono, frac: float) -> None:
        what = _describe(node, self.gm)
        if self.strict:
            raise UnsupportedOpError(
                f"no fxbackmatch rule for {what} at node {node.format_node()}\n"
                f"  What to do: register one with {_register_hint(node, self.gm)} "
                f"(see fxbackmatch.registry), or pass strict=False to keep its parameters at "
                f"scale 1 and pass the backward factor through it unchanged."
            )
        self.notes.append(f"{what} at '{node.name}' has no rule: factor passed through unchanged")
        if node.op == "call_module":
            for pname, p in self.gm.get_submodule(node.target).named_parameters():
                name = self.param_names.get(id(p))
                if name and p.requires_grad:
                    self.uncovered.setdefault(name, f"{what} has no rule")
        for inp in _flat_nodes((node.args, node.kwargs)):
            if carries_tensor(inp) and inp.op != "get_attr":
                self.contribute(inp, m, frac, node)

    def _check_params(self, g) -> None:
        # parameters reached through get_attr by a node whose rule did not claim them
        for n in self.gm.graph.nodes:
            if n.op != "get_attr":
                continue
            p = _fetch_attr(self.gm, n.target)
            name = self.param_names.get(id(p))
            if not isinstance(p, nn.Parameter) or name is None or not p.requires_grad:
                continue
            for user in n.users:
                if (n, user) in self.claimed or name in self.uncovered:
                    continue
                if user not in self.m_at:
                    continue  # no gradient reaches this use
                msg = (
                    f"parameter '{name}' is used by node {user.format_node()} "
                    f"({_describe(user, self.gm)}), and no rule owns it as a parameter"
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
                self.uncovered[name] = "no gradient path from the outputs reaches it in the traced forward"


def analyze(
    gm: fx.GraphModule,
    model: nn.Module,
    registry: RuleRegistry,
    *,
    strict: bool = True,
    variance: str = "weights",
) -> Analysis:
    """Walk ``gm`` (with shapes propagated) and return the symbolic factors of every layer."""
    if variance not in ("weights", "measured"):
        raise ValueError(f"variance must be 'weights' or 'measured', got {variance!r}")
    return _Walker(gm, registry, model, strict, variance).run()


def positions(shape: tuple[int, ...] | None, channel_dim: int) -> int:
    """Positions per sample and channel: ``numel / (batch · channels)`` (batch = dim 0)."""
    if not shape:
        return 1
    total = math.prod(shape)
    ch = shape[channel_dim] if len(shape) > 1 else 1
    return max(1, total // max(1, shape[0] * ch)) if len(shape) > 1 else 1
