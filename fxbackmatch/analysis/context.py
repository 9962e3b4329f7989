"""The rule API: what a rule sees for one node (:class:`RuleContext`) and its helpers.

Rules import this module only — never the graph walker (:mod:`fxbackmatch.analysis.walk`), which
implements the small set of callbacks a context forwards to (``claim``, ``contribute``,
``add_layer``, ``note``, ``variance_below``).
"""
from __future__ import annotations

import math
from typing import Any

import torch.fx as fx
from torch import nn

from .expr import Mono
from .records import Flow
from ..capture.shapes import shape_of
from ..capture.topology import carries_tensor, fetch_attr, numel_of

__all__ = ["RuleContext", "positions", "flat_nodes", "fetch_attr", "param_view_source", "VIEW_METHODS"]


def flat_nodes(args) -> list[fx.Node]:
    """Every FX node in a nested args/kwargs structure, in order."""
    out: list[fx.Node] = []
    fx.node.map_arg(args, lambda a: out.append(a))
    return out


def positions(shape: tuple[int, ...] | None, channel_dim: int) -> int:
    """Positions per sample and channel: ``numel / (batch · channels)`` (batch = dim 0)."""
    if not shape or len(shape) < 2:
        return 1
    total = math.prod(shape)
    ch = shape[channel_dim]
    return max(1, total // max(1, shape[0] * ch))


class RuleContext:
    """What a rule sees for one node, and how it reports back (see :mod:`registry`).

    ``m_out``, ``frac_out`` and ``chan_out`` describe the gradient at the node's output
    (see :class:`~fxbackmatch.analysis.records.Flow`); a rule hands each tensor input its own with
    :meth:`pass_to` and declares parameters with :meth:`add_layer`.
    """

    def __init__(self, walker, node: fx.Node, rule, flow: Flow):
        self._w = walker
        self.node = node
        self.rule = rule
        self.flow = flow
        self.m_out: Mono = flow.m
        self.frac_out: float = flow.frac
        self.chan_out: float = flow.chan
        self.gm: fx.GraphModule = walker.gm
        self.module: nn.Module | None = (
            walker.gm.get_submodule(node.target) if node.op == "call_module" else None
        )
        self.atoms = walker.atoms
        self.variance_mode: str = walker.variance
        self.gamma_mode: str = walker.gamma
        self.relu_mode: str = walker.relu
        self.taps_mode: str = walker.taps
        self.activations_mode: str = walker.activations
        self.floor_mode: str = walker.floor
        #: the node's tensor-valued inputs, in argument order (kwargs after args); parameters
        #: (get_attr of an nn.Parameter) are not inputs — rules claim them with param_from_arg
        self.inputs: list[fx.Node] = [
            a for a in flat_nodes((node.args, node.kwargs))
            if carries_tensor(a) and not _is_param(walker.gm, param_view_source(a))
        ]

    # ----- shapes -------------------------------------------------------------------
    @property
    def out_shape(self) -> tuple[int, ...] | None:
        return shape_of(self.node)

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        return shape_of(node)

    def numel(self, node: fx.Node) -> int:
        return numel_of(node)

    @property
    def batch(self) -> int:
        """The batch size: dim 0 of the graph's first tensor input."""
        return self._w.batch

    def positions_per_sample(self, node: fx.Node, channels: int) -> float:
        """``numel / (batch · channels)``: positions per sample of a value with ``channels``
        features, also where the batch was folded into another dimension (``x.view(-1, C)``)."""
        shape = shape_of(node)
        if shape and shape[0] == 1 and self.batch > 1:  # broadcast over the batch: every sample reads it
            return max(1.0, numel_of(node) / max(1, channels))
        return max(1.0, numel_of(node) / max(1, self.batch * channels))

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Positional-or-keyword argument of a call_function / call_method node."""
        if len(self.node.args) > index:
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    def rule_of(self, node: fx.Node):
        """The registered rule of another node (``None`` for inputs and parameters)."""
        return self._w.registry.lookup(node, self.gm) if node.op.startswith("call") else None

    def channel_dim_below(self, node: fx.Node) -> int | None:
        """The channel dimension of the nearest rule below ``node`` that declares one
        (conv/BN: 1, linear/LayerNorm: -1), looking through transparent ops."""
        return self._w.channel_dim_below(node)

    # ----- parameters ---------------------------------------------------------------
    def module_param(self, attr: str) -> str | None:
        """Canonical name of ``self.module.<attr>`` if it is a parameter (frozen ones too:
        their norms still enter ``m``; ``add_layer`` does not scale them)."""
        p = getattr(self.module, attr, None)
        return self._w.claim(p, self.node)

    def param_from_arg(self, arg: Any) -> str | None:
        """Canonical name of the parameter a ``get_attr`` argument refers to, also when it is
        read through a view (``self.gamma.view(1, -1, 1, 1)``, ``reshape``, ``expand``,
        ``unsqueeze``, ...): a view of a parameter is the same parameter."""
        src = param_view_source(arg)
        if src is not None:
            p = fetch_attr(self._w.gm, src.target)
            first = arg
            while first is not src and first.args[0] is not src:  # the view that reads the get_attr
                first = first.args[0]
            return self._w.claim(p, self.node if first is src else first, src)
        return None

    def buffer_from_arg(self, arg: Any) -> str | None:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return arg.target
        return None

    def param_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._w.params[name].shape)

    def numel_of_param(self, name: str) -> int:
        return self._w.params[name].numel()

    def sumsq(self, name: str, init_var: float | None = None) -> Mono:
        """``sum(W²)`` of parameter ``name``, as a per-step atom.

        With ``floor="init"`` it is ``max(sum(W²), numel·v₀)``: the parameter counts at least
        as much as at its initialization, ``v₀`` the variance of its layer kind's default
        initializer — ``init_var`` where the rule gives it (embeddings: 1, γ: 1), else torch's
        ``kaiming_uniform_(a=√5)`` of Linear/Conv: ``v₀ = 1/(3·fan_in)``, so the floor is
        ``shape[0]/3``; 1-D parameters get no floor unless ``init_var`` is given."""
        floor = 0.0
        if self.floor_mode == "init":
            shape = self.param_shape(name)
            if init_var is not None:
                floor = self.numel_of_param(name) * float(init_var)
            elif len(shape) >= 2:
                floor = shape[0] / 3.0
        return Mono.atom(self.atoms.weight(name, floor))

    def mean_sq(self, name: str, init_var: float | None = None) -> Mono:
        """``mean(W²)`` of parameter ``name`` (e.g. ``mean(γ²)``), floored as :meth:`sumsq`."""
        return self.sumsq(name, init_var) / self.numel_of_param(name)

    def gamma_sq(self, name: str) -> Mono:
        """``mean(γ²)`` of a multiplicative parameter (norm γ, layer scale) as this plan counts
        it — forward moments and backward chain alike: ``1`` with ``gamma="one"`` (the
        network the paper trains, BN without γ, §2.3, §4), ``mean(γ²)`` with ``gamma="exact"``
        (``max(mean(γ²), 1)`` with ``floor="init"``: γ's initial value is 1)."""
        return self.mean_sq(name, 1.0) if self.gamma_mode == "exact" else Mono()

    def stat_mean(self, ref: str) -> Mono:
        """Mean of the buffer at qualified name ``ref`` (e.g. a BN ``running_var``)."""
        return Mono.atom(self.atoms.stat(ref))

    def stat_inv_mean(self, ref: str, eps: float = 0.0) -> Mono:
        """``mean(1/(x + eps))`` of the buffer at ``ref`` (``mean_c(1/(running_var_c + eps))``)."""
        return Mono.atom(self.atoms.stat_inv(ref, eps))

    def value_now(self, mono: Mono) -> float | None:
        """``mono``'s value at the current weights and statistics, or ``None`` where it reads
        a value only a batch gives (a measured moment, a gradient)."""
        return self._w.value_now(mono)

    # ----- the walk -----------------------------------------------------------------
    def pass_to(self, node: fx.Node, m: Mono, frac: float | None = None, chan: float | None = None) -> None:
        """Hand ``node`` (an input of this node) its backward factor ``m``, the fraction of
        its positions (``frac``) and of its channels (``chan``) that carry gradient. Both
        fractions default to the output's (right for ops that keep the layout)."""
        frac = self.frac_out if frac is None else frac
        chan = self.chan_out if chan is None else chan
        self._w.contribute(node, Flow(m, _unit(frac), _unit(chan)), self.node)

    def pass_all(self, m: Mono | None = None, frac: float | None = None, chan: float | None = None) -> None:
        for inp in self.inputs:
            self.pass_to(inp, self.m_out if m is None else m, frac, chan)

    def variance_below(self, node: fx.Node) -> tuple[Mono | None, str]:
        """``E[a²]`` of the value ``node`` estimated from the graph below it (the weights of
        the layer that produces it, a norm layer, a bounded activation), ``None`` when the
        graph gives no estimate; and a note saying how."""
        return self._w.variance_below(node)

    def note(self, text: str) -> None:
        """Name an approximation this rule made at this node (shown in the report)."""
        self._w.note(self.node, text)

    def add_layer(
        self,
        kind: str,
        params: list[tuple],
        *,
        weight: str | None,
        s: float,
        c: float,
        input_node: fx.Node | None = None,
        notes: tuple[str, ...] = (),
    ) -> None:
        """Declare a layer. ``params`` are ``(name, role, s)`` or ``(name, role, s, k)`` with
        ``k`` a :class:`Mono` that multiplies ``m`` for that parameter only (a layer scale's
        ``E[x²]``); ``None`` names are skipped."""
        self._w.add_layer(self, kind, params, weight, s, c, input_node, notes)


#: ops that read a tensor as it is, only laid out differently: a parameter read through them
#: is still that parameter (not ``expand``: copies read ``r`` times are a layer of their own,
#: :func:`~.rules.transformer.expand_rule`)
VIEW_METHODS = ("view", "reshape", "unsqueeze", "squeeze", "flatten", "permute",
                "transpose", "contiguous", "view_as", "reshape_as", "to", "type_as")


def param_view_source(arg: Any, depth: int = 0) -> fx.Node | None:
    """The ``get_attr`` node ``arg`` reads, directly or through views (:data:`VIEW_METHODS`,
    ``torch.reshape``/``unsqueeze``/``flatten``/...), or ``None``."""
    import torch

    if not isinstance(arg, fx.Node) or depth > 8:
        return None
    if arg.op == "get_attr":
        return arg
    is_view = (arg.op == "call_method" and arg.target in VIEW_METHODS) or (
        arg.op == "call_function" and arg.target in (torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten,
                                                     torch.permute, torch.transpose))
    if is_view and arg.args and isinstance(arg.args[0], fx.Node) and len(arg.users) == 1:
        return param_view_source(arg.args[0], depth + 1)
    return None


def _is_param(gm: fx.GraphModule, node: fx.Node | None) -> bool:
    return node is not None and isinstance(fetch_attr(gm, node.target), nn.Parameter)


def _unit(x: float) -> float:
    return min(max(float(x), 0.0), 1.0)
