"""Layer-wise rate methods: back-matching and its competitors as rules of the same pass.

Each method maps a parameter (with the uses the analysis found) to a symbolic scale:

* ``backmatch`` — ``1/(m·s)`` (Algorithm 1); a weight used ``k`` times gets
  ``1/Σ_i m_i·s_i`` (its sharing factor accumulated over every use);
* ``lars`` — You et al. 2017: ``τ·||W||/||δW||`` with trust coefficient ``τ`` (0.001 unless
  set); 1 where either norm is zero;
* ``lsalr`` — Singh et al. 2015: ``1 + log(1 + 1/||δW||)``, ``||δW||²`` floored at EPS;
* ``sgd`` — every scale 1;
* ``lamb`` — You et al. 2019: ``‖W‖``, an *absolute* step length: only for the step-length
  mode (``plan.attach(adamw, mode="length")`` is then LAMB exactly; see :mod:`.length`).

Every method also has a *length unit* for the step-length mode: ``"gradient"`` (the target
length is ``lr · scale · ‖ḡ‖``, the step the method takes with SGD) or ``"absolute"``
(``lr · scale``).

The global learning rate ``η`` stays the optimizer's ``lr``.
"""
from __future__ import annotations

from typing import Callable

from .walk import ParamUse
from .expr import ONE, AtomTable, Mono

__all__ = ["METHODS", "LENGTH_UNITS", "PUBLISHED", "register_method", "scale_of", "length_unit"]

MethodFn = Callable[[AtomTable, str, list[ParamUse], dict], Mono]
METHODS: dict[str, MethodFn] = {}
#: method name -> "gradient" (a gradient scale) or "absolute" (a step length: length mode only)
LENGTH_UNITS: dict[str, str] = {}
#: the competitors: published formulas of the weight and its gradient, which read no ``s``, so the
#: batch's corrections of ``s`` (``span="batch"``, ``token_mask``) never multiply them; a
#: registered method sees ``s`` in its uses and gets them, as back-matching does
PUBLISHED = ("sgd", "lars", "lsalr", "lamb")


def register_method(name: str, fn: MethodFn | None = None, *, unit: str = "gradient"):
    """Register a layer-wise rate method under ``name`` (usable as a decorator).

    ``unit="gradient"``: the method's value multiplies the gradient (SGD) or sets the step
    length ``lr · value · ‖ḡ‖`` (step-length mode); ``unit="absolute"``: the value is the step
    length over ``lr`` and the method works in the step-length mode only. Its scales get the
    batch's multipliers of ``s`` (``span="batch"``, ``token_mask``) as back-matching's do (the
    competitors in :data:`PUBLISHED` do not).
    """
    if unit not in ("gradient", "absolute"):
        raise ValueError(f"unit must be 'gradient' or 'absolute', got {unit!r}")

    def deco(f: MethodFn) -> MethodFn:
        if name in METHODS:
            from ..errors import DuplicateRuleError

            raise DuplicateRuleError(f"a method named {name!r} is already registered")
        METHODS[name] = f
        LENGTH_UNITS[name] = unit
        return f

    return deco(fn) if fn is not None else deco


@register_method("backmatch")
def _backmatch(atoms: AtomTable, name: str, uses: list[ParamUse], opts: dict) -> Mono:
    if len(uses) == 1:
        return (uses[0].m * uses[0].s).inverse()
    return atoms.sum_of(((1.0, u.m * u.s) for u in uses), label=f"'{name}' used {len(uses)} times").inverse()


@register_method("lars")
def _lars(atoms: AtomTable, name: str, uses: list[ParamUse], opts: dict) -> Mono:
    return atoms.lars(name, opts.get("trust_coefficient", 1e-3))


@register_method("lsalr")
def _lsalr(atoms: AtomTable, name: str, uses: list[ParamUse], opts: dict) -> Mono:
    return atoms.lsalr(name)


@register_method("sgd")
def _sgd(atoms: AtomTable, name: str, uses: list[ParamUse], opts: dict) -> Mono:
    return ONE


@register_method("lamb", unit="absolute")
def _lamb(atoms: AtomTable, name: str, uses: list[ParamUse], opts: dict) -> Mono:
    return Mono.atom(atoms.weight(name), 0.5)


def length_unit(method: str) -> str:
    return LENGTH_UNITS.get(method, "gradient")


def scale_of(method: str, atoms: AtomTable, name: str, uses: list[ParamUse], opts: dict) -> Mono:
    try:
        fn = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown rule {method!r}; choose one of {sorted(METHODS)}") from None
    return fn(atoms, name, uses, opts)
