"""Errors raised by fxbackmatch.

Every error says what is wrong, where (node / module) and what to do about it.
"""
from __future__ import annotations

__all__ = [
    "FxBackmatchError",
    "TraceError",
    "ShapePropagationError",
    "UnsupportedOpError",
    "RuleError",
    "UncoveredParameterError",
    "NoWeightedLayerError",
    "PlanNotReadyError",
    "PlanMismatchError",
    "DuplicateRuleError",
    "NonFiniteWeightError",
    "ScaleRangeWarning",
    "AdaptiveOptimizerWarning",
    "AlreadyAttachedError",
    "CliError",
]


class FxBackmatchError(RuntimeError):
    """Base class of every error fxbackmatch raises."""


class TraceError(FxBackmatchError):
    """The model could not be captured as an FX graph."""


class ShapePropagationError(FxBackmatchError):
    """Running the traced graph on (fake) example inputs failed."""


class UnsupportedOpError(FxBackmatchError):
    """An op on a gradient path has no rule in the registry."""


class RuleError(FxBackmatchError):
    """A registered rule failed on a node it was asked about."""


class UncoveredParameterError(FxBackmatchError):
    """A trainable parameter is used by an op that no rule owns (``strict=True``)."""


class NoWeightedLayerError(FxBackmatchError):
    """The model has no layer the rules know how to rescale."""


class PlanNotReadyError(FxBackmatchError):
    """The plan was prepared without example inputs and the model has not run yet."""


class PlanMismatchError(FxBackmatchError):
    """The model changed after ``prepare`` or a state dict belongs to another model."""


class DuplicateRuleError(FxBackmatchError):
    """A rule for this module type, function or method is already registered."""


class NonFiniteWeightError(FxBackmatchError):
    """A weight norm is not finite, so no meaningful scale exists."""


class ScaleRangeWarning(UserWarning):
    """A scale lies outside the documented range (``fxbackmatch.analysis.guards.SCALE_RANGE``)."""


class AdaptiveOptimizerWarning(UserWarning):
    """A gradient rescale was attached to an optimizer whose normalization cancels it."""


class AlreadyAttachedError(FxBackmatchError):
    """A plan would scale a parameter that an attached plan already scales on this optimizer."""


class CliError(Exception):
    """A one-line user error of the command line or the training harness: the CLI prints it
    without a traceback and exits with status 2."""
