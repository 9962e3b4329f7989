"""CUDA graphs of the per-step runtime: where launches, not bytes, cost the time.

:class:`GraphedScales` replays the gradient-independent factor function (the norms of every
weight and the chain) as one graph; its inputs keep their addresses from step to step (the
optimizer updates weights in place) and a moved input captures it again.

:class:`GraphedRescale` (``Runtime.graph_rescale``) replays the whole rescale — the scales and
every gradient multiplied by its scale — as one graph, for one set of gradient addresses.
Gradients keep their addresses where they are zeroed rather than freed
(``zero_grad(set_to_none=False)``, DDP's bucket views) and often where the caching allocator
hands the same blocks back each step; :class:`CaptureCache` captures a layout the second time
it sees it, replays it while it recurs and stops trying where addresses never repeat. A replay
happens only when every input lies where the graph reads it (address, dtype, shape) and every
gradient where it writes it (address, dtype, shape, strides), so a moved or reallocated
gradient is multiplied by the plain path, never by a stale graph. A step checks the graph it
replayed last with :class:`InputGuard` (the addresses, and the metadata in dynamo's C++
``TensorGuards``) and builds :func:`rescale_key` only where that fails. Graphs are captured only on
the current CUDA device (:func:`capturable`) and in ``thread_local`` mode (:data:`CAPTURE_MODE`).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from itertools import repeat
from operator import attrgetter, is_
from typing import Callable, Hashable

import torch

from .codegen import multiplied

__all__ = [
    "CAPTURE_MODE", "CaptureCache", "GraphedRescale", "GraphedScales", "InputGuard", "capturable", "may_capture",
    "rescale_key",
]

log = logging.getLogger(__name__)

_SHAPE, _DTYPE = attrgetter("shape"), attrgetter("dtype")
_PTR, _STRIDE = torch.Tensor.data_ptr, torch.Tensor.stride

try:  # dynamo's C++ check of tensors' metadata (private: the Python key where it is missing)
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - every torch this project supports has it
    _TensorGuards = None


#: ``torch.cuda.graph``'s ``capture_error_mode``: only this thread's unsafe calls break a
#: capture. Under the default ("global") a DataLoader's pin-memory thread allocating pinned
#: memory while the rescale is captured would fail there (its ``cuMemHostAlloc``) or invalidate
#: the capture; inductor's own captures and vLLM's use "thread_local" for the same reason
CAPTURE_MODE = "thread_local"


def capturable(dev: torch.device) -> bool:
    """Whether a graph of work on ``dev`` can be captured here: a CUDA device that is the
    current one (work on another device would not be on the capture stream: it would run once,
    eagerly, and the graph replay nothing)."""
    return dev.type == "cuda" and (dev.index is None or dev.index == torch.cuda.current_device())


def may_capture() -> bool:
    """Whether eager CUDA-side tricks are safe here: not while torch.compile traces the step
    (a graph capture is not traceable) and not inside the caller's own CUDA graph capture
    (a nested capture, or a first-call host copy, would break it; the caller's graph already
    removes the launches these tricks save)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _inputs_key(ts: list[torch.Tensor]) -> tuple:
    """Every tensor's address, dtype and shape (C-level maps: ~0.1 µs a tensor each)."""
    return tuple(map(_PTR, ts)), tuple(map(_DTYPE, ts)), tuple(map(_SHAPE, ts))


def rescale_key(weights: list[torch.Tensor], stats: list[torch.Tensor],
                grads: list[torch.Tensor | None]) -> tuple:
    """What a :class:`GraphedRescale` reads and writes: the inputs' addresses, dtypes and
    shapes, and the gradients' (``None`` where a target has none) with their strides too."""
    if any(map(is_, grads, repeat(None))):
        where = tuple(i for i, g in enumerate(grads) if g is not None)
        grads = [grads[i] for i in where]
    else:
        where = None
    return _inputs_key([*weights, *stats]), where, _inputs_key(grads), tuple(map(_STRIDE, grads))


