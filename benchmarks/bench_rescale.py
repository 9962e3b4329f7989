"""Per-step cost of the rescale against the optimizer step it rides on (issue 3).

Prints, per model, milliseconds per call and ratios measured in this one process:
eager per-layer loop, compiled rescale, SGD(momentum=0.9, foreach) step, timm Lars step
(if timm is installed), the fused ``compile_step`` against a compiled SGD step, the rescale's
effective bandwidth against a plain ``copy_`` of the same bytes, and a full training step
(forward, backward, rescale, SGD) against the same step without the rescale. On CUDA also
the rescale without the scales' CUDA graph, and with scales and multiply as one graph
(``Runtime.graph_rescale``: alone, and in the full step with gradients freed every step).
With ``--length``, then Adam's step-length mode (scales and length rescale) against AdamW's
own step, with the few-launch foreach core and with the compiled per-tensor kernel.

    python benchmarks/bench_rescale.py                 # VGG-16 (paper) and ResNet-50, CIFAR shapes
    python benchmarks/bench_rescale.py --models vgg16 --train-reps 3
    python benchmarks/bench_rescale.py --models resnet50 --profile profile.txt   # where a rescale's host time goes
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, sync, timeit  # noqa: E402

import fxbackmatch  # noqa: E402
from fxbackmatch.apply import fused as fused_mod  # noqa: E402
from fxbackmatch.models import vgg_paper  # noqa: E402
from fxbackmatch.runtime.graphs import CaptureCache  # noqa: E402


def build(name: str, batch: int):
    if name == "vgg16":
        return vgg_paper(16), (batch, 3, 32, 32)
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=10), (batch, 3, 32, 32)


def host_profile(fn, setup, calls: int) -> str:
    """cProfile's functions by cumulative time over ``calls`` calls of ``fn`` (``setup`` before
    each, not profiled), then torch.profiler's ops by self CPU time over ``calls`` calls in a row
    (``setup`` once before them)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    for _ in range(calls):
        setup()
        sync()
        prof.enable()
        fn()
        prof.disable()
        sync()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(30)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    setup()
    with torch.profiler.profile(activities=acts) as tp:  # no setup inside: its copies would fill the table
        for _ in range(calls):
            fn()
        sync()
    return text.getvalue() + "\n" + tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=25) + "\n"


def model_setup(name: str, device: str, batch: int, amp: bool):
    """``(net, plan, x, y, params, restore)``: the model on ``device`` (channels-last with
    ``amp``), its plan with the paper's conventions, a batch, the parameters with gradients
    and a function that puts those gradients back (they are rescaled in place)."""
    torch.manual_seed(0)
    net, shape = build(name, batch)
    net.to(device, memory_format=torch.channels_last if amp else torch.preserve_format)
    x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last if amp else torch.contiguous_format)
    y = torch.randint(0, 10, (shape[0],), device=device)
    plan = fxbackmatch.prepare(net, x[:2], conventions="paper")  # docs/benchmarks.md: measured with the paper's set
    F.cross_entropy(net(x[:8]), y[:8]).backward()
    params = [p for p in net.parameters() if p.grad is not None]
    saved = [p.grad.clone() for p in params]

    def restore():
        for p, g in zip(params, saved):
            p.grad.copy_(g)

    return net, plan, x, y, params, restore


def interleaved(base, fn, restore, reps: int, rounds: int) -> list[float]:
    """``fn``'s time over ``base``'s in ``rounds`` rounds, each timing both back to back."""
    ratios = []
    for _ in range(rounds):
        c = timeit(base, restore, reps)
        ratios.append(timeit(fn, restore, reps) / c)
    return ratios


