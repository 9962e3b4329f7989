"""Per-tensor scalars spread to each tensor's shape, so that tensor-list ops keep foreach's
fast path: :func:`spread_`, a foreach op over it (:func:`spread_foreach_`) and the
multiply, :func:`spread_mul_`.

CUDA's multi-tensor kernels take a foreach call only where every list's tensor ``i`` has the
same sizes and strides; a list of 0-d scalars fails that for every other tensor, and the op
launches a kernel per tensor. Spreading the scalars over one flat buffer, viewed with each
tensor's shape and strides, turns that into three launches plus one fast-path call, for an
extra write and read of the tensors' bytes: cheap where launches, not bytes, are the cost.
"""
from __future__ import annotations

from operator import attrgetter
from typing import Callable, Sequence

import torch

__all__ = ["spread_", "spread_foreach_", "spread_mul_", "SPREAD_MAX", "SPREAD_LAYOUTS", "SPREAD_CACHED"]

#: :func:`spread_mul_` keeps a spread buffer of at most this many elements per gradient layout
#: (64 MiB in float32), filled with the smallest gradients first: those are the launch-bound
#: ones; a gradient that does not fit is multiplied on its own (one launch for ≥ its bytes)
SPREAD_MAX = 1 << 24
#: layouts a :func:`spread_mul_` cache keeps (one per optimizer's parameters and dtype in
#: practice), and the elements their buffers may hold together; past either, the least
#: recently used layouts are dropped
SPREAD_LAYOUTS = 8
SPREAD_CACHED = 4 * SPREAD_MAX


@torch.no_grad()
def spread_mul_(grads: list[torch.Tensor], scales: torch.Tensor, positions: Sequence[int] | None = None,
                cache: dict | None = None) -> None:
    """``grads[i] *= scales[positions[i]]`` in a few launches instead of one per tensor.

    ``torch._foreach_mul_`` with a list of 0-d scale tensors is off foreach's fast path (the
    operands' shapes differ) and launches a kernel per gradient. Here the scales are spread
    (:func:`spread_foreach_`) and each gradient is multiplied by a view of the spread buffer
    with its own shape and strides — a tensor-list multiply on the fast path: four launches
    for any number of tensors, for one extra write and read of their bytes, cheap where
    launches, not bytes, are the cost (CUDA). Gradients the buffer does not hold are
    multiplied one by one.
    """
    spread_foreach_(torch._foreach_mul_, grads, scales, positions, cache)


@torch.no_grad()
def spread_foreach_(op: Callable, tensors: list[torch.Tensor], values: torch.Tensor,
                    positions: Sequence[int] | None = None, cache: dict | None = None,
                    others: tuple[list[torch.Tensor], ...] = ()) -> None:
    """``op(tensors, *others, weights)`` — an in-place foreach op whose last operand is the
    per-tensor scalar ``values[positions[i]]`` (``torch._foreach_mul_``, ``_foreach_lerp_``
    with ``others=(ends,)``) — with those scalars spread (:func:`spread_`): one fast-path
    call for the tensors the buffer holds, one with 0-d scalars for the rest. ``others``
    match ``tensors`` in shapes and strides (what the fast path asks of every list)."""
    lay = spread_(tensors, values, positions, cache)
    if lay.members:
        if lay.everything:
            op(tensors, *others, lay.views)
        else:
            op(*([t[k] for k in lay.members] for t in (tensors, *others)), lay.views)
    if lay.rest:
        op(*([t[k] for k in lay.rest] for t in (tensors, *others)), lay.rest_values(values).unbind(0))


