"""Shape propagation on fake tensors, leaving the real model untouched.

Parameters and buffers are swapped for fake copies while the graph runs, so BatchNorm's
running statistics and ``num_batches_tracked`` never move. Results are stored in
``node.meta["val"]`` (the fake output, as ``FakeTensorProp`` does) and in
``node.meta[SHAPE_KEY]`` (a ``torch.Size`` or ``None`` for non-tensor values).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.nn.utils.stateless import _reparametrize_module

from ..errors import ShapePropagationError

__all__ = ["SHAPE_KEY", "propagate_shapes", "shape_of"]

SHAPE_KEY = "fxbackmatch.shape"


class _NodeFakeProp(FakeTensorProp):
    """FakeTensorProp that names the failing node and its module."""

    current: fx.Node | None = None
    real_state: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        self.current = n
        result = super().run_node(n)
        val = _with_numbers(result, n.meta.get("val"))
        if val is not None:
            n.meta["val"] = val
        return result

    def call_module(self, target, args, kwargs):
        try:
            return super().call_module(target, args, kwargs)
        except Exception:
            # An opaque (leaf) module that fake tensors cannot run, e.g. with data-dependent
            # control flow: run it once for real on zeros, on copies of its own state.
            return self._run_real(target, args, kwargs)

    def _run_real(self, target, args, kwargs):
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from torch.utils._pytree import tree_map

        prefix = f"{target}."
        state = {k[len(prefix):]: v for k, v in self.real_state.items() if k.startswith(prefix)}
        with unset_fake_temporarily():
            real = lambda t: torch.zeros(t.shape, dtype=t.dtype) if isinstance(t, torch.Tensor) else t  # noqa: E731
            r_args, r_kwargs = tree_map(real, (args, kwargs))
            state = {k: v.detach().clone() for k, v in state.items()}
            with torch.no_grad():
                out = torch.func.functional_call(self.module.get_submodule(target), state, r_args, r_kwargs)
        return tree_map(lambda t: self._mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, out)


_NUMBERS = (int, float, bool)


def _with_numbers(result, val):
    """``val`` with the Python numbers of ``result`` filled in (shape arithmetic traced by
    torch.fx: ``x.size(-1) ** -0.5``). torch 2.14's FakeTensorProp records them; older ones
    (2.11) record tensors and symbols only, and the rules would then miss an attention's
    ``1/√d`` (its scores' factor off by ``d``)."""
    if val is None and isinstance(result, _NUMBERS):
        return result
    if isinstance(result, (tuple, list)) and isinstance(val, (tuple, list)) and len(val) == len(result):
        return type(val)(r if v is None and isinstance(r, _NUMBERS) else v for r, v in zip(result, val))
    return val


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Run ``gm`` on fake copies of ``example_inputs`` and record every node's shape."""
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    state = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(
        gm.named_buffers(remove_duplicate=False)
    ):
        state[name] = mode.from_tensor(t)
    fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    prop = _NodeFakeProp(gm, mode)
    prop.real_state = {
        k: v for k, v in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    }
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)  # it logs every failing op with a traceback; we re-raise
    try:
        with _reparametrize_module(gm, state, tie_weights=True), _hooks_silenced(gm):
            prop.propagate_dont_convert_inputs(*fake_inputs)
    except Exception as e:
        n = prop.current
        where = n.format_node() if n is not None else "<graph inputs>"
        mod = ""
        if n is not None and n.op == "call_module":
            mod = f" (module '{n.target}': {type(gm.get_submodule(n.target)).__name__})"
        shapes = [tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)]
        raise ShapePropagationError(
            f"shape propagation failed at node {where}{mod}: {type(e).__name__}: "
            f"{_first_line(e)}\n  Example input shapes: {shapes}.\n  What to do: pass "
            f"example_inputs with the shape the model expects (batch dimension first)."
        ) from e
    finally:
        fake_log.setLevel(level)
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        n.meta[SHAPE_KEY] = tuple(val.shape) if isinstance(val, torch.Tensor) else None


@contextlib.contextmanager
def _hooks_silenced(root: torch.nn.Module):
    """The user's forward (pre-)hooks must not see fake tensors (an activation logger would
    keep them): they are set aside while the graph runs and put back after."""
    names = ("_forward_hooks", "_forward_pre_hooks")
    saved = []
    for m in root.modules():
        saved.append((m, [getattr(m, n) for n in names]))
        for n in names:
            setattr(m, n, type(getattr(m, n))())
    try:
        yield
    finally:
        for m, hooks in saved:
            for n, h in zip(names, hooks):
                setattr(m, n, h)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The propagated output shape of ``node``, or ``None`` if it is not a tensor."""
    return node.meta.get(SHAPE_KEY) if isinstance(node, fx.Node) else None
