"""Where the fused SGD step's time goes on the CPU (issue 23), against ``torch.compile(SGD.step)``
in the same process, interleaved rounds, gradients restored before every call: the generated
C++ kernel alone (``apply/cpu_update.py``), the kernel step (its scales from the chain on
Python floats and its layout checks), the whole fused step (plus the identity and staleness
checks of ``FusedStep``), the chain alone, and the fused step as CUDA runs it (``--foreach``:
``cuda_update.SGDForeachStep``, the runtime's rescale then torch's fused SGD kernel, here on
the CPU).

    python benchmarks/fused_split.py [--models vgg16,resnet50] [--rounds 5] [--foreach]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, timeit  # noqa: E402
from bench_rescale import model_setup  # noqa: E402


def split(name: str, rounds: int, reps: int, foreach: bool) -> None:
    net, plan, x, y, params, restore = model_setup(name, "cpu", 128, False)
    compiled_sgd = torch.compile(torch.optim.SGD(params, lr=1e-6, momentum=0.9, foreach=True).step)
    compiled_sgd()
    fused = plan.compile_step(torch.optim.SGD(params, lr=1e-6, momentum=0.9))
    fused()
    fused()
    step = fused._fn
    if fused.cpu_code is None:
        print(f"{name}: the fused step does not use the C++ update here (inductor's update)")
        return
    rt = plan._runtime
    consts, stats = rt._consts.get(fused._dev), [rt.buffers[r] for r in rt.stat_refs]
    kept = fused._kept_sq()
    kept = kept if isinstance(kept, torch.Tensor) else torch.stack(kept)
    lrs, moms = fused._hyper(fused._dev)
    bufs = fused._state()[0]
    grads = [p.grad for p in fused.params]
    scales = step.scales_of(fused._read, kept, stats, consts)
    sums = torch.empty(max(1, step.n_kept), dtype=torch.float64)
    flat = [t for trio in zip(fused.params, grads, bufs) for t in trio]
    lr_t, mom_t = torch.stack(lrs), torch.stack(moms)

    def kernel():
        step.kernel(*flat, scales, lr_t, mom_t, sums)

    def kernel_step():
        with torch.no_grad():
            step(fused._read, kept, stats, consts, fused.params, grads, lrs, moms, bufs)

    def chain():
        step.scales_of(fused._read, kept, stats, consts)

    parts = {"compiled SGD step": compiled_sgd, "fused step": fused, "kernel step": kernel_step,
             "kernel alone": kernel, "scales (chain on floats)": chain}
    if foreach:
        from fxbackmatch.apply import fused as fused_mod

        fused_mod.FOREACH_DEVICES.add("cpu")
        try:
            parts["foreach step (CUDA's)"] = plan.compile_step(torch.optim.SGD(params, lr=1e-6, momentum=0.9))
            parts["foreach step (CUDA's)"]()
        finally:
            fused_mod.FOREACH_DEVICES.discard("cpu")
        opt_k = torch.optim.SGD(params, lr=1e-6, momentum=0.9, fused=True)
        opt_k.step()
        parts["torch fused SGD step"] = opt_k.step
    times: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(rounds):
        for k, f in parts.items():
            times[k].append(timeit(f, restore, reps))
    base = statistics.median(times["compiled SGD step"])
    print(f"## {name}")
    for k, v in times.items():
        print(f"{k:26} {statistics.median(v) * 1e6:9.1f} µs  {statistics.median(v) / base:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg16,resnet50")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--foreach", action="store_true", help="also the fused step as CUDA runs it, and torch's fused SGD")
    args = ap.parse_args()
    print(f"# {machine()}")
    for name in args.models.split(","):
        split(name, args.rounds, args.reps, args.foreach)


if __name__ == "__main__":
    main()
