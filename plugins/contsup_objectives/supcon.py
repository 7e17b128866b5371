"""The supervised contrastive loss (the paper's Eq. 48) as a plain, reusable function."""

from __future__ import annotations

from typing import TYPE_CHECKING

from contsup.errors import BatchError

if TYPE_CHECKING:  # annotations only: the package imports this module, and importing torch takes seconds
    import torch


class NoPositivePairs(BatchError, ValueError):
    """A batch in which no two samples share a label: the contrastive loss is undefined."""


def supcon_loss(z: torch.Tensor, y: torch.Tensor, temperature: float = 0.07, base_temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss of embeddings ``z`` (B, D), usually L2-normalised, with labels
    ``y`` (B,).

    For each anchor i with at least one positive p (same label, p != i): the mean over its
    positives of -log(exp(z_i.z_p / t) / sum_{k != i} exp(z_i.z_k / t)), times t / base_t; the
    loss is the mean over those anchors. Computed with log-sum-exp, so large logits are safe.
    """
    import torch

    if z.dim() != 2 or y.dim() != 1 or len(z) != len(y):
        raise ValueError(f"supcon_loss expects z: (B, D) and y: (B,), got {tuple(z.shape)} and {tuple(y.shape)}")
    n = len(y)
    logits = (z @ z.T) / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (y[:, None] == y[None, :]) & ~self_mask
    counts = positives.sum(dim=1)
    anchors = counts > 0
    if not bool(anchors.any()):
        raise NoPositivePairs(
            f"supcon: no two samples in this batch of {n} share a label, so the contrastive loss is "
            f"undefined: every batch needs two samples of one class"
        )
    pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1)
    per_anchor = -(temperature / base_temperature) * pos_log_prob[anchors] / counts[anchors]
    return per_anchor.mean()
