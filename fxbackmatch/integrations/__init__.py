"""Trainer integrations: a callback per trainer that prepares a plan and attaches it.

* :class:`BackmatchCallback` — ``lightning.pytorch`` (``fxbackmatch.integrations.lightning``);
* :class:`BackmatchTrainerCallback` — Hugging Face ``transformers.Trainer``
  (``fxbackmatch.integrations.hf``).

timm's ``NativeScaler`` loop and torchtitan-style optimizer containers need no callback:
``plan.attach(optimizer)`` (README, "Use it with your trainer"). Each trainer is imported only when its
callback is first looked up here, so ``import fxbackmatch`` never imports a trainer. This
package may import ``prepare``, ``Plan`` and :mod:`fxbackmatch.apply`; nothing in the
package imports it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._common import resolve_mode, unwrap_optimizer

if TYPE_CHECKING:
    from .hf import BackmatchTrainerCallback
    from .lightning import BackmatchCallback

__all__ = ["BackmatchCallback", "BackmatchTrainerCallback", "resolve_mode", "unwrap_optimizer"]

_LAZY = {"BackmatchCallback": ".lightning", "BackmatchTrainerCallback": ".hf"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
