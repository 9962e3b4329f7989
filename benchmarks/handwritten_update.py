"""How close inductor's fused step is to the memory limit on this CPU (issue 23): a hand-written
C++ SGD-momentum update that also sums each new weight's squares (float32 per 4096-value chunk,
float64 across chunks; one OpenMP region, no barrier between parameters), against
``torch.compile(SGD.step)`` and the fused step, ratios from one process, interleaved rounds.

The experiment behind the shipped form (``fxbackmatch/apply/cpu_update.py``, generated per
layout and built with inductor's toolchain) and docs/benchmarks.md. It builds a C++ extension with
``torch.utils.cpp_extension.load_inline`` (needs a C++ compiler and ninja; ~30 s the first time).
The scales are fixed numbers here (the fused step computes them from the sums: add its factor
function's cost to compare like with like).

    python benchmarks/handwritten_update.py [--models resnet50,vgg16] [--rounds 9]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, timeit  # noqa: E402
from bench_rescale import model_setup  # noqa: E402

SOURCE = r'''
#include <torch/extension.h>
#include <omp.h>
#include <algorithm>
#include <vector>

// p <- p - lr * (m * b + s * g), b <- m * b + s * g; returns sum(p²) per parameter (float64)
torch::Tensor sgd_sums(std::vector<torch::Tensor> ps, std::vector<torch::Tensor> gs,
                       std::vector<torch::Tensor> bs, torch::Tensor scales, double lr, double mom) {
  const int n = ps.size();
  auto out = torch::zeros({n}, torch::kFloat64);
  double* o = out.data_ptr<double>();
  const double* sc = scales.data_ptr<double>();
  std::vector<float*> P(n), G(n), B(n);
  std::vector<int64_t> N(n);
  for (int i = 0; i < n; ++i) {
    P[i] = ps[i].data_ptr<float>(); G[i] = gs[i].data_ptr<float>(); B[i] = bs[i].data_ptr<float>();
    N[i] = ps[i].numel();
  }
  const int T = omp_get_max_threads();
  std::vector<double> part((size_t)n * T, 0.0);
  const float m = (float)mom, l = (float)lr;
  #pragma omp parallel
  {
    const int tid = omp_get_thread_num();
    for (int i = 0; i < n; ++i) {
      float* __restrict p = P[i]; const float* __restrict g = G[i]; float* __restrict b = B[i];
      const float s = (float)sc[i];
      const int64_t len = N[i], chunks = (len + 4095) / 4096;
      double acc = 0.0;
      #pragma omp for schedule(static) nowait
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t lo = c * 4096, hi = std::min(len, lo + 4096);
        float sum = 0.f;
        #pragma omp simd reduction(+:sum)
        for (int64_t k = lo; k < hi; ++k) {
          const float nb = m * b[k] + g[k] * s;
          b[k] = nb;
          const float np = p[k] - l * nb;
          p[k] = np;
          sum += np * np;
        }
        acc += sum;
      }
      part[(size_t)i * T + tid] = acc;
    }
  }
  for (int i = 0; i < n; ++i) {
    double s = 0;
    for (int t = 0; t < T; ++t) s += part[(size_t)i * T + t];
    o[i] = s;
  }
  return out;
}
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,vgg16")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    print(f"# {machine()}")
    from torch.utils.cpp_extension import load_inline

    try:
        ext = load_inline("fxbm_handwritten_update", cpp_sources=SOURCE, functions=["sgd_sums"],
                          extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                          build_directory=tempfile.mkdtemp())
    except Exception as e:  # no compiler or ninja: nothing to measure
        print(f"# cannot build the C++ update: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return
    for name in args.models.split(","):
        net, plan, x, y, params, restore = model_setup(name, "cpu", 128, False)
        compiled_sgd = torch.compile(torch.optim.SGD(params, lr=1e-6, momentum=0.9, foreach=True).step)
        compiled_sgd()
        bufs = [torch.zeros_like(p) for p in params]
        scales = torch.rand(len(params), dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
        grads = [p.grad for p in params]

        def hand():
            with torch.no_grad():
                return ext.sgd_sums(params, grads, bufs, scales, 1e-6, 0.9)

        sums = hand()
        ref = torch.stack([p.detach().double().square().sum() for p in params])
        err = ((sums - ref).abs() / ref).max().item()
        fused = plan.compile_step(torch.optim.SGD(params, lr=1e-6, momentum=0.9))
        fused()
        hand_r, fused_r = [], []
        for _ in range(args.rounds):
            c = timeit(compiled_sgd, restore, args.reps)
            hand_r.append(timeit(hand, restore, args.reps) / c)
            fused_r.append(timeit(fused, restore, args.reps) / c)
        print(f"{name}: hand-written update + sums / compiled SGD step {statistics.median(hand_r):.3f} "
              f"({min(hand_r):.3f}–{max(hand_r):.3f}); fused step / compiled SGD step "
              f"{statistics.median(fused_r):.3f} ({min(fused_r):.3f}–{max(fused_r):.3f}); "
              f"sums within {err:.1e} of float64")


if __name__ == "__main__":
    main()
