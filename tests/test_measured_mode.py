"""``factors="measured"`` (issue 11): every layer's backward factor measured on the live batch
every ``refresh`` steps, against exact Jacobians and the derived rules."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxbackmatch
from fxbackmatch.models import lenet_bn


def _chain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32, bias=False), nn.Linear(32, 24, bias=False), nn.Linear(24, 5, bias=False))


def test_measured_factors_equal_the_exact_jacobians_of_a_linear_chain():
    """``m`` at layer 1's output is ``‖W₃W₂‖²_F / 32`` exactly (a product of matrices, no
    approximation); the scale is ``1/(m·s·E[a²])`` with the layer's own input moment, measured
    on the batch too: the mean square of the values that reach it, computed here by hand."""
    net = _chain()
    x = torch.randn(64, 16)
    plan = fxbackmatch.prepare(net, x, factors="measured", probes=256, compile=False)
    w1, w2, w3 = (net[i].weight.detach().double() for i in range(3))
    m1 = float((w3 @ w2).pow(2).sum() / 32)
    m2 = float(w3.pow(2).sum() / 24)
    h1 = x.double() @ w1.T
    a0, a1, a2 = (float(t.pow(2).mean()) for t in (x.double(), h1, h1 @ w2.T))  # E[a²] of each input
    sc = plan.scales()
    assert sc["0.weight"] == pytest.approx(1 / (m1 * a0), rel=0.05)
    assert sc["1.weight"] == pytest.approx(1 / (m2 * a1), rel=0.05)
    assert sc["2.weight"] == pytest.approx(1 / a2, rel=1e-6)  # the output layer: m = 1 exactly
    # the rules' estimate from the weights (‖W₂‖²row·‖W₁‖²row, unit data) is not the batch's
    assert a2 != pytest.approx(float(w2.pow(2).sum() / 24 * w1.pow(2).sum() / 32), rel=1e-3)
    assert all("m measured" in r.notes for r in plan.layers) and "m measured" in str(plan)
    # the derived chain's paper approximation (‖W₃ᵀ‖²·‖W₂ᵀ‖² for ‖W₃W₂‖²) differs from it
    derived = fxbackmatch.prepare(net, x, compile=False).scales()
    assert derived["0.weight"] != pytest.approx(sc["0.weight"], rel=1e-3)


def test_refresh_runs_every_k_steps_on_the_last_batch_and_leaves_state_alone():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    plan = fxbackmatch.prepare(net, x, factors="measured", refresh=2, compile=False)
    calls = []
    real = plan.refresh
    plan.refresh = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    plan.attach(opt)
    before = dict(plan._measured)
    before = {k: float(v) for k, v in before.items()}
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        state = {k: v.clone() for k, v in net.state_dict().items()}
        rng = torch.random.get_rng_state()
        opt.step()  # steps 0 and 2 refresh first
        assert torch.equal(rng, torch.random.get_rng_state())  # dropout's RNG untouched
        for k, v in net.state_dict().items():
            if "running" in k or "num_batches" in k:
                assert torch.equal(v, state[k]), k
    assert len(calls) == 2
    after = {k: float(v) for k, v in plan._measured.items()}
    assert any(abs(after[k] - before[k]) > 1e-6 * abs(before[k]) for k in before)


def test_each_refresh_measures_the_batch_of_its_own_step():
    """Oracle by hand: the head's measured ``m`` is 1 (Rademacher probes at the outputs) and its
    ``s`` is 1, so its scale is ``1/E[a²]`` of its input on the refreshed batch. With
    ``refresh=2`` and a different batch every step, steps 0 and 2 apply their own batch's value
    and steps 1 and 3 keep the previous refresh's (a refresh on the prepare-time example, or on
    the step before, would show)."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    xs = [torch.randn(32, 8) + k for k in range(4)]
    y = torch.randint(0, 4, (32,))
    plan = fxbackmatch.prepare(net, xs[0][:4], factors="measured", refresh=2, compile=False)
    inputs: list[torch.Tensor] = []
    training = [False]
    net[3].register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().double()) if training[0] else None)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    plan.attach(opt)
    applied = []
    for x in xs:
        opt.zero_grad()
        training[0] = True
        F.cross_entropy(net(x), y).backward()
        training[0] = False
        opt.step()
        applied.append(plan.applied_scales()["3.weight"])
    want = [1 / float(inputs[k - k % 2].square().mean()) for k in range(4)]
    assert applied == pytest.approx(want, rel=1e-9)
    assert applied[1] != pytest.approx(1 / float(inputs[1].square().mean()), rel=1e-4)  # the batches differ