class InputGuard:
    """Whether tensors are still the ones a graph was captured for, as far as a replay can
    tell: every address, dtype, device, shape and stride the same (a superset of what
    :func:`rescale_key` compares). The addresses are compared in Python, the metadata in C++ by
    dynamo's ``TensorGuards`` (with the addresses, ~30 µs for ResNet-50's 216 tensors on a
    2-core Xeon, where building and comparing the key takes ~70), which also compares
    ``requires_grad``, the dispatch keys (autocast on or off) and the Python type: stricter
    than the key, never looser. A tensor listed twice (a weight two atoms read) is checked once
    and its repeats for being the same object (``TensorGuards`` refuses repeats). Where torch
    has no ``TensorGuards`` or it refuses the tensors, the key's own tuples are compared."""

    def __init__(self, ts: list[torch.Tensor]) -> None:
        self.n = len(ts)
        self.ptrs = tuple(map(_PTR, ts))
        first: dict[int, int] = {}
        for i, t in enumerate(ts):
            first.setdefault(id(t), i)
        #: positions of each tensor's first listing, and (repeat, first) position pairs; None: no repeats
        self.unique = None if len(first) == len(ts) else sorted(first.values())
        self.repeats = [(i, first[id(t)]) for i, t in enumerate(ts) if first[id(t)] != i]
        checked = ts if self.unique is None else [ts[i] for i in self.unique]
        self._check: Callable[..., bool]
        try:
            self._check = _TensorGuards(*checked, dynamic_dims_sizes=[list(t.shape) for t in checked],
                                        dynamic_dims_strides=[list(t.stride()) for t in checked]).check
        except Exception:  # None (no TensorGuards), or a signature this torch does not take
            meta = _meta(checked)
            self._check = lambda *now: _meta(now) == meta

    def __call__(self, ts: list[torch.Tensor | None]) -> bool:
        if len(ts) != self.n:
            return False
        try:
            # the addresses first: a tensor without storage (sparse) raises here, in Python; the C++
            # check has no error translation, and a sparse tensor's strides would abort the process
            if tuple(map(_PTR, ts)) != self.ptrs:
                return False
        except (RuntimeError, TypeError):  # None where a gradient was, a sparse gradient (no data_ptr)
            return False
        if self.unique is None:
            return self._check(*ts)
        return all(ts[i] is ts[j] for i, j in self.repeats) and self._check(*[ts[i] for i in self.unique])


def _meta(ts) -> tuple:
    return tuple(map(_DTYPE, ts)), tuple(map(_SHAPE, ts)), tuple(map(_STRIDE, ts)), tuple(t.device for t in ts)


def _warm(fn: Callable, weights, stats, consts) -> None:
    """Run ``fn`` twice on a side stream (compiling it, if it is compiled): what a capture needs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(weights, [], stats, consts)
    torch.cuda.current_stream().wait_stream(side)


class GraphedScales:
    """The gradient-independent factor function captured once as a CUDA graph: ``fn`` runs
    twice on a side stream (compiling, if it is compiled), then once under capture; each
    call replays it and returns a copy of the static output."""

    def __init__(self, fn: Callable, weights: list[torch.Tensor], stats: list[torch.Tensor],
                 consts: dict[str, torch.Tensor]) -> None:
        self.key = self._key(weights, stats)
        _warm(fn, weights, stats, consts)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode=CAPTURE_MODE):
            self.out = fn(weights, [], stats, consts)

    @staticmethod
    def _key(weights: list[torch.Tensor], stats: list[torch.Tensor]) -> tuple:
        """Every input's address, dtype and shape."""
        return _inputs_key([*weights, *stats])

    def matches(self, weights: list[torch.Tensor], stats: list[torch.Tensor]) -> bool:
        """Whether every input still lives where the graph reads it."""
        return self._key(weights, stats) == self.key

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites the static output


class GraphedRescale:
    """The scales and the multiply, ``grads[i] *= scales[i]``, captured as one CUDA graph for
    these gradients (``None``: a target without one); ``groups`` are the gradients' positions
    per (device, dtype), all on one device. ``n_mult``: the length of a per-step multiplier
    the scales take (a static input, copied in before each replay; 0: none), ``cap``: the
    clamp after it (``Runtime.post_cap``). Capturing runs nothing: the first call's replay
    computes the scales and multiplies."""

    def __init__(self, fn: Callable, weights: list[torch.Tensor], grads: list[torch.Tensor | None],
                 stats: list[torch.Tensor], consts: dict[str, torch.Tensor], groups: list,
                 n_mult: int = 0, cap: float | None = None) -> None:
        devices = {dev for (dev, _), _ in groups}
        if len(devices) > 1:
            raise ValueError("gradients on several devices: one graph runs on one")
        self.n_mult, self.cap = n_mult, cap
        #: the targets that have a gradient (None: all), and the guard over the inputs and those
        self.where = None if not any(map(is_, grads, repeat(None))) else [i for i, g in enumerate(grads) if g is not None]
        self.guard = InputGuard(self._guarded(weights, stats, grads))
        _warm(fn, weights, stats, consts)
        # where it captures (the gradients' device, the current one: capturable)
        dev = next(iter(devices)) if devices else torch.device("cuda", torch.cuda.current_device())
        self.mult = torch.ones(n_mult, dtype=torch.float64, device=dev) if n_mult else None

        def body() -> torch.Tensor:
            out = multiplied(fn(weights, [], stats, consts), self.mult, cap)
            for (_, dtype), idx in groups:
                sc = out.to(dtype).unbind(0)
                torch._foreach_mul_([grads[i] for i in idx], [sc[i] for i in idx])
            return out

        self.graph, self.out = _capture(body)

    def _guarded(self, weights: list[torch.Tensor], stats: list[torch.Tensor], grads: list) -> list | None:
        """What the guard checks: the inputs and the gradients the graph writes; ``None`` where
        more or fewer targets have a gradient than at capture (one moved: a ``None`` in the list)."""
        if self.where is None:
            return [*weights, *stats, *grads]
        if sum(map(is_, grads, repeat(None))) != len(grads) - len(self.where):
            return None
        return [*weights, *stats, *[grads[i] for i in self.where]]

    def fits(self, weights: list[torch.Tensor], stats: list[torch.Tensor], grads: list,
             n_mult: int, cap: float | None) -> bool:
        """Whether a replay reads and writes exactly these tensors (:class:`InputGuard`): the
        fast check before :func:`rescale_key`'s lookup."""
        if n_mult != self.n_mult or cap != self.cap:
            return False
        ts = self._guarded(weights, stats, grads)
        return ts is not None and self.guard(ts)

    def reguard(self, weights: list[torch.Tensor], stats: list[torch.Tensor], grads: list) -> None:
        """After :func:`rescale_key` found this graph where :meth:`fits` did not (a weight's
        ``requires_grad``, autocast on around the step): guard these tensors from now on."""
        self.guard = InputGuard(self._guarded(weights, stats, grads))

    def __call__(self, mult: torch.Tensor | None = None) -> torch.Tensor:
        if self.mult is not None:
            if mult is None:
                self.mult.fill_(1.0)
            else:
                self.mult.copy_(mult)
        self.graph.replay()
        return self.out.clone()


