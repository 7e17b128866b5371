"""Counting arithmetic: the forward FLOPs of one image through each of a backbone's units, the
figure a partitioner with ``needs_flops = True`` is given (``Costs.flops``)."""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from contsup.errors import ContsupError, one_line
from contsup.types import Shape


def unit_flops(units: Sequence[nn.Module], input_shape: Shape, fake_mode: FakeTensorMode | None = None) -> tuple[float, ...]:
    """Forward FLOPs of one image of ``input_shape`` (C, H, W) through each unit in turn, as
    ``torch.utils.flop_counter`` counts them (a multiply-add is 2; convolutions and matrix
    products only, so batch norm, activations and pooling count 0).

    Units built inside ``fake_mode`` run there, on shapes alone; real units run one image of
    zeros in eval mode without gradients, which changes nothing in them (every submodule's mode
    is restored, the global random state too). Raises ContsupError naming a unit that fails."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    modes = [(m, m.training) for unit in units for m in unit.modules()]
    out: list[float] = []
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), fake_mode or contextlib.nullcontext():
            h = torch.zeros((1, *input_shape))
            with counter:
                before = 0
                for unit in units:
                    unit.eval()
                    try:
                        h = unit(h)
                    except Exception as exc:
                        raise ContsupError(
                            f"partition: counting the forward FLOPs of unit {len(out)} failed "
                            f"({type(exc).__name__}: {one_line(str(exc))[:200]})"
                        ) from None
                    total = counter.get_total_flops()
                    out.append(float(total - before))
                    before = total
    finally:
        for m, mode in modes:
            m.training = mode
    return tuple(out)


__all__ = ["unit_flops"]
