"""CIFAR-style ResNets (He et al. 2016, section 4.2) built from timm's ``BasicBlock``.

Three stages of 16/32/64 channels with n blocks each (depth = 6n + 2), a 3x3 stride-1 stem,
1x1-convolution shortcuts where the shape changes. The factories are registered in timm's own
registry, so ``timm.create_model("cifar_resnet32")`` works once this module is imported.
"""

from __future__ import annotations

import torch
from timm.models import register_model
from timm.models.resnet import BasicBlock
from torch import nn

WIDTHS = (16, 32, 64)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: stem, three stages of BasicBlocks, pool + linear head."""

    def __init__(self, depth: int = 32, num_classes: int = 10, in_chans: int = 3, **_: object) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        blocks = (depth - 2) // 6
        self.num_classes = num_classes
        self.num_features = WIDTHS[-1]
        self.conv1 = nn.Conv2d(in_chans, WIDTHS[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        self.act1 = nn.ReLU(inplace=True)
        inplanes = WIDTHS[0]
        self.feature_info = [dict(num_chs=WIDTHS[0], reduction=1, module="act1")]
        for stage, planes in enumerate(WIDTHS):
            stride = 1 if stage == 0 else 2
            layers = []
            for b in range(blocks):
                s = stride if b == 0 else 1
                downsample = None
                if s != 1 or inplanes != planes:
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, planes, kernel_size=1, stride=s, bias=False), nn.BatchNorm2d(planes)
                    )
                layers.append(BasicBlock(inplanes, planes, stride=s, downsample=downsample))
                inplanes = planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
            self.feature_info.append(dict(num_chs=planes, reduction=2**stage, module=f"layer{stage + 1}"))
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(WIDTHS[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem(self) -> nn.Module:
        """The first unit: 3x3 conv, BN, ReLU."""
        return nn.Sequential(self.conv1, self.bn1, self.act1)

    def blocks(self) -> list[nn.Module]:
        """Every residual block in order."""
        return [*self.layer1, *self.layer2, *self.layer3]

    def head(self) -> nn.Module:
        """Global average pool and the linear classifier."""
        return nn.Sequential(self.global_pool, self.fc)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, 64, H/4, W/4)."""
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(depth: int, pretrained: bool, **kwargs) -> CifarResNet:
    if pretrained:
        raise ValueError("no pretrained weights exist for CIFAR ResNets in contsup")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    return CifarResNet(depth=depth, **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for 32x32 inputs (0.27 M parameters)."""
    return _create(20, pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for 32x32 inputs (0.47 M parameters)."""
    return _create(32, pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for 32x32 inputs (0.86 M parameters)."""
    return _create(56, pretrained, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110 for 32x32 inputs (1.73 M parameters)."""
    return _create(110, pretrained, **kwargs)
