"""Which weighted layers count as having no normalization above them (the precondition the
paper's chain rests on, §3.1), on graphs whose answer is read off by hand."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from fxbackmatch.analysis.guards import unnormalized_layers
from fxbackmatch.analysis.registry import REGISTRY


class PreLN(nn.Module):
    """Two pre-LN residual blocks and a head: every branch's last linear feeds an add whose
    sum reaches the next block's LayerNorm (or the final one) — all normalized; only
    ``bare`` (a branch with no norm anywhere above it, summed straight into a second
    unnormalized linear) is not."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)
        self.bare, self.after = nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = x + self.fc1(self.ln1(x))
        x = x + self.fc2(self.ln2(x))
        y = self.after(x + self.bare(x))  # after's input: a sum that reaches no norm
        return self.head(self.ln_f(x)), y.sum(1, keepdim=True) * 0 + self.head(self.ln_f(y))


def test_residual_branches_reach_the_stream_norm_through_their_add():
    gm = fx.symbolic_trace(PreLN())
    layers = [n.name for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)]
    flagged = unnormalized_layers(gm, REGISTRY, layers)
    # fc1/fc2: branch → add → next LayerNorm; bare: → add → after (a linear, not a norm);
    # after: → ln_f; head: feeds the outputs
    assert flagged == {"bare"}, flagged
