"""Rules for transformer layers, derived by the least-squares principle
(``docs/derivations.md``, "Transformers"):

* embeddings — a linear layer on one-hot inputs: row ``v`` is read ``count_v`` times, so its
  exact factor is ``1/(m·T·p_v)`` (``p_v`` its share of the tokens); the per-layer scalar is
  the mean over the rows read, ``rows/(m·T)``, with ``rows`` counted from the gradient each
  step (a ``grad_rows`` atom);
* ``addmm(b, x, W)`` (GPT-2's ``Conv1D``) and ``x @ W`` — linear layers with ``W`` stored
  ``[in, out]``;
* ``matmul``/``bmm`` between two activations — ``C = A·B``: ``m_A = m·N·E[B²]``,
  ``m_B = m·M·E[A²]`` (``J_A = I ⊗ Bᵀ``; times the copies of a broadcast operand);
* softmax — ``J = diag(p) − ppᵀ``: ``m ← m·(S − 1)/S³`` at uniform attention (``p = 1/S``);
* ``scaled_dot_product_attention`` — the composition of the above at uniform attention
  (``Σ_k P_qk² = 1/S``; causal: ``H_L/L`` on average; the keys each query sees read from the
  mask's own structure, :mod:`.masks`); the value path gets ``m·f_q·(L/S)·ρ̄`` (``f_q`` the
  share of queries whose output carries gradient), queries ``m·τ²·d_v·E[v²]·E[k²]·ρ̄`` and keys
  ``m·τ²·d_v·E[v²]·E[q²]·f_q·(L/S)·ρ̄``; with ``token_mask`` the ``ρ̄`` are per-step atoms over
  the real tokens (:mod:`..tokens`);
  grouped-query attention multiplies the key/value factors by the heads sharing them;
* functional ``layer_norm``/``group_norm``/``rms_norm`` — as their modules; RMS normalization
  written out (``x·rsqrt(mean(x²) + ε)``, Llama) is recognized by :func:`rms_source`;
* ``expand`` — a broadcast read ``r`` times: ``m ← m·r`` (stacked copies);
* ``neg`` — ``J = −I``; ``cos``/``sin`` — slope² and moment ``1/2`` (rotary phases spread).

The attention estimates hold at initialization (near-uniform attention); trained attention
is peakier (``ρ̄ → 1``): the measured mode (``prepare(..., factors="measured")``) follows it.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..context import RuleContext
from ..expr import Mono
from ..registry import register_rule
from .layers import norm_layer, input_moment
from ..tokens import SHARE_REF, STATS, stat_ref
from .masks import is_causal, token_kind, uniform_stats, visible_keys

__all__ = [
    "embedding_rule", "functional_embedding_rule", "addmm_rule", "matmul_rule", "softmax_rule",
    "sdpa_rule", "functional_layer_norm_rule", "expand_rule", "rms_source", "op_name",
]


def op_name(node) -> str | None:
    """The op a node computes, whatever the vocabulary: ``torch.rsqrt``, ``.rsqrt()`` and
    ``aten.rsqrt.default`` are all ``"rsqrt"``."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method":
        return str(node.target).rstrip("_")
    if node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            return t._opname.rstrip("_")
        return getattr(t, "__name__", str(t)).rstrip("_")
    return None


def _moment(ctx: RuleContext, node) -> Mono:
    got, _ = ctx.variance_below(node)
    if got is None:
        ctx.note(f"E[{node.name}²] taken as 1")
        return Mono()
    return got


# ------------------------------------------------------------------------- embeddings
def _embedding(ctx: RuleContext, w: str | None, kind: str) -> None:
    if w is None:
        return
    _, dim = ctx.param_shape(w)
    s = ctx.frac_out * ctx.positions_per_sample(ctx.node, dim)
    rows = Mono.atom(ctx.atoms.grad_rows(w), -1.0)  # E[a²] of the one-hot input, over the rows read
    ctx.add_layer(kind, [(w, "weight", s, rows)], weight=w, s=s, c=1.0, input_node=None)
    # the indices are integers: nothing flows below