@torch.no_grad()
def spread_(tensors: list[torch.Tensor], values: torch.Tensor, positions: Sequence[int] | None = None,
            cache: dict | None = None) -> "_Spread":
    """``values[positions[i]]`` spread over one flat buffer, seen through a view with each dense
    ``tensors[i]``'s shape and strides: operands that keep a tensor-list op with ``tensors`` on
    foreach's fast path (equal sizes and strides), for per-tensor scalars.

    Three launches (the values gathered, a ``repeat_interleave`` index, an ``index_select`` by
    it) for any number of tensors. The buffer holds the smallest dense tensors, up to
    :data:`SPREAD_MAX` elements; the others (large ones, and any that is not dense) are the
    returned layout's ``rest``, for the caller to take one by one (``rest_values``). ``cache`` keeps, per positions, device and
    dtype, the layout: the buffer, the views over it (built once: ~1 µs of host time each) and
    the index and count tensors on the device (a copy from the host would wait for the device);
    pass the same dict every step. A tensor's shape or strides changing builds it again; past
    :data:`SPREAD_LAYOUTS` layouts or :data:`SPREAD_CACHED` elements, the least recently used
    are dropped. The views are valid until the next call with the same cache and layout.
    """
    positions = range(len(tensors)) if positions is None else positions
    cache = {} if cache is None else cache
    key = (values.device, values.dtype, tuple(positions))
    shapes, strides = tuple(map(_SHAPE, tensors)), tuple(map(_STRIDE, tensors))
    spread = cache.get(key)
    if spread is None or spread.shapes != shapes or spread.strides != strides:
        cache.pop(key, None)
        spread = _Spread(tensors, positions, values.device, values.dtype, shapes, strides)
        while cache and (len(cache) >= SPREAD_LAYOUTS or  # gradients that come and go (MoE experts)
                         sum(s.total for s in cache.values()) + spread.total > SPREAD_CACHED):
            del cache[next(iter(cache))]  # the least recently used
        cache[key] = spread
    elif next(reversed(cache)) != key:
        cache[key] = cache.pop(key)  # the most recently used last
    spread.fill(values)
    return spread


class _Spread:
    """One tensor layout's spread buffer, the views :func:`spread_` fills, and the tensors it
    leaves to be taken one by one."""

    def __init__(self, tensors: list[torch.Tensor], positions: Sequence[int], device: torch.device,
                 dtype: torch.dtype, shapes: tuple, strides: tuple) -> None:
        self.shapes, self.strides = shapes, strides
        members, total = [], 0
        for k in sorted((k for k, t in enumerate(tensors) if _dense(t)), key=lambda k: tensors[k].numel()):
            if total + tensors[k].numel() > SPREAD_MAX:
                break
            members.append(k)
            total += tensors[k].numel()
        members.sort()
        taken = set(members)
        #: the buffer's tensors, their value positions and element counts (device), its size
        self.members, self.total = members, total
        self.everything = len(members) == len(tensors)
        self.pos = torch.tensor([positions[k] for k in members], dtype=torch.long, device=device)
        # int32 counts: the per-element index repeat_interleave builds each fill is int32 too
        # (half the bytes of int64); a buffer holds at most SPREAD_MAX elements
        self.counts = torch.tensor([tensors[k].numel() for k in members], dtype=torch.int32, device=device)
        self.flat = torch.empty(total, dtype=dtype, device=device)
        self.views, offset = [], 0
        for k in members:  # dense strides are never negative
            self.views.append(self.flat.as_strided(tensors[k].shape, tensors[k].stride(), offset))
            offset += tensors[k].numel()
        #: the tensors left to be taken one by one, and their value positions (device)
        self.rest = [k for k in range(len(tensors)) if k not in taken]
        self.rest_pos = torch.tensor([positions[k] for k in self.rest], dtype=torch.long, device=device)

    def fill(self, values: torch.Tensor) -> None:
        """Write each member's value over its view."""
        if self.members:
            rep = torch.repeat_interleave(self.counts, output_size=self.total)
            torch.index_select(values.index_select(0, self.pos), 0, rep, out=self.flat)

    def rest_values(self, values: torch.Tensor) -> torch.Tensor:
        """The values of the tensors in ``rest``, in order (one gather)."""
        return values.index_select(0, self.rest_pos)


_SHAPE = attrgetter("shape")
_STRIDE = torch.Tensor.stride


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill ``numel`` consecutive storage slots (any dim order)."""
    expected = 1
    dims = sorted(((st, n) for n, st in zip(t.shape, t.stride()) if n != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True
