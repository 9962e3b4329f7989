"""The per-step runtime around the generated factor function: the squared norms of every
weight, then the (compiled) chain, then the gradients multiplied in place with
``torch._foreach_mul_`` grouped by device and dtype. No ``.item()``, no host sync.

Compiled, the norms are read by one ``torch._foreach_norm`` per device and dtype (a
multi-tensor kernel; float32 accumulation at least; a BLAS ``dot`` per tensor on the CPU) and only the chain
(``factors_from_base``: logs, fork sums, one matrix-vector product) is compiled — a graph that
grows with the number of fork sums, not of weights; past :data:`COMPILE_MAX_STAGES` stages it
runs eagerly instead (ResNet-152: no compile at all, where 0.1 spent 35 s compiling one
inductor reduction per weight). On the CPU the chain runs on Python floats instead
(:class:`HostChain`: no sync to avoid there, and no per-op dispatch). Eagerly, the generated
``factors`` reads each weight in float64 chunks (the reference precision). Gradients that
are ``None`` are skipped outside the compiled region, so a changing set of missing gradients
never recompiles it.

On CUDA, a gradient-independent factor function (back-matching) is replayed as one CUDA
graph (:class:`GraphedScales`): its inputs — the weights, BatchNorm statistics and constants
— keep their addresses from step to step (the optimizer updates weights in place), so the
norms and the chain cost one launch instead of a hundred. The graph is captured again when
any input's address changes (``p.data = …``, ``.to()``), and never used for sharded or
data-parallel-synchronized statistics. With :attr:`Runtime.graph_rescale`, the multiply joins
the graph wherever the gradients' addresses recur (:mod:`.graphs`).
"""
from __future__ import annotations

import logging
import math
from itertools import repeat
from operator import attrgetter, is_
from typing import Callable

import torch
from torch import nn

import torch.distributed as dist

from .codegen import GeneratedFactors, multiplied
from .graphs import CaptureCache, GraphedRescale, GraphedScales, capturable, may_capture, rescale_key
from ..analysis.expr import EPS
from .norms import rows_read, sumsq, sumsq_many
from .sharding import group_of, is_dtensor, local_part
from .spread import spread_mul_
from .transfer import to_device

__all__ = ["Runtime", "HostChain", "GraphedScales", "spread_mul_", "stat_means", "COMPILE_MAX_STAGES"]

log = logging.getLogger(__name__)

#: chains with more sequential stages (fork sums) than this run eagerly: a few hundred tiny
#: ops per step (~1–5 ms on a CPU) instead of a first-call compile that grows with the
#: number of stages (57 s for ResNet-152's ~150 stages)
COMPILE_MAX_STAGES = 24
#: models with at most this many tensors to read compile the whole function, norms included
#: (inductor's fused reductions read at copy bandwidth; its compile time grows per tensor)
FUSED_MAX_TENSORS = 64