def _embedding_moment(ctx: RuleContext) -> Mono | None:
    w = ctx.module_param("weight") if ctx.module is not None else ctx.param_from_arg(ctx.arg(1, "weight"))
    return None if w is None else ctx.mean_sq(w, 1.0)  # floor="init": at least N(0, 1), its default init


@register_rule(module=nn.Embedding, moment=_embedding_moment, channel_dim=-1)
def embedding_rule(ctx: RuleContext) -> None:
    """nn.Embedding: scale ``rows/(m·T)`` — see the module docstring."""
    _embedding(ctx, ctx.module_param("weight"), "Embedding")


@register_rule(function=F.embedding, moment=_embedding_moment, channel_dim=-1)
def functional_embedding_rule(ctx: RuleContext) -> None:
    """F.embedding(ids, weight): as nn.Embedding."""
    _embedding(ctx, ctx.param_from_arg(ctx.arg(1, "weight")), "F.embedding")


# ----------------------------------------------------------------- x·W with W [in, out]
def _in_out_linear(ctx: RuleContext, x: fx.Node, w: str, b: str | None, kind: str) -> None:
    """``y = x·W (+ b)`` with ``W`` of shape ``[in, out]``: the linear rule, transposed."""
    in_f, out_f = ctx.param_shape(w)[-2:]
    s = ctx.frac_out * ctx.positions_per_sample(ctx.node, out_f)
    ctx.add_layer(kind, [(w, "weight", s, input_moment(ctx, x)), (b, "bias", s)], weight=w, s=s, c=1.0, input_node=x)
    ctx.pass_to(x, ctx.m_out * ctx.sumsq(w) * (ctx.chan_out / in_f), ctx.frac_out, 1.0)


def _in_out_row_norm(ctx: RuleContext) -> Mono | None:
    args = ctx.node.args
    w = ctx.param_from_arg(args[2] if ctx.node.target is torch.addmm and len(args) > 2 else args[1] if len(args) > 1 else None)
    if w is None or len(ctx.param_shape(w)) != 2:
        return None
    return ctx.sumsq(w) / ctx.param_shape(w)[1]


@register_rule(function=torch.addmm, row_norm=_in_out_row_norm, channel_dim=-1)
def addmm_rule(ctx: RuleContext) -> None:
    """``addmm(b, x, W)`` — GPT-2's ``Conv1D``: a linear layer with ``W`` stored ``[in, out]``
    (``s`` = tokens per sample, also when the batch is folded into the rows)."""
    b = ctx.param_from_arg(ctx.arg(0, "input"))
    w = ctx.param_from_arg(ctx.arg(2, "mat2"))
    x = ctx.arg(1, "mat1")
    if w is None or not isinstance(x, fx.Node):
        ctx.note("addmm of activations: treated as a matmul")
        _matmul_activations(ctx, ctx.arg(1, "mat1"), ctx.arg(2, "mat2"))
        return
    _in_out_linear(ctx, x, w, b, "addmm")


# ------------------------------------------------------------------------------ matmul
def _matmul_moment(ctx: RuleContext) -> Mono | None:
    a, b = ctx.node.args[:2]
    pa, pb = ctx.param_from_arg(a), ctx.param_from_arg(b)
    if pb is not None:
        return _in_out_row_norm(ctx)
    if pa is not None or not all(isinstance(t, fx.Node) for t in (a, b)):
        return None
    ea, _ = ctx.variance_below(a)
    eb, _ = ctx.variance_below(b)
    if ea is None or eb is None:
        return None
    k = (ctx.shape(a) or (1,))[-1]
    return ea * eb * k


def _partner(ctx: RuleContext, node) -> Mono:
    """A bilinear partner's ``E[x²]`` under ``gamma="one"``: 1 (normalized), except where a
    ``structural`` rule (softmax: ``1/S²``) fixes the moment, looking through transparent ops."""
    rule = ctx.rule_of(node)
    while rule is not None and rule.transparent and not rule.structural and node.all_input_nodes:
        node = node.all_input_nodes[0]
        rule = ctx.rule_of(node)
    if rule is not None and rule.structural:
        got, _ = ctx.variance_below(node)
        return got if got is not None else Mono()
    return Mono()


