"""Batch normalisation with statistics over the whole batch of every rank, on any device.

torch's ``nn.SyncBatchNorm`` runs only on CUDA; :class:`SyncBatchNorm` computes the same thing
with two all-reduces per layer that any backend can do (gloo on CPUs): per channel the sum, the
sum of squares and the count in the forward pass, the sums of dy and dy * x_hat in the backward
pass. Each rank's gradient is then the exact gradient of the global loss for its own samples
(its loss weighted by its share of the batch), so summing the gradients over ranks gives what one
process would compute on the concatenated batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _layout(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """For x: (B, C, ...), the dimensions to reduce over and the shape (1, C, 1, ...) that broadcasts."""
    return [d for d in range(x.dim()) if d != 1], [1, x.shape[1]] + [1] * (x.dim() - 2)


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, mean and var over every rank's batch."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
        running_mean: torch.Tensor | None, running_var: torch.Tensor | None, eps: float, momentum: float,
        group: Any,
    ) -> torch.Tensor:
        dims, shape = _layout(x)
        xf = x.float()
        c = x.shape[1]
        count = torch.tensor([xf.numel() // c], dtype=torch.float64, device=x.device)
        # sums in float64: the variance below is a difference of two of them
        stats = torch.cat([xf.sum(dims, dtype=torch.float64), (xf * xf).sum(dims, dtype=torch.float64), count])
        dist.all_reduce(stats, group=group)
        n64 = stats[2 * c]
        mean64 = stats[:c] / n64
        var64 = (stats[c : 2 * c] / n64 - mean64 * mean64).clamp_min(0.0)  # biased, as normalisation uses
        mean, var, n = mean64.float(), var64.float(), n64.float()
        invstd = torch.rsqrt(var + eps)
        x_hat = (xf - mean.view(shape)) * invstd.view(shape)
        y = x_hat
        if weight is not None:
            y = y * weight.float().view(shape) + bias.float().view(shape)
        if running_mean is not None:
            with torch.no_grad():
                unbiased = (var64 * (n64 / (n64 - 1).clamp_min(1.0))).float()
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        ctx.save_for_backward(x_hat, weight, invstd, n)
        ctx.group = group
        ctx.dtype = x.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:  # type: ignore[override]
        x_hat, weight, invstd, n = ctx.saved_tensors
        dims, shape = _layout(dy)
        dyf = dy.float()
        c = dy.shape[1]
        local = torch.cat([dyf.sum(dims), (dyf * x_hat).sum(dims)])
        sums = local.clone()
        dist.all_reduce(sums, group=ctx.group)
        mean_dy = (sums[:c] / n).view(shape)
        mean_dy_xhat = (sums[c:] / n).view(shape)
        scale = invstd if weight is None else invstd * weight.float()
        dx = (dyf - mean_dy - x_hat * mean_dy_xhat) * scale.view(shape)
        d_weight = d_bias = None
        if weight is not None:
            d_weight = local[c:].to(weight.dtype)  # this rank's samples only: the gradient sum adds the rest
            d_bias = local[:c].to(weight.dtype)
        return dx.to(ctx.dtype), d_weight, d_bias, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics cover every rank's batch (any backend, any device).

    It holds the same parameters and buffers as ``nn.BatchNorm2d``, so state dicts are
    interchangeable; in eval mode, or without a process group, it is plain batch norm."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, group: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.group = group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected input with at least 2 dimensions (B, C, ...), got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        use_batch = self.training or not self.track_running_stats
        if not use_batch or not dist.is_available() or not dist.is_initialized() or dist.get_world_size(self.group) == 1:
            return super().forward(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        track = self.training and self.track_running_stats
        return _SyncBatchNormFunction.apply(
            x, self.weight, self.bias, self.running_mean if track else None, self.running_var if track else None,
            self.eps, momentum, self.group,
        )


def convert_sync_batchnorm(module: nn.Module, group: Any = None, cuda: bool = False) -> nn.Module:
    """Replace every batch-norm layer inside ``module`` (in place) by one that synchronises its
    statistics: torch's ``nn.SyncBatchNorm`` on CUDA, :class:`SyncBatchNorm` otherwise. The
    parameters and buffers are the same tensors, so optimizers built before stay valid."""
    for name, child in list(module.named_children()):
        if isinstance(child, _BatchNorm) and not isinstance(child, (SyncBatchNorm, nn.SyncBatchNorm)):
            args = (child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new = nn.SyncBatchNorm(*args, process_group=group) if cuda else SyncBatchNorm(*args, group=group)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child, group, cuda)
    return module

