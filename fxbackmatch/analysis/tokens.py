"""Padding-aware weight sharing for sequence models (``prepare(..., token_mask=...)``).

A Linear over ``(B, T, D)`` shares its weight over the tokens that carry gradient (``s``, the
paper's weight-sharing factor). With padded batches only the real tokens do — padding is masked
out of attention and of the loss — so ``s = f·T`` with ``f`` the batch's share of real tokens,
and the scale ``1/(m·s)`` of every token-wise layer is ``1/f`` times the full-length one.
``m`` (a mean over the elements that carry gradient) does not change.

The plan reads ``f`` from the mask of the model's last forward call (a forward pre-hook keeps
a reference to it), as a 0-d tensor on the mask's device — no host sync on the step path.
A layer is token-wise when its output is ``(B, T, …)`` with ``(B, T)`` the example mask's
shape; a parameter counts as token-wise when all its uses are.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch

from ..errors import FxBackmatchError
from .records import LayerRecord, ParamUse

__all__ = ["find_mask", "position_of", "token_targets", "token_multiplier", "is_token_shape"]


def position_of(model: torch.nn.Module, name: str) -> int | None:
    """The positional index of ``forward``'s parameter ``name`` (a mask passed by position)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    pos = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return pos.index(name) if name in pos else None


def find_mask(where: str | int, args: Sequence[Any], kwargs: dict, pos: int | None = None) -> torch.Tensor | None:
    """The mask named by ``where`` (a keyword, or a positional index) in one call's inputs;
    a keyword passed by position is found at ``pos`` (:func:`position_of`)."""
    if isinstance(where, int):
        return args[where] if -len(args) <= where < len(args) else None
    if where in kwargs:
        return kwargs[where]
    return args[pos] if pos is not None and pos < len(args) else None


def check_mask(where: str | int, mask: Any) -> tuple[int, int]:
    """``(B, T)`` of the example mask; a clear error if it is missing or not ``B × T``."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        got = "nothing" if mask is None else (f"a tensor of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
                                             else type(mask).__name__)
        raise FxBackmatchError(
            f"token_mask={where!r} names {got} in the example inputs; it must name a B × T mask of "
            f"the real (non-padding) tokens, e.g. the attention_mask of a Hugging Face model.\n  What "
            f"to do: pass it in example_kwargs (token_mask='attention_mask') or give its positional "
            f"index (token_mask=1)."
        )
    return int(mask.shape[0]), int(mask.shape[1])


def token_targets(
    targets: Sequence[str], uses: dict[str, list[ParamUse]], layers: Sequence[LayerRecord], bt: tuple[int, int]
) -> list[bool]:
    """Per target: whether every use of it is a layer whose output is ``(B, T, …)``."""
    shapes = {r.node: r.output_shape for r in layers}
    return [bool(uses.get(t)) and all(is_token_shape(shapes.get(u.node), bt) for u in uses[t]) for t in targets]


def is_token_shape(shape: Sequence[int] | None, bt: tuple[int, int]) -> bool:
    """Whether a layer output of ``shape`` is token-wise: ``(B, T, …)`` with ``(B, T)`` the mask's."""
    return bool(shape) and len(shape) >= 3 and tuple(shape[:2]) == bt


def token_multiplier(mask: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """``1/f`` on the token-wise targets (``flags`` 1), 1 elsewhere; ``f`` = the mask's share
    of real tokens (at least one token, so an all-padding batch stays finite)."""
    real = (mask != 0).sum().to(torch.float64).clamp_min(1.0)
    inv = mask.numel() / real
    flags = flags.to(device=mask.device)
    return 1.0 + flags * (inv - 1.0)