def _matmul_activations(ctx: RuleContext, a, b) -> None:
    sa, sb, so = ctx.shape(a), ctx.shape(b), ctx.out_shape
    if not (sa and sb and so) or len(sa) < 2 or len(sb) < 2:
        ctx.note("matmul of vectors: each operand keeps m (heuristic)")
        ctx.pass_all()
        return
    m_rows, n_cols = sa[-2], sb[-1]
    out_n = math.prod(so)
    ra = out_n / (m_rows * n_cols) / max(1.0, math.prod(sa) / (sa[-2] * sa[-1]))  # broadcast copies
    rb = out_n / (m_rows * n_cols) / max(1.0, math.prod(sb) / (sb[-2] * sb[-1]))
    exact = ctx.gamma_mode == "exact"  # else partners taken as normalized (the paper's γ = 1)
    mb = _moment(ctx, b) if exact else _partner(ctx, b)
    ma = _moment(ctx, a) if exact else _partner(ctx, a)
    # an element of A meets the N·chan output columns that carry gradient, one of B the M·frac rows
    ctx.pass_to(a, ctx.m_out * mb * (n_cols * ctx.chan_out * max(1.0, ra)), ctx.frac_out, 1.0)
    ctx.pass_to(b, ctx.m_out * ma * (m_rows * ctx.frac_out * max(1.0, rb)), 1.0, ctx.chan_out)


@register_rule(function=(torch.matmul, operator.matmul, torch.bmm, torch.mm), method=("matmul", "bmm", "mm"),
               moment=_matmul_moment, averages=True)
def matmul_rule(ctx: RuleContext) -> None:
    """``C = A·B``. With ``B`` a parameter ``[in, out]``: a linear layer. Between two
    activations (attention scores, ``P·V``): ``J_A = I ⊗ Bᵀ`` gives ``m_A = m·N·E[B²]`` and
    ``m_B = m·M·E[A²]`` (``A`` is ``M×K``, ``B`` is ``K×N``), times the copies of an operand
    broadcast over batch dimensions; ``E[·²]`` from the graph below (1 if none, noted)."""
    a, b = ctx.node.args[:2]
    pa, pb = ctx.param_from_arg(a), ctx.param_from_arg(b)
    if pb is not None and isinstance(a, fx.Node) and len(ctx.param_shape(pb)) == 2:
        _in_out_linear(ctx, a, pb, None, "matmul (parameter)")
        return
    if pa is not None:
        ctx.note("parameter on the left of a matmul: no rule; factor passed through")
        if isinstance(b, fx.Node):
            ctx.pass_to(b, ctx.m_out)
        return
    _matmul_activations(ctx, a, b)


# ----------------------------------------------------------------------------- softmax
def _softmax_size(ctx: RuleContext) -> int:
    shape = ctx.shape(ctx.inputs[0]) or (1,)
    dim = ctx.arg(1, "dim", -1)
    if dim is None:
        dim = -1
    return max(1, shape[dim])


@register_rule(module=nn.Softmax, function=(torch.softmax, F.softmax), method=("softmax",), structural=True,
               moment=lambda ctx: Mono.const(1.0 / _softmax_size(ctx) ** 2) if ctx.inputs else None)
def softmax_rule(ctx: RuleContext) -> None:
    """Softmax over ``S`` entries: ``J = diag(p) − ppᵀ``, ``mean diag(JᵀJ) = (S − 1)/S³`` at
    ``p = 1/S`` (uniform: attention at initialization); ``E[p²] = 1/S²``. (``log_softmax``'s
    ``J = I − 1pᵀ`` keeps ``m``: it stays with the identity rules.)"""
    if not ctx.inputs:
        return
    dim = ctx.module.dim if ctx.module is not None else ctx.arg(1, "dim", -1)
    shape = ctx.shape(ctx.inputs[0]) or (1,)
    n = max(1, shape[-1 if dim is None else dim])
    ctx.pass_to(ctx.inputs[0], ctx.m_out * ((n - 1) / n**3) if n > 1 else ctx.m_out)


