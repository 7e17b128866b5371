"""The context adapters: M_E encodes the raw input, M_R aligns an earlier feature.

Each maps a source tensor to the shape of the module input h it is added to. Two variants:
the paper's text (:func:`paper_adapter`: M_E's first width h's channels, M_R a 1x1 conv) and the
official code's (:func:`official_adapter`: M_E's first width 12, M_R with BN and ReLU), which
produced the published numbers and is what the built-in selectors build by default. A context
selector that builds no adapter of its own for a source gets :func:`paper_adapter` (the engine's
fallback, kept so that third-party networks and their checkpoints stay as they were; see
docs/architecture.md, Decisions); a selector that wants the official ones returns
``official_adapter(...)`` from its ``adapter`` method.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from contsup.layers import RECOMPUTE_CHUNK, autocast_state, chunkable, conv_bn_relu, conv_bn_relu_backward_in_chunks, pool_to
from contsup.types import Shape


class _BackToContiguous(torch.autograd.Function):
    """``x.contiguous()`` for a channels-last ``x`` whose gradient goes back channels-last.

    The plain ``.contiguous()`` hands its contiguous gradient to the layer before; a pooling
    layer whose input is channels-last then copies its whole full-size input gradient into that
    layout in its backward (two copies at x's resolution, the largest tensors of M_E). Converting
    the small pooled gradient instead gives the same numbers without those copies."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


class InputEncoder(nn.Module):
    """M_E: 3x3 conv+BN+ReLU, 3x3 conv+BN+ReLU, adaptive average pool to h's size.

    x: (B, C_x, H_x, W_x) -> (B, C_h, H_h, W_h). ``hidden`` is the first conv's width: h's
    channels in the paper (Table 7), 12 in the official code. ``pool_first`` pools x to h's size
    before the convolutions (the "pooled" encoder): the same layers at h's resolution, not the
    same function, and far cheaper where h is small. ``channels_last`` runs the convolutions in
    channels-last memory format: the same function, faster on CPU at x's full resolution
    (docs/performance.md); None (the default) uses it on CPU unless pooling first.
    """

    adapter_kind = "M_E"  # what contsup plan calls it

    def __init__(
        self,
        source_shape: Shape,
        target_shape: Shape,
        hidden: int | None = None,
        pool_first: bool = False,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        c_in, c_out = source_shape[0], target_shape[0]
        hidden = hidden or c_out
        self.pool_first = pool_first
        self.channels_last = channels_last
        self.conv1, self.bn1, self.act1 = conv_bn_relu(c_in, hidden)
        self.conv2, self.bn2, self.act2 = conv_bn_relu(hidden, c_out)
        self.pool = pool_to(target_shape[1:], source_shape[1:])

    def _uses_channels_last(self, x: torch.Tensor) -> bool:
        if self.channels_last is None:
            return x.device.type == "cpu" and not self.pool_first
        return self.channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_first:
            x = self.pool(x)
        channels_last = self._uses_channels_last(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = x if self.pool_first else self.pool(x)
        return _BackToContiguous.apply(x) if channels_last else x

    def recompute_lean(self, x: torch.Tensor, scope: Callable[[], Any]) -> torch.Tensor | None:
        """``context.recompute``'s path for M_E (see :class:`_RecomputedInChunks`): the output of
        ``self(x)``, keeping only x for backward, where the second layer is recomputed
        :data:`RECOMPUTE_CHUNK` output channels at a time, under ``scope()``. None where that does
        not apply (a batch norm other than ``nn.BatchNorm2d`` in training mode, such as a
        SyncBatchNorm, or other layers swapped in): the caller then recomputes the whole encoder."""
        layers = ((self.conv1, self.bn1, self.act1), (self.conv2, self.bn2, self.act2))
        if not all(chunkable(*layer) for layer in layers) or not isinstance(self.pool, (nn.Identity, nn.AdaptiveAvgPool2d)):
            return None
        params = (self.conv1.weight, self.bn1.weight, self.bn1.bias, self.conv2.weight, self.bn2.weight, self.bn2.bias)
        return _RecomputedInChunks.apply(x, self, scope, *params)


class _RecomputedInChunks(torch.autograd.Function):
    """M_E under ``context.recompute``, keeping only its input x through the forward.

    Checkpointing M_E would bring back, at once, everything its backward uses: both layers'
    batch-norm inputs and ReLU outputs at x's full resolution, 2 x (12 + C) channels (76 MiB for a
    64-channel module at batch 128 on 32x32 inputs, more than a whole CIFAR module's forward
    keeps). Here backward recomputes the first layer whole (12 channels) and the second in
    channel chunks (:func:`conv_bn_relu_backward_in_chunks`): every gradient is the plain
    encoder's to the bit (tests/test_recompute.py), with one chunk of the second layer alive
    instead of all of it.

    The forward is the plain ``encoder(x)`` (its batch norms update their running statistics,
    once); backward's batch norms use the batch's statistics without touching the buffers, under
    the forward's autocast.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, encoder: InputEncoder, scope: Callable[[], Any], *params: torch.Tensor) -> torch.Tensor:
        ctx.encoder, ctx.scope, ctx.autocast = encoder, scope, autocast_state(x)
        ctx.save_for_backward(x)
        return encoder(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        e: InputEncoder = ctx.encoder
        channels_last = e._uses_channels_last(x)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        with torch.enable_grad(), torch.autocast(**ctx.autocast), ctx.scope():
            xi = x.detach().requires_grad_(ctx.needs_input_grad[0])
            h = e.pool(xi) if e.pool_first else xi
            h = h.contiguous(memory_format=layout)
            w1, g1, b1 = (t.detach().requires_grad_() for t in (e.conv1.weight, e.bn1.weight, e.bn1.bias))
            c1 = e.conv1
            a1 = F.conv2d(h, w1, None, c1.stride, c1.padding, c1.dilation)
            y1 = F.relu(F.batch_norm(a1, None, None, g1, b1, True, 0.0, e.bn1.eps), inplace=True)
            pool = nn.Identity() if e.pool_first else e.pool
            d_y1, w2_grad, g2_grad, b2_grad = conv_bn_relu_backward_in_chunks(
                y1.detach(), e.conv2, e.bn2, pool, grad.contiguous(memory_format=layout), layout,
            )
            leaves = (xi, w1, g1, b1) if ctx.needs_input_grad[0] else (w1, g1, b1)
            first = list(torch.autograd.grad(y1, leaves, d_y1.to(y1.dtype)))
        d_x = first.pop(0) if ctx.needs_input_grad[0] else None
        return (d_x, None, None, *first, w2_grad, g2_grad, b2_grad)


class ShortcutAdapter(nn.Module):
    """M_R as the paper writes it: 1x1 conv to h's channels, adaptive average pool to h's size.

    h_j: (B, C_s, H_s, W_s) -> (B, C_h, H_h, W_h). Pooling commutes with a 1x1 convolution, so
    this pools first: the same result at a fraction of the cost.
    """

    adapter_kind = "M_R"  # what contsup plan calls it

    def __init__(self, source_shape: Shape, target_shape: Shape) -> None:
        super().__init__()
        self.pool = pool_to(target_shape[1:], source_shape[1:])
        self.conv = nn.Conv2d(source_shape[0], target_shape[0], 1, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(h))


class OfficialShortcutAdapter(nn.Module):
    """M_R as the official code builds it: 1x1 conv, BN, ReLU, then adaptive average pool.

    The BN and ReLU sit between conv and pool, so the pool cannot move first.
    """

    adapter_kind = "M_R official"  # what contsup plan calls it

    def __init__(self, source_shape: Shape, target_shape: Shape) -> None:
        super().__init__()
        self.conv, self.bn, self.act = conv_bn_relu(source_shape[0], target_shape[0], kernel=1)
        self.pool = pool_to(target_shape[1:], source_shape[1:])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn(self.conv(h))))


OFFICIAL_ENCODER_WIDTH = 12  # the official M_E's first convolution


def official_adapter(is_input: bool, source_shape: Shape, target_shape: Shape) -> nn.Module:
    """The official code's adapter for a source: M_E of first width 12 for the raw input, M_R
    with BN and ReLU for a feature."""
    if is_input:
        return InputEncoder(source_shape, target_shape, hidden=OFFICIAL_ENCODER_WIDTH)
    return OfficialShortcutAdapter(source_shape, target_shape)


def paper_adapter(is_input: bool, source_shape: Shape, target_shape: Shape) -> nn.Module:
    """The paper's text's adapter for a source: M_E (first width h's channels) for the raw input,
    M_R (1x1 conv + pool) for a feature. The engine's fallback for selectors that build none."""
    if is_input:
        return InputEncoder(source_shape, target_shape)
    return ShortcutAdapter(source_shape, target_shape)


__all__ = [
    "InputEncoder", "ShortcutAdapter", "OfficialShortcutAdapter", "official_adapter", "paper_adapter", "pool_to",
    "OFFICIAL_ENCODER_WIDTH", "RECOMPUTE_CHUNK", "autocast_state", "chunkable", "conv_bn_relu_backward_in_chunks",
]