def test_an_export_graph_measures_the_first_samples_of_a_larger_batch():
    """torch.export specializes the graph to the example's shapes: a training batch of 32
    after an example of 8 is measured on its first 8 samples (the same numbers as measuring
    those 8 alone); a batch of 4 cannot run the graph, says so, and the attached step keeps
    the last measured factors with a warning instead of failing."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    plan = fxbackmatch.prepare(net, torch.randn(8, 8), factors="measured", capture="export", compile=False, conventions="paper")
    assert plan.capture == "export"
    x = torch.randn(32, 8)
    assert plan.refresh(x, seed=0) == plan.refresh(x[:8], seed=0)
    moments = {k: float(v) for k, v in plan._measured.items() if k.startswith("fxbackmatch.moment:")}
    assert moments and any(v == pytest.approx(float(x[:8].pow(2).mean()), rel=1e-6) for v in moments.values())
    with pytest.raises(fxbackmatch.PlanMismatchError, match="captured at"):
        plan.refresh(torch.randn(4, 8))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    plan.attach(opt)
    before = plan.scales()
    F.mse_loss(net(torch.randn(4, 8)), torch.randn(4, 4)).backward()
    with pytest.warns(RuntimeWarning, match="kept from the last refresh"):
        opt.step()
    assert plan.scales() == before


def test_measured_mode_on_the_papers_lenet_is_near_the_closed_form():
    """On the paper's own net, where its approximations hold, measured and derived ``m`` agree
    to the drift docs/derivations.md tabulates for LeNet, with 16 probes' noise on top (this
    seed: 0.55–1.09, the fully-connected layers lowest; bounded at 0.45–1.6). The input moments are the
    batch's own (max-pooled ReLU outputs are not the paper's 1): checked against forward
    hooks, exactly at the output layer, whose ``m`` is 1 in both."""
    torch.manual_seed(2)
    net = lenet_bn()
    x = torch.randn(64, 3, 32, 32)
    meas = fxbackmatch.prepare(net, x, factors="measured", probes=16, compile=False, conventions="paper").scales()
    der = fxbackmatch.prepare(net, x, compile=False, conventions="paper").scales()
    k = {}
    hooks = [mod.register_forward_pre_hook(lambda mod, a, n=n: k.__setitem__(f"{n}.weight", float(a[0].double().pow(2).mean())))
             for n, mod in net.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    assert set(k) == set(der)
    for n in der:  # the paper takes every weighted layer's input moment as 1
        assert 0.45 < meas[n] * k[n] / der[n] < 1.6, (n, meas[n], der[n], k[n])
    assert meas["15.weight"] * k["15.weight"] == pytest.approx(der["15.weight"], rel=1e-6)
    assert not 0.9 < k["15.weight"] < 1.1  # so the last line is not 1 = 1


def test_measured_mode_prepares_and_trains_a_hugging_face_model():
    transformers = pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))
    ids = torch.randint(0, 100, (4, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxbackmatch.ScaleRangeWarning)
        plan = fxbackmatch.prepare(model, (ids,), example_kwargs={"use_cache": False}, outputs="logits",
                                   factors="measured", refresh=5, compile=False)
    assert plan.uncovered == ()
    opt = torch.optim.SGD(model.parameters(), lr=2e-3, momentum=0.9)
    plan.attach(opt)
    for _ in range(10):
        opt.zero_grad()
        logits = model(ids, use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, 100), ids.reshape(-1))
        loss.backward()
        opt.step()
        assert math.isfinite(float(loss))
    assert all(0 < v < math.inf for v in plan.scales().values())


# ------------------------------------------------------------------ moments="batch"
class _PoolNet(nn.Module):
    """conv → ReLU → global average pool → linear head (the output layer: its scale is
    ``1/(s·E[a²])`` with ``a`` the pooled features, whose ReLU mean the independent-position
    estimate ``E[x²]/HW`` misses)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def _pooled_moment(net: _PoolNet, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.relu(net.conv(x)).mean((2, 3)).double().pow(2).mean())