# ---------------------------------------------------------------------------- attention
def _sdpa_parts(ctx: RuleContext):
    """Shapes and the attention statistics at uniform attention: with ``n_i`` keys visible to
    query ``i`` (read from the mask's structure, :func:`.masks.visible_keys`; ``is_causal``: ``i + 1``),
    ``ρ_v = mean 1/n`` (``Σ_k P²`` per query), ``ρ_qk = mean (1/n)(1 − 1/n)`` (the same with
    ``v_k − out_q``, which vanishes for a single key) and ``coh = mean (1 − 1/n)²``. Under a
    token mask (:mod:`..tokens`) they are per-step atoms over the real queries and keys."""
    q, k, v = (ctx.arg(i, n) for i, n in enumerate(("query", "key", "value")))
    sq, sk, sv = ctx.shape(q), ctx.shape(k), ctx.shape(v)
    L, S, E, Ev = sq[-2], sk[-2], sq[-1], sv[-1]
    tau = ctx.node.kwargs.get("scale") or (ctx.arg(6, "scale") if len(ctx.node.args) > 6 else None) or 1 / math.sqrt(E)
    causal = bool(ctx.arg(5, "is_causal", False))
    mask = ctx.arg(3, "attn_mask", None)
    n = visible_keys(ctx, mask, L, S) if isinstance(mask, fx.Node) else None
    if n is None:
        mshape = ctx.shape(mask) if isinstance(mask, fx.Node) else None
        if mshape and len(mshape) >= 2 and mshape[-2] == L == S and L > 1:
            causal = True  # a mask with a query dimension on self-attention: causal (a padding
            # mask has a singleton query dimension)
            ctx.note("attention mask not evaluated: taken as causal (it has a query dimension)")
        n = torch.tensor([[min(S, i + 1 + max(0, S - L)) if causal else S for i in range(L)]], dtype=torch.float64)
    elif mask is not None:
        ctx.note("attention mask: uniform over the keys it leaves" + (" (causal)" if is_causal(n, S) else ""))
    rho_v, rho_qk, coh = uniform_stats(n)
    groups = 1.0
    if ctx.node.kwargs.get("enable_gqa") and len(sq) >= 3 and len(sk) >= 3 and sk[-3]:
        groups = sq[-3] / sk[-3]
    width = sq[-3] * sq[-1] if len(sq) >= 4 else sq[-1]
    kind = token_kind(ctx, mask, n, L, S)
    if kind is not None and ctx.frac_out < 1 - 1e-9:
        kind = "chosen"  # only chosen queries carry gradient (a pooler's): real, one per sample
    if kind is not None:
        ctx.note(f"attention over the real tokens ({kind} queries): ρ read from each step's token mask")
        stats = tuple(ctx.stat_mean(stat_ref(kind, w)) for w in STATS)
    else:
        stats = tuple(Mono.const(x) if x > 0 else None for x in (rho_v, rho_qk, coh))
    return q, k, v, L, S, Ev, float(tau), stats, 1.0 / width, groups, kind is not None


def _sdpa_moment(ctx: RuleContext) -> Mono | None:
    q, k, v, L, S, Ev, tau, (rho_v, _, _), _, groups, _ = _sdpa_parts(ctx)
    ev, _ = ctx.variance_below(v)
    return None if ev is None else ev * rho_v


