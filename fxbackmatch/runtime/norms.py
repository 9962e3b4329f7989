"""The one sum-of-squares implementation: the eager reference, the generated code, the
runtime's foreach path, the sharded path and the report all read ``sum(t²)`` from here."""
from __future__ import annotations

from collections import defaultdict

import torch

__all__ = ["sumsq", "sumsq_many", "rows_read"]

_CHUNK = 1 << 20

#: CPU dtypes whose compiled ``sumsq`` adds in float32 (see :func:`sumsq`)
_FLOAT32_SUM = (torch.float32, torch.bfloat16, torch.float16)


def sumsq(t: torch.Tensor) -> torch.Tensor:
    """``sum(t²)`` as a 0-d float64 tensor on ``t``'s device, accumulated in float64 — except
    compiled for a float32, bfloat16 or float16 CPU tensor (below). Fused into one read when
    compiled; eagerly in chunks of 2**20 elements, so no float64 copy of a whole weight is ever made.

    Compiled for such a CPU tensor it is summed in float32 by inductor's cascade sum (each
    vector lane adds 4096 values in a row, the chunks pairwise above; 4096·ε ≈ 2.4e-4 at worst
    per chunk), because inductor's float64 widening of each element round-trips through the
    stack on AVX-512: it made ResNet-50's fused SGD step 1.31× a compiled SGD step (1.13× now)
    and the compiled rescale 1.17× an SGD step (0.53×; docs/benchmarks.md). Observed from
    float64: ≤ 6e-7 for float32 (``tests/test_core.py`` allows 2e-6); up to 3.4e-6 for
    bfloat16/float16 (allowed 1e-5: their squares are exact in float32, but the low bits of
    quantized values' squares are skewed, so the additions round with a bias), where the
    values themselves hold 2–3 digits. Widening those to float64 was 4.4–4.7× a compiled
    multiply of the same tensors, the float32 sum is 0.68–0.69 (``benchmarks/bench_sumsq.py``).
    Limits of float32 that float64 does not have: a sum above ~1.8e19 overflows to ``inf``
    (float32 and bfloat16 weights; only a diverged tensor gets there; float16 cannot), and
    squares below ~1e-45 vanish."""
    if torch.compiler.is_compiling():
        if t.dtype in _FLOAT32_SUM and t.device.type == "cpu":
            return t.float().square().sum().to(torch.float64)
        return t.to(torch.float64).square().sum()
    flat = t.detach().reshape(-1)
    if flat.numel() <= _CHUNK:
        return flat.to(torch.float64).square().sum()
    return torch.stack([c.to(torch.float64).square().sum() for c in flat.split(_CHUNK)]).sum()


def sumsq_many(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``sum(t²)`` of each tensor as float64: one ``torch._foreach_norm`` per (device, dtype)
    (a multi-tensor kernel; float32 accumulation for lower precisions), then one stacked
    conversion and square: a few launches for any number of tensors; float32/float64
    tensors on the CPU go through BLAS ``dot`` instead (reads at copy bandwidth, where the
    CPU ``_foreach_norm`` reaches ~0.65 of it; same accumulation precision)."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    for (device, dtype), idx in groups.items():
        if device.type == "cpu" and dtype in (torch.float32, torch.float64):
            for i in idx:
                flat = tensors[i].detach().reshape(-1)  # a view of a contiguous tensor
                out[i] = torch.dot(flat, flat).to(torch.float64)
            continue
        acc = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        norms = torch._foreach_norm([tensors[i].detach() for i in idx], 2, dtype=acc)
        sq = torch.stack(norms).to(torch.float64).square()  # three launches, not two per tensor
        for i, n in zip(idx, sq.unbind(0)):
            out[i] = n
    return out  # type: ignore[return-value]


def rows_read(g: torch.Tensor) -> torch.Tensor:
    """The number of rows of ``g`` (dim 0) with a non-zero entry, as a float64 0-d tensor."""
    g = g.detach()
    if g.dim() == 0:
        return (g != 0).to(torch.float64)
    return (g.reshape(g.shape[0], -1) != 0).any(dim=1).sum().to(torch.float64)
