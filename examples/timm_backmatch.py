"""Back-matching rates in a timm-style loop (create_optimizer_v2 + NativeScaler): one attach.

    python examples/timm_backmatch.py             # synthetic data, CPU, a few seconds

NativeScaler's step order: backward (scaled loss) → unscale → clip → ``scaler.step(opt)``. The
attached pre-hook runs inside that ``opt.step()``: clipping sees the raw (unscaled) gradients
and the update uses the clipped, then rescaled ones.
"""
import timm
import timm.optim
import timm.utils
import torch
import torch.nn.functional as F

import fxbackmatch

if __name__ == "__main__":
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    x_all, y_all = torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,))

    plan = fxbackmatch.prepare(model, x_all[:2], compile=False)
    opt = timm.optim.create_optimizer_v2(model, "sgd", lr=0.02, momentum=0.9, weight_decay=0)
    plan.attach(opt, weight_decay=5e-5)  # weight decay before the rescale; the optimizer's stays 0
    scaler = timm.utils.NativeScaler(device="cpu")  # on a GPU: NativeScaler() and autocast fp16

    for step, i in enumerate(range(0, 256, 32)):
        x, y = x_all[i:i + 32], y_all[i:i + 32]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):  # bf16 is slow on most CPUs
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler(loss, opt, clip_grad=5.0, clip_mode="norm", parameters=model.parameters())
        print(f"step {step}: loss {loss.item():.3f}")
    print(plan)  # per-layer factors at the final weights