@register_rule(function=F.scaled_dot_product_attention, moment=_sdpa_moment, averages=True)
def sdpa_rule(ctx: RuleContext) -> None:
    """``softmax(τ·QKᵀ + mask)·V`` at uniform attention over the keys each query sees (see
    :func:`_sdpa_parts`):

    * value ``m·f_q·(L/S)·ρ_v`` — ``Σ_q P_qk²`` over the ``f_q·L`` queries whose output carries
      gradient (``f_q`` the output's ``frac``: BERT's last block under a pooler reads one);
    * query ``m·τ²·d_v·E[v²]·E[k²]·(ρ_qk + coh/D)`` — ``∂out_q/∂q = τ Σ_k P_qk (v_k − out_q) k_kᵀ``
      is incoherent over keys (``ρ_qk``) plus a coherent part: a key and its value are read
      from one token through independent weights, so ``E[v_k k_kᵀ]`` has norm² ``≈ 1/D`` per
      unit moment (``D`` the model width, heads × head dim);
    * key ``m·τ²·d_v·E[v²]·E[q²]·f_q·(L/S)·ρ_qk``; only the ``f_q`` share of queries carry gradient.

    The keys each query sees come from the mask's structure (evaluated without padding: causal,
    sliding window, bidirectional); with a token mask, from each step's real tokens. GQA
    multiplies the key/value factors by the query heads per key head. Under ``gamma="one"`` the
    partners' moments are 1 (the paper's γ = 1); ``"exact"`` reads them from the graph."""
    q, k, v, L, S, Ev, tau, (rho_v, rho_qk, coh), inv_width, groups, tokens = _sdpa_parts(ctx)
    if ctx.gamma_mode == "exact":
        ev, eq, ek = _moment(ctx, v), _moment(ctx, q), _moment(ctx, k)
    else:  # bilinear partners taken as normalized, as the paper's BN takes γ = 1 (§2.3, §4)
        ev = eq = ek = Mono()
    m, fq = ctx.m_out, ctx.frac_out  # fq: the share of the queries whose output carries gradient
    mkv = m  # keys and values: summed over the fq·L queries, averaged over the keys
    if tokens and fq < 1 - 1e-9:  # chosen queries (real) over the f·S real keys: fq·L/(f·S)
        mkv = m / ctx.stat_mean(SHARE_REF)
    ctx.pass_to(v, mkv * rho_v * ((L / S) * groups * fq), 1.0, 1.0)
    terms = [(w, x) for w, x in ((1.0, rho_qk), (inv_width, coh)) if x is not None]
    if terms:
        ctx.pass_to(q, m * ev * ek * ctx.atoms.sum_of(terms, label=f"{ctx.node.name}: ρ_qk + coh/D") * (tau * tau * Ev),
                    fq, 1.0)
    if rho_qk is not None:
        ctx.pass_to(k, mkv * ev * eq * rho_qk * (tau * tau * Ev * (L / S) * groups * fq), 1.0, 1.0)


# ------------------------------------------------------------------------------- norms
def _fn_norm_moment(ctx: RuleContext) -> Mono:
    g = ctx.param_from_arg(ctx.arg(2, "weight"))
    return Mono() if g is None else ctx.gamma_sq(g)


def _fn_norm(ctx: RuleContext, gamma, beta, feature_numel: int, kind: str) -> None:
    s = ctx.frac_out * ctx.positions_per_sample(ctx.node, feature_numel)
    norm_layer(ctx, gamma, beta, None, kind, s=s)


@register_rule(function=F.layer_norm, moment=_fn_norm_moment, channel_dim=-1, norm=True)
def functional_layer_norm_rule(ctx: RuleContext) -> None:
    """F.layer_norm(x, shape, weight, bias): as nn.LayerNorm."""
    shape = ctx.arg(1, "normalized_shape")
    _fn_norm(ctx, ctx.param_from_arg(ctx.arg(2, "weight")), ctx.param_from_arg(ctx.arg(3, "bias")),
             math.prod(shape), "F.layer_norm")


@register_rule(function=F.rms_norm, moment=_fn_norm_moment, channel_dim=-1, norm=True)
def functional_rms_norm_rule(ctx: RuleContext) -> None:
    """F.rms_norm(x, shape, weight): as LayerNorm without centring (``J ≈ I/rms``)."""
    shape = ctx.arg(1, "normalized_shape")
    _fn_norm(ctx, ctx.param_from_arg(ctx.arg(2, "weight")), None, math.prod(shape), "F.rms_norm")


@register_rule(function=F.group_norm, moment=_fn_norm_moment, channel_dim=1, norm=True)
def functional_group_norm_rule(ctx: RuleContext) -> None:
    """F.group_norm(x, groups, weight, bias): as nn.GroupNorm."""
    x = ctx.inputs[0]
    ch = (ctx.shape(x) or (1, 1))[1]
    _fn_norm(ctx, ctx.param_from_arg(ctx.arg(2, "weight")), ctx.param_from_arg(ctx.arg(3, "bias")), ch, "F.group_norm")


