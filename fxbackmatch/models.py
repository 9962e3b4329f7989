"""The paper's networks: LeNet with BN (Figure 1, §3.3) and the VGG variants of §4
(no biases, BatchNorm without trainable affine before each ReLU, only the last FC)."""
from __future__ import annotations

from torch import nn

__all__ = ["lenet_bn", "vgg_paper", "resnet18_paper", "VGG_CONFIGS", "BUILTIN_MODELS"]


def lenet_bn(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Sequential:
    """LeNet-BN of Figure 1: conv5-BN-ReLU-pool ×2, fc 400-120-84-classes, no biases, BN
    without affine. On 32×32 input: ``s_cv1 = 196``, ``s_cv2 = 25``. ``width`` scales every
    hidden width (channels and units)."""
    bn2 = lambda c: nn.BatchNorm2d(c, affine=False)  # noqa: E731
    bn1 = lambda c: nn.BatchNorm1d(c, affine=False)  # noqa: E731
    c1, c2, f1, f2 = (max(1, int(round(v * width))) for v in (6, 16, 120, 84))
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 5, bias=False), bn2(c1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5, bias=False), bn2(c2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 25, f1, bias=False), bn1(f1), nn.ReLU(),
        nn.Linear(f1, f2, bias=False), bn1(f2), nn.ReLU(),
        nn.Linear(f2, num_classes, bias=False),
    )


VGG_CONFIGS: dict[str, list] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


def vgg_paper(depth: int | str = 11, num_classes: int = 10, width: float = 1.0) -> nn.Sequential:
    """The paper's VGG (§4): conv3×3 (no bias) - BN (no affine) - ReLU, max pools, one FC
    (no bias) on the 512 features of a 32×32 input. ``width`` scales channel counts."""
    cfg = VGG_CONFIGS[depth if isinstance(depth, str) else f"vgg{depth}"]
    layers: list[nn.Module] = []
    c_in = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            c = max(1, int(v * width))
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c, affine=False), nn.ReLU()]
            c_in = c
    layers += [nn.Flatten(), nn.Linear(c_in, num_classes, bias=False)]
    return nn.Sequential(*layers)


def resnet18_paper(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """torchvision's ResNet-18 in the paper's style: BatchNorm without trainable affine
    (residual graphs are beyond the paper; see the fork rule). ``width`` scales every
    stage's channels (64·w … 512·w)."""
    import torchvision
    from torchvision.models.resnet import BasicBlock, ResNet

    if width == 1.0:
        net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    else:
        class _Wide(ResNet):  # torchvision hard-codes 64…512: scale them where they are read
            _w = width

            @property
            def inplanes(self):
                return self._inplanes

            @inplanes.setter
            def inplanes(self, v):
                first = not hasattr(self, "_inplanes")
                self._inplanes = max(1, int(round(v * self._w))) if first else v

            def _make_layer(self, block, planes, *args, **kwargs):
                return super()._make_layer(block, max(1, int(round(planes * self._w))), *args, **kwargs)

        net = _Wide(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        net.fc = nn.Linear(net.layer4[-1].conv2.out_channels, num_classes)
    for mod in list(net.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(mod, name, nn.BatchNorm2d(child.num_features, affine=False))
    return net


BUILTIN_MODELS = {
    "lenet-bn": lenet_bn,
    "vgg11-bn-paper": lambda: vgg_paper(11),
    "vgg13-bn-paper": lambda: vgg_paper(13),
    "vgg16-bn-paper": lambda: vgg_paper(16),
    "vgg19-bn-paper": lambda: vgg_paper(19),
    "resnet18-paper": resnet18_paper,
}