class Runtime:
    """Holds references (never copies) to the tensors the generated function reads."""

    def __init__(
        self,
        gen: GeneratedFactors,
        params: dict[str, nn.Parameter],
        buffers: dict[str, torch.Tensor],
        targets: list[str],
        compile: bool,
    ) -> None:
        self.gen = gen
        self.compile = compile
        self.weights = [params[r] for r in gen.weight_refs]
        self.grad_params = [params[r] for r in gen.grad_refs]
        self.stat_refs = list(gen.stat_refs)
        self.buffers = buffers
        self.targets = [params[t] for t in targets]
        self._fn = None
        self._consts: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._sharded = any(is_dtensor(t) for t in self.weights + self.targets)
        #: weights on several devices (``device_map``, pipeline stages): each weight's sum is
        #: read where it lives and moved to :meth:`device`, never stacked in place. Read when the
        #: factor function is built (the first step), so a model placed after prepare counts
        self._split: bool | None = None
        #: per-step factor on the scales (``token_mask``: 1/real-token share on token-wise
        #: layers): returns a float64 tensor in target order, or ``None``
        self.multiplier: Callable[[], torch.Tensor | None] | None = None
        #: the plan's ``cap`` where a multiplier is set: applied once, after it (a scale clamped
        #: before it too would end outside what the cap alone gives: ``clamp(s)·k ≠ clamp(s·k)``)
        self.post_cap: float | None = None
        #: replay the scales as a CUDA graph where that is sound (see the module docstring)
        self.cuda_graph = True
        self._graphed: GraphedScales | None = None
        #: multiply through :func:`spread_mul_` (None: on CUDA, where launches cost more than bytes)
        self.flat_multiply: bool | None = None
        #: replay the whole rescale — scales and multiply — as one CUDA graph per recurring set of
        #: gradient addresses (:class:`~.graphs.GraphedRescale`, :class:`~.graphs.CaptureCache`);
        #: off until a GPU measures it (``bench_rescale.py``'s "graphed rescale" rows)
        self.graph_rescale = False
        self._rescale_graphs = CaptureCache()
        self._spread_cache: dict = {}
        self._group_cache: dict = {}

    @property
    def fn(self):
        """``fn(weights, grads, stats, C) -> scales``: eager, the generated ``factors``;
        compiled, foreach norms then the compiled chain. Traced inside a caller's compiled
        region (a compiled optimizer step), the generated function itself, uncached: dynamo
        inlines it, where building a compiled one would itself be traced (and break the
        caller's graph under a wrapped ``torch.compile``, as importing Lightning makes it)."""
        if self._fn is None:
            if torch.compiler.is_compiling():
                return self.gen.fn
            split = self.split()
            if self.compile and not split and self.gen.n_stages <= COMPILE_MAX_STAGES and (
                len(self.weights) + len(self.grad_params) <= FUSED_MAX_TENSORS
            ):  # few tensors: inductor fuses every reduction into one read (0.1's path; norms.sumsq)
                self._fn = torch.compile(self.gen.fn, fullgraph=True, dynamic=False)
            elif self.compile or split:
                chain = self.gen.from_base
                host = HostChain.of(self.gen)
                if self.compile and self.gen.n_stages <= COMPILE_MAX_STAGES and not (host and self.device().type == "cpu"):
                    chain = torch.compile(chain, fullgraph=True, dynamic=False)
                dev = self.device() if split else None  # else the sums stay where they are (a moved model follows)

                inverse, n_sq = self.gen.stat_inverse, self.gen.n_grad_sq

                def fn(weights, grads, stats, consts):
                    base = _base(weights, grads, stats, inverse, n_sq, dev)
                    if host is not None and base.device.type == "cpu":  # no sync to avoid on the host
                        return torch.tensor(host(base.tolist()), dtype=torch.float64)
                    return chain(base, consts)

                self._fn = fn
            else:
                self._fn = self.gen.fn
        return self._fn

    def split(self) -> bool:
        """Whether the weights and targets live on more than one device (read once)."""
        if self._split is None:
            self._split = len({local_part(t)[0].device for t in self.weights + self.targets}) > 1
        return self._split

    def device(self) -> torch.device:
        for t in self.targets or self.weights:  # a DTensor's own .device may not be its shard's
            return local_part(t)[0].device if self._sharded else t.device
        return torch.device("cpu")

    @property
    def sharded(self) -> bool:
        return self._sharded

    @torch.no_grad()
    def scales(self) -> torch.Tensor:
        """float64 scales of the targets, on the parameters' device."""
        mult = self.multiplier() if self.multiplier is not None else None  # first: it refills per-step atoms
        out = self._scales()
        if mult is not None:
            mult = to_device(mult, out.device)  # a token share from a host mask: no sync
        return multiplied(out, mult, self.post_cap)

    def _scales(self) -> torch.Tensor:
        dev = self.device()
        grads = []
        for p in self.grad_params:
            g = p.grad
            grads.append(g if g is not None else torch.zeros_like(p))
        stats = [self.buffers[r] for r in self.stat_refs]
        consts = self._consts_on(dev)
        if self._sharded:
            return self._sharded_scales(grads, stats, consts, dev)
        if stats and _data_parallel_world() > 1:
            return self._synced_stat_scales(grads, stats, consts, dev)
        if self.cuda_graph and not grads and capturable(dev) and not self.split() and may_capture():
            g = self._graphed
            if g is None or not g.matches(self.weights, stats):
                try:
                    g = self._graphed = GraphedScales(self.fn, self.weights, stats, consts)
                except Exception as e:  # capture is an optimization: fall back, say why once
                    log.warning("fxbackmatch: CUDA graph capture of the scales failed (%s: %s); "
                                "computing them without a graph", type(e).__name__, e)
                    self.cuda_graph = False
                    return self.fn(self.weights, grads, stats, consts)
            return g()
        return self.fn(self.weights, grads, stats, consts)

    def _consts_on(self, dev: torch.device) -> dict[str, torch.Tensor]:
        consts = self._consts.get(dev)
        if consts is None:
            consts = self._consts[dev] = self.gen.constants_on(dev)
        return consts

    def _graphed_rescale(self) -> torch.Tensor | None:
        """The rescale as one replay where a graph for these gradients is kept or due: the
        scales, or ``None`` (not on the current CUDA device, sharded or synchronized inputs, a
        rule reading gradients, a sparse gradient, no graph this step): take the plain path."""
        if (self._sharded or self.grad_params or not self.cuda_graph or not self._rescale_graphs.enabled
                or not may_capture()):
            return None
        dev = self.device()
        if not capturable(dev) or self.split():
            return None
        stats = [self.buffers[r] for r in self.stat_refs]
        if stats and _data_parallel_world() > 1:
            return None
        grads = list(map(_GRAD, self.targets))
        n_mult, cap = (len(self.targets), self.post_cap) if self.multiplier is not None else (0, None)
        cache = self._rescale_graphs
        # the graph the last step replayed, checked first (InputGuard: ~30 µs for ResNet-50's
        # 216 tensors on a 2-core Xeon); then the full key (~70 µs), which finds any kept graph
        # or counts this layout
        last = cache.last
        g = cache.recent(lambda g: g.fits(self.weights, stats, grads, n_mult, cap))
        if g is None:
            if any(t is not None and t.layout != torch.strided for t in grads):
                return None
            g = cache.lookup(
                (rescale_key(self.weights, stats, grads), n_mult, cap),
                lambda: GraphedRescale(self.fn, self.weights, grads, stats, self._consts_on(dev), self._groups(grads),
                                       n_mult, cap))
            if g is None:
                return None
            if g is last:  # its guard refused what the key accepts (requires_grad, autocast): guard these
                g.reguard(self.weights, stats, grads)
        return g(self.multiplier() if n_mult else None)  # the multiplier first refills per-step atoms

    def _synced_stat_scales(self, grads, stats, consts, dev) -> torch.Tensor:
        """DDP: weights are replicated, but each rank's BatchNorm running statistics are its
        own; one all-reduce averages the statistics atoms so every rank gets the same scales."""
        base = _base(self.weights, grads, stats, self.gen.stat_inverse, self.gen.n_grad_sq)
        n = len(self.weights) + len(grads)
        part = base[n:].clone()
        dist.all_reduce(part)  # the one collective of the step
        base = torch.cat([base[:n], part / dist.get_world_size()])
        return self.gen.from_base(base.to(dev), consts)

    def _sharded_scales(self, grads, stats, consts, dev) -> torch.Tensor:
        """Sharded (FSDP2 / DTensor) weights: each rank sums the squares of its local shard,
        one all-reduce adds all layers' partial sums at once, then the chain runs as usual.
        Unsharded tensors contribute ``1/world`` of their sum on every rank."""
        parts, group, world = [], None, 1
        for t in list(self.weights) + list(grads):
            local, shards = local_part(t)
            if shards > 1:
                if group is None:
                    group, world = group_of(t)
            parts.append((local, shards))
        if group is None:
            world = dist.get_world_size() if dist.is_initialized() else 1
        n_sq = len(self.weights) + self.gen.n_grad_sq  # then row counts (disjoint row shards add up)
        partial = torch.stack(
            [(sumsq(l) if k < n_sq else rows_read(l)) / (1.0 if n > 1 else world) for k, (l, n) in enumerate(parts)]
        ) if parts else torch.zeros(0, dtype=torch.float64, device=dev)
        stat = stat_means(stats, self.gen.stat_inverse)
        if stat:  # each rank's statistics, averaged in the same collective
            partial = torch.cat([partial, torch.stack([t.to(partial.device) for t in stat]) / world])
        if dist.is_initialized():
            dist.all_reduce(partial, group=group)  # the one collective of the step
        base = partial
        return self.gen.from_base(base.to(dev), consts)

    @torch.no_grad()
    def rescale_(self, only: set[int] | None = None, scales: torch.Tensor | None = None) -> torch.Tensor:
        """Multiply the targets' gradients by their scales (only those whose ``id`` is in
        ``only``, when given: the parameters of one optimizer); ``scales``: computed before."""
        if scales is None and only is None and self.graph_rescale:
            out = self._graphed_rescale()
            if out is not None:
                return out
        scales = self.scales() if scales is None else scales
        compiling = torch.compiler.is_compiling()  # dynamo traces loops, not C-level maps
        grads = [p.grad for p in self.targets] if compiling else list(map(_GRAD, self.targets))
        if only is not None:
            grads = [g if id(p) in only else None for p, g in zip(self.targets, grads)]
        if self._sharded:
            grads = [None if g is None else local_part(g)[0] for g in grads]
        # the spread multiply keeps a buffer across steps: never inside a graph capture or a
        # compiled region (where it would outlive the graph's memory pool, or not be traced)
        flat, may = self.flat_multiply, may_capture()
        for (dev, dtype), idx in (_grouped(grads) if compiling else self._groups(grads)):
            gs = grads if len(idx) == len(grads) else [grads[i] for i in idx]
            if may and (flat if flat is not None else dev.type == "cuda"):
                spread_mul_(gs, scales.to(device=dev, dtype=dtype), idx, self._spread_cache)
            else:
                sc = scales.to(device=dev, dtype=dtype).unbind(0)
                torch._foreach_mul_(gs, [sc[i] for i in idx])
        return scales

    def _groups(self, grads: list[torch.Tensor | None]) -> list[tuple[tuple[torch.device, torch.dtype], list[int]]]:
        """:func:`_grouped`, kept per pattern: a step reads each gradient's device and dtype
        (C-level maps), nothing else."""
        if not any(map(is_, grads, repeat(None))):
            sig = (tuple(map(_DEVICE, grads)), tuple(map(_DTYPE, grads)))
        else:
            sig = tuple(None if g is None else (g.device, g.dtype) for g in grads)
        groups = self._group_cache.get(sig)
        if groups is None:
            if len(self._group_cache) >= 16:  # a few patterns (one per optimizer's ``only``) in practice
                self._group_cache.clear()
            groups = self._group_cache[sig] = _grouped(grads)
        return groups


