"""Peak memory of a training step with and without the rescale (issue 7).

Each variant runs in its own subprocess (peak RSS on CPU is per process; on CUDA the
allocator's peak is read instead) on torchvision's VGG-19 (≈139 M parameters with 10
classes), batch 8 of 32×32 CIFAR shapes, SGD with momentum, 3 steps.

    python benchmarks/bench_memory.py
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(variant: str, model: str) -> None:
    import torch
    import torch.nn.functional as F
    import torchvision

    import fxbackmatch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    net = torchvision.models.get_model(model, weights=None, num_classes=10).to(dev)
    x = torch.randn(8, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (8,), device=dev)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9, foreach=True)
    # every variant loads the compiler (its code and threads are RSS, not tensor memory)
    torch.compile(lambda t: t * 2, fullgraph=True)(torch.ones(2, device=dev))
    if variant != "baseline":
        plan = fxbackmatch.prepare(net, x, compile=(variant == "compiled"), conventions="paper")  # as recorded in docs
        plan.attach(opt)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"variant": variant, "peak_bytes": peak, "params": sum(p.numel() for p in net.parameters()), "device": dev}))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    from _common import machine

    model = "vgg19"
    print(f"# machine: {machine()}")
    res = {}
    for variant in ("baseline", "compiled", "eager"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, model], capture_output=True, text=True, check=True)
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    base = res["baseline"]["peak_bytes"]
    print(f"{model}: {res['baseline']['params'] / 1e6:.1f} M parameters on {res['baseline']['device']}")
    for v, r in res.items():
        print(f"{v:9s} peak {r['peak_bytes'] / 2**20:9.1f} MiB  ratio {r['peak_bytes'] / base:.4f}")


if __name__ == "__main__":
    main()
