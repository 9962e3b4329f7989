"""Issue 11's check with the default conventions: torchvision ``vit_b_16``, ``swin_t`` and
``maxvit_t`` (224×224, batch 2, ``weights=None``) and tiny Hugging Face GPT-2, BERT and Llama
(built from config objects, nothing downloaded) prepare with ``fxbackmatch.prepare(model, x)``,
cover every parameter, keep every scale in ``[1e-6, 1e6]`` at init, and train 20 steps of
SGD-momentum (lr 2e-3, random data, the plan attached): finite losses, never above 3× the
first. Whether the first step moves any weight more than its norm is a test of its own, with
the models where it does marked (strict xfail: a fix shows up as a pass).

Run as a script to print each model's extreme scales under both named conventions::

    python tests/test_defaults_big.py [MODEL ...] [--conventions paper,default] [--steps 20]
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import fxbackmatch

VISION = ("vit_b_16", "swin_t", "maxvit_t")
LANGUAGE = ("gpt2", "bert", "llama")
MODELS = VISION + LANGUAGE
RANGE = (1e-6, 1e6)


def build(name: str) -> tuple[torch.nn.Module, tuple, dict, str | None, torch.Tensor]:
    """``(model, args, kwargs, outputs, labels)`` at seed 0: a torchvision model at 224×224,
    batch 2, or a tiny Hugging Face model (as ``tests/test_transformers.py`` builds them)."""
    torch.manual_seed(0)
    if name in VISION:
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        return model, (torch.randn(2, 3, 224, 224),), {}, None, torch.randint(0, 1000, (2,))
    sys.path.insert(0, str(Path(__file__).parent))
    from test_transformers import _hf

    model, kw = _hf(name)
    ids = torch.randint(0, 100, (2, 16))
    labels = torch.randint(0, 3, (2,)) if name == "bert" else torch.randint(0, 100, (2, 16))
    return model, (ids,), kw, "logits", labels


def extremes(plan: fxbackmatch.Plan) -> dict[str, Any]:
    """The smallest and largest scale at the current weights and where they are."""
    sc = plan.scales()
    lo, hi = min(sc, key=sc.get), max(sc, key=sc.get)
    return {"min": (lo, sc[lo]), "max": (hi, sc[hi]), "n": len(sc)}


def train_steps(name: str, model, plan, args, kw, labels, steps: int = 20) -> tuple[list[float], tuple[str, float]]:
    """``steps`` SGD-momentum steps (lr 2e-3) on fresh random data with the plan attached: the
    losses, and the largest first-step move ``‖ΔW‖/‖W‖`` over the nonzero parameters (and whose)."""
    opt = torch.optim.SGD(model.parameters(), lr=2e-3, momentum=0.9)
    plan.attach(opt)
    gen = torch.Generator().manual_seed(1)
    losses = []
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and bool(p.detach().norm() > 0)}
    first_move = ("", 0.0)
    model.train()
    for _ in range(steps):
        if name in VISION:
            x = (torch.randn(args[0].shape, generator=gen),)
            y = torch.randint(0, 1000, labels.shape, generator=gen)
        else:
            x = (torch.randint(0, 100, args[0].shape, generator=gen),)
            y = torch.randint(0, int(labels.max()) + 1 if name == "bert" else 100, labels.shape, generator=gen)
        out = model(*x, **kw)
        logits = out.logits if name in LANGUAGE else out
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if len(losses) == 1:
            params = dict(model.named_parameters())
            first_move = max(((n, float((params[n].detach() - w).norm() / w.norm())) for n, w in before.items()),
                             key=lambda t: t[1], default=("", 0.0))
            before = {}
    return losses, first_move


def check(name: str, conventions: str = "default", steps: int = 20) -> dict[str, Any]:
    """Prepare ``name`` under ``conventions`` (``"default"``: ``prepare(model, x)`` as it is),
    and report coverage, the extreme scales, range warnings and ``steps`` training losses."""
    model, args, kw, outputs, labels = build(name)
    opts = {} if conventions == "default" else {"conventions": conventions}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = fxbackmatch.prepare(model, args, example_kwargs=kw, outputs=outputs, compile=False, **opts)
    got = {"model": name, "conventions": conventions, "prepare_s": round(time.perf_counter() - t0, 2),
           "uncovered": list(plan.uncovered), **extremes(plan),
           "flagged": [str(w.message).split(":")[1].strip() for w in caught
                       if issubclass(w.category, fxbackmatch.ScaleRangeWarning)]}
    if steps:
        got["losses"], got["first_move"] = train_steps(name, model, plan, args, kw, labels, steps)
        got["after"] = extremes(plan)
    return got


@functools.lru_cache(maxsize=None)
def checked(name: str) -> dict[str, Any]:
    """:func:`check` once per model for both tests below."""
    return check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_models_prepare_with_the_defaults_and_train(name):
    got = checked(name)
    assert got["uncovered"] == [], got["uncovered"]
    (lo_name, lo), (hi_name, hi) = got["min"], got["max"]
    assert RANGE[0] <= lo and hi <= RANGE[1], (lo_name, lo, hi_name, hi)
    assert got["flagged"] == [], got["flagged"]
    losses = got["losses"]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses), losses
    assert max(losses) <= 3 * losses[0], losses


# measured 2026-12-05 (2-core CPU, torch 2.14.1): the largest first-step move ‖ΔW‖/‖W‖
FIRST_MOVE_FAILS = {
    "swin_t": "features.5.5.attn.proj.weight moves 1.20× its norm in step 1",
    "maxvit_t": "an MBConv conv_b weight moves 1.11× its norm in step 1 (the batch moments follow "
                "stochastic depth's draws: under torchvision 0.26's RNG state it stays under its norm)",
    "bert": "word_embeddings (HF's 0.02-std init, under the floor's N(0, 1)) moves 7.8× its norm in step 1",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=FIRST_MOVE_FAILS[n])) if n in FIRST_MOVE_FAILS else n
    for n in MODELS])
def test_the_first_step_moves_no_weight_more_than_its_norm(name):
    who, move = checked(name)["first_move"]
    assert move <= 1.0, (who, move)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=list(MODELS))
    p.add_argument("--conventions", default="paper,default")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    for m in a.models:
        for c in a.conventions.split(","):
            print(json.dumps(check(m, c, a.steps)), flush=True)