def _grouped(grads: list[torch.Tensor | None]) -> list[tuple[tuple[torch.device, torch.dtype], list[int]]]:
    """The gradients' positions grouped by device and dtype, ``None`` skipped."""
    by: dict[tuple, list[int]] = {}
    for i, g in enumerate(grads):
        if g is not None:
            by.setdefault((g.device, g.dtype), []).append(i)
    return list(by.items())


_GRAD, _DEVICE, _DTYPE = attrgetter("grad"), attrgetter("device"), attrgetter("dtype")


class HostChain:
    """``factors_from_base`` on Python floats, for tensors that live on the CPU: a few hundred
    multiply-adds (the generated chain's sparse rows) instead of ~9 dispatched tensor ops per
    fork-sum stage (ResNet-50: 32 stages, ~2.5 ms eagerly; compiled, 45 s of compile and
    0.6 ms per call). Same arithmetic as the generated code: log of the clamped base, one
    log-sum-exp per sum atom, zero coefficients ignored (a non-finite norm reaches only the
    scales that depend on it), the cap, ``exp``. Only for chains whose stages are all sums."""

    def __init__(self, stages, final, final_b, cap: float | None, lo: list[float] | None = None) -> None:
        self.stages, self.final, self.final_b, self.lo = stages, final, final_b, lo
        self.log_cap = None if cap is None else math.log(cap)

    @classmethod
    def of(cls, gen: GeneratedFactors) -> "HostChain | None":
        c = gen.constants
        sparse = lambda m: [[(j, a) for j, a in enumerate(r) if a != 0] for r in m.tolist()]  # noqa: E731
        stages = [(sparse(c[k]), c[k[:-2] + "_b"].tolist()) for k in c if k.endswith("_A") and k != "A"]
        if len(stages) != gen.n_stages or "A" not in c or not len(c["b"]):
            return None  # LARS / LSALR atoms: keep the generated chain
        lo = c["lo"].tolist() if "lo" in c else None  # the reference floor of each base entry
        return cls(stages, sparse(c["A"].reshape(len(c["b"]), -1)), c["b"].tolist(), gen.cap, lo)

    def __call__(self, base: list[float]) -> list[float]:
        lo = self.lo or [EPS] * len(base)
        x = [math.log(max(v, f)) for v, f in zip(base, lo)]  # max keeps a NaN, as clamp_min does
        for rows, bs in self.stages:
            terms = [sum(a * x[j] for j, a in row) + b for row, b in zip(rows, bs)]
            x.append(_logsumexp(terms))
        out = []
        for row, b in zip(self.final, self.final_b):
            v = sum(a * x[j] for j, a in row) + b
            if self.log_cap is not None:
                v = min(max(v, -self.log_cap), self.log_cap)
            out.append(math.inf if v > 709.78 else math.exp(v))
        return out


