"""The approximation conventions of the back-matching chain, as one typed value.

Every switch that picks *how* a layer's factors are approximated — not which rule, which
parameters or how the plan runs — is a field of :class:`Conventions`. Two named instances
(:data:`CONVENTIONS`): ``"default"`` (:data:`DEFAULT`), what ``prepare`` uses, chosen by
evidence (docs/zoo.md, docs/results.md); ``"paper"``, which is ``Conventions()``: the paper's
choices, bit for bit what ``prepare`` did before 0.3. Each field's zero point is the paper.

>>> from fxbackmatch import Conventions
>>> Conventions.named("paper") == Conventions()
True
>>> Conventions.named("paper").replace(relu="exact").relu
'exact'
>>> Conventions.named("default").activations
'meanfield'

The allowed values of each field live here too (``GAMMA_MODES``, ``RELU_MODES``, ...); the
walk (:mod:`.walk`) reads them from this module. This module imports only :mod:`.span`.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any

from .span import SPANS

__all__ = ["Conventions", "CONVENTIONS", "FIELDS", "GAMMA_MODES", "RELU_MODES", "UNNORMALIZED_MODES", "TAPS_MODES",
           "MOMENT_MODES", "VARIANCES", "ACTIVATION_MODES", "LEGACY_FIELDS", "FLOOR_MODES", "DEFAULT", "SPANS", "check_choice", "check_cap", "resolve", "merge_legacy"]

#: how multiplicative parameters (norm γ, layer scales) enter the chain: ``"one"`` treats
#: them as 1 (the paper, §2.3, §4: BN without trainable γ); ``"exact"`` multiplies by mean(γ²).
GAMMA_MODES = ("one", "exact")
#: how ReLU enters: ``"paper"`` — the identity (eq. 31); ``"exact"`` — half of the units carry
#: gradient and ``Var[relu(z)] = (1/2 − 1/2π)·E[z²]`` (see docs/derivations.md)
RELU_MODES = ("paper", "exact")
#: weighted layers with no normalization above them (the paper's precondition, §3.1, broken):
#: ``"exact"`` chains their Jacobians as they are; ``"virtual"`` acts as if a BN followed each
#: one (except output layers): ``m ← m / Var[y]`` at its output, ``Var[y] = ||W||²row·E[x²]``,
#: so the chain no longer depends on the weights' overall scale (e.g. 0.02-std inits)
UNNORMALIZED_MODES = ("exact", "virtual")
#: which conv kernel taps count: ``"all"`` — every tap at every output location (the paper's
#: convention, eqs. 33, 35; exact away from the borders); ``"valid"`` — only the (output, tap)
#: pairs that read a real input, not zero padding (the exact mean of ``JᵀJ``; it matters when
#: the kernel is large beside the map, e.g. 7×7 on 1×1 or 2×2 maps; docs/derivations.md)
TAPS_MODES = ("all", "valid")
#: where the forward moments ``E[a²]`` the rules read come from: ``"derived"`` — estimated from
#: the weights below (:mod:`fxbackmatch.analysis.variance`); ``"batch"`` — the same, except the values
#: that average over positions (pooling, means, attention outputs), which are atoms measured
#: on the live batch; ``"measured"`` — every value a rule reads is such an atom
#: (``factors="measured"``; not a convention of its own). The plan refreshes the atoms every
#: ``refresh`` steps.
MOMENT_MODES = ("derived", "batch", "measured")
#: the ``moments`` values a :class:`Conventions` takes
CONVENTION_MOMENTS = ("derived", "batch")
#: how elementwise activations enter: ``"paper"`` — the identity (eq. 31; ReLU as ``relu``
#: says); ``"meanfield"`` — under a zero-mean Gaussian pre-activation of the variance the chain
#: knows, ``m ← m·E[φ'(z)²]`` and ``E[a²] ← Var[φ(z)]`` (:mod:`.meanfield`), for every
#: activation whose input is a norm's or a weighted layer's output (ReLU: ``relu="exact"``'s
#: ½ and ½ − 1/2π), and for any op found to be elementwise
ACTIVATION_MODES = ("paper", "meanfield")
#: ``"none"`` — weights count with their norms as they are (the paper); ``"init"`` — the
#: reference floor: a weight's ``sum(W²)`` counts at least as at its default initialization
#: (``numel·v₀``: ``shape[0]/3`` for torch Linear/Conv, ``numel`` for embeddings), and γ
#: (``gamma="exact"``) at least 1 (docs/derivations.md, "The reference floor")
FLOOR_MODES = ("none", "init")
#: where a BatchNorm's input variance comes from: ``"weights"`` — the row-norm approximation
#: from the weights below; ``"measured"`` — the BatchNorm's running variance
VARIANCES = ("weights", "measured")


def check_choice(key: str, value: Any, allowed: tuple) -> None:
    """Raise :class:`ValueError` if ``value`` is not one of ``allowed`` (option ``key``)."""
    if value not in allowed:
        raise ValueError(f"{key} must be one of {allowed}, got {value!r}")


def check_cap(cap: float | None) -> None:
    if cap is not None and not (isinstance(cap, numbers.Real) and math.isfinite(cap) and cap > 1):
        raise ValueError(f"cap must be a finite number > 1 (scales are kept in [1/cap, cap]), got {cap!r}")


@dataclass(frozen=True)
class Conventions:
    """How the chain approximates each layer's factors: one frozen, hashable value.

    Pass it (or a name of :data:`CONVENTIONS`) as ``prepare(..., conventions=...)``; change a
    field with :meth:`replace`. Every value is checked when the object is made.
    """

    #: ``"one"``: norm γ and layer scales count as 1, in the chain and the moments (§2.3, §4); ``"exact"``: mean(γ²)
    gamma: str = "one"
    #: ``"paper"``: ReLU is the identity (eq. 31); ``"exact"``: a ReLU of a norm output passes m/2 (deep ResNets)
    relu: str = "paper"
    #: ``"all"``: every conv kernel tap counts (the paper); ``"valid"``: only taps that read input, not padding
    taps: str = "all"
    #: ``"full"``: a weight's normal matrix is E[a²]·I; ``"batch"``: on the batch's span, scale / max(1, n/(B·s))
    span: str = "full"
    #: ``"derived"``: averaged values count as independent; ``"batch"``: their E[a²] measured on the live batch
    moments: str = "derived"
    #: ``"exact"``: layers with no norm above chain as they are; ``"virtual"``: as if a BatchNorm followed each
    unnormalized: str = "exact"
    #: ``"weights"``: a BatchNorm's input variance from the row-norm approximation; ``"measured"``: running_var
    variance: str = "weights"
    #: ``None``: scales as computed; a finite number ``> 1``: every scale clamped into ``[1/cap, cap]``
    cap: float | None = None
    #: ``"paper"``: activations are the identity; ``"meanfield"``: ``E[φ'²]`` back, ``Var[φ]`` forward
    activations: str = "paper"
    #: ``"none"``: norms as they are; ``"init"``: a weight counts at least as at its default init
    floor: str = "none"

    def __post_init__(self) -> None:
        for key, allowed in (("gamma", GAMMA_MODES), ("relu", RELU_MODES), ("unnormalized", UNNORMALIZED_MODES),
                             ("taps", TAPS_MODES), ("moments", CONVENTION_MOMENTS), ("span", SPANS),
                             ("variance", VARIANCES), ("activations", ACTIVATION_MODES), ("floor", FLOOR_MODES)):
            check_choice(key, getattr(self, key), allowed)
        check_cap(self.cap)

    def replace(self, **changes: Any) -> "Conventions":
        """A copy with ``changes`` (field name -> value), checked like a new one."""
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise TypeError(f"Conventions has no field {unknown[0]!r}; fields: {', '.join(FIELDS)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def named(cls, name: str) -> "Conventions":
        """The named instance ``name`` of :data:`CONVENTIONS` (``"default"``, ``"paper"``)."""
        try:
            return CONVENTIONS[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown conventions {name!r}; choose one of {sorted(CONVENTIONS)} "
                             f"or pass a fxbackmatch.Conventions(...)") from None


#: the fields of :class:`Conventions`, in order
FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Conventions))
#: the fields that were ``prepare`` keywords before :class:`Conventions` (still accepted, deprecated)
LEGACY_FIELDS: tuple[str, ...] = ("gamma", "relu", "taps", "span", "moments", "unnormalized", "variance", "cap")

#: the conventions ``prepare`` uses unless told otherwise, chosen by evidence (docs/zoo.md,
#: docs/results.md): mean-field activations, only the conv taps that read input, normal
#: matrices on the batch's span, averaged moments measured on the batch, the reference floor
DEFAULT = Conventions(relu="exact", activations="meanfield", taps="valid", span="batch", moments="batch",
                      floor="init")

#: named conventions ``prepare(conventions=...)`` accepts: ``"default"`` (:data:`DEFAULT`,
#: ``prepare``'s default) and ``"paper"`` (``Conventions()``: the paper's choices, bit for bit)
CONVENTIONS: dict[str, Conventions] = {"default": DEFAULT, "paper": Conventions()}


def resolve(conventions: "str | Conventions") -> Conventions:
    """A :class:`Conventions` from a name of :data:`CONVENTIONS` or a Conventions itself."""
    if isinstance(conventions, Conventions):
        return conventions
    if isinstance(conventions, str):
        return Conventions.named(conventions)
    raise TypeError(f"conventions must be a name of {sorted(CONVENTIONS)} or a fxbackmatch.Conventions, "
                    f"got {type(conventions).__name__}")


def merge_legacy(conventions: Conventions, legacy: dict[str, Any], where: str = "prepare",
                 stacklevel: int = 3) -> Conventions:
    """``conventions`` with the deprecated keywords of ``where(...)`` merged over it: each a
    field of :class:`Conventions`, each warned about (a :class:`DeprecationWarning` at the
    caller of ``where``); any other keyword raises :class:`TypeError` as Python would."""
    for key in legacy:
        if key not in LEGACY_FIELDS:
            raise TypeError(f"{where}() got an unexpected keyword argument {key!r}")
    for key, value in legacy.items():
        warnings.warn(
            f"{where}({key}=...) is deprecated, and it now applies over the chosen conventions (the new "
            f"default unless conventions= says otherwise): pass conventions=fxbackmatch.Conventions.named("
            f"'default').replace({key}={value!r}), or conventions=fxbackmatch.Conventions.named('paper')"
            f".replace({key}={value!r}) for what prepare({key}={value!r}) gave before 0.3",
            DeprecationWarning, stacklevel=stacklevel)
    return conventions.replace(**legacy) if legacy else conventions
