"""Padding-aware weight sharing for sequence models (``prepare(..., token_mask=...)``).

A Linear over ``(B, T, D)`` shares its weight over the tokens that carry gradient (``s``, the
paper's weight-sharing factor). With padded batches only the real tokens do — padding is masked
out of attention and of the loss — so ``s = f·T`` with ``f`` the batch's share of real tokens,
and the scale ``1/(m·s)`` of every token-wise layer is ``1/f`` times the full-length one.
``m`` (a mean over the elements that carry gradient) does not change.

The plan reads ``f`` from the mask of the model's last forward call (a forward pre-hook keeps
a reference to it), as a 0-d tensor on the mask's device — no host sync on the step path.
A layer is token-wise when its output is ``(B, T, …)`` with ``(B, T)`` the example mask's
shape, or those tokens folded into the rows (``(B·T, …)``: GPT-2's ``Conv1D`` runs ``addmm``
on ``x.view(-1, D)``), or one row of positions read by every sample (``(1, T, …)``: a
position embedding); a parameter counts as token-wise when all its uses are.

**Attention counts the real keys.** Padding is masked out of attention, so a real query
averages over the ``n`` real keys it sees, not over all ``T``: the statistics of the attention
rule (``ρ_v = mean 1/n``, ``ρ_qk = mean (1/n)(1 − 1/n)``, ``coh = mean (1 − 1/n)²`` over the real
queries, :mod:`.rules.transformer`) change with each batch's padding — for bidirectional
attention ``ρ_v = 1/(f·T)`` exactly, ``1/f`` times the full-length value, so the value path's
``m`` grows by ``1/f`` while its ``s`` shrinks by ``f``. When the plan has a token mask
(``gm.meta[TOKEN_META]``, set before the walk) and an attention's mask is built from the
token-mask input, the rule reads these statistics as atoms (:func:`stat_ref`); the plan makes
them (:func:`token_stats`) and refills them from each step's mask (:func:`fill_token_stats`),
on the mask's device, before the scales are computed.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch

from ..errors import FxBackmatchError
from .records import LayerRecord, ParamUse

__all__ = ["find_mask", "position_of", "token_targets", "token_multiplier", "is_token_shape", "is_token_layer",
           "TOKEN_META",
           "STAT_PREFIX", "SHARE_REF", "ATTENTION_KINDS", "STATS", "stat_ref", "attention_stats", "token_stats",
           "fill_token_stats"]

#: ``gm.meta`` key holding ``(B, T)`` of the plan's token mask (set before the walk)
TOKEN_META = "fxbackmatch.token_mask"
#: prefix of the per-step attention-statistics atoms (``stat_mean`` refs filled from the mask)
STAT_PREFIX = "fxbackmatch.tokens:"
#: the attention structures whose statistics follow the mask: every key visible, causal, or
#: chosen queries (a pooler's token 0, a classifier's last token: one per sample, each seeing
#: all of its sample's real keys, so averaged per sample)
ATTENTION_KINDS = ("full", "causal", "chosen")
#: the statistics (see the module docstring)
STATS = ("rho_v", "rho_qk", "coh")
#: the ref of the real-token share ``f`` itself (where an attention's gradient reaches only
#: chosen queries — BERT's last block under its pooler — those are real, and its keys are
#: ``f·T``)
SHARE_REF = STAT_PREFIX + "share"


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
    """Per target: whether every use of it is a token-wise layer that shares its weight over
    all the tokens (:func:`is_token_layer`, with the use's own ``s``)."""
    recs = {r.node: r for r in layers}
    return [bool(uses.get(t)) and all(is_token_layer(recs.get(u.node), bt, u.s) for u in uses[t]) for t in targets]


def is_token_layer(rec: LayerRecord | None, bt: tuple[int, int], s: float | None = None) -> bool:
    """Whether a layer shares its weight over the tokens, so that padding takes ``1 − f`` of
    its ``s`` away: a token-wise output (:func:`is_token_shape`) whose gradient reaches every
    token (``s ≥ T``). A layer whose gradient reaches only chosen tokens (``s < T``: BERT's last
    block below a pooler reading token 0, a head on the last token) shares over those, which
    are real: its ``s`` stays."""
    if rec is None or not is_token_shape(rec.output_shape, bt):
        return False
    return (rec.s if s is None else s) >= bt[1] * (1 - 1e-9)


def is_token_shape(shape: Sequence[int] | None, bt: tuple[int, int]) -> bool:
    """Whether a layer output of ``shape`` is token-wise: ``(B, T, …)`` with ``(B, T)`` the
    mask's; ``(B·T, …)`` (the tokens folded into the rows); or ``(1, T, …)`` (positions every
    sample reads)."""
    if not shape or len(shape) < 2:
        return False
    b, t = bt
    if len(shape) >= 3 and (tuple(shape[:2]) == (b, t) or tuple(shape[:2]) == (1, t)):
        return True
    return t > 1 and shape[0] == b * t


def token_multiplier(mask: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """``1/f`` on the token-wise targets (``flags`` 1), 1 elsewhere; ``f`` = the mask's share
    of real tokens (at least one token, so an all-padding batch stays finite)."""
    real = (mask != 0).sum().to(torch.float64).clamp_min(1.0)
    inv = mask.numel() / real
    flags = flags.to(device=mask.device)
    return 1.0 + flags * (inv - 1.0)


def stat_ref(kind: str, which: str) -> str:
    """The buffer ref of the per-step statistic ``which`` (:data:`STATS`) of attention ``kind``."""
    if kind not in ATTENTION_KINDS or which not in STATS:
        raise ValueError(f"no token statistic {kind!r}.{which!r}")
    return f"{STAT_PREFIX}{kind}.{which}"


def attention_stats(mask: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """The attention statistics of :data:`STATS` over the real queries of a ``B × T`` mask,
    each a 0-d float64 tensor on the mask's device (no host sync). A real query sees ``n`` real
    keys: all of its sample's (``"full"``), or those up to itself (``"causal"``); ``"chosen"``:
    one query per sample, seeing all of its sample's. A batch with no real token counts as all
    real (its gradient is zero anyway)."""
    real = mask != 0
    real = torch.where(real.any(), real, torch.ones_like(real))
    if kind == "chosen":  # one query per sample with a real token, seeing all of them
        n = real.sum(1)
        w = (n > 0).to(torch.float64)
    else:
        n = real.cumsum(1) if kind == "causal" else real.sum(1, keepdim=True).expand_as(real)
        w = real.to(torch.float64)
    inv = 1.0 / n.clamp_min(1).to(torch.float64)
    total = w.sum()
    return {"rho_v": (w * inv).sum() / total, "rho_qk": (w * inv * (1 - inv)).sum() / total,
            "coh": (w * (1 - inv).square()).sum() / total}


def _parse(ref: str) -> tuple[str, str] | None:
    if ref == SHARE_REF:
        return ("share", "share")
    if not ref.startswith(STAT_PREFIX):
        return None
    kind, _, which = ref[len(STAT_PREFIX):].partition(".")
    return (kind, which) if kind in ATTENTION_KINDS and which in STATS else None


def _values(refs: Sequence[str], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each token-statistic ref among ``refs`` valued on ``mask``."""
    out: dict[str, torch.Tensor] = {}
    cache: dict[str, dict[str, torch.Tensor]] = {}
    for ref in refs:
        parsed = _parse(ref)
        if parsed is None:
            continue
        kind, which = parsed
        if kind not in cache:
            if kind == "share":
                real = (mask != 0).sum().to(torch.float64).clamp_min(1.0)
                cache[kind] = {"share": real / mask.numel()}
            else:
                cache[kind] = attention_stats(mask, kind)
        out[ref] = cache[kind][which]
    return out


def token_stats(atoms: Sequence[Any], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 0-d float64 tensor per token-statistic atom of ``atoms`` (an
    :class:`~fxbackmatch.analysis.expr.AtomTable`'s list), valued on ``mask`` (the example's)."""
    refs = [a.ref for a in atoms if getattr(a, "kind", "") == "stat_mean"]
    return {ref: v.detach().clone() for ref, v in _values(refs, mask).items()}


def fill_token_stats(stats: dict[str, torch.Tensor], mask: torch.Tensor) -> None:
    """Refill, in place, the token statistics among ``stats`` (ref -> 0-d tensor) from this
    step's ``mask``."""
    for ref, v in _values(list(stats), mask).items():
        dst = stats[ref]
        # to the host blocking (a non-blocking copy would be read before it lands); else not
        dst.copy_(v, non_blocking=dst.device.type != "cpu")
