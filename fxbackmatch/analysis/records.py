"""What the analysis records per parameter use and per layer."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .expr import ONE, Mono

__all__ = ["ROLES", "ParamUse", "LayerRecord", "Flow"]

ROLES = ("weight", "bias", "norm_scale", "norm_shift")


@dataclass(frozen=True)
class Flow:
    """What flows backwards along one edge of the graph.

    * ``m`` — the backward factor (``mean diag(JᵀJ)`` under the paper's approximations) at
      the elements of the value that carry gradient;
    * ``frac`` — the fraction of the value's *positions* that carry gradient (a 2×2 max pool
      keeps a quarter): a weighted layer's sharing factor is ``s = frac · positions``;
    * ``chan`` — the fraction of its *channels* that carry gradient (a channel slice keeps
      some): it shrinks the column norms the layer below sees, never ``s``.
    """

    m: Mono
    frac: float = 1.0
    chan: float = 1.0

    @property
    def cover(self) -> float:
        """Fraction of the value's elements that carry gradient."""
        return self.frac * self.chan


@dataclass(frozen=True)
class ParamUse:
    """One use of a parameter by a layer: the scale of this use is ``1/(m·s)``."""

    name: str
    role: str
    m: Mono
    s: float
    node: str = ""  # the layer node of this use


@dataclass(frozen=True)
class LayerRecord:
    """What the analysis decided for one layer (one FX node that owns parameters).

    ``m`` is the backward factor at the layer's output under the current weights (a float
    in :attr:`Plan.layers`); ``m_expr`` is its symbolic form.
    """

    name: str
    kind: str
    node: str
    weight_shape: tuple[int, ...] | None
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    s: float
    c: float
    params: tuple[tuple[str, str], ...]
    notes: tuple[str, ...]
    m_expr: Mono = field(repr=False, default=ONE)
    m: float | None = None

    def with_m(self, value: float) -> "LayerRecord":
        return replace(self, m=value)
