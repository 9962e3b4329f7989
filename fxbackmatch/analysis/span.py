"""``span="batch"``: a weight's normal matrix taken on the span of the batch.

Back-matching's weight step is ``δ'W = E[δb aᵀ]·(E aaᵀ)⁻¹`` (eq. 13); the paper replaces
``E aaᵀ`` by ``E[a²]·I`` — the mean of its eigenvalues. But ``E aaᵀ`` (``n × n``, ``n`` the
fan-in) is averaged over the ``N = B·s`` rows that share the weight (``B`` samples, ``s``
positions each), so its rank is at most ``N``. Where ``N < n`` (a wide linear layer at a small
batch: torchvision VGG's classifier reads 25,088 features, a batch has 16 rows) the least-squares
step acts through the pseudo-inverse, on the ``N``-dimensional span of the batch, where the
eigenvalues average ``trace/rank = E[a²]·n/N``. With ``E[a²]·I`` the step's change of the
layer's output on the batch itself is ``n/N`` times the target (``δ'W a = (1/N)·Σ δb' a'ᵀa/E[a²]``
and ``aᵀa ≈ n·E[a²]``): 1,568× on that classifier. ``span="batch"`` divides such a weight's
scale by ``max(1, n/(B·s))``, ``B`` read from each forward call's first input (no host sync),
times the world size under data parallelism (the ranks average their gradients). Under
gradient accumulation the rows of all micro-batches count; this reads one micro-batch's (the
scale is then smaller than it could be — the safe side).

Only weights with a fan-in are affected (linear and conv layers, GPT-2's ``[in, out]``
layout); biases, norms and embeddings keep their scales. The paper's nets at its batch of 128
change where ``n > 128·s``: LeNet's ``fc1`` (400 inputs), VGG's classifier and its convs on
2×2 maps — which is why it is an option, not the default.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch

__all__ = ["SPANS", "fan_in_of", "span_table", "span_multiplier", "batch_of"]

SPANS = ("full", "batch")


def fan_in_of(kind: str, shape: Sequence[int]) -> int | None:
    """Inputs per output unit of a weight of a layer of ``kind`` (``None``: not a fan-in
    weight): ``[out, in, *kernel]`` for linear/conv layers, ``[in, out]`` for ``addmm`` and a
    parameter right operand of ``matmul``."""
    k = kind.lower()
    if not shape or len(shape) < 2 or "transpose" in k:
        return None
    if k in ("addmm", "matmul (parameter)"):
        return int(shape[0])
    if "linear" in k or "conv" in k:
        return int(math.prod(shape[1:]))
    return None


def span_table(targets: Iterable[str], uses: dict[str, list], layers: Iterable[Any],
               shapes: dict[str, tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per target: its fan-in ``n`` (0 where none) and the rows ``s`` per sample of its use."""
    kinds = {r.node: r.kind for r in layers}
    fan, rows = [], []
    for name in targets:
        use = uses[name][0]
        n = fan_in_of(kinds.get(use.node, ""), shapes[name]) if use.role == "weight" else None
        fan.append(float(n or 0))
        rows.append(float(sum(u.s for u in uses[name])))
    return torch.tensor(fan, dtype=torch.float64), torch.tensor(rows, dtype=torch.float64)


def span_multiplier(batch: int, fan: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``1/max(1, n/(B·s))`` per target (1 where there is no fan-in)."""
    ratio = torch.where(fan > 0, fan / (max(1, int(batch)) * rows.clamp_min(1e-12)), torch.zeros_like(fan))
    return 1.0 / ratio.clamp_min(1.0)


def batch_of(args: Sequence[Any], kwargs: dict) -> int | None:
    """The batch size of a forward call: dim 0 of its first tensor input."""
    for x in list(args) + list(kwargs.values()):
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return int(x.shape[0])
    return None
