"""Cost of ``factors="measured"`` (issue 11): time per training step (forward, backward,
rescale, SGD-momentum step) with derived factors, and with measured ones refreshed every K
steps, interleaved in one process; and how far the derived factors are from the measured ones
(geometric mean and range of rule m / measured m over the layers).

    python benchmarks/bench_measured.py
"""
from __future__ import annotations

import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

import fxbackmatch  # noqa: E402


def models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, logging

    from fxbackmatch.models import lenet_bn

    logging.set_verbosity_error()
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (8, 32))
    yield "lenet-bn", lenet_bn, (torch.randn(32, 3, 32, 32),), {}, None, torch.randint(0, 10, (32,))
    yield "gpt2-tiny", lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=100, n_positions=32,
                                                          bos_token_id=0, eos_token_id=0)), (ids,), {"use_cache": False}, "logits", ids
    yield "llama-tiny", lambda: LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, intermediate_size=128,
        vocab_size=100, max_position_embeddings=32, bos_token_id=0, eos_token_id=0)), (ids,), {"use_cache": False}, "logits", ids


def step_fn(model, plan, args, kwargs, labels):
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    plan.attach(opt)

    def step():
        opt.zero_grad()
        out = model(*args, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()
        opt.step()

    return step


def main() -> None:
    print(machine())
    print(f"{'model':12} {'derived ms':>10} {'K=10 ms':>8} {'K=1 ms':>8} {'K=10/der':>8}   rule m / measured m: geo mean [min, max]")
    for name, make, args, kwargs, outputs, labels in models():
        steps = {}
        for label, kw in (("derived", {}), ("K=10", {"factors": "measured", "refresh": 10}),
                          ("K=1", {"factors": "measured", "refresh": 1})):
            torch.manual_seed(0)
            model = make()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plan = fxbackmatch.prepare(model, args, example_kwargs=kwargs or None, outputs=outputs, compile=False,
                                           conventions="paper", **kw)  # as recorded in docs/benchmarks.md
            steps[label] = step_fn(model, plan, args, kwargs, labels)
            if label == "derived":
                rows = plan.measure(*args, probes=8, **kwargs)
        for f in steps.values():  # warm up
            f()
        times = {k: [] for k in steps}
        for _ in range(20):  # interleaved: 20 steps each, K=10 refreshes twice
            for k, f in steps.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
        mean = {k: statistics.fmean(v) * 1e3 for k, v in times.items()}
        ratios = [r["ratio"] for r in rows if r["ratio"]]
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        print(f"{name:12} {mean['derived']:10.1f} {mean['K=10']:8.1f} {mean['K=1']:8.1f} {mean['K=10'] / mean['derived']:8.2f}"
              f"   {geo:.3g} [{min(ratios):.3g}, {max(ratios):.3g}]")


if __name__ == "__main__":
    main()
