"""``prepare``: the entry point of the pass."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .analysis.conventions import Conventions, merge_legacy, resolve
from .plan import Plan
from .analysis.registry import RuleRegistry

__all__ = ["prepare"]


def prepare(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    leaf_modules: Sequence = (),
    rule: str = "backmatch",
    adapt: str = "all",
    strict: bool = False,
    compile: bool = True,
    trust_coefficient: float = 1e-3,
    registry: RuleRegistry | None = None,
    capture: str = "auto",
    outputs: Any = None,
    example_kwargs: dict | None = None,
    factors: str = "derived",
    refresh: int = 10,
    probes: int = 4,
    token_mask: str | int | None = None,
    conventions: str | Conventions = "default",
    **deprecated: Any,
) -> Plan:
    """Trace ``model``, propagate shapes, walk the graph and build its layer-wise scales.

    ``example_inputs`` is a tensor or tuple of tensors (batch dimension first);
    ``example_kwargs`` keyword inputs (``{"attention_mask": m, "use_cache": False}``). Leave
    both out and the plan completes itself from the model's first forward call. Capture
    (``capture=``): ``"auto"`` tries ``torch.fx`` symbolic tracing, then ``torch.export``
    (non-strict; Hugging Face models); ``"fx"``/``"export"`` force one; ``"hooks"`` records
    module calls (chains only). ``prepare``
    never changes the model: parameters, buffers and train/eval mode stay as they were.

    Options: ``rule`` — ``"backmatch"`` (default), ``"lars"``, ``"lsalr"``, ``"sgd"``;
    ``adapt="weights"`` keeps biases and norm parameters at scale 1; an op with no rule
    does not stop the pass (``strict=False``, the default): an elementwise one gets the
    mean-field elementwise rule, any other has its own factor measured on the live batch
    every ``refresh`` steps (:mod:`fxbackmatch.analysis.gaps`), and the report says which;
    parameters no rule owns stay at scale 1, listed in ``plan.uncovered``; ``strict=True``
    refuses both instead (:class:`UnsupportedOpError`, :class:`UncoveredParameterError`);
    ``compile=False`` runs the generated function eagerly.
    ``outputs`` names the outputs that enter the loss (tuple index, dict key or field name,
    or a sequence of them; default: every tensor output) — only they start the chain with
    ``m = 1``. ``factors="measured"`` measures every layer's ``m`` on the live batch every
    ``refresh`` steps (``probes`` random probes). ``token_mask="attention_mask"`` (a keyword
    input, or a positional index) names the ``B × T`` mask of real tokens: the layers over
    ``(B, T, …)`` then share their weights over the real tokens of each step's batch
    (``s = f·T``, :mod:`fxbackmatch.analysis.tokens`).

    ``conventions`` — how the chain approximates each layer: a
    :class:`fxbackmatch.Conventions` or a name of ``fxbackmatch.analysis.conventions.CONVENTIONS``:
    ``"default"`` (the default) is ``Conventions(relu="exact", activations="meanfield",
    taps="valid", span="batch", moments="batch", floor="init")``, the set for models outside
    the paper's tables (docs/zoo.md); ``"paper"`` is ``Conventions()``, the paper's choices,
    bit for bit the plans of ``prepare`` before 0.3 — use it to reproduce the paper's numbers.
    Its fields:
    ``activations="meanfield"``: every elementwise activation whose input is a norm's or a
    weighted layer's output passes ``m·E[φ'(z)²]`` and has the forward moment ``Var[φ]``
    (after a norm; ``E[φ²]`` elsewhere) under a zero-mean Gaussian ``z`` of the variance the
    chain knows, and dropout in training is ``1/(1−p)`` both ways; ``"paper"``: the identity.
    ``floor="init"``: each weight's ``sum(W²)`` counts at least ``numel·v₀``, ``v₀`` its layer
    kind's default-init variance (``shape[0]/3`` for Linear/Conv; embeddings 1; γ with
    ``gamma="exact"`` at least 1); ``"none"``: as it is.
    ``gamma="one"`` treats multiplicative parameters (norm γ, layer scales) as 1 in the chain
    and in the forward moments, as the paper's BN (§2.3, §4); ``gamma="exact"`` uses ``mean(γ²)``.
    ``relu="exact"``: a ReLU of a norm layer's output passes gradient at half of its entries
    (``m/2``) and has ``Var = (1/2 − 1/2π)·E[z²]`` — use it on deep ResNets/RegNets (the
    paper's identity, ``relu="paper"``, drifts by ``1 − 1/π`` per stage on deep nets).
    ``taps="valid"`` counts only the conv kernel taps that read real input, not zero padding
    (exact at the borders; ``"all"`` is the paper's convention; on its VGG both
    give the same scales) — it matters where a kernel is as wide as the map (3×3 on 1×1).
    ``span="batch"`` takes a weight's normal matrix ``E aaᵀ`` on the span of the batch: its
    scale is divided by ``max(1, n/(B·s))`` (``n`` its fan-in, ``B·s`` the rows sharing it, ``B``
    from each forward call) — for wide layers at small batches (:mod:`fxbackmatch.analysis.span`).
    ``moments="batch"`` measures the second moment of every value that averages over
    positions (pooling, means, attention outputs) on the live batch every ``refresh`` steps
    (one extra forward of the captured graph) instead of taking the averaged values as
    independent — real feature maps and tokens are alike (post-activation means, neighbouring
    patches): up to 80× larger than that estimate on MaxViT, 14× on Swin.
    ``unnormalized="virtual"`` acts as if a BatchNorm followed every weighted layer that has
    none above it (the paper's precondition; output layers excepted): the chain then no longer
    depends on the weights' overall scale — use it for transformers at small-std inits.
    ``variance="measured"`` uses BatchNorm running variances instead of the row-norm
    approximation. ``cap`` keeps every scale in ``[1/cap, cap]``.
    ``prepare(model, x, relu="exact")`` and the other fields of 0.2 as keywords still work,
    with a :class:`DeprecationWarning`, applied over the chosen conventions (the default set
    unless ``conventions=`` says otherwise): write
    ``conventions=fxbackmatch.Conventions.named("default").replace(relu="exact")``.
    Scales outside ``fxbackmatch.analysis.guards.SCALE_RANGE`` at the current weights raise a
    ``ScaleRangeWarning``.

    >>> import torch, fxbackmatch
    >>> from fxbackmatch.models import lenet_bn
    >>> plan = fxbackmatch.prepare(lenet_bn(), torch.randn(2, 3, 32, 32), compile=False)
    >>> [r.s for r in plan.layers]
    [196.0, 25.0, 1.0, 1.0, 1.0]
    """
    chosen = merge_legacy(resolve(conventions), deprecated, "prepare", stacklevel=3)
    plan = Plan(
        model, leaf_modules=leaf_modules, rule=rule, adapt=adapt, strict=strict, compile=compile,
        trust_coefficient=trust_coefficient, registry=registry, capture=capture, outputs=outputs, factors=factors,
        refresh=refresh, probes=probes, token_mask=token_mask, conventions=chosen,
    )
    if example_inputs is None and not example_kwargs:
        plan._arm()
        return plan
    if example_inputs is None:
        example_inputs = ()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    plan._build(tuple(example_inputs), example_kwargs)
    return plan
