"""Host values onto a device without waiting for the device.

A blocking copy from pageable host memory to CUDA — ``t.to("cuda")`` of a CPU tensor,
``torch.tensor(values, device="cuda")`` — ends with a stream synchronization (PyTorch's
``memcpy_and_sync``): the host waits for every kernel queued before it, so a step that makes one
loses the host's lead over the device (the next step's launches start only after this step's
work has run). Per-step values from the host (learning rates, index lists, multipliers) go
through pinned memory with a non-blocking copy instead: the caching host allocator keeps the
pinned block until the copy has run. Values that do not change are made on the device once and
kept by their callers.
"""
from __future__ import annotations

from typing import Callable, Hashable, Sequence

import torch

__all__ = ["kept", "tensor_on", "to_device"]

#: entries a table of :func:`kept` holds before it is emptied (batch sizes that keep changing)
KEPT_MAX = 32


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; from the CPU to CUDA without a synchronization (a copy from pinned
    memory, made here, so a later write to ``t`` cannot reach the copy). Traced by torch.compile
    or inside a CUDA graph capture: a plain ``.to()`` (what a trace and a graph can hold; a
    capture refuses a copy from pageable memory loudly)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu" or torch.compiler.is_compiling() \
            or torch.cuda.is_current_stream_capturing():
        return t.to(device)
    src = t.clone().pin_memory() if t.is_pinned() else t.pin_memory()  # pin_memory() of a pinned t is t
    return src.to(device, non_blocking=True)


def tensor_on(values: Sequence | float, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` without a synchronization (a
    number: filled on the device, no copy at all)."""
    if isinstance(values, (int, float, bool)):
        return torch.full((), values, dtype=dtype, device=device)
    return to_device(torch.tensor(values, dtype=dtype), device)


def kept(tables: dict, key: Hashable, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``tables[key]``, made by ``make()`` the first time it is asked for (a device tensor made
    once instead of copied every step); past :data:`KEPT_MAX` entries the table starts again."""
    got = tables.get(key)
    if got is None:
        if len(tables) >= KEPT_MAX:
            tables.clear()
        got = tables[key] = make()
    return got