def _logsumexp(terms: list[float]) -> float:
    if any(t != t for t in terms):
        return math.nan
    m = max(terms)
    if math.isinf(m):
        return m
    return m + math.log(sum(math.exp(t - m) for t in terms))


def stat_means(stats, inverse) -> list[torch.Tensor]:
    """float64 mean of each statistic, or ``mean(1/(x + eps))`` where ``inverse`` gives an eps."""
    from ..analysis.expr import EPS

    return [
        s.detach().to(torch.float64).mean() if eps is None
        else (s.detach().to(torch.float64) + eps).clamp_min(EPS).reciprocal().mean()
        for s, eps in zip(stats, inverse)
    ]


def _base(weights, grads, stats, inverse, n_sq: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """The stacked ``[weight_sq, grad_sq, rows, stat]`` vector ``factors_from_base`` takes, on
    ``device`` (default: the first part's); each part is read where its tensor lives."""
    grads = list(grads)
    n_sq = len(grads) if n_sq is None else n_sq
    parts = sumsq_many(list(weights)) + sumsq_many(grads[:n_sq]) + [rows_read(g) for g in grads[n_sq:]]
    parts += stat_means(stats, inverse)
    if not parts:
        return torch.zeros(0, dtype=torch.float64, device=device)
    dev = parts[0].device if device is None else device
    return torch.stack([p.to(dev) for p in parts])


def _data_parallel_world() -> int:
    """World size when running under an initialized process group (DDP), else 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()