def bench(name: str, device: str, reps: int, train_reps: int, batch: int = 128, amp: bool = False,
          rounds: int = 5, adam: bool = False, profile: str | None = None, out: dict | None = None) -> dict:
    """The figures of one model, filled into ``out`` as they are measured (an error part-way
    leaves the ones before it there: the device run prints what it has)."""
    net, plan, x, y, params, restore = model_setup(name, device, batch, amp)
    saved = [p.grad.clone() for p in params]  # the copy_ baseline's bytes
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    out = {} if out is None else out
    out.update(model=name, params_M=sum(p.numel() for p in params) / 1e6)
    plan.rescale_grads_()  # compile once
    out["compiled_rescale"] = timeit(plan.rescale_grads_, restore, reps)
    if profile:  # where the host time of a rescale goes: Python functions, then torch ops
        with open(profile, "a") as f:
            f.write(f"# {name}, {device}: profile of 20 calls of plan.rescale_grads_()\n")
            f.write(host_profile(plan.rescale_grads_, restore, 20))
    if torch.device(device).type == "cuda":  # the same without the CUDA graph of the scales
        rt = plan._runtime
        rt.cuda_graph = False
        out["ungraphed_rescale"] = timeit(plan.rescale_grads_, restore, reps)
        rt.cuda_graph = True
        # scales and multiply as one graph (Runtime.graph_rescale): restore() copies into the
        # same gradients, so every call after the capture replays it; a failure loses nothing else
        try:
            rt.graph_rescale = True
            t = timeit(plan.rescale_grads_, restore, reps)
            c = rt._rescale_graphs
            if c.enabled and c.captures:  # else it timed the plain path (a failed capture is logged)
                out["graphed_rescale"] = t
            else:
                print(f"# graphed rescale: no graph ({c.captures} captures, on: {c.enabled})")
        except Exception as e:
            print(f"# graphed rescale failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        finally:
            rt.graph_rescale = False
            rt._rescale_graphs = CaptureCache()  # the training loop below counts its own

    named = dict(net.named_parameters())

    def eager_loop():
        scales = plan.scales()  # plain per-layer Python loop, float64
        with torch.no_grad():
            for n, s in scales.items():
                g = named[n].grad
                if g is not None:
                    g.mul_(s)

    out["eager_loop"] = timeit(eager_loop, restore, max(3, reps // 4))
    opt = torch.optim.SGD(params, lr=1e-6, momentum=0.9, foreach=True)
    opt.step()
    out["sgd_momentum_step"] = timeit(opt.step, restore, reps)
    try:
        from timm.optim import Lars

        lars = Lars(params, lr=1e-6, momentum=0.9)
        out["timm_lars_step"] = timeit(lars.step, restore, reps)
    except ImportError:
        out["timm_lars_step"] = None
    # bandwidth: the rescale reads W, reads G and writes G; copy_ reads and writes G
    dst = [torch.empty_like(g) for g in saved]
    nbytes = sum(g.numel() * g.element_size() for g in saved)
    out["copy"] = timeit(lambda: torch._foreach_copy_(dst, saved), None, reps)
    out["rescale_GBps"] = 3 * nbytes / out["compiled_rescale"] / 1e9
    out["copy_GBps"] = 2 * nbytes / out["copy"] / 1e9
    # fused step vs the same optimizer's compiled step
    opt_c = torch.optim.SGD(params, lr=1e-6, momentum=0.9, foreach=True)
    opt_c.step()
    compiled_sgd = torch.compile(opt_c.step)
    compiled_sgd()
    out["compiled_sgd_step"] = timeit(compiled_sgd, restore, reps)
    opt_f = torch.optim.SGD(params, lr=1e-6, momentum=0.9)
    try:
        fused = plan.compile_step(opt_f)
        fused()
        out["fused_step"] = timeit(fused, restore, reps)
        # the pair again in interleaved rounds: the ratio of each round, both timed back to back
        out["fused_ratios"] = interleaved(compiled_sgd, fused, restore, reps, rounds)
    except Exception as e:  # report it, keep measuring the rest
        print(f"# fused step failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        out["fused_step"] = None
    if adam:  # the same pair for AdamW (the fused step warns that Adam cancels a rescale: fine here)
        import warnings

        oa_c = torch.optim.AdamW(params, lr=1e-6, foreach=True)
        oa_c.step()
        compiled_adam = torch.compile(oa_c.step)
        compiled_adam()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused_adam = plan.compile_step(torch.optim.AdamW(params, lr=1e-6))
        fused_adam()
        out["adam_ratios"] = interleaved(compiled_adam, fused_adam, restore, reps, rounds)
        out["compiled_adamw_step"] = timeit(compiled_adam, restore, reps)
    if torch.device(device).type == "cuda":  # the optimizer's own single-kernel-family update
        opt_k = torch.optim.SGD(params, lr=1e-6, momentum=0.9, fused=True)
        opt_k.step()
        out["torch_fused_sgd_step"] = timeit(opt_k.step, restore, reps)
    # full training step, with and without the rescale (interleaved)
    if train_reps:
        opt_t = torch.optim.SGD(net.parameters(), lr=1e-6, momentum=0.9, foreach=True)

        def step(rescale: bool, graphed: bool = False):
            opt_t.zero_grad()  # set_to_none: gradients freed, so a graph replays only where addresses recur
            with autocast():
                loss = F.cross_entropy(net(x).float(), y)
            loss.backward()
            if rescale:
                plan._runtime.graph_rescale = graphed
                try:
                    plan.rescale_grads_()
                finally:
                    plan._runtime.graph_rescale = False
            opt_t.step()

        import time

        variants = [(True, False, []), (False, False, [])]
        if torch.device(device).type == "cuda":  # the one-graph rescale in a real loop
            variants.append((True, True, []))
        def timed(flag: bool, graphed: bool) -> float | None:
            sync()
            t = time.perf_counter()
            try:
                step(flag, graphed)
                sync()
            except Exception as e:  # the one-graph rescale's first run on a GPU: keep the other two
                if not graphed:
                    raise
                print(f"# full step with the graphed rescale failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}")
                variants.pop()
                return None
            return time.perf_counter() - t

        for flag, graphed, _ in list(variants):  # warm-up
            timed(flag, graphed)
        for _ in range(train_reps):
            for flag, graphed, acc in list(variants):
                t = timed(flag, graphed)
                if t is not None:
                    acc.append(t)
        out["train_step_with"] = statistics.median(variants[0][2])
        out["train_step_without"] = statistics.median(variants[1][2])
        if len(variants) > 2:
            out["train_step_graphed"] = statistics.median(variants[2][2])
            c = plan._runtime._rescale_graphs
            out["graph_use"] = f"{c.hits} replays, {c.captures} captures in {c.calls} steps, on: {c.enabled}"
    return out


@contextlib.contextmanager
def foreach_off():
    """The fused steps built inside use the compiled update on every device
    (``apply.fused.FOREACH_DEVICES`` emptied)."""
    before = set(fused_mod.FOREACH_DEVICES)
    fused_mod.FOREACH_DEVICES.clear()
    try:
        yield
    finally:
        fused_mod.FOREACH_DEVICES.update(before)


def bench_fused_options(name: str, device: str, reps: int, batch: int, amp: bool, rounds: int,
                        options: dict) -> list[float]:
    """The fused step on the compiled update (not the foreach step), built with extra inductor
    ``options`` on CUDA (``apply.fused.CUDA_OPTIONS``), against a compiled SGD step, in
    interleaved rounds; measured after the main results are printed, so a failure or a
    timeout here loses nothing else."""
    _, plan, _, _, params, restore = model_setup(name, device, batch, amp)

    opt_c = torch.optim.SGD(params, lr=1e-6, momentum=0.9, foreach=True)
    opt_c.step()
    compiled_sgd = torch.compile(opt_c.step)
    compiled_sgd()
    before = dict(fused_mod.CUDA_OPTIONS)
    fused_mod.CUDA_OPTIONS.update(options)
    try:
        with foreach_off():  # CUDA_OPTIONS are the compiled update's
            fused = plan.compile_step(torch.optim.SGD(params, lr=1e-6, momentum=0.9))
            fused()
    finally:
        fused_mod.CUDA_OPTIONS.clear()
        fused_mod.CUDA_OPTIONS.update(before)
    return interleaved(compiled_sgd, fused, restore, reps, rounds)


def bench_length(name: str, device: str, reps: int, batch: int, amp: bool, rounds: int) -> dict:
    """Adam's step-length mode (``attach(mode="length")``) against AdamW's own step: the
    step with the few-launch foreach core (``flat``, CUDA's default), then with the compiled
    per-tensor kernel for large tensors (the CPU's default under a compiled plan), each in
    interleaved rounds against a plain AdamW step (torch's default implementation on the
    device). Measured after the main results are printed (the compile may be cut by a timeout)."""
    _, plan, _, _, params, restore = model_setup(name, device, batch, amp)
    base = torch.optim.AdamW(params, lr=1e-6)
    base.step()
    out = {"adamw_step": timeit(base.step, restore, reps)}
    opt = torch.optim.AdamW(params, lr=1e-6)
    h = plan.attach(opt, mode="length")
    cuda = torch.device(device).type == "cuda"
    for label, flat in (("flat", True), ("compiled", False)):
        h.flat = flat
        opt.step()  # builds (compiles) the variant
        if cuda:  # the step's transient memory above what the model and both optimizers hold
            sync()
            held = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            opt.step()
            sync()
            out[f"{label}_peak_MiB"] = (torch.cuda.max_memory_allocated() - held) / 2**20
        out[label] = interleaved(base.step, opt.step, restore, reps, rounds)
    return out


def report(name: str, r: dict) -> None:
    """Print one model's figures (those measured: a run stopped by an error has fewer)."""
    ms = lambda k: f"{r[k] * 1e3:8.3f} ms" if r.get(k) is not None else "     n/a"  # noqa: E731
    print(f"\n## {name} ({r['params_M']:.1f} M parameters)")
    for k in ("eager_loop", "compiled_rescale", "ungraphed_rescale", "graphed_rescale", "sgd_momentum_step", "timm_lars_step", "copy",
              "compiled_sgd_step", "fused_step", "torch_fused_sgd_step", "train_step_with", "train_step_without", "train_step_graphed"):
        if k in r:
            print(f"{k:22s} {ms(k)}")
    if "sgd_momentum_step" in r:
        print(f"compiled rescale / SGD-momentum step : {r['compiled_rescale'] / r['sgd_momentum_step']:.3f}  (target ≤ 0.6)")
        print(f"eager loop / compiled rescale        : {r['eager_loop'] / r['compiled_rescale']:.2f}×")
    if r.get("fused_step"):
        print(f"fused step / compiled SGD step       : {r['fused_step'] / r['compiled_sgd_step']:.3f}  (target ≤ 1.05)")
        if r.get("fused_ratios"):
            q = sorted(r["fused_ratios"])
            print(f"  in {len(q)} interleaved rounds        : median {statistics.median(q):.3f}, "
                  f"range {q[0]:.3f}–{q[-1]:.3f}")
    if r.get("adam_ratios") and "compiled_adamw_step" in r:
        q = sorted(r["adam_ratios"])
        print(f"fused AdamW / compiled AdamW step    : median {statistics.median(q):.3f}, range {q[0]:.3f}–{q[-1]:.3f} "
              f"({len(q)} interleaved rounds; compiled AdamW {r['compiled_adamw_step'] * 1e3:.2f} ms)")
    if "copy_GBps" in r:
        print(f"rescale bandwidth {r['rescale_GBps']:.1f} GB/s vs copy_ {r['copy_GBps']:.1f} GB/s "
              f"({r['rescale_GBps'] / r['copy_GBps']:.2f})")
    if r.get("torch_fused_sgd_step") and r.get("fused_step"):
        print(f"fused step / torch fused SGD step    : {r['fused_step'] / r['torch_fused_sgd_step']:.3f}")
    if "train_step_without" in r:
        print(f"full step with / without rescale     : {r['train_step_with'] / r['train_step_without']:.4f}  (target ≤ 1.02)")
        print(f"rescale share of the step            : {100 * r['compiled_rescale'] / r['train_step_with']:.2f} %  "
              f"(compiled rescale alone / full step; target ≤ 1 %)")
    if r.get("graphed_rescale") and "train_step_with" in r:
        print(f"graphed rescale share of the step    : {100 * r['graphed_rescale'] / r['train_step_with']:.2f} %  "
              f"(scales and multiply as one CUDA graph, same gradients every call)")
    if "train_step_graphed" in r:
        print(f"full step, graphed rescale / without : {r['train_step_graphed'] / r['train_step_without']:.4f}  "
              f"(gradients freed each step; {r['graph_use']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vgg16,resnet50")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--train-reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the fused / compiled SGD pair")
    ap.add_argument("--adam", action="store_true", help="also the fused AdamW step against a compiled AdamW step")
    ap.add_argument("--batch", type=int, default=128, help="training-step batch (default 128)")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast and channels-last in the training step")
    ap.add_argument("--profile", metavar="FILE", help="append a host-time profile of the rescale (cProfile, torch.profiler)")
    ap.add_argument("--compiled-update", action="store_true",
                    help="then the fused step on the compiled update (on CUDA the fused step is the foreach one) "
                         "against a compiled SGD step")
    ap.add_argument("--length", action="store_true",
                    help="then AdamW with attach(mode='length') against AdamW's own step: the few-launch "
                         "foreach core and the compiled per-tensor kernel")
    ap.add_argument("--combo", action="store_true",
                    help="--compiled-update, then the same with inductor's combo kernels (on CUDA)")
    args = ap.parse_args()
    print(f"# machine: {machine()}, device {args.device}, batch {args.batch}{', bf16 autocast' if args.amp else ''}")
    for name in args.models.split(","):
        r: dict = {}
        try:
            bench(name, args.device, args.reps, args.train_reps, args.batch, args.amp, args.rounds, args.adam,
                  args.profile, out=r)
        except Exception as e:  # print what was measured before it
            print(f"\n# {name}: stopped by {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                  f"the figures measured before it follow")
        if "compiled_rescale" not in r:
            continue
        report(name, r)
    for name in args.models.split(",") if args.length else []:
        try:
            r = bench_length(name, args.device, args.reps, args.batch, args.amp, args.rounds)
            print(f"\n{name}: AdamW step {r['adamw_step'] * 1e3:.3f} ms; with the step-length mode / without:")
            for label in ("flat", "compiled"):
                q = sorted(r[label])
                peak = f"; step's transient memory {r[label + '_peak_MiB']:.0f} MiB" if label + "_peak_MiB" in r else ""
                print(f"  {label:9s}: median {statistics.median(q):.3f}, range {q[0]:.3f}–{q[-1]:.3f} "
                      f"({len(q)} interleaved rounds{peak})")
        except Exception as e:  # report it: the main results are already printed
            print(f"\n{name}: step-length mode failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    variants = [("the compiled update", {})] if args.compiled_update or args.combo else []
    if args.combo:  # CUDA_OPTIONS apply on CUDA only: on the CPU both are the same
        variants.append(("the compiled update with combo_kernels", {"combo_kernels": True}))
    for name in args.models.split(",") if variants else []:
        for label, options in variants:
            try:
                q = sorted(bench_fused_options(name, args.device, args.reps, args.batch, args.amp, args.rounds,
                                               options))
                print(f"\n{name}: fused step with {label} / compiled SGD step: median "
                      f"{statistics.median(q):.3f}, range {q[0]:.3f}–{q[-1]:.3f} ({len(q)} interleaved rounds)")
            except Exception as e:  # report it: the main results are already printed
                print(f"\n{name}: fused step with {label} failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}")


if __name__ == "__main__":
    main()
