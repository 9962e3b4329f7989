"""Padding-aware weight sharing (``prepare(..., token_mask=...)``): a layer over ``(B, T, …)``
shares its weight over the real tokens only, ``s = f·T``. Checked against the measured
curvature of the weight (autograd, padded positions carry no gradient) and against a plan
prepared without the mask (exactly ``1/f`` on the token-wise layers, 1 elsewhere)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxbackmatch
from fxbackmatch.errors import FxBackmatchError
from fxbackmatch.measure.factors import carrying_mean

B, T, D = 64, 8, 16


class Seq(nn.Module):
    """Token-wise layers whose padded outputs are masked out of the loss, and a classifier
    on the first token (always real)."""

    def __init__(self, heads: bool = True):
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(D, 48, bias=False)
        self.out = nn.Linear(48, 24, bias=False)
        self.cls = nn.Linear(48, 4, bias=False)

    def forward(self, x, attention_mask):
        h = self.inp(x)
        tok = self.out(h) * attention_mask.unsqueeze(-1)
        return (tok, self.cls(h[:, 0])) if self.heads else tok


def padded_mask(lengths) -> torch.Tensor:
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(torch.float32)


def lengths(b=B):
    return [T if i % 2 == 0 else T // 4 for i in range(b)]  # f = (8 + 2)/16 = 5/8


def test_token_mask_scale_matches_the_measured_weight_curvature():
    """``scale × mean diag(J_WᵀJ_W)`` per sample is 1 where the rule is exact: with the mask,
    for the token-wise layers; without it they are off by the real-token share ``f = 5/8``."""
    ratios = {True: [], False: []}
    mask = padded_mask(lengths())
    for d in range(4):
        torch.manual_seed(300 + d)
        net = Seq(heads=False)
        x = torch.randn(B, T, D)
        out = net(x, mask)
        w = net.inp.weight
        acc = torch.zeros_like(w, dtype=torch.float64)
        gen = torch.Generator().manual_seed(d)
        for _ in range(64):
            z = torch.randint(0, 2, out.shape, generator=gen).to(out.dtype) * 2 - 1
            (g,) = torch.autograd.grad(out, w, z, retain_graph=True)
            acc += g.double().square()
        curv = carrying_mean(acc / 64) / B
        for masked in ratios:
            kw = {"token_mask": "attention_mask"} if masked else {}
            plan = fxbackmatch.prepare(net, (x,), example_kwargs={"attention_mask": mask}, compile=False, **kw)
            ratios[masked].append(math.log(plan.scales()["inp.weight"] * curv))
    geo = {k: math.exp(sum(v) / len(v)) for k, v in ratios.items()}
    assert geo[True] == pytest.approx(1.0, rel=0.12)
    assert geo[False] == pytest.approx(5 / 8, rel=0.12)


def test_each_steps_mask_sets_the_share_and_compiled_equals_eager():
    torch.manual_seed(0)
    net = Seq()
    x = torch.randn(B, T, D)
    full = torch.ones(B, T)
    plan = fxbackmatch.prepare(net, (x,), example_kwargs={"attention_mask": full}, token_mask="attention_mask")
    ref = fxbackmatch.prepare(net, (x,), example_kwargs={"attention_mask": full}, compile=False)
    base = ref.scales()
    assert plan.scales() == pytest.approx(base, rel=1e-12)  # f = 1 before any padded batch
    notes = {r.name: r.notes for r in plan.layers}
    assert "s × real-token share" in notes["inp"] and "s × real-token share" not in notes["cls"]
    net(x, padded_mask(lengths()))  # the last forward's mask is the step's
    got = plan.scales()
    f = 5 / 8
    for n, v in base.items():
        want = v / f if n in ("inp.weight", "out.weight") else v
        assert got[n] == pytest.approx(want, rel=1e-12), n
    compiled = dict(zip(plan.targets, plan.scale_tensor().tolist()))
    for n in plan.targets:
        assert compiled[n] == pytest.approx(got[n], rel=1e-9), n
    # rescale_grads_ applies it: the gradient ratio is the scale
    loss = sum(o.square().sum() for o in net(x, padded_mask(lengths())))
    loss.backward()
    before = {n: p.grad.clone() for n, p in net.named_parameters()}
    plan.rescale_grads_()
    for n, p in net.named_parameters():
        ratio = float((p.grad.double().norm() / before[n].double().norm()))
        assert ratio == pytest.approx(got[n], rel=1e-5), n
    net(x, full)
    assert plan.scales() == pytest.approx(base, rel=1e-12)  # no padding: back to f = 1
    # cap= still bounds every scale after the token share, on both paths
    cap = 1.1
    assert base["inp.weight"] < cap < base["inp.weight"] * 8 / 5  # under the cap unpadded, over it at 1/f
    capped = fxbackmatch.prepare(net, (x,), example_kwargs={"attention_mask": full}, token_mask="attention_mask",
                                 conventions=fxbackmatch.Conventions(cap=cap), compile=False)
    net(x, padded_mask(lengths()))
    assert capped.scales()["inp.weight"] == pytest.approx(cap, rel=1e-12)
    assert float(capped.scale_tensor()[capped.targets.index("inp.weight")]) == pytest.approx(cap, rel=1e-12)


def test_token_mask_errors_name_the_input():
    net = Seq()
    x = torch.randn(2, T, D)
    with pytest.raises(FxBackmatchError, match="token_mask='mask'.*names nothing"):
        fxbackmatch.prepare(net, (x,), example_kwargs={"attention_mask": torch.ones(2, T)}, token_mask="mask")
    with pytest.raises(FxBackmatchError, match=r"token_mask=0 names a tensor of shape \(2, 8, 16\).*B × T mask"):
        fxbackmatch.prepare(net, (x,), example_kwargs={"attention_mask": torch.ones(2, T)}, token_mask=0)
    plan = fxbackmatch.prepare(net, (x,), example_kwargs={"attention_mask": torch.ones(2, T)},
                               token_mask="attention_mask", compile=False)
    with pytest.raises(FxBackmatchError, match="token_mask='attention_mask', which reads each step's batch"):
        plan.compile_step(torch.optim.SGD(net.parameters(), lr=0.1))


@pytest.mark.filterwarnings("ignore::fxbackmatch.errors.ScaleRangeWarning")  # BERT's 0.02-std head: known
def test_bert_attention_mask_scales_the_token_layers_only():
    """A Hugging Face BERT, captured with torch.export, with ``token_mask="attention_mask"``:
    on a padded batch the encoder's token-wise layers (and the embedding LayerNorm) get exactly
    ``1/f``, the pooler and classifier (one vector per sample) keep their scales."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        num_hidden_layers=1, num_attention_heads=2, hidden_size=32, intermediate_size=64, vocab_size=100,
        max_position_embeddings=32, num_labels=3))
    ids = torch.randint(0, 100, (4, T))
    full = torch.ones(4, T, dtype=torch.long)
    kw = {"attention_mask": full}
    plan = fxbackmatch.prepare(model, (ids,), example_kwargs=kw, outputs="logits", compile=False,
                               token_mask="attention_mask")
    base = plan.scales()
    padded = padded_mask(lengths(4)).long()  # f = 5/8
    model(ids, attention_mask=padded)
    got = plan.scales()
    ratio = {n: got[n] / base[n] for n in base}
    enc = [n for n in ratio if n.startswith("bert.encoder.") and n.endswith(".weight")]
    assert enc and all(ratio[n] == pytest.approx(8 / 5, rel=1e-12) for n in enc), {n: ratio[n] for n in enc}
    for n in ("bert.pooler.dense.weight", "classifier.weight"):
        assert ratio[n] == pytest.approx(1.0, rel=1e-12), n
