"""Building blocks shared by the engine's adapters and the built-in plugins' heads and adapters
(below both, as the plugin API): conv+BN+ReLU, pooling to a size, and recomputing a conv+BN+ReLU
layer's backward in channel chunks."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d, nn.ReLU]:
    """A convolution without bias ("same" padding for odd kernels), its batch norm and an in-place
    ReLU: three layers the caller registers under its own names (their state-dict keys)."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)


def fresh_copy(unit: nn.Module) -> nn.Module:
    """A deep copy of ``unit`` with every submodule's parameters and buffers reinitialised.

    The copy is made outside any fake-tensor mode: contsup counts memory on fake tensors
    (``contsup plan``, the fit check), and a deep copy cannot run inside one. A fake unit's copy
    is still fake, a real one's real; the reinitialisation runs in the caller's mode. Copying a
    fake tensor makes torch warn that it asked for the tensor's data pointer; the copy is right."""
    with unset_fake_temporarily(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor", category=UserWarning)
        twin = copy.deepcopy(unit)
    for m in twin.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return twin


def pool_to(size: tuple[int, int], source_size: tuple[int, int]) -> nn.Module:
    """Adaptive average pooling from ``source_size`` to ``size`` (H, W); the identity when they match."""
    return nn.Identity() if tuple(size) == tuple(source_size) else nn.AdaptiveAvgPool2d(tuple(size))


RECOMPUTE_CHUNK = 16  # output channels a chunked recomputation makes at a time (the fastest of 8..64 here)


def autocast_state(t: torch.Tensor) -> dict[str, Any]:
    """The autocast in force for ``t``'s device, as ``torch.autocast`` keywords: a recomputation in
    backward (which training runs outside autocast) enters it again, as checkpointing does."""
    device = t.device.type
    return {"device_type": device, "enabled": torch.is_autocast_enabled(device), "dtype": torch.get_autocast_dtype(device)}


def chunkable(conv: nn.Module, bn: nn.Module, act: nn.Module) -> bool:
    """Whether ``act(bn(conv(h)))`` is the plain layer :func:`conv_bn_relu_backward_in_chunks`
    recomputes: an ``nn.Conv2d`` without bias or groups, an affine ``nn.BatchNorm2d`` in training
    mode (not a synchronised one, whose collectives the chunks would skip), an ``nn.ReLU``."""
    return (
        type(conv) is nn.Conv2d and conv.bias is None and conv.groups == 1
        and type(bn) is nn.BatchNorm2d and bn.training and bn.affine
        and type(act) is nn.ReLU
    )


def conv_bn_relu_backward_in_chunks(
    h: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, pool: nn.Module, grad: torch.Tensor,
    layout: torch.memory_format = torch.contiguous_format,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of ``pool(relu(bn(conv(h))))`` in training mode, recomputing the layer
    :data:`RECOMPUTE_CHUNK` output channels at a time: (grad of h, of the conv's weight, of the
    batch norm's weight and bias), given ``grad``, the gradient of the pooled output (channels in
    dimension 1, in the forward's autocast dtype).

    The convolution's output channels, the batch norm (statistics per channel, over the batch),
    ReLU and a per-channel ``pool`` each act on their own channels, so one chunk's batch norm,
    ReLU and pool are differentiated before the next chunk is made, and the chunks fill the
    gradient of the convolution's output; the convolution's backward then runs once on it, as in
    the plain layer. The results are the plain layer's to the bit; what stays alive is ``h``, one
    chunk's two tensors and that output gradient (which the plain backward makes too). The batch
    norm uses the batch's statistics and leaves its buffers alone. Call it under autograd (the
    chunks are differentiated) and under the forward's autocast."""
    grad_out, norm_grads = None, []
    for c in range(0, conv.out_channels, RECOMPUTE_CHUNK):
        part = slice(c, c + RECOMPUTE_CHUNK)
        with torch.no_grad():  # the chunk's convolution output: its gradient is all backward needs of it
            a = F.conv2d(h, conv.weight[part], None, conv.stride, conv.padding, conv.dilation, conv.groups)
        a.requires_grad_()
        weight, bias = (t[part].detach().requires_grad_() for t in (bn.weight, bn.bias))
        out = pool(F.relu(F.batch_norm(a, None, None, weight, bias, True, 0.0, bn.eps), inplace=True))
        d_a, *d_norm = torch.autograd.grad(out, (a, weight, bias), grad[:, part])
        if conv.out_channels <= RECOMPUTE_CHUNK:
            grad_out = d_a  # one chunk: the whole gradient already
        else:
            if grad_out is None:
                shape = (d_a.shape[0], conv.out_channels, *d_a.shape[2:])
                grad_out = torch.empty(shape, dtype=d_a.dtype, device=d_a.device, memory_format=layout)
            grad_out[:, part] = d_a
        norm_grads.append(d_norm)
        del a, out, d_a
    operand = grad_out.dtype  # autocast's: the forward's convolution ran in it
    with torch.no_grad():  # the convolution's backward once, on the whole output gradient: a result, not a graph
        d_h, w_grad, _ = torch.ops.aten.convolution_backward(
            grad_out, h.to(operand), conv.weight.to(operand), None, conv.stride, conv.padding,
            conv.dilation, False, [0, 0], conv.groups, [True, True, False],
        )
    bn_weight_grad, bn_bias_grad = (torch.cat(parts) for parts in zip(*norm_grads))
    return d_h, w_grad.to(conv.weight.dtype), bn_weight_grad, bn_bias_grad


__all__ = ["conv_bn_relu", "fresh_copy", "pool_to", "RECOMPUTE_CHUNK", "autocast_state", "chunkable", "conv_bn_relu_backward_in_chunks"]
