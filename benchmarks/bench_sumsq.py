"""The compiled ``sumsq`` read on the CPU, per dtype, against the float64 widening it replaced
and a compiled elementwise multiply of the same tensors (one read, one write: the memory
baseline). Ratios from one process, interleaved rounds; six 512×512×3×3 weights (14 M values).

    python benchmarks/bench_sumsq.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, timeit  # noqa: E402

from fxbackmatch.runtime.norms import sumsq  # noqa: E402


def _float64(ws):
    return [w.to(torch.float64).square().sum() for w in ws]


def _sumsq(ws):
    return [sumsq(w) for w in ws]


def _mul(ws):
    return [w.mul(1.0001) for w in ws]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    print(f"# {machine()}")
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(512, 512, 3, 3, generator=g) * 0.02 for _ in range(6)]
    print("dtype     | sumsq / multiply | float64 widening / multiply | max rel. error of sumsq")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ws = [w.to(dtype) for w in base]
        fns = {k: torch.compile(f, fullgraph=True, dynamic=False) for k, f in
               (("sumsq", _sumsq), ("float64", _float64), ("mul", _mul))}
        ratios: dict[str, list[float]] = {"sumsq": [], "float64": []}
        for f in fns.values():
            f(ws)
        for _ in range(args.rounds):
            t = {k: timeit(lambda f=f: f(ws), None, args.reps) for k, f in fns.items()}
            for k in ratios:
                ratios[k].append(t[k] / t["mul"])
        err = max(abs(float(s) / float(w.double().square().sum()) - 1) for s, w in zip(fns["sumsq"](ws), ws))
        print(f"{str(dtype).split('.')[1]:9} | {statistics.median(ratios['sumsq']):16.2f} | "
              f"{statistics.median(ratios['float64']):27.2f} | {err:.1e}")


if __name__ == "__main__":
    main()
