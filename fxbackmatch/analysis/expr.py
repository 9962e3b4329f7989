"""Symbolic factors: products of powers of per-step quantities ("atoms").

Every backward factor ``m`` and every scale ``1/(m·s)`` the analysis builds is a
:class:`Mono` — ``exp(log_const) · Π atom_i ** power_i`` — over atoms whose values are read
from the model each step:

* ``weight_sumsq``: ``sum(W**2)`` of a parameter (the norms ``||W||²_{2,μ}`` and
  ``||Wᵀ||²_{2,μ}`` are this divided by the number of rows or columns, a constant);
  ``max(sum(W**2), param)`` where ``param > 0`` (the reference floor, ``floor="init"``);
* ``grad_sumsq``: ``sum(δW**2)`` (for the LARS and LSALR rules);
* ``grad_rows``: the number of rows of ``δW`` not all zero (an embedding's rows read this step);
* ``stat_mean``: the mean of a buffer (BatchNorm ``running_var``, "measured variance");
* ``stat_inv_mean``: the mean of its reciprocal (``mean_c(1/(running_var_c + eps))`` — BN's
  ``mean diag(JᵀJ)``, which ``1/mean(running_var)`` underestimates by Jensen's inequality);
* ``sum``: ``Σ_j weight_j · mono_j`` over earlier atoms — forks (the consumers' factors
  summed: stacked Jacobians), second moments of sums and concatenations, and weights used
  more than once (sharing factor summed over uses);
* ``lars`` / ``lsalr``: the competitors' per-layer rates, with their zero-norm guards.

A chain of layers therefore has log-scales that are a fixed linear map of the log atoms,
fixed at ``prepare`` time; each sum atom adds one log-sum-exp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

__all__ = ["Atom", "AtomTable", "Mono", "ONE", "EPS"]

#: Floor applied to every atom before its logarithm: keeps scales finite for all-zero or
#: tiny weights (a zero-norm layer behaves as if its squared norm were EPS).
EPS = 1e-12


@dataclass(frozen=True)
class Mono:
    """``exp(log_const) * prod(atom[i] ** p for i, p in powers)``; immutable, hashable."""

    powers: tuple[tuple[int, float], ...] = ()
    log_const: float = 0.0

    @staticmethod
    def const(value: float) -> "Mono":
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"factor constants must be finite and positive, got {value}")
        return Mono((), math.log(value))

    @staticmethod
    def atom(index: int, power: float = 1.0, const: float = 1.0) -> "Mono":
        return Mono(((index, float(power)),), math.log(const))

    def __mul__(self, other: "Mono | float") -> "Mono":
        if not isinstance(other, Mono):
            other = Mono.const(float(other))
        acc = dict(self.powers)
        for i, p in other.powers:
            acc[i] = acc.get(i, 0.0) + p
        powers = tuple(sorted((i, p) for i, p in acc.items() if p != 0.0))
        return Mono(powers, self.log_const + other.log_const)

    __rmul__ = __mul__

    def __truediv__(self, other: "Mono | float") -> "Mono":
        if not isinstance(other, Mono):
            other = Mono.const(float(other))
        return self * other.inverse()

    def inverse(self) -> "Mono":
        return Mono(tuple((i, -p) for i, p in self.powers), -self.log_const)

    def atoms(self) -> set[int]:
        return {i for i, _ in self.powers}


ONE = Mono()


@dataclass(frozen=True)
class Atom:
    """A per-step quantity. ``ref`` names the tensor (parameter or buffer qualified name)."""

    kind: str  # weight_sumsq | grad_sumsq | grad_rows | stat_mean | stat_inv_mean | sum | lars | lsalr
    ref: str = ""
    terms: tuple[tuple[float, Mono], ...] = ()  # for kind == "sum"
    args: tuple[int, ...] = ()  # argument atoms for lars (weight, grad) and lsalr (grad)
    param: float = 0.0  # trust coefficient for lars
    label: str = ""  # human description (fork node, shared module …)


@dataclass
class AtomTable:
    """Interning table of atoms; ``sum`` atoms only refer to earlier atoms."""

    atoms: list[Atom] = field(default_factory=list)
    _index: dict[Atom, int] = field(default_factory=dict)

    def intern(self, atom: Atom) -> int:
        for _, mono in atom.terms:
            assert all(i < len(self.atoms) for i in mono.atoms())
        assert all(i < len(self.atoms) for i in atom.args)
        if atom not in self._index:
            self._index[atom] = len(self.atoms)
            self.atoms.append(atom)
        return self._index[atom]

    def weight(self, ref: str, floor: float = 0.0) -> int:
        """``sum(W²)`` of parameter ``ref``; ``max(sum(W²), floor)`` with a ``floor > 0``."""
        return self.intern(Atom("weight_sumsq", ref, param=float(floor)))

    def grad(self, ref: str) -> int:
        return self.intern(Atom("grad_sumsq", ref))

    def grad_rows(self, ref: str) -> int:
        """The number of rows of ``δW`` that are not all zero (an embedding's rows read)."""
        return self.intern(Atom("grad_rows", ref))

    def stat(self, ref: str) -> int:
        return self.intern(Atom("stat_mean", ref))

    def stat_inv(self, ref: str, eps: float = 0.0) -> int:
        """``mean(1/(x + eps))`` of buffer ``ref`` (a BN's own ``eps``)."""
        return self.intern(Atom("stat_inv_mean", ref, param=float(eps)))

    def lars(self, ref: str, trust: float) -> Mono:
        """LARS rate ``τ·||W||/||δW||`` of parameter ``ref`` (1 if either norm is 0)."""
        args = (self.weight(ref), self.grad(ref))
        return Mono.atom(self.intern(Atom("lars", ref, args=args, param=float(trust))))

    def lsalr(self, ref: str) -> Mono:
        """LSALR rate ``1 + log(1 + 1/||δW||)`` of parameter ``ref``."""
        return Mono.atom(self.intern(Atom("lsalr", ref, args=(self.grad(ref),))))

    def sum_of(self, terms: Iterable[tuple[float, Mono]], label: str = "") -> Mono:
        """``Σ w·mono`` as a new atom; terms with the same powers are added analytically
        (``a·x + b·x = (a+b)·x``), and a sum left with one term is no atom at all."""
        merged: dict[tuple, float] = {}
        for w, m in terms:
            if w > 0:
                merged[m.powers] = merged.get(m.powers, 0.0) + w * math.exp(m.log_const)
        if not merged:
            raise ValueError("a sum of factors needs at least one positive term")
        if len(merged) == 1:
            (powers, c), = merged.items()
            return Mono(powers, math.log(c))
        canon = tuple((1.0, Mono(p, math.log(c))) for p, c in merged.items())
        return Mono.atom(self.intern(Atom("sum", terms=canon, label=label)))
