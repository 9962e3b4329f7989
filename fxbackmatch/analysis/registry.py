"""The rule registry: one rule per layer kind, looked up by module type (MRO), function
target or method name — like ``torch.utils.flop_counter.register_flop_formula``.

A rule is a function ``rule(ctx: RuleContext) -> None`` that, for one FX node, reads the
backward factor ``ctx.m_out`` and gradient-carrying fraction ``ctx.frac_out`` at the node's
output and

* hands each tensor input its factor with ``ctx.pass_to(input_node, m, frac)`` — the paper's
  ``m ← m · δa/δ'a`` (Algorithm 1);
* declares the layer and its parameters with ``ctx.add_layer(...)`` when it owns weights.

Register your own::

    @fxbackmatch.register_rule(module=MyScale)
    def my_scale_rule(ctx):
        ctx.pass_to(ctx.inputs[0], ctx.m_out, ctx.frac_out)   # acts like the identity

Duplicates raise :class:`DuplicateRuleError` unless ``override=True``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch.fx as fx
from torch import nn

from ..errors import DuplicateRuleError

__all__ = ["Rule", "RuleRegistry", "REGISTRY", "register_rule", "lookup_rule"]


@dataclass(frozen=True)
class Rule:
    """A registered rule.

    ``transparent`` rules leave the signal's variance alone (pointwise ops, reshapes,
    pooling, dropout): the BatchNorm rule looks through them for the weighted layer below.
    ``row_norm(ctx)`` returns the variance of the node's output for unit-variance input:
    ``||W||²_{2,μ}`` of a weighted layer's weight (the BN approximation
    ``Var[a] ≈ ||W||²_{2,μ}``, eq. 36) or ``mean(γ²)`` of a norm layer; the BatchNorm rule
    above uses it.
    """

    name: str
    fn: Callable[..., None]
    key: tuple[str, Any]
    transparent: bool = False
    row_norm: Callable[..., Any] | None = None
    doc: str = ""
    channel_dim: int | None = None
    norm: bool = False
    moment: Callable[..., Any] | None = None
    layout: bool = False  # keeps the layout of what it passes on (slices, concatenations, containers)
    #: its output moment is fixed by the op itself (softmax: ``1/S²``), not by a weight scale:
    #: a bilinear partner keeps it under ``gamma="one"``, where weight-scaled partners count 1
    structural: bool = False
    #: its output averages over positions (pooling, a mean, attention): its moment depends on
    #: how alike the averaged values are — a property of the data, not of the weights — so
    #: ``moments="batch"`` measures it on the live batch instead of assuming independence
    averages: bool = False
    #: its output is a sum of its inputs (residual adds): a normalization above the sum is
    #: above each input too (:func:`~fxbackmatch.analysis.guards.unnormalized_layers`)
    sums: bool = False

    def __call__(self, ctx) -> None:
        self.fn(ctx)


class RuleRegistry:
    """Rules keyed by ``("module", type)``, ``("function", callable)``, ``("method", name)``."""

    def __init__(self) -> None:
        self._rules: dict[tuple[str, Any], Rule] = {}

    def register(
        self,
        fn: Callable[..., None] | None = None,
        *,
        module: type | tuple[type, ...] = (),
        function: Callable | tuple[Callable, ...] = (),
        method: str | tuple[str, ...] = (),
        transparent: bool = False,
        row_norm: Callable[..., Any] | None = None,
        channel_dim: int | None = None,
        norm: bool = False,
        moment: Callable[..., Any] | None = None,
        layout: bool = False,
        structural: bool = False,
        averages: bool = False,
        sums: bool = False,
        override: bool = False,
    ):
        """Register ``fn`` for module types, function targets and/or method names.

        Usable as a decorator. Returns ``fn`` unchanged.
        """

        def deco(f: Callable[..., None]):
            keys = [("module", t) for t in _tuple(module)]
            keys += [("function", t) for t in _tuple(function)]
            keys += [("method", t) for t in _tuple(method)]
            if not keys:
                raise ValueError("register_rule needs at least one module=, function= or method=")
            for key in keys:
                if key in self._rules and not override:
                    raise DuplicateRuleError(
                        f"a rule for {_key_str(key)} is already registered "
                        f"({self._rules[key].name}); pass override=True to replace it"
                    )
            for key in keys:
                self._rules[key] = Rule(
                    name=getattr(f, "__name__", repr(f)),
                    fn=f,
                    key=key,
                    transparent=transparent,
                    row_norm=row_norm,
                    doc=(f.__doc__ or "").strip(),
                    channel_dim=channel_dim,
                    norm=norm,
                    moment=moment,
                    layout=layout,
                    structural=structural,
                    averages=averages,
                    sums=sums,
                )
            return f

        return deco(fn) if fn is not None else deco

    def unregister(self, *, module=(), function=(), method=()) -> None:
        for key in [("module", t) for t in _tuple(module)] + [
            ("function", t) for t in _tuple(function)
        ] + [("method", t) for t in _tuple(method)]:
            self._rules.pop(key, None)

    def has(self, kind: str, target: Any) -> bool:
        """Whether a rule is registered under ``(kind, target)`` (``"function"``/``"method"``)."""
        return (kind, target) in self._rules

    def has_module_rule(self, mod: nn.Module) -> bool:
        return self._module_rule(type(mod)) is not None

    def _module_rule(self, cls: type) -> Rule | None:
        for base in cls.__mro__:
            rule = self._rules.get(("module", base))
            if rule is not None:
                return rule
        return None

    def lookup(self, node: fx.Node, gm: fx.GraphModule) -> Rule | None:
        """The rule for ``node``: by module type (MRO), function target or method name."""
        if node.op == "call_module":
            return self._module_rule(type(gm.get_submodule(node.target)))
        if node.op == "call_function":
            rule = self._rules.get(("function", node.target))
            if rule is None and isinstance(node.target, type) and issubclass(node.target, tuple):
                rule = self._rules.get(("function", tuple))  # namedtuple outputs
            return rule
        if node.op == "call_method":
            return self._rules.get(("method", node.target))
        return None

    def __iter__(self) -> Iterator[Rule]:
        return iter(self._rules.values())

    def keys(self) -> list[tuple[str, Any]]:
        return list(self._rules)

    def __len__(self) -> int:
        return len(self._rules)


def _tuple(x) -> tuple:
    if x is None:
        return ()
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _key_str(key: tuple[str, Any]) -> str:
    kind, target = key
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)
    mod = getattr(target, "__module__", "")
    return f"{kind} {mod + '.' if mod and kind != 'method' else ''}{name}"


#: The default registry used by :func:`fxbackmatch.prepare`.
REGISTRY = RuleRegistry()


def register_rule(fn=None, **kwargs):
    """Register a rule in the default registry (see :class:`RuleRegistry.register`)."""
    return REGISTRY.register(fn, **kwargs)


def lookup_rule(node: fx.Node, gm: fx.GraphModule) -> Rule | None:
    return REGISTRY.lookup(node, gm)
