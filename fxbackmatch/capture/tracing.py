"""Capture a model as an FX graph.

One leaf-module policy: torch's own ``nn`` modules (as ``torch.fx.Tracer`` decides) plus any
module type that has a rule in the registry, plus the user's ``leaf_modules``. Everything
else is traced through, so a custom block built from known layers needs no rule of its own.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch.fx as fx
from torch import nn

from ..errors import TraceError

__all__ = ["BackmatchTracer", "trace", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the user's module inside ``torch.compile``, DDP or DataParallel wrappers.

    >>> unwrap_model(torch.compile(nn.Linear(2, 2))).__class__.__name__
    'Linear'
    """
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        break
    return model


class BackmatchTracer(fx.Tracer):
    """``fx.Tracer`` whose leaves are torch's modules, rule-owned types and ``leaf_modules``."""

    def __init__(self, is_rule_leaf: Callable[[nn.Module], bool], leaf_modules: Iterable = ()):
        super().__init__()
        self._is_rule_leaf = is_rule_leaf
        leaf_types, leaf_names = [], set()
        for item in leaf_modules:
            if isinstance(item, str):
                leaf_names.add(item)
            elif isinstance(item, type) and issubclass(item, nn.Module):
                leaf_types.append(item)
            else:
                raise TypeError(
                    f"leaf_modules entries must be nn.Module subclasses or qualified module "
                    f"names, got {item!r}"
                )
        self._leaf_types = tuple(leaf_types)
        self._leaf_names = leaf_names

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or isinstance(m, self._leaf_types):
            return True
        if self._is_rule_leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(
    model: nn.Module,
    is_rule_leaf: Callable[[nn.Module], bool],
    leaf_modules: Iterable = (),
) -> fx.GraphModule:
    """Symbolically trace ``model``; raise :class:`TraceError` with advice on failure."""
    tracer = BackmatchTracer(is_rule_leaf, leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # torch.fx raises many kinds; we re-raise one, with the cause
        name = type(model).__name__
        raise TraceError(
            f"torch.fx could not trace {name}: {type(e).__name__}: {e}\n"
            f"  What to do: if a submodule has data-dependent control flow (an `if` on a tensor "
            f"value, a loop over a tensor), keep it opaque with "
            f"prepare(..., leaf_modules=[TheModuleClass or 'qualified.name']) and register a "
            f"rule for it (fxbackmatch.register_rule), or make the forward traceable."
        ) from e
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    return gm
