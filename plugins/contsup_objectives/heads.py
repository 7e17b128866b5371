"""Auxiliary classifiers A_l: small heads that turn a module's output into a local prediction.

A variant's name counts its layers: ``1c2f`` is one 3x3 conv (+BN+ReLU) then two fully connected
layers, the paper's default (Table 6). The conv's stride and width follow the feature (see
:func:`conv_plan`); the hidden fully connected layers have ``hidden`` units.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from contsup.layers import autocast_state, chunkable, conv_bn_relu, conv_bn_relu_backward_in_chunks
from contsup.types import HeadSpec

VARIANTS = ("0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f")  # the recipe key's choices (HeadVariant; a test keeps them equal)


def conv_plan(spec: HeadSpec) -> tuple[int, int]:
    """(stride, width) of the head's first 3x3 conv, as in the paper's Table 6: stride 2 and twice
    the channels while the feature is larger than the backbone's last feature (CIFAR: 16 -> 32,
    32 -> 64), stride 1 and the same channels at the last stage (64 -> 64)."""
    channels, height = spec.shape[0], spec.shape[1]
    if height > spec.final_shape[1]:
        return 2, 2 * channels
    return 1, channels


class AuxClassifier(nn.Module):
    """An auxiliary head: ``convs`` 3x3 conv+BN+ReLU layers, global average pool, ``fcs`` fully
    connected layers (ReLU between them) ending in ``out`` units. h: (B, C, H, W) -> (B, out)."""

    def __init__(self, spec: HeadSpec, out: int, hidden: int = 128, variant: str = "1c2f") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown head variant '{variant}'; choose one of {', '.join(VARIANTS)}")
        convs, fcs = int(variant[0]), int(variant[2])
        self.variant = variant
        layers: list[nn.Module] = []
        width = spec.shape[0]
        if convs:
            stride, conv_width = conv_plan(spec)
            layers += conv_bn_relu(width, conv_width, stride=stride)
            layers += [m for _ in range(convs - 1) for m in conv_bn_relu(conv_width, conv_width)]
            width = conv_width
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        dims = [width] + [hidden] * (fcs - 1) + [out]
        fc: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            fc.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                fc.append(nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(*fc)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(h)))

    def recompute_lean(self, h: torch.Tensor, scope: Callable[[], Any]) -> torch.Tensor | None:
        """``context.recompute_head``'s path for a one-conv head (``1c*f``): the output of
        ``self(h)``, keeping h and the pooled features for backward, which makes the conv+BN+ReLU
        layer again in channel chunks (:func:`contsup.layers.conv_bn_relu_backward_in_chunks`,
        the plain gradients to the bit). None for other heads, or layers swapped in (a synchronised
        batch norm): the caller then checkpoints the whole head."""
        layers = list(self.features)
        pooled = [type(m) for m in self.pool] == [nn.AdaptiveAvgPool2d, nn.Flatten] and self.pool[0].output_size in (1, (1, 1))
        if len(layers) != 3 or not chunkable(*layers) or not pooled:
            return None
        conv, bn = layers[0], layers[1]
        return _HeadRecomputed.apply(h, self, scope, conv.weight, bn.weight, bn.bias, *self.classifier.parameters())


class _HeadRecomputed(torch.autograd.Function):
    """A one-conv auxiliary head under ``recompute_head``, keeping its input h (which the module's
    last unit keeps anyway) and the pooled features (batch x width) through the forward.

    Checkpointing the head would bring back its convolution's batch-norm input and ReLU output
    while backward runs, when the module's units still hold theirs: the step's peak. Here backward
    runs the fully connected layers on the kept pooled features, then makes the conv+BN+ReLU
    layer again in channel chunks, so one chunk of it is alive at a time. The forward is the
    plain head (its batch norm updates its running statistics, once); backward runs under the
    forward's autocast.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, head: AuxClassifier, scope: Callable[[], Any], *params: torch.Tensor) -> torch.Tensor:
        ctx.head, ctx.scope, ctx.autocast = head, scope, autocast_state(h)
        pooled = head.pool(head.features(h))
        ctx.save_for_backward(h, pooled)
        return head.classifier(pooled)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, pooled = ctx.saved_tensors
        head: AuxClassifier = ctx.head
        fc = list(head.classifier.parameters())
        channels_last = h.dim() == 4 and not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        with torch.enable_grad(), torch.autocast(**ctx.autocast), ctx.scope():
            features = pooled.detach().requires_grad_()
            trained = [p for p in fc if p.requires_grad]  # a frozen layer gets no gradient
            d_features, *d_trained = torch.autograd.grad(head.classifier(features), (features, *trained), grad)
            by_id = {id(p): d for p, d in zip(trained, d_trained)}
            d_fc = [by_id.get(id(p)) for p in fc]
            d_h, conv_grad, bn_weight_grad, bn_bias_grad = conv_bn_relu_backward_in_chunks(
                h.detach(), head.features[0], head.features[1], head.pool, d_features, layout,
            )
        return (d_h if ctx.needs_input_grad[0] else None, None, None, conv_grad, bn_weight_grad, bn_bias_grad, *d_fc)


class Normalized(nn.Module):
    """Rows of the wrapped head's output scaled to unit L2 norm: (B, D) -> (B, D)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.head(h), dim=1)