def _strip(node):
    """Look through dtype/device conversions and views that keep every element."""
    while isinstance(node, fx.Node) and op_name(node) in ("to", "float", "type_as", "contiguous", "clone"):
        node = node.args[0]
    return node


def rms_source(a, b) -> fx.Node | None:
    """If ``a·b`` is RMS normalization written out — ``b = rsqrt(mean(a², -1) + ε)`` (any
    vocabulary, dtype casts allowed) — return ``a``."""
    b = _strip(b)
    if op_name(b) != "rsqrt":
        return None
    inner = _strip(b.args[0])
    if op_name(inner) == "add":
        inner = next((x for x in inner.args if isinstance(x, fx.Node)), None)
    if op_name(inner) != "mean":
        return None
    sq = _strip(inner.args[0])
    if op_name(sq) == "pow" and len(sq.args) > 1 and sq.args[1] == 2:
        src = sq.args[0]
    elif op_name(sq) == "mul" and len(sq.args) == 2 and sq.args[0] is sq.args[1]:
        src = sq.args[0]
    else:
        return None
    return a if _strip(src) is _strip(a) else None


# ------------------------------------------------------------------------ small pieces
def _exponent(ctx: RuleContext) -> float | None:
    p = ctx.arg(1, "exponent")
    return float(p) if isinstance(p, (int, float)) and not isinstance(p, bool) else None


def _mono_pow(m: Mono, p: float) -> Mono:
    return Mono(tuple((i, q * p) for i, q in m.powers), m.log_const * p)


@register_rule(function=(torch.pow,), method=("pow",), moment=lambda ctx: _pow_moment(ctx))
def pow_rule(ctx: RuleContext) -> None:
    """``x**p`` (a constant exponent): ``J = p·x^(p−1)``, ``m ← m·p²·E[x²]^(p−1)`` (a Gaussian's
    higher moments taken as powers of ``E[x²]``, noted); output moment ``E[x²]^p``."""
    p = _exponent(ctx)
    if not ctx.inputs:
        return
    if p is None:
        ctx.note("pow with a tensor exponent: m kept (heuristic)")
        ctx.pass_to(ctx.inputs[0], ctx.m_out)
        return
    ex2 = _moment(ctx, ctx.inputs[0])
    ctx.note("pow: E[x^(2p−2)] taken as E[x²]^(p−1)")
    ctx.pass_to(ctx.inputs[0], ctx.m_out * _mono_pow(ex2, p - 1) * (p * p))


def _pow_moment(ctx: RuleContext) -> Mono | None:
    p = _exponent(ctx)
    if p is None or not ctx.inputs:
        return None
    got, _ = ctx.variance_below(ctx.inputs[0])
    return None if got is None else _mono_pow(got, p)


@register_rule(function=(operator.neg, torch.neg), method=("neg",), transparent=True)
def neg_rule(ctx: RuleContext) -> None:
    """``−x``: ``J = −I``, ``m`` unchanged."""
    if ctx.inputs:
        ctx.pass_to(ctx.inputs[0], ctx.m_out)


@register_rule(function=(torch.cos, torch.sin), method=("cos", "sin"), moment=lambda ctx: Mono.const(0.5))
def trig_rule(ctx: RuleContext) -> None:
    """``cos``/``sin`` of phases spread over whole periods (rotary tables): ``E[cos'²] =
    E[sin²] = 1/2``, and the output moment ``1/2``."""
    if ctx.inputs:
        ctx.pass_to(ctx.inputs[0], ctx.m_out * 0.5)


