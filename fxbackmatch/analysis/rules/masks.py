"""Attention masks as the attention rules read them (:mod:`.transformer`): the keys each query
sees, from the mask's own structure — its graph evaluated with every graph input all ones, so
a padding mask expanded to ``B × 1 × L × S`` (BERT's) reads as bidirectional, a causal or
sliding-window mask as what it is — and whether the mask is built from the plan's token mask
(:mod:`..tokens`), so that the statistics follow each step's real tokens."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..context import RuleContext, fetch_attr
from ..tokens import TOKEN_META

__all__ = ["ancestors", "visible_keys", "reads_tokens", "uniform_stats", "is_causal", "token_kind"]


def ancestors(node: fx.Node, limit: int = 400) -> list[fx.Node] | None:
    """``node`` and the nodes it is computed from, inputs first (``None`` past ``limit``)."""
    seen: set[fx.Node] = set()
    order: list[fx.Node] = []
    stack: list[tuple[fx.Node, bool]] = [(node, False)]
    while stack:
        n, done = stack.pop()
        if done:
            order.append(n)
            continue
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > limit:
            return None
        stack.append((n, True))
        stack.extend((a, False) for a in reversed(n.all_input_nodes) if a not in seen)
    return order


def visible_keys(ctx: RuleContext, mask: fx.Node, L: int, S: int) -> torch.Tensor | None:
    """The keys each query sees, ``(rows, L)``, under the structure of the attention mask
    ``mask``: its graph evaluated with every graph input all ones (no padding) — causal,
    sliding-window or bidirectional, read from the mask itself (a padding mask expanded to
    ``B × 1 × L × S``, BERT's, is not causal). ``None`` where it cannot be evaluated."""
    order = ancestors(mask)
    if order is None:
        return None
    env: dict[fx.Node, object] = {}
    try:
        with torch.no_grad():
            for n in order:
                val = n.meta.get("val")
                if isinstance(val, torch.Tensor) and val.numel() > 1 << 22:
                    return None
                if n.op == "placeholder":
                    if not isinstance(val, torch.Tensor):
                        return None
                    env[n] = torch.ones(tuple(val.shape), dtype=val.dtype, device=val.device)
                elif n.op == "get_attr":
                    obj = fetch_attr(ctx.gm, n.target)
                    env[n] = obj.detach() if isinstance(obj, torch.Tensor) else obj
                elif n.op in ("call_function", "call_method"):
                    args = fx.node.map_arg(n.args, lambda a: env[a])
                    kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
                    fn = n.target if n.op == "call_function" else getattr(args[0], n.target)
                    env[n] = fn(*args, **kwargs) if n.op == "call_function" else fn(*args[1:], **kwargs)
                else:
                    return None
        m = env[mask]
        if not isinstance(m, torch.Tensor) or type(m) is not torch.Tensor or m.device.type == "meta":
            return None
        vis = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m != 0
        vis = torch.broadcast_to(vis, torch.broadcast_shapes(vis.shape, (L, S)))
        return vis.sum(-1).reshape(-1, L).to(torch.float64).cpu()
    except Exception:  # an op this small evaluator cannot run: the shape heuristic decides
        return None


def reads_tokens(mask: fx.Node, bt: tuple[int, int]) -> bool:
    """Whether the attention mask is computed from a ``B × T`` graph input (the token mask)."""
    order = ancestors(mask) or []
    return any(n.op == "placeholder" and _val_shape(n) == tuple(bt) for n in order)


def _val_shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def uniform_stats(n: torch.Tensor) -> tuple[float, float, float]:
    """``(ρ_v, ρ_qk, coh)`` at uniform attention over ``n`` visible keys per query."""
    inv = 1.0 / n.clamp_min(1.0)
    return float(inv.mean()), float((inv * (1 - inv)).mean()), float((1 - inv).square().mean())


def is_causal(n: torch.Tensor, S: int) -> bool:
    """Whether query ``i`` sees ``i + 1`` keys (the last ``L`` of ``S``: ``i + 1 + S − L``)."""
    L = n.shape[-1]
    want = torch.arange(1, L + 1, dtype=n.dtype) + max(0, S - L)
    return bool((n == want.clamp_max(S)).all()) and L > 1


def token_kind(ctx: RuleContext, mask, n: torch.Tensor | None, L: int, S: int) -> str | None:
    """``"full"`` or ``"causal"`` where this self-attention's statistics follow the plan's token
    mask (its mask is built from the token-mask input), else ``None``."""
    bt = ctx.gm.meta.get(TOKEN_META)
    if bt is None or n is None or not isinstance(mask, fx.Node) or L != S or L != bt[1]:
        return None
    if not reads_tokens(mask, bt):
        return None
    if bool((n == S).all()):
        return "full"
    if is_causal(n, S):
        return "causal"
    ctx.note("attention mask neither bidirectional nor causal: its statistics do not follow the token mask")
    return None
