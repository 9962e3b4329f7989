"""Command line: ``fxbackmatch report [MODEL] ...`` (and ``python -m fxbackmatch``)."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Callable, Sequence

import torch
from torch import nn

from .errors import CliError

__all__ = ["main", "resolve_model"]

EXAMPLES = """examples:
  fxbackmatch report                                   # the paper's LeNet-BN, CIFAR shapes
  fxbackmatch report vgg16-bn-paper --json
  fxbackmatch report torchvision.models:resnet18 --input-shape 2,3,64,64
  fxbackmatch report lenet-bn --rule lars
  fxbackmatch report mypkg.models:tiny_gpt2 --ids 100 --input-shape 2,16 \\
      --kwarg use_cache=False --outputs logits          # a Hugging Face model (torch.export)
"""



def resolve_model(spec: str) -> nn.Module:
    """A built-in name (``lenet-bn``, ``vgg11-bn-paper`` …) or ``package.module:callable``."""
    from .models import BUILTIN_MODELS

    if spec in BUILTIN_MODELS:
        try:
            return BUILTIN_MODELS[spec]()
        except Exception as e:
            raise CliError(f"building {spec} failed: {type(e).__name__}: {e}") from e
    if ":" not in spec:
        raise CliError(
            f"unknown model {spec!r}: use a built-in name ({', '.join(BUILTIN_MODELS)}) or "
            f"'package.module:callable'"
        )
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:
        raise CliError(f"cannot import {mod_name!r}: {type(e).__name__}: {e}") from e
    fn: Callable | None = mod
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if fn is None or not callable(fn):
        raise CliError(f"{mod_name!r} has no callable {attr!r}")
    try:
        model = fn() if not isinstance(fn, nn.Module) else fn
    except Exception as e:
        raise CliError(f"calling {spec} failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise CliError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must be comma-separated integers, got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"input shape must be positive integers, got {text!r}")
    return shape


def _kwarg(text: str) -> tuple[str, object]:
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise CliError(f"--kwarg needs KEY=VALUE with a Python name as KEY, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fxbackmatch",
        description="Layer-wise adaptive rates by approximate back-matching propagation.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("report", help="print the per-layer factor report of a model", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("model", nargs="?", default="lenet-bn", help="built-in name or package.module:callable")
    r.add_argument("--input-shape", type=_shape, default=(2, 3, 32, 32), help="e.g. 2,3,32,32 (batch first)")
    r.add_argument("--rule", default="backmatch", help="backmatch, lars, lsalr or sgd")
    r.add_argument("--ids", type=int, default=None, metavar="VOCAB",
                   help="feed integer token ids in [0, VOCAB) of --input-shape (language models)")
    r.add_argument("--kwarg", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword input, e.g. use_cache=False (repeatable; Python literals)")
    r.add_argument("--outputs", default=None, help="the output that enters the loss, e.g. logits")
    r.add_argument("--json", action="store_true", help="print the figures as JSON")
    r.add_argument("--width", type=int, default=None, help="report width in columns")
    try:
        from .train import add_train_parser
    except ImportError:  # pragma: no cover
        pass
    else:
        add_train_parser(sub)
    return p


def _report(args) -> int:
    from .api import prepare
    from .errors import FxBackmatchError
    from .analysis.methods import METHODS

    if args.rule not in METHODS:
        raise CliError(f"unknown rule {args.rule!r}; choose one of {', '.join(sorted(METHODS))}")
    model = resolve_model(args.model)
    model.eval()
    x = torch.randint(0, args.ids, args.input_shape) if args.ids else torch.randn(args.input_shape)
    kwargs = dict(_kwarg(k) for k in args.kwarg)
    outputs = int(args.outputs) if args.outputs and args.outputs.isdigit() else args.outputs
    try:
        plan = prepare(model, (x,), rule=args.rule, compile=False, strict=False,
                       example_kwargs=kwargs or None, outputs=outputs)
    except FxBackmatchError as e:
        raise CliError(str(e).splitlines()[0]) from e
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        plan.report(width=args.width)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["report", *(argv or [])])
    try:
        if args.command == "report":
            return _report(args)
        return args.func(args)
    except CliError as e:
        print(f"fxbackmatch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