@register_rule(function=(torch.broadcast_to,), method=("expand", "expand_as"), transparent=True)
def expand_rule(ctx: RuleContext) -> None:
    """``expand``: each element is read ``r = numel(out)/numel(in)`` times; stacking the
    copies' Jacobians gives ``m ← m·r`` (grouped-query attention's ``repeat_kv``). A parameter
    expanded over the batch (a class token) is a layer: scale ``1/(m·s)``, ``s`` its copies
    per sample."""
    name = ctx.param_from_arg(ctx.node.args[0]) if ctx.node.args else None
    if name is not None:  # a learned token (ViT's class token): a bias of the positions it fills
        per_sample = ctx.positions_per_sample(ctx.node, 1) / max(1, ctx.numel_of_param(name))
        s = ctx.frac_out * max(1.0, per_sample)
        ctx.add_layer("token (parameter)", [(name, "bias", s)], weight=name, s=s, c=1.0, input_node=None)
        return
    if ctx.inputs:
        x = ctx.inputs[0]
        r = ctx.numel(ctx.node) / max(1, ctx.numel(x))
        ctx.pass_to(x, ctx.m_out * max(1.0, r), 1.0 if r > 1 else None, 1.0 if r > 1 else None)


def _einsum_sizes(eq: str, shapes) -> tuple[list[str], str, dict[str, int]] | None:
    eq = eq.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    subs = lhs.split(",")
    if len(subs) != len(shapes) or any(s is None or len(s) != len(sub) for s, sub in zip(shapes, subs)):
        return None
    sizes: dict[str, int] = {}
    for sub, shape in zip(subs, shapes):
        for ch, n in zip(sub, shape):
            sizes[ch] = max(sizes.get(ch, 1), n)
    return subs, out, sizes


def _einsum_parts(ctx: RuleContext) -> tuple[list, tuple | None]:
    """The operands of ``einsum(eq, a, b)`` or ``einsum(eq, [a, b])`` (export's form), and the
    parsed subscripts (``None`` when they cannot be read)."""
    eq, rest = ctx.node.args[0], ctx.node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = rest[0]
    ops = [a for a in rest if isinstance(a, fx.Node)]
    return ops, (_einsum_sizes(eq, [ctx.shape(o) for o in ops]) if isinstance(eq, str) else None)


def _einsum_moment(ctx: RuleContext) -> Mono | None:
    """Output moment of a two-operand einsum between activations, as ``matmul``'s:
    ``E[A²]·E[B²]·K`` with ``K`` the summed-over size (independent terms) — ``E[v²]/S`` for
    attention probabilities times values; one operand: its moment."""
    ops, parsed = _einsum_parts(ctx)
    if parsed is None or any(ctx.param_from_arg(o) is not None for o in ops):
        return None
    subs, out, sizes = parsed
    got = [ctx.variance_below(o)[0] for o in ops]
    if any(g is None for g in got) or len(ops) not in (1, 2):
        return None
    if len(ops) == 1:
        return got[0] if set(subs[0]) == set(out) else None
    summed = (set(subs[0]) | set(subs[1])) - set(out)
    return got[0] * got[1] * float(max(1, math.prod(sizes[ch] for ch in summed)))


@register_rule(function=(torch.einsum,), moment=_einsum_moment, averages=True)
def einsum_rule(ctx: RuleContext) -> None:
    """``einsum`` of two operands: the bilinear rule of ``matmul`` from the subscripts — an
    element of ``A`` meets ``N_A`` outputs (the product of the output indices ``A`` lacks),
    each with a coefficient of ``B``: ``m_A = m·N_A·E[B²]`` (``E[B²]`` taken as 1 under
    ``gamma="one"`` unless ``B`` is a softmax output). One operand: its indices kept (a
    permutation) keep ``m``."""
    ops, parsed = _einsum_parts(ctx)
    if parsed is None or len(ops) not in (1, 2):
        ctx.note("einsum: each operand keeps m (heuristic)")
        ctx.pass_all()
        return
    subs, out, sizes = parsed
    if len(ops) == 1:
        ctx.pass_to(ops[0], ctx.m_out)
        return
    exact = ctx.gamma_mode == "exact"
    for i, (a, b) in enumerate(((ops[0], ops[1]), (ops[1], ops[0]))):
        n = math.prod(sizes[ch] for ch in out if ch not in subs[i])
        eb = _moment(ctx, b) if exact else _partner(ctx, b)
        ctx.pass_to(a, ctx.m_out * eb * max(1, n), 1.0, 1.0)
