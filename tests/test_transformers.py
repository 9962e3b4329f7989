"""Transformers (issue 11): the torch.export front end and the attention/embedding/norm rules,
against the measured-Jacobian oracle, hand computations and exact equivalences."""
from __future__ import annotations

import math
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxbackmatch
from fxbackmatch.models import lenet_bn
from test_oracle import TOL, oracle_ratios


def _close(ratios: dict[str, float], tol: float = TOL) -> dict[str, float]:
    return {k: round(v, 3) for k, v in ratios.items() if abs(math.log(v)) > math.log(1 + tol)}


# ----------------------------------------------------------------- oracle on small graphs
class Attn(nn.Module):
    """LN → q, k, v → attention (SDPA or written out) → o → head, per token (a language
    model's layout: the output Jacobian is block-diagonal over tokens, as the paper's
    ``J_topᵀJ_top ≈ m·I`` assumes; a mean over tokens before the head would couple them).
    Linearized (no activations); q/k small so that attention is near uniform at init."""

    def __init__(self, manual: bool = False, causal: bool = False, d: int = 32, heads: int = 2):
        super().__init__()
        self.manual, self.causal, self.h = manual, causal, heads
        self.n = nn.LayerNorm(d, elementwise_affine=False)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.head = nn.Linear(d, 10, bias=False)
        with torch.no_grad():
            self.q.weight.mul_(0.1)
            self.k.weight.mul_(0.1)

    def forward(self, x):  # B × T × d
        b, t, d = x.shape
        h = self.n(x)
        q, k, v = (f(h).view(b, t, self.h, d // self.h).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.manual:
            p = torch.softmax(q @ k.transpose(-2, -1) * (d // self.h) ** -0.5, dim=-1)
            a = p @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.head(self.o(a.transpose(1, 2).reshape(b, t, d)))


class RMSMLP(nn.Module):
    """Linear → RMS normalization written out (Llama's) → linear → head; and x·W via addmm."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.a = nn.Linear(d, d, bias=False)
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)  # GPT-2 Conv1D layout [in, out]
        self.head = nn.Linear(d, 10, bias=False)

    def forward(self, x):  # B × T × d
        y = self.a(x)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
        z = torch.addmm(torch.zeros(y.shape[-1]), y.reshape(-1, y.shape[-1]), self.w).view_as(y)
        return self.head(z)


@pytest.mark.parametrize("causal", [False, True], ids=["sdpa", "sdpa-causal"])
def test_attention_rules_match_measured_jacobians(causal):
    """With ``gamma="exact"`` (the partners' moments from the graph) every value's rule ``m``
    agrees with the measured ``mean diag(JᵀJ)`` — q, k and v paths included."""
    ratios = oracle_ratios(lambda: Attn(causal=causal), (16, 32), draws=3, conventions=fxbackmatch.Conventions(gamma="exact"))
    assert {"q", "k", "v"} <= set(ratios), ratios
    assert not _close(ratios), ratios


class PooledAttn(Attn):
    """``Attn`` with a head on token 0 alone (BERT's pooler): only one query's output carries
    gradient, and a padding mask of BERT's layout (``B × 1 × T × T``, all ones) if asked."""

    def __init__(self, mask: bool = False, pooled: bool = True):
        super().__init__()
        self.mask, self.pooled = mask, pooled

    def forward(self, x):
        b, t, d = x.shape
        h = self.n(x)
        q, k, v = (f(h).view(b, t, self.h, d // self.h).transpose(1, 2) for f in (self.q, self.k, self.v))
        keep = torch.ones(b, t, dtype=torch.bool, device=x.device)[:, None, None, :].expand(b, 1, t, t) if self.mask else None
        a = self.o(F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(b, t, d))
        return self.head(a[:, 0] if self.pooled else a)


def test_attention_under_a_pooler_counts_only_the_queries_that_carry_gradient():
    """Keys and values sum ``P_qk²`` over the queries whose output carries gradient: under a
    head on token 0 that is one query of ``L`` (the output's ``frac``), not all of them — the
    rule was ``L = 16×`` the measured factor on the key and value paths before."""
    ratios = oracle_ratios(PooledAttn, (16, 32), draws=2, conventions=fxbackmatch.Conventions(gamma="exact"))
    assert {"q", "k", "v"} <= set(ratios), ratios
    assert not _close(ratios), ratios


def test_a_padding_mask_with_a_query_dimension_is_not_causal():
    """BERT's padding mask, expanded to ``B × 1 × T × T``, has a query dimension but hides no
    key from any query: the rule reads the mask's structure (evaluated without padding) and
    gives the scales of the unmasked attention; a causal mask written out gives ``is_causal``'s."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, 32)
    masked, bare = PooledAttn(mask=True, pooled=False), PooledAttn(pooled=False)
    bare.load_state_dict(masked.state_dict())
    got = fxbackmatch.prepare(masked, x, compile=False, conventions="paper")
    want = fxbackmatch.prepare(bare, x, compile=False, conventions="paper").scales()
    assert got.scales() == pytest.approx(want, rel=1e-12)
    assert not any("causal" in t for r in got.layers for t in r.notes) and not any("causal" in t for t in got.notes)

    class Tril(Attn):
        def forward(self, x):
            b, t, d = x.shape
            h = self.n(x)
            q, k, v = (f(h).view(b, t, self.h, d // self.h).transpose(1, 2) for f in (self.q, self.k, self.v))
            keep = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            return self.head(self.o(a.transpose(1, 2).reshape(b, t, d)))

    torch.manual_seed(1)
    tril, causal = Tril(), Attn(causal=True)
    causal.load_state_dict(tril.state_dict())
    got = fxbackmatch.prepare(tril, x, compile=False, conventions="paper").scales()
    assert got == pytest.approx(fxbackmatch.prepare(causal, x, compile=False, conventions="paper").scales(), rel=1e-12)


class EinsumAttn(nn.Module):
    """MaxViT's layout: one ``qkv`` linear chunked in three, attention written with ``einsum``,
    then the merging linear as the output layer (``m = 1``: its scale is ``1/(s·E[a²])``)."""

    def __init__(self, d: int = 32, heads: int = 2):
        super().__init__()
        self.h = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.merge = nn.Linear(d, d, bias=False)  # default init: scores' std ≈ 0.3, near uniform

    def forward(self, x):  # B × T × d
        b, t, d = x.shape
        q, k, v = (z.reshape(b, t, self.h, d // self.h).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        p = torch.einsum("b h i d, b h j d -> b h i j", q, k).mul(d ** -0.5).softmax(dim=-1)
        a = torch.einsum("b h i j, b h j d -> b h i d", p, v)
        self.seen = a.detach(), p.detach()
        return self.merge(a.transpose(1, 2).reshape(b, t, d))


def test_einsum_attention_output_moment_matches_the_batch():
    """The attention output's ``E[a²]`` (``E[v²]/S`` at uniform attention over independent
    tokens), derived through ``chunk`` and ``einsum``, against the batch's own mean square —
    before this rule the chain had no estimate there and took 1 (MaxViT: 180× off). The
    parts of a split share the whole's moment (q, k and v rows alike, as at init)."""
    torch.manual_seed(0)
    net = EinsumAttn()
    x = torch.randn(8, 24, 32)
    plan = fxbackmatch.prepare(net, x, compile=False)
    net(x)
    a, p = (t.double() for t in net.seen)
    got = float(a.pow(2).mean())
    s = 24  # tokens per sample share the merge weight
    derived = 1.0 / (plan.scales()["merge.weight"] * s)
    # the rule's 1/S is uniform attention's Σ_j P_ij²; the batch's own is a little larger
    uniformity = float(p.pow(2).sum(-1).mean()) * s
    assert 1.0 < uniformity < 1.3
    # within 25 %: the qkv rows' mean norm stands in for the v rows' (5 % here), and a token's
    # key and value come from one input, which couples P and v (the rest, ~15 %)
    assert derived * uniformity == pytest.approx(got, rel=0.25), (derived, uniformity, got)
    assert got < 0.1  # so that a moment taken as 1 would fail


def test_attention_written_out_matches_but_for_the_coherent_query_term():
    """matmul → softmax → matmul: every value as measured, except the queries, where the
    local rules cannot see that a key and its value come from one token: their rule is the
    incoherent part alone, ``D/(D + S − 1)`` of the measured factor (D = 32, S = 16)."""
    ratios = oracle_ratios(lambda: Attn(manual=True), (16, 32), draws=3, conventions=fxbackmatch.Conventions(gamma="exact"))
    q = ratios.pop("q")
    for name in ("view", "transpose"):  # q's own reshapes
        ratios.pop(name, None)
    assert q == pytest.approx(32 / 47, rel=TOL)
    assert not _close(ratios), ratios


def test_rms_norm_written_out_and_addmm_match_measured_jacobians():
    """Above the normalization every value matches; below it the rule's ``1/E[x²]`` is the
    layer mean, while the Jacobian averages ``1/r²`` per token — larger by Jensen's
    inequality (measured 0.81 for a square Gaussian layer below), as for LayerNorm."""
    ratios = oracle_ratios(RMSMLP, (8, 32), draws=3)
    below = ratios.pop("a")
    assert 0.7 < below < 1.0
    assert not _close(ratios), ratios


# ------------------------------------------------------------------- hand computations
def test_embedding_scale_is_rows_read_over_m_and_tokens():
    """``rows/(m·T)``: the (harmonic) mean over the rows read of the exact per-row factor
    ``B/(m·count_v)``, with ``m`` at the embedding's output measured from the head's Jacobian."""
    torch.manual_seed(0)
    emb, head = nn.Embedding(50, 16), nn.Linear(16, 7, bias=False)
    net = nn.Sequential(emb, head)
    ids = torch.randint(0, 50, (4, 12))
    plan = fxbackmatch.prepare(net, ids, compile=False, conventions="paper")  # no floor under the head's m
    net(ids).sum().backward()
    # m at the embedding's output, measured: mean diag(JᵀJ) of the head's Jacobian (autograd)
    jac = torch.autograd.functional.jacobian(lambda h: head(h), torch.zeros(16)).double()
    m = float(torch.diagonal(jac.T @ jac).mean())
    # the exact per-row factors B/(m·count_v), the rows read counted in plain Python
    counts = Counter(ids.reshape(-1).tolist())
    exact = [4 / (m * c) for c in counts.values()]
    harmonic = len(exact) / sum(1 / e for e in exact)
    assert plan.scales()["0.weight"] == pytest.approx(harmonic, rel=1e-9)
    # the generated (per-step) path counts the rows from the gradient too
    torch.testing.assert_close(plan.scale_tensor()[0].item(), plan.scales()["0.weight"], rtol=1e-9, atol=0)


def test_tied_embedding_sums_its_two_uses():
    """GPT-2's tied ``lm_head``: the weight used twice gets ``1/Σ m_i s_i``."""
    torch.manual_seed(1)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 8)

        def forward(self, ids):
            return F.linear(self.emb(ids), self.emb.weight)

    net = Tied()
    ids = torch.randint(0, 30, (2, 5))
    plan = fxbackmatch.prepare(net, ids, compile=False, conventions="paper")  # no floor under the head's m
    net(ids).sum().backward()
    rows = int((net.emb.weight.grad.abs().sum(1) > 0).sum())  # all 30: the head's gradient is dense
    w2 = float(net.emb.weight.double().pow(2).sum())
    # embedding use: m = ||Wᵀ||² = Σw²/8, s = 5, k = 1/rows; head use: m = 1, s = 5,
    # k = E[a²] of its input, the embedding's output: mean(W²) = Σw²/240
    want = 1 / ((w2 / 8) * 5 / rows + 1 * 5 * w2 / 240)
    assert plan.scales()["emb.weight"] == pytest.approx(want, rel=1e-9)


def test_softmax_and_uniform_attention_by_hand():
    """SDPA at uniform attention, non-causal, S = 16 keys, width D = 32: value ``m/S``; with
    ``gamma="one"`` (τ²·d = 1) keys ``m·(1/S)(1 − 1/S)``, queries that plus ``m·(1 − 1/S)²/D``."""
    torch.manual_seed(2)
    net = Attn()
    x = torch.randn(8, 16, 32)
    plan = fxbackmatch.prepare(net, x, compile=False)
    gm = plan.graph_module
    m = {n.name: n.meta.get("fxbackmatch.m") for n in gm.graph.nodes}
    sdpa = next(n for n in gm.graph.nodes if "scaled_dot_product" in n.name)
    vals = plan._atom_values()
    from fxbackmatch.runtime.reference import eval_mono

    m_out = eval_mono(sdpa.meta["fxbackmatch.m"], vals)
    q, k, v = sdpa.args[:3]
    assert eval_mono(m[v.name], vals) == pytest.approx(m_out / 16, rel=1e-9)
    assert eval_mono(m[k.name], vals) == pytest.approx(m_out * 15 / 256, rel=1e-9)
    assert eval_mono(m[q.name], vals) == pytest.approx(m_out * (15 / 256 + (15 / 16) ** 2 / 32), rel=1e-9)


# -------------------------------------------------------------- the torch.export front end
def test_export_capture_equals_symbolic_tracing_on_the_papers_lenet():
    """The ATen graph, lowered to torch-level calls, gives the paper's LeNet-BN scales
    exactly as the traced graph does — and leaves BatchNorm statistics alone."""
    torch.manual_seed(3)
    net = lenet_bn()
    x = torch.randn(4, 3, 32, 32)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fx_plan = fxbackmatch.prepare(net, x, compile=False, capture="fx")
    ex_plan = fxbackmatch.prepare(net, x, compile=False, capture="export")
    assert ex_plan.capture == "export" and fx_plan.capture == "fx"
    a, b = fx_plan.scales(), ex_plan.scales()
    assert a.keys() == b.keys()
    for n in a:
        assert b[n] == pytest.approx(a[n], rel=1e-9), n
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert net.training


def test_export_log_softmax_stays_log_softmax():
    """``aten.log_softmax`` lowers to ``torch.log_softmax`` (``J = I − 1pᵀ``: ``m`` kept), not
    to softmax (``(S−1)/S³``, 1/1000 of it at S = 10): the exported plan equals the traced
    one, and the graph that plan.measure replays calls log_softmax."""
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 10), nn.LogSoftmax(dim=1))
    torch.manual_seed(0)
    x = torch.randn(16, 6)
    a = fxbackmatch.prepare(net, x, compile=False, capture="fx").scales()
    ex = fxbackmatch.prepare(net, x, compile=False, capture="export")
    for n, v in a.items():
        assert ex.scales()[n] == pytest.approx(v, rel=1e-9), n
    gm = ex._analysis.gm
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.log_softmax in targets and torch.softmax not in targets


def test_export_takes_keyword_inputs_and_names_dict_outputs():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.aux = nn.Linear(6, 4), nn.Linear(6, 3)

        def forward(self, x, *, scale=None):
            if scale is not None:
                x = x * scale
            return {"logits": self.fc(x), "aux": self.aux(x)}

    net = KW()
    x = torch.randn(3, 6)
    plan = fxbackmatch.prepare(net, (x,), example_kwargs={"scale": torch.ones(6)}, outputs="logits", compile=False,
                               conventions="paper")  # the output layer's 1/(m·s·E[x²]) = 1, no batch span
    assert plan.capture == "export"
    assert plan._analysis.outputs == ["logits"]  # the loss output, named through the dict
    assert "aux.weight" in plan.uncovered  # not on the loss output's path
    assert plan.scales()["fc.weight"] == pytest.approx(1.0, rel=1e-9)


# --------------------------------------------------------------- models people train
def _hf(name: str):
    transformers = pytest.importorskip("transformers")
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                              LlamaConfig, LlamaForCausalLM)

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32,
                                          bos_token_id=0, eos_token_id=0)), {"use_cache": False}
    if name == "bert":
        return BertForSequenceClassification(BertConfig(
            num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64, vocab_size=100,
            max_position_embeddings=32, num_labels=3)), {}
    return LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
        vocab_size=100, max_position_embeddings=32, bos_token_id=0, eos_token_id=0)), {"use_cache": False}