def test_batch_moments_measure_what_averages_over_positions():
    torch.manual_seed(4)
    net = _PoolNet()
    x = torch.randn(16, 3, 12, 12)
    derived = fxbackmatch.prepare(net, x, compile=False, conventions="paper").scales()["head.weight"]
    plan = fxbackmatch.prepare(net, x, compile=False, conventions=fxbackmatch.Conventions(moments="batch"), refresh=1)
    k = _pooled_moment(net, x)
    assert plan.scales()["head.weight"] == pytest.approx(1.0 / k, rel=1e-6)  # s = 1, m = 1
    assert derived > 5.0 / k  # the independent-position estimate is far below the batch's
    assert plan.scales()["conv.weight"] == pytest.approx(
        fxbackmatch.prepare(net, x, compile=False, conventions="paper").scales()["conv.weight"], rel=1e-9)  # m chain kept
    assert "mean: E[a²] measured on the batch" in str(plan)  # the report names the value
    # attached, it follows the live batch: inputs 3× larger give pooled moments 9× larger
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    plan.attach(opt)
    x3 = 3 * torch.randn(16, 3, 12, 12)
    F.cross_entropy(net(x3), torch.randint(0, 4, (16,))).backward()
    opt.step()
    assert plan.scales()["head.weight"] == pytest.approx(1.0 / _pooled_moment(net, x3), rel=1e-6)
    state = plan.state_dict()
    other = fxbackmatch.prepare(net, x, compile=False, conventions="paper")
    with pytest.raises(fxbackmatch.PlanMismatchError, match="moments"):
        other.load_state_dict(state)


def test_refresh_without_measured_atoms_says_what_to_pass():
    net = nn.Sequential(nn.Linear(4, 4))
    plan = fxbackmatch.prepare(net, torch.randn(2, 4), compile=False, conventions=fxbackmatch.Conventions(moments="batch"))  # nothing averages
    with pytest.raises(fxbackmatch.FxBackmatchError, match="moments='batch'"):
        plan.refresh(torch.randn(2, 4))


def test_batch_moments_see_attention_with_a_buffer_mask_and_skip_weighted_matmuls():
    """A buffer operand (an attention mask) does not make an average a weighted layer; a
    parameter operand (``x @ W``) does, and keeps its derived moment."""

    class Att(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mask", torch.ones(6, 6, dtype=torch.bool).tril())
            self.w = nn.Parameter(torch.randn(8, 8) / 8**0.5)
            self.head = nn.Linear(8, 3)

        def forward(self, x):  # B × T × 8
            a = F.scaled_dot_product_attention(x, x, x, attn_mask=self.mask)
            return self.head(a @ self.w)

    plan = fxbackmatch.prepare(Att(), torch.randn(4, 6, 8), compile=False, conventions=fxbackmatch.Conventions(moments="batch"))
    kinds = {n.name: str(n.target) for n in plan._analysis.gm.graph.nodes}
    measured = [kinds[n] for n in plan._analysis.moment_nodes]
    assert any("scaled_dot_product_attention" in k for k in measured), measured
    assert not any("matmul" in k for k in measured), measured


def test_measured_mode_reports_the_measured_m_of_a_hugging_face_model():
    """``factors="measured"`` on GPT-2 (eval mode: no dropout draws between the two forwards):
    each layer's reported ``m`` is the Jacobian's ``mean diag(JᵀJ)`` at its output, estimated
    here independently (64 Rademacher probes of the logits through a forward hook), within the
    probes' noise. The report used to show the rule's ``m`` evaluated with the measured moments
    (1108 where the measurement, and the scales, had 43)."""
    transformers = pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32,
                                       bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, 100, (4, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxbackmatch.ScaleRangeWarning)
        plan = fxbackmatch.prepare(model, (ids,), example_kwargs={"use_cache": False}, outputs="logits",
                                   factors="measured", compile=False)
    reported = {r.name: r.m for r in plan.layers}
    modules = dict(model.named_modules())
    for name in ("transformer.h.1.mlp.c_proj", "transformer.h.0.attn.c_attn", "transformer.h.1.ln_2",
                 "transformer.ln_f"):
        seen = {}
        hook = modules[name].register_forward_hook(lambda mod, args, out: seen.setdefault("out", out))
        logits = model(ids, use_cache=False).logits
        hook.remove()
        out, gen, acc = seen["out"], torch.Generator().manual_seed(1), 0.0
        for _ in range(64):
            z = torch.randint(0, 2, logits.shape, generator=gen).to(logits.dtype) * 2 - 1
            (g,) = torch.autograd.grad(logits, out, z, retain_graph=True)
            acc = acc + g.double().square()
        assert reported[name] == pytest.approx(float((acc / 64).mean()), rel=0.05), name
