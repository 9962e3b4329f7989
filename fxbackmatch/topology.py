"""The FX graph as a networkx DiGraph, walked from the outputs to the inputs."""
from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx

__all__ = ["build_digraph", "backward_order", "output_nodes", "carries_tensor", "numel_of"]


def carries_tensor(node: fx.Node) -> bool:
    """True if the node's value is a tensor or a (nested) tuple/list holding tensors."""
    return _count(node.meta.get("val"))[0] > 0


def numel_of(node: fx.Node) -> int:
    """Total number of elements in the node's tensor value(s)."""
    return _count(node.meta.get("val"))[1]


def _count(val) -> tuple[int, int]:
    if isinstance(val, torch.Tensor):
        return 1, val.numel()
    if isinstance(val, (tuple, list)):
        t = n = 0
        for v in val:
            a, b = _count(v)
            t, n = t + a, n + b
        return t, n
    return 0, 0


def build_digraph(gm: fx.GraphModule) -> nx.DiGraph:
    """One graph node per FX node (keyed by the FX node), one edge per data dependency."""
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n)
        for inp in n.all_input_nodes:
            g.add_edge(inp, n)
    return g


def output_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The tensor-valued nodes the graph returns (tuples/dicts are flattened)."""
    outs: list[fx.Node] = []
    for n in gm.graph.nodes:
        if n.op == "output":
            fx.node.map_arg(n.args, lambda a: outs.append(a))
    return [o for o in dict.fromkeys(outs) if carries_tensor(o)]


def backward_order(g: nx.DiGraph) -> list[fx.Node]:
    """Nodes in reverse topological order (every consumer before its producers)."""
    return list(reversed(list(nx.lexicographical_topological_sort(g, key=lambda n: _pos(n)))))


def _pos(n: fx.Node) -> str:
    # FX nodes are already in topological order; sort ties by that order
    return f"{n.meta.get('fxbackmatch.index', 0):09d}"
