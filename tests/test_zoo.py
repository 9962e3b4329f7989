"""The torchvision zoo sweep: every classification builder either prepares with finite,
positive scales or raises an fxbackmatch error naming the op — nothing else; every CNN family
prepares, fully covered, with every scale inside the documented range at default init
(``resnet18(zero_init_residual=True)`` included). Whether they *train* is docs/zoo.md's
"trains" column (benchmarks/zoo_sweep.py: 20 SGD steps on real CIFAR-10)."""
from __future__ import annotations

import warnings

import pytest
import torchvision

from fxbackmatch.guards import SCALE_RANGE
from fxbackmatch.zoo import VARIANTS, sweep_model

MODELS = torchvision.models.list_models(module=torchvision.models) + list(VARIANTS)
TARGET_FAMILIES = (
    "resnet", "resnext", "wide_resnet", "vgg", "densenet", "mobilenet", "efficientnet", "regnet",
    "shufflenet", "squeezenet", "mnasnet", "googlenet", "convnext", "alexnet", "inception",
)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_zoo_model(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # out-of-range scales of the transformer families
        r = sweep_model(name)  # raises AssertionError on non-finite scales, anything else escapes
    if name.startswith(TARGET_FAMILIES):
        assert r.outcome == "ok", r.message
        assert r.conv_linear_covered and r.covered == r.total
        assert SCALE_RANGE[0] <= r.scale_min and r.scale_max <= SCALE_RANGE[1], (r.scale_min, r.scale_max)
    else:
        assert r.outcome == "ok" or r.outcome.endswith("Error"), r
        if r.outcome != "ok":
            assert "node" in r.message or "module" in r.message
            assert r.lenient_covered and r.lenient_covered > 0  # strict=False prepares, finite scales
