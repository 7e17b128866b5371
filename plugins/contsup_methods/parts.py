"""The networks the built-in training methods add to a module: MAN's two copies of the next
module's first unit, HPFF's independent head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from contsup.layers import fresh_copy
from contsup.types import Shape


class MomentumCopies(nn.Module):
    """MAN's LB_l (a trainable copy of unit u_l, module l+1's first) and EMA_l (a frozen copy moved
    towards the live u_l); module l's head and decoder read ``LB_l(h) + EMA_l(h)``, of u_l's
    output shape. Both copies take fresh weights of their own; EMA_l gets no gradient (its input
    h does) and keeps its own batch-norm statistics."""

    def __init__(self, unit: nn.Module, output_shape: Shape) -> None:
        super().__init__()
        self.lb = fresh_copy(unit)
        self.ema = fresh_copy(unit)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.feature_shape = tuple(output_shape)

    def feature(self, h: torch.Tensor) -> torch.Tensor:
        """h: (B, C, H, W), module l's output -> LB_l(h) + EMA_l(h), of u_l's output shape."""
        return self.lb(h) + self.ema(h)

    @torch.no_grad()
    def follow(self, live: nn.Module, momentum: float) -> None:
        """ema = momentum * ema + (1 - momentum) * live, parameter by parameter (buffers stay)."""
        for e, p in zip(self.ema.parameters(), live.parameters()):
            e.copy_(e * momentum + p.detach() * (1 - momentum))

    @torch.no_grad()
    def copy_from(self, live: nn.Module) -> None:
        """EMA_l's parameters take the live unit's values."""
        for e, p in zip(self.ema.parameters(), live.parameters()):
            e.copy_(p.detach())


class IndependentHead(nn.Module):
    """HPFF's independent head of module l: the objective's head on h_l and its loss, which trains
    module l alone (``extra_loss``)."""

    def __init__(self, head: nn.Module, objective: Any) -> None:
        super().__init__()
        self.head = head
        self._objective = (objective,)  # a tuple: an objective that is a module stays out of the parameters

    def extra_loss(self, h: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._objective[0].loss(self.head(h), y)


__all__ = ["MomentumCopies", "IndependentHead"]