def _train(model, plan, ids, labels, kw, steps=20):
    """``steps`` SGD-momentum steps with the plan attached; the losses. The first step is
    checked by hand: each parameter moves by ``lr`` × its scale × its gradient (the momentum
    buffer starts there), the scale from ``plan.scales()`` (the eager evaluator, not the
    generated code the attached step runs) read in a step pre-hook after the attached one, whose
    refresh re-measures the batch moments (under dropout, not those of the forward before)."""
    lr = 2e-3
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    plan.attach(opt)
    seen: dict = {}
    hook = opt.register_step_pre_hook(lambda *_: seen.update(scales=plan.scales()) and None)
    named = dict(model.named_parameters())  # GPT-2's tied lm_head: one entry
    losses = []
    for step in range(steps):
        opt.zero_grad()
        logits = model(ids, **kw).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        if step == 0:
            before = {n: (p.detach().clone(), p.grad.clone()) for n, p in named.items() if p.grad is not None}
        opt.step()
        if step == 0:
            hook.remove()
            assert len(before) == len(named), set(named) - set(before)
            for n, (w, g) in before.items():
                torch.testing.assert_close(named[n].detach(), w - lr * seen["scales"][n] * g, rtol=1e-5, atol=1e-8)
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_hugging_face_models_prepare_strict_and_train(name):
    model, kw = _hf(name)
    ids = torch.randint(0, 100, (4, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = fxbackmatch.prepare(model, (ids,), example_kwargs=kw, outputs="logits", compile=False, strict=True)
    assert plan.capture == "export"
    assert plan.uncovered == ()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(plan.targets) == names  # tied GPT-2 lm_head counted once, as named
    labels = torch.randint(0, 3 if name == "bert" else 100, (4,) if name == "bert" else (4, 16))
    losses = _train(model, plan, ids, labels, kw)
    assert all(math.isfinite(v) for v in losses)
    sc = plan.scales()
    lo, hi = min(sc.values()), max(sc.values())
    flagged = [w for w in caught if issubclass(w.category, fxbackmatch.ScaleRangeWarning)]
    assert 1e-6 <= lo and hi <= 1e6, (lo, hi)
    assert not flagged
    if name == "bert":  # under the paper's conventions HF's 0.02-std pooler and classifier make the
        # exact chain ~1e-5 at the top, every layer below ~1e7: the guard says so, naming the layer;
        # the default's reference floor counts those weights at least as at torch's default init
        model, kw = _hf(name)
        with pytest.warns(fxbackmatch.ScaleRangeWarning, match="bert."):
            fxbackmatch.prepare(model, (ids,), example_kwargs=kw, outputs="logits", compile=False, conventions="paper")


def test_a_wrapper_returning_logits_prepares_strict():
    model, kw = _hf("llama")

    class Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(ids, use_cache=False).logits

    wrapped = Wrap(model)
    ids = torch.randint(0, 100, (2, 8))
    plan = fxbackmatch.prepare(wrapped, ids, compile=False, strict=True)
    assert plan.capture == "export" and plan.uncovered == ()
    # the same function captured without the wrapper (the model's own outputs, logits named)
    ref = fxbackmatch.prepare(model, (ids,), example_kwargs=kw, outputs="logits", compile=False, strict=True)
    got = plan.scales()
    assert set(got) == {"m." + n for n in ref.scales()}
    for n, v in ref.scales().items():
        assert got["m." + n] == pytest.approx(v, rel=1e-12), n


def tiny_gpt2():
    """A factory for the CLI test (``package.module:callable``)."""
    return _hf("gpt2")[0]


def test_cli_report_on_a_hugging_face_model(capsys, monkeypatch):
    import json
    import pathlib
    import sys

    from fxbackmatch.cli import main

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent))
    monkeypatch.delitem(sys.modules, "test_transformers", raising=False)
    rc = main(["report", "test_transformers:tiny_gpt2", "--ids", "100", "--input-shape", "2,16",
               "--kwarg", "use_cache=False", "--outputs", "logits", "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    data = json.loads(out)
    assert data["capture"] == "export"
    assert any("wte" in ",".join(p for p in row.get("params", [])) or "embedding" in row.get("op", "")
               for row in data["layers"])


def test_shape_arithmetic_is_known_whatever_fake_tensor_prop_records(monkeypatch):
    """``x.size(-1) ** -0.5`` traced by torch.fx is a node; its number must reach the product
    rule. torch 2.11's FakeTensorProp keeps no Python numbers in ``meta["val"]`` (2.14's does):
    emulated here, the attention scores' factor was off by ``d`` = 16 before ``capture.shapes``
    filled them in. The plan must equal the one made with the numbers recorded."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    torch.manual_seed(0)
    net = Attn(manual=True)
    x = torch.randn(4, 16, 32)
    want = fxbackmatch.prepare(net, x, compile=False).scales()
    plain = FakeTensorProp.run_node

    def older(self, n):  # what torch 2.11 records: tensors (and symbols) only
        out = plain(self, n)
        val = n.meta.get("val")
        if isinstance(val, (int, float, bool)):
            del n.meta["val"]
        elif isinstance(val, (tuple, list)):
            n.meta["val"] = type(val)(None if isinstance(v, (int, float, bool)) else v for v in val)
        return out

    monkeypatch.setattr(FakeTensorProp, "run_node", older)
    got = fxbackmatch.prepare(net, x, compile=False).scales()
    assert got == pytest.approx(want, rel=1e-12)
    # and without the fill-in (what this torch or 2.11 gives): the scores' 1/√d unseen, so q's
    # and k's m are d = 16 times too large, their scales 16 times too small; the rest as is
    import fxbackmatch.capture.shapes as shapes

    monkeypatch.setattr(shapes, "_with_numbers", lambda result, val: val)
    blind = fxbackmatch.prepare(net, x, compile=False).scales()
    for name in want:
        assert blind[name] * (16 if name.startswith(("q.", "k.")) else 1) == pytest.approx(want[name], rel=1e-9), name
