"""Guards: a plan never silently produces absurd scales.

* :func:`out_of_range` — every scale outside :data:`SCALE_RANGE` under the current weights,
  with its layer and the approximations (notes) that produced its chain;
* :func:`unnormalized_layers` — weighted layers whose output reaches no normalization layer
  before the next weighted layer (the paper's precondition, §3.1: every intermediate layer
  is bonded with a BN); their factors rest on row norms of an unnormalized signal.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch.fx as fx

from .records import LayerRecord
from .registry import RuleRegistry

__all__ = ["SCALE_RANGE", "out_of_range", "unnormalized_layers"]

#: The documented range of sound scales: outside it a plan warns (and the report flags).
SCALE_RANGE = (1e-6, 1e6)


def out_of_range(scales: dict[str, float], layers: Iterable[LayerRecord], lo: float = SCALE_RANGE[0], hi: float = SCALE_RANGE[1]) -> list[str]:
    """One line per parameter whose scale lies outside ``[lo, hi]`` (or is not finite)."""
    owner = {}
    for rec in layers:
        for name, _ in rec.params:
            owner.setdefault(name, rec)
    out = []
    for name, v in scales.items():
        if math.isfinite(v) and lo <= v <= hi:
            continue
        rec = owner.get(name)
        where = f"layer '{rec.name}' ({rec.kind})" if rec else "no layer"
        why = f"; approximations: {', '.join(rec.notes)}" if rec and rec.notes else ""
        out.append(f"scale of '{name}' is {v:.3g}, outside [{lo:g}, {hi:g}] — {where}{why}")
    return out


def unnormalized_layers(gm: fx.GraphModule, registry: RuleRegistry, layer_nodes: Iterable[str]) -> set[str]:
    """Names of the layer nodes (weighted, not norms) from whose output no path through
    transparent ops reaches a normalization layer, and that do not feed an output directly."""
    nodes = {n.name: n for n in gm.graph.nodes}
    flagged: set[str] = set()
    for name in layer_nodes:
        node = nodes.get(name)
        if node is None:
            continue
        rule = registry.lookup(node, gm)
        if rule is None or rule.norm or rule.row_norm is None or rule.transparent:
            continue  # norm layers, parameter ops (add/mul) and the like
        if not _reaches_norm(node, gm, registry):
            flagged.add(name)
    return flagged


def _reaches_norm(node: fx.Node, gm: fx.GraphModule, registry: RuleRegistry) -> bool:
    seen: set[fx.Node] = set()
    stack = list(node.users)
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        if u.op == "output":
            return True  # the output layer needs no norm above it
        rule = registry.lookup(u, gm)
        if rule is None:
            continue
        if rule.norm:
            return True
        if rule.transparent or rule.layout or rule.sums:  # through residual adds to the stream's norm
            stack.extend(u.users)
    return False
