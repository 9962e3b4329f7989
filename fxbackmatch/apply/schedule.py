"""An inductor scheduler pass that keeps each parameter's update in one loop.

The fused step (``apply.fused``) updates every parameter and sums the squares of the weights it
writes. After functionalization its graph holds, per parameter, the new weight and the sum that
reads it near the front and the writes back into the weight and the optimizer state
(``copy_`` into the inputs) at the end. Inductor refuses to fuse nodes more than 64 apart in
that order ("Nodes are too far away", ``Scheduler.are_long_distant_nodes``), so from ~30
parameters on it writes each momentum buffer in a second loop that reads the buffer and the
gradient again: 1.5x a compiled SGD step on ResNet-50 instead of the memory limit.

:class:`ClusterUpdates` reorders the scheduler's nodes before fusion so that the nodes of one
parameter sit together: nodes are linked when they touch the same buffer, unless that buffer
is touched by more than ``max_sharing`` nodes (the scales, the learning rate); each linked
group is emitted whole, in the original order, where its first node stood. The order is kept
as it was when that would run a node before something it needs. Fusion is then inductor's own.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

__all__ = ["ClusterUpdates", "cluster_order", "compile_options"]

try:  # a cacheable pass (its uuid keys inductor's FX graph cache); plain callables bypass it
    from torch._inductor.custom_graph_pass import CustomSchedulerPass as _Base
except ImportError:  # pragma: no cover - older torch: a plain callable, the cache is bypassed
    _Base = object


def cluster_order(touched: Sequence[set[str]], needs: Sequence[set[int]], max_sharing: int = 8) -> list[int] | None:
    """The new order of nodes ``0..n-1`` (a topological order), or ``None`` to keep it.

    ``touched[i]``: the buffers node ``i`` reads or writes; ``needs[i]``: the nodes that must
    run before node ``i`` (every ancestor, not only the direct ones)."""
    n = len(touched)
    count = Counter(b for t in touched for b in t)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, bufs in enumerate(touched):
        for b in bufs:
            if count[b] <= max_sharing:
                parent[root(i)] = root(first.setdefault(b, i))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    order = [i for members in sorted(groups.values(), key=lambda m: m[0]) for i in members]
    pos = {i: k for k, i in enumerate(order)}
    if any(pos[j] > pos[i] for i in range(n) for j in needs[i]):
        return None
    return order


class ClusterUpdates(_Base):
    """``torch._inductor.config._pre_fusion_custom_pass``: the nodes of each parameter's
    update side by side (:func:`cluster_order`), so inductor fuses them into one loop."""

    def __init__(self, max_sharing: int = 8):
        self.max_sharing = max_sharing

    def __call__(self, nodes: list[Any]) -> list[Any]:
        try:
            index: dict[str, int] = {}
            for i, nd in enumerate(nodes):  # a grouped node (foreach) answers for the nodes inside it
                for sub in [nd, *getattr(nd, "snodes", ())]:
                    index[sub.get_name()] = i
            touched = [{d.name for d in nd.read_writes.reads} | {d.name for d in nd.read_writes.writes} for nd in nodes]
            needs = [{index[a] for a in nd.ancestors if a in index} for nd in nodes]
        except AttributeError:  # a scheduler whose nodes look different: leave its order alone
            return nodes
        order = cluster_order(touched, needs, self.max_sharing)
        if order is None or order == list(range(len(nodes))):
            return nodes
        out = [nodes[i] for i in order]
        for k, nd in enumerate(out):  # the distances inductor's fusion measures
            nd.min_order = nd.max_order = k
        return out

    def uuid(self) -> str:
        return f"fxbackmatch.apply.schedule.ClusterUpdates(max_sharing={self.max_sharing}, v1)"


def compile_options() -> dict[str, Any]:
    """``torch.compile(options=...)`` for the fused step: the pass, where this inductor has
    the hook (empty otherwise: then large updates read their weights first, see
    ``apply.fused.KEEP_MAX_PARAMS``)."""
    import torch._inductor.config as config

    if not hasattr(config, "_pre_fusion_custom_pass"):  # pragma: no cover - older torch
        return {}
    return {"_pre_fusion_custom_pass": ClusterUpdates()}
