"""The scheduler pass that keeps each parameter's update in one loop (issue 23, part 4).

``cluster_order`` against hand-built graphs; the pass inside inductor against the eager update
(same numbers) and against inductor without it (one loop per parameter instead of a second loop
that re-reads the momentum buffers)."""
from __future__ import annotations

import re

import pytest
import torch

from fxbackmatch.apply.updates import sgd_update
from fxbackmatch.apply.schedule import ClusterUpdates, cluster_order, compile_options


def fused_graph(n: int) -> tuple[list[str], list[set[str]], list[set[int]]]:
    """The shape of the fused step's scheduler graph for ``n`` parameters: per parameter the
    new weight and its sum first, the momentum buffer and the two writes back at the end; every
    node reads the scales."""
    names: list[str] = []
    touched: list[set[str]] = []
    for i in range(n):
        names += [f"w{i}", f"sum{i}"]
        touched += [{"scales", f"p{i}", f"g{i}", f"b{i}", f"W{i}"}, {f"W{i}", f"S{i}"}]
    for i in range(n):
        names += [f"bnew{i}", f"bstore{i}", f"pstore{i}"]
        touched += [{"scales", f"g{i}", f"b{i}", f"B{i}"}, {f"b{i}", f"B{i}"}, {f"p{i}", f"W{i}"}]
    at = {name: k for k, name in enumerate(names)}
    needs: list[set[int]] = [set() for _ in names]
    for i in range(n):
        needs[at[f"sum{i}"]] = {at[f"w{i}"]}
        needs[at[f"bstore{i}"]] = {at[f"bnew{i}"], at[f"w{i}"]}  # the old buffer is read first
        needs[at[f"pstore{i}"]] = {at[f"w{i}"], at[f"sum{i}"]}
    return names, touched, needs


def test_each_parameter_s_nodes_come_together():
    names, touched, needs = fused_graph(40)
    order = cluster_order(touched, needs)
    assert order is not None
    got = [names[k] for k in order]
    want = [f"{kind}{i}" for i in range(40) for kind in ("w", "sum", "bnew", "bstore", "pstore")]
    assert got == want


def test_a_buffer_many_nodes_touch_links_nothing():
    names, touched, needs = fused_graph(3)  # 'scales' is read by 6 nodes: still a link at 8
    assert cluster_order(touched, needs, max_sharing=8) == list(range(len(names)))  # one group
    order = cluster_order(touched, needs, max_sharing=5)
    assert [names[k] for k in order] == [f"{kind}{i}" for i in range(3) for kind in ("w", "sum", "bnew", "bstore", "pstore")]


def test_an_order_that_would_run_a_node_early_is_refused():
    # a0 and a1 share buffer x; b needs a0 and is needed by a1: grouping a0 with a1 would put
    # a1 before b
    touched = [{"x"}, {"y"}, {"x"}]
    needs = [set(), {0}, {1}]
    assert cluster_order(touched, needs) is None


def sgd_with_sums(n: int):
    def step(params, grads, bufs, scales, lrs, momenta):
        new_sq = [None] * n
        sgd_update(params, grads, bufs, scales, list(range(n)), lrs, momenta, [0] * n, 1e-4, [False],
                    list(range(n)), new_sq)
        return new_sq
    return step


def loops(code: str) -> int:
    return len(re.findall(r"for\(int64_t x0=", code))


def compiled_update(n: int, options: dict, momentum: float | torch.Tensor = 0.9) -> int:
    """Loops in inductor's code for an ``n``-parameter SGD update with sums, after checking its
    numbers against the eager update; ``momentum`` compiled in (a float) or read (a tensor)."""
    from torch._inductor.utils import run_and_get_code

    g = torch.Generator().manual_seed(0)
    make = lambda: [torch.randn(256, generator=g) for _ in range(n)]  # noqa: E731
    params, grads, bufs = make(), make(), make()
    scales = torch.rand(n, dtype=torch.float64, generator=g) + 0.5
    lrs, momenta = [torch.tensor(0.1, dtype=torch.float64)], [momentum]
    want_p, want_b = [p.clone() for p in params], [b.clone() for b in bufs]
    want_sq = sgd_with_sums(n)(want_p, grads, want_b, scales, lrs, momenta)
    fn = torch.compile(sgd_with_sums(n), fullgraph=True, dynamic=False, options=options)
    sq, codes = run_and_get_code(fn, params, grads, bufs, scales, lrs, momenta)
    for got, want in zip(params + bufs, want_p + want_b):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for got, want in zip(sq, want_sq):  # compiled on the CPU: float32 cascade sums (norms.sumsq)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    return sum(loops(c) for c in codes)


N_PARAMS = 34  # past inductor's 64-node fusion distance for this graph (5 nodes a parameter)


@pytest.mark.skipif(not compile_options(), reason="this inductor has no pre-fusion hook")
def test_the_pass_puts_each_update_in_one_loop_with_the_eager_numbers():
    """With the pass each parameter is one loop (weight, gradient and buffer read once, weight
    and buffer written, the sum accumulated): the eager update's numbers."""
    assert compiled_update(N_PARAMS, compile_options()) <= N_PARAMS + 2  # and the scales' own


@pytest.mark.slow
def test_without_the_pass_inductor_splits_the_update():
    """What the pass removes: inductor alone writes the buffers in second loops."""
    assert compiled_update(N_PARAMS, {}) > N_PARAMS + 10


@pytest.mark.slow
@pytest.mark.skipif(not compile_options(), reason="this inductor has no pre-fusion hook")
def test_a_momentum_read_from_memory_splits_some_updates():
    """Why the fused step compiles momentum in until a scheduler moves it: read from a tensor,
    it costs extra loops even with the pass (same numbers). Should a later inductor fuse it as
    well, this fails: then the step can pass momentum and betas from the start."""
    assert compiled_update(N_PARAMS, compile_options(), torch.tensor(0.9, dtype=torch.float64)) > N_PARAMS + 2


def test_the_pass_leaves_a_foreign_graph_alone():
    class Node:  # a scheduler node without read_writes
        def get_name(self):
            return "x"

    nodes = [Node()]
    assert ClusterUpdates()(nodes) is nodes


def test_a_graph_with_foreach_nodes_keeps_the_eager_numbers():
    """A foreach update with sums, which the pass reorders (per parameter), keeps the eager
    numbers. (On CUDA foreach ops arrive as grouped scheduler nodes, whose members' names then
    stand for the group in the dependency check; on the CPU they are plain nodes.)"""

    def step(params, bufs, grads):
        torch._foreach_mul_(bufs, 0.9)
        torch._foreach_add_(bufs, grads)
        torch._foreach_add_(params, bufs, alpha=-0.1)
        return [torch.sum(p * p, dtype=torch.float64) for p in params]

    g = torch.Generator().manual_seed(0)
    make = lambda: [torch.randn(64, generator=g) for _ in range(6)]  # noqa: E731
    params, bufs, grads = make(), make(), make()
    want_p, want_b = [p.clone() for p in params], [b.clone() for b in bufs]
    want = step(want_p, want_b, grads)
    got = torch.compile(step, fullgraph=True, dynamic=False, options=compile_options())(params, bufs, grads)
    for a, b in zip(params + bufs, want_p + want_b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want):  # the sums of weights that differ from eager's in the last bit
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
