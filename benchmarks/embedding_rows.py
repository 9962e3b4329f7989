"""Issue 11's embedding decision, measured: the per-layer scalar ``rows/(m·T)`` (what the
embedding rule uses) against the exact per-row factor ``B/(m·count_v)`` (the scalar times
``mean_count/count_v``, applied per row from each step's ids), on the character-level GPT of
``adaptive_compare.py`` with untied embeddings, back-matching with SGD-momentum, same init and
batches, three rates.

    python benchmarks/embedding_rows.py
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from adaptive_compare import evaluate, gpt_task  # noqa: E402

import fxbackmatch  # noqa: E402


def main() -> None:
    print(machine())
    model0, train_batches, val, loss_fn, prep, info = gpt_task(0)
    model0.config.tie_word_embeddings = False
    model0.lm_head.weight = torch.nn.Parameter(model0.transformer.wte.weight.detach().clone())  # untie
    print(info, "| untied embeddings, back-matching + SGD-momentum 0.9, 200 steps")
    batches = train_batches(200, torch.Generator().manual_seed(0))
    for lr in (0.1, 0.3, 1.0):
        for variant in ("scalar", "per-row"):
            model = copy.deepcopy(model0)
            plan = prep(model, "backmatch")
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
            plan.attach(opt)
            wte = model.transformer.wte.weight
            current = {}
            if variant == "per-row":
                def per_row(optimizer, args, kwargs):  # after the plan's own pre-hook
                    ids = current["ids"].reshape(-1)
                    count = torch.bincount(ids, minlength=wte.shape[0]).to(wte.dtype)
                    read = count > 0
                    mean_count = count[read].mean()
                    with torch.no_grad():
                        wte.grad[read] *= (mean_count / count[read]).unsqueeze(1)
                opt.register_step_pre_hook(per_row)
            for b in batches:
                current["ids"] = b[:, :-1]
                opt.zero_grad()
                loss, _ = loss_fn(model, b)
                loss.backward()
                opt.step()
            vl, _ = evaluate(model, val, loss_fn)
            print(f"lr {lr:<4g} {variant:8} val loss {vl:.4f}", flush=True)


if __name__ == "__main__":
    main()
