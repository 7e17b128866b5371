"""Evaluation on the test set: the final output's error and loss, and every module head's accuracy."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from contsup.model.network import ContextModule, GreedyNetwork
from contsup.training.precision import Precision, to_memory_format


@attrs.frozen
class Evaluation:
    """Test error of the final output and accuracy of every module's head, in percent."""

    error_pct: float
    loss: float
    local_acc_pct: list[float | None]


@attrs.define
class EvalCounts:
    """Sums over test batches: each module head's correct predictions (None when a head does not
    classify), the final output's loss x images, and the images seen."""

    modules: int
    correct: list[int | None] = attrs.field(init=False)
    total: int = 0
    loss_sum: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.correct = [0] * self.modules

    def add(self, module: ContextModule, z: torch.Tensor, y: torch.Tensor) -> None:
        """Count module ``module``'s head output z: (B, classes) against y: (B,); the last module's
        loss is summed too. ``total`` is counted separately (``images``)."""
        i = module.index - 1
        z = z.float()
        if module.index == self.modules:
            self.loss_sum += float(module.objective.loss(z, y)) * len(y)
        prediction = module.objective.predict(z)
        if prediction is None or self.correct[i] is None:
            self.correct[i] = None
        else:
            self.correct[i] += int((prediction == y).sum())

    def images(self, n: int) -> None:
        self.total += n

    def result(self) -> Evaluation:
        total = self.total
        acc = [100.0 * c / total if c is not None and total else None for c in self.correct]
        return Evaluation(error_pct=100.0 - (acc[-1] or 0.0), loss=self.loss_sum / max(total, 1), local_acc_pct=acc)

    def as_tensor(self, modules: Any = None) -> torch.Tensor:
        """[correct | 1 where a head does not classify | images | loss sum], float64: (2K + 2,),
        counting only the heads of ``modules`` (1-based indices; default all): summed over
        processes, each head counted once."""
        k = self.modules
        t = torch.zeros(2 * k + 2, dtype=torch.float64)
        for i in (m - 1 for m in (modules or range(1, k + 1))):
            t[i] = self.correct[i] or 0
            t[k + i] = 1.0 if self.correct[i] is None else 0.0
        t[2 * k] = self.total
        t[2 * k + 1] = self.loss_sum
        return t

    @classmethod
    def from_tensor(cls, t: torch.Tensor, k: int) -> "EvalCounts":
        values = t.cpu().tolist()
        out = cls(k)
        out.correct = [None if m > 0 else int(round(c)) for c, m in zip(values[:k], values[k : 2 * k])]
        out.total, out.loss_sum = int(round(values[2 * k])), values[2 * k + 1]
        return out


@torch.no_grad()
def evaluation_counts(
    network: GreedyNetwork, loader: Any, device: torch.device, precision: Precision | None = None,
    channels_last: bool = False,
) -> EvalCounts:
    """Run the network in eval mode over ``loader``: the sums :class:`EvalCounts` holds."""
    was_training = network.training
    network.eval()
    precision = precision or Precision()
    counts = EvalCounts(network.num_modules)
    for x, y in loader:
        x, y = to_memory_format(x.to(device, non_blocking=True), channels_last), y.to(device, non_blocking=True)
        with precision.autocast():
            outs = network.module_outputs(x)
            heads = [m.head_output(h) for m, h in zip(network.blocks, outs)]
        for m, z in zip(network.blocks, heads):
            counts.add(m, z, y)
        counts.images(len(y))
    network.train(was_training)
    return counts


def evaluate(
    network: GreedyNetwork, loader: Any, device: torch.device, precision: Precision | None = None,
    channels_last: bool = False,
) -> Evaluation:
    """Evaluate in eval mode: final error and each local head's accuracy."""
    return evaluation_counts(network, loader, device, precision, channels_last).result()


__all__ = ["Evaluation", "EvalCounts", "evaluation_counts", "evaluate"]