def _capture(body: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``body`` captured on a side stream of the current device: the graph and its output.
    Not ``torch.cuda.graph``, which empties the caching allocator first: that would move the
    blocks the next step's gradients are allocated from, the addresses this graph is for."""
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph.capture_begin(capture_error_mode=CAPTURE_MODE)
        try:
            out = body()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    return graph, out


class CaptureCache:
    """Which layouts get a graph: a layout (a hashable key) is captured the second time it is
    seen, then replayed while it recurs; at most ``keep`` graphs are kept (least recently used
    dropped: one per optimizer's ``only`` pattern, or an allocator's few recurring layouts).
    It stops trying — :attr:`enabled` false, said once in the log — where it does not pay: no
    layout replayed or captured in ``patience`` calls in a row (gradients freed and reallocated
    elsewhere every step), more than ``max_captures`` captures averaging fewer than ``min_replays`` replays
    each (a capture costs milliseconds, a replay saves ~0.1), or a capture failed."""

    def __init__(self, keep: int = 4, patience: int = 32, max_captures: int = 8, min_replays: int = 20) -> None:
        self.keep, self.patience, self.max_captures, self.min_replays = keep, patience, max_captures, min_replays
        self.graphs: OrderedDict[Hashable, object] = OrderedDict()
        self.seen: OrderedDict[Hashable, None] = OrderedDict()
        self.enabled = True
        #: lookups, replays of a kept graph and captures so far; lookups since the last of either
        self.calls = self.hits = self.captures = self.idle = 0

    def lookup(self, key: Hashable, build: Callable[[], object]) -> object | None:
        """The graph for ``key`` (built by ``build()`` if this is the layout's second sighting),
        or ``None``: use the plain path this time."""
        if not self.enabled:
            return None
        self.calls += 1
        g = self.graphs.get(key)
        if g is not None:
            self.hits += 1
            self.idle = 0
            self.graphs.move_to_end(key)
            return g
        if key in self.seen:
            del self.seen[key]
            if self.captures >= self.max_captures and self.hits < self.min_replays * self.captures:
                return self._stop(f"{self.captures} captures replayed {self.hits} times in all")
            try:
                g = build()
            except Exception as e:  # a graph is an optimization: say why once, go on without
                log.warning("fxbackmatch: CUDA graph capture of the rescale failed (%s: %s); "
                            "rescaling without it", type(e).__name__, e)
                return self._stop(None)
            self.captures += 1
            self.idle = 0
            self.graphs[key] = g
            while len(self.graphs) > self.keep:
                self.graphs.popitem(last=False)
            return g
        self.seen[key] = None
        while len(self.seen) > 2 * self.keep:
            self.seen.popitem(last=False)
        self.idle += 1
        if self.idle >= self.patience:
            return self._stop(f"no gradient layout recurred in {self.idle} steps")
        return None

    @property
    def last(self) -> object | None:
        """The most recently used graph (captured or replayed), if any."""
        return next(reversed(self.graphs.values()), None)

    def recent(self, fits: Callable[[object], bool]) -> object | None:
        """The most recently used graph where ``fits(graph)`` (counted as :meth:`lookup`
        counts a replay), else ``None``: then :meth:`lookup` with the full key. A step checks
        the graph it most likely replays before building the key (``fits`` is cheaper)."""
        g = self.last if self.enabled else None
        if g is None or not fits(g):
            return None
        self.calls += 1
        self.hits += 1
        self.idle = 0
        return g

    def _stop(self, why: str | None) -> None:
        self.enabled = False
        self.graphs.clear()
        self.seen.clear()
        if why:
            log.info("fxbackmatch: the rescale's CUDA graph is off from here: %s", why)
        return None
