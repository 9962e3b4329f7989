"""The torchvision zoo sweep (issue 6): every classification builder either prepares with
finite, positive scales or raises an fxbackmatch error naming the op — nothing else."""
from __future__ import annotations

import pytest
import torchvision

from fxbackmatch.zoo import sweep_model

MODELS = torchvision.models.list_models(module=torchvision.models)
TARGET_FAMILIES = (
    "resnet", "resnext", "wide_resnet", "vgg", "densenet", "mobilenet", "efficientnet", "regnet",
    "shufflenet", "squeezenet", "mnasnet", "googlenet", "convnext", "alexnet", "inception",
)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_zoo_model(name):
    r = sweep_model(name)  # raises AssertionError on non-finite scales, anything else escapes
    if name.startswith(TARGET_FAMILIES):
        assert r.outcome == "ok", r.message
        assert r.conv_linear_covered and r.covered == r.total
    else:
        assert r.outcome == "ok" or r.outcome.endswith("Error"), r
        if r.outcome != "ok":
            assert "node" in r.message or "module" in r.message
            assert r.lenient_covered and r.lenient_covered > 0  # strict=False prepares, finite scales
