"""The plain eager reference: atoms, factor chain and scales in Python float64.

This is the oracle the generated (and compiled) code is tested against; it follows the
symbolic factors term by term with no vectorization.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..analysis.expr import EPS, Atom, Mono
from .norms import rows_read, sumsq

__all__ = ["atom_values", "eval_mono", "log_mono", "lars_rate", "lsalr_rate"]


def lars_rate(w_sq: float, g_sq: float, trust: float) -> float:
    """LARS (You et al.): ``τ·||W||/||δW||``; 1 when either squared norm is at most EPS (zero)."""
    if w_sq <= EPS or g_sq <= EPS:
        return 1.0
    return trust * math.sqrt(w_sq) / math.sqrt(g_sq)


def lsalr_rate(g_sq: float) -> float:
    """LSALR (Singh et al.): ``1 + log(1 + 1/||δW||)``, with ``||δW||²`` floored at EPS."""
    return 1.0 + math.log1p(1.0 / math.sqrt(max(g_sq, EPS)))


def log_mono(mono: Mono, values: Sequence[float]) -> float:
    """``log`` of the monomial (atoms floored at EPS)."""
    out = mono.log_const
    for i, p in mono.powers:
        out += p * math.log(max(values[i], EPS))
    return out


def eval_mono(mono: Mono, values: Sequence[float]) -> float:
    """The monomial's value; ``inf`` past float64's range rather than an exception."""
    lg = log_mono(mono, values)
    return math.exp(lg) if lg < 709.0 else math.inf


def atom_values(
    atoms: Sequence[Atom],
    tensor: Callable[[str], torch.Tensor],
    grad: Callable[[str], torch.Tensor | None],
) -> list[float]:
    """Values of every atom under the current weights / gradients / statistics."""
    vals: list[float] = []
    for a in atoms:
        if a.kind == "weight_sumsq":
            v = float(sumsq(tensor(a.ref)))
            v = max(v, a.param) if math.isfinite(v) else v  # the reference floor (floor="init")
            if not math.isfinite(v):
                from ..errors import NonFiniteWeightError

                raise NonFiniteWeightError(
                    f"weight '{a.ref}' has a non-finite norm ({v}); its layer and every layer "
                    f"below it on the backward chain have no meaningful scale.\n  What to do: "
                    f"restore the weights from a checkpoint (lower the learning rate) — the "
                    f"rescale itself never creates non-finite values from finite weights."
                )
        elif a.kind == "grad_sumsq":
            g = grad(a.ref)
            v = 0.0 if g is None else float(sumsq(g))
        elif a.kind == "grad_rows":  # before any backward: every row (a uniform prior)
            g = grad(a.ref)
            v = float(tensor(a.ref).shape[0]) if g is None else float(rows_read(g))
        elif a.kind == "stat_mean":
            v = float(tensor(a.ref).detach().double().mean())
        elif a.kind == "stat_inv_mean":
            v = float((tensor(a.ref).detach().double() + a.param).clamp_min(EPS).reciprocal().mean())
        elif a.kind == "sum":
            logs = [math.log(w) + log_mono(m, vals) for w, m in a.terms]
            top = max(logs)
            v = math.exp(top + math.log(sum(math.exp(x - top) for x in logs))) if top < 709.0 else math.inf
        elif a.kind == "lars":
            v = lars_rate(vals[a.args[0]], vals[a.args[1]], a.param)
        elif a.kind == "lsalr":
            v = lsalr_rate(vals[a.args[0]])
        else:
            raise ValueError(f"unknown atom kind {a.kind!r}")
        vals.append(v)
    return vals
