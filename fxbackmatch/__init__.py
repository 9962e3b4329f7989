"""fxbackmatch: layer-wise adaptive rates by approximate back-matching propagation
(Zhang, Chen, Liu), as a torch.fx graph pass.

>>> import torch, fxbackmatch
>>> from fxbackmatch.models import lenet_bn
>>> net = lenet_bn()
>>> plan = fxbackmatch.prepare(net, torch.randn(2, 3, 32, 32), compile=False)
>>> plan.scales()["0.weight"] > 0
True
"""
from .analysis import rules as _rules  # noqa: F401  (registers the built-in rules)
from .analysis.context import RuleContext
from .analysis.conventions import Conventions
from .analysis.records import LayerRecord
from .api import prepare
from .errors import (
    AdaptiveOptimizerWarning,
    AlreadyAttachedError,
    DuplicateRuleError,
    FxBackmatchError,
    NoWeightedLayerError,
    NonFiniteWeightError,
    PlanMismatchError,
    ScaleRangeWarning,
    PlanNotReadyError,
    RuleError,
    ShapePropagationError,
    TraceError,
    UncoveredParameterError,
    UnsupportedOpError,
)
from .analysis.methods import METHODS, register_method
from .plan import Plan
from .analysis.registry import REGISTRY, Rule, RuleRegistry, register_rule

__version__ = "0.3.0"

__all__ = [
    "prepare",
    "Conventions",
    "Plan",
    "LayerRecord",
    "RuleContext",
    "register_rule",
    "register_method",
    "REGISTRY",
    "METHODS",
    "Rule",
    "RuleRegistry",
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
    "AlreadyAttachedError",
    "AdaptiveOptimizerWarning",
]
