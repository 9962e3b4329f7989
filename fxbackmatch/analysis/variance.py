"""Second-moment inference: ``E[a²]`` of a value, estimated from the graph below it.

The BatchNorm rule needs ``Var[a]`` of its input (eq. 36: ``≈ ||W||²_{2,μ}`` of the weighted
layer that produces it, whose own input is normalized); a layer scale and a gate need
``E[x²]`` of the tensor they multiply. One estimator serves all of them:

* a weighted layer gives ``||W||²_{2,μ}·E[a²]`` of its input ``a`` (``E[a²] = 1``, the
  paper's normalized input, where the graph gives no estimate below: on the paper's nets
  every weighted layer reads a BN output or the data, and nothing changes);
* a rule's ``moment`` hook gives the output moment outright: a norm layer's 1 (γ counted as the
  plan's ``gamma`` mode says, the same forward as backward: 1 by default, ``mean(γ²)`` with
  ``gamma="exact"``), a sigmoid gate's ``1/4``, a product's moments multiplied (a layer scale:
  ``γ²·E[x²]``, γ counted the same way);
* ``transparent`` rules (pointwise ops, reshapes, pooling) are looked through;
* a concatenation along channels is the channel-weighted mean of its parts; the parts of a
  split (``chunk``, ``split``, ``unbind``) have the moment of what was split;
* an addition is the sum of its parts' moments (independent summands);
* anything else has no estimate (``None``): the caller falls back to a measured statistic
  or to 1, and says so in a note.

The estimates of values that average over positions (pooling, means, attention outputs:
``averages`` rules) take the averaged values as independent — ``E[x²]/K``. Real features are
not (post-activation means, neighbouring patches, similar tokens: up to 80× larger, measured
on MaxViT and Swin); with ``moments="batch"`` they are atoms measured on the live batch.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

from .context import fetch_attr
from .expr import AtomTable, Mono
from .registry import RuleRegistry
from ..capture.shapes import shape_of
from ..capture.topology import carries_tensor

__all__ = ["VarianceEstimator"]

_ADD = (operator.add, operator.iadd, torch.add)
_SPLITS = (torch.chunk, torch.split, torch.unbind, torch.tensor_split, "chunk", "split", "unbind", "tensor_split")


class VarianceEstimator:
    def __init__(self, gm: fx.GraphModule, registry: RuleRegistry, atoms: AtomTable, make_ctx: Callable,
                 measure_at: Callable[[fx.Node], Mono] | None = None):
        self.gm = gm
        self.registry = registry
        self.atoms = atoms
        self._make_ctx = make_ctx
        self._measure_at = measure_at  # moments="batch": an atom for a value that averages
        self._memo: dict[fx.Node, Mono | None] = {}

    def _reads_param(self, node: fx.Node) -> bool:
        """A matmul/einsum with a parameter operand is a weighted layer, not an average."""
        return any(a.op == "get_attr" and isinstance(fetch_attr(self.gm, a.target), torch.nn.Parameter)
                   for a in node.all_input_nodes)

    def __call__(self, node, depth: int = 0) -> Mono | None:
        if not isinstance(node, fx.Node) or depth > 256 or not node.op.startswith("call"):
            return None
        if node in self._memo:
            return self._memo[node]
        self._memo[node] = None  # cycles cannot happen in a DAG; guards re-entry
        rule = self.registry.lookup(node, self.gm)
        ins = [a for a in node.all_input_nodes if carries_tensor(a) and a.op != "get_attr"]
        out: Mono | None = None
        if self._measure_at is not None and rule is not None and rule.averages and not self._reads_param(node):
            out = self._measure_at(node)  # positions averaged: their likeness is the data's
        elif rule is not None and rule.moment is not None:
            out = rule.moment(self._make_ctx(node, rule))
        elif rule is not None and rule.row_norm is not None:
            out = rule.row_norm(self._make_ctx(node, rule))
            if out is not None and not rule.norm and not rule.transparent and ins:
                # a weighted layer: Var[Wa] = ||W||²row · E[a²]; the paper takes E[a²] = 1
                # (a normalized input) — so does this, where the graph gives no estimate
                below = self(ins[0], depth + 1)
                if below is not None:
                    out = out * below
        elif rule is not None and rule.transparent:
            out = self(ins[0], depth + 1) if ins else None
        elif node.op == "call_function" and node.target in (torch.cat, torch.concat):
            first = node.args[0]
            if isinstance(first, fx.Node):  # torch.cat(x.chunk(k)): the parts of one tensor
                self._memo[node] = out = self(first.all_input_nodes[0], depth + 1) if first.all_input_nodes else None
                return out
            parts = [a for a in first if isinstance(a, fx.Node) and carries_tensor(a)]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            sizes = [shape_of(p)[dim] if shape_of(p) else 0 for p in parts]
            moments = [self(p, depth + 1) for p in parts]
            if parts and all(v is not None for v in moments) and sum(sizes):
                total = sum(sizes)
                out = self.atoms.sum_of(
                    ((n / total, v) for n, v in zip(sizes, moments) if n), label=f"E[a²] of cat '{node.name}'"
                )
        elif node.target in _SPLITS and ins:  # the parts of a split have its elements' moment
            out = self(ins[0], depth + 1)
        elif (node.op == "call_function" and node.target in _ADD) or (node.op == "call_method" and node.target in ("add", "add_")):
            moments = [self(p, depth + 1) for p in ins]
            consts = [a for a in node.args[:2] if isinstance(a, (int, float)) and not isinstance(a, bool)]
            if len(ins) == 2 and all(v is not None for v in moments):
                out = self.atoms.sum_of(((1.0, v) for v in moments), label=f"E[a²] of sum '{node.name}'")
            elif len(ins) == 1 and consts and moments[0] is not None:  # x + c: E[x²] + c²
                c2 = float(consts[0]) ** 2
                out = moments[0] if c2 == 0 else self.atoms.sum_of(
                    ((1.0, moments[0]), (c2, Mono())), label=f"E[a²] of '{node.name}' (plus a constant)")
        self._memo[node] = out
        return out
