"""Factors in words: a monomial over the atoms as a readable formula (for ``plan.code``
and the report), so a reader can check each layer's chain by hand."""
from __future__ import annotations

import math
from typing import Sequence

from ..analysis.expr import Atom, Mono

__all__ = ["atom_str", "mono_str", "describe_uses"]


def atom_str(i: int, atoms: Sequence[Atom]) -> str:
    a = atoms[i]
    if a.kind == "weight_sumsq":
        return f"max(Σ{a.ref}², {a.param:.4g})" if a.param > 0 else f"Σ{a.ref}²"
    if a.kind == "grad_sumsq":
        return f"Σδ{a.ref}²"
    if a.kind == "stat_mean":
        return f"mean({a.ref})"
    if a.kind == "grad_rows":
        return f"rows({a.ref})"
    if a.kind == "sum":
        return f"S{i}"
    return f"{a.kind}({a.ref})"


def mono_str(mono: Mono, atoms: Sequence[Atom]) -> str:
    """``c · x^p · …`` with negative powers as a denominator."""
    num, den = [], []
    for i, p in mono.powers:
        name = atom_str(i, atoms)
        q = abs(p)
        term = name if q == 1 else (f"√{name}" if q == 0.5 else f"{name}^{q:g}")
        (num if p > 0 else den).append(term)
    c = math.exp(mono.log_const)
    head = "·".join(num) or "1"
    if abs(c - 1.0) > 1e-12:
        head = f"{c:.6g}·{head}" if num else f"{c:.6g}"
    return head if not den else f"{head} / ({'·'.join(den)})"


def sum_str(i: int, atoms: Sequence[Atom]) -> str:
    a = atoms[i]
    terms = " + ".join(
        (f"{w:.4g}·" if abs(w - 1.0) > 1e-12 else "") + mono_str(m, atoms) for w, m in a.terms
    )
    return f"S{i} = {terms}" + (f"   # {a.label}" if a.label else "")


def describe_uses(analysis) -> dict[str, str]:
    """Parameter name -> ``m`` and ``s`` of each of its uses, in words."""
    atoms = analysis.atoms.atoms
    out: dict[str, str] = {}
    for name, uses in analysis.uses.items():
        parts = [f"m = {mono_str(u.m, atoms)}, s = {u.s:g}" for u in uses]
        out[name] = " ; ".join(parts) if len(parts) > 1 else parts[0]
    return out
