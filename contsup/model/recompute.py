"""Running a piece of a module (its context adapters, its head) again during backward instead of
keeping its activations: ``[context] recompute`` and ``recompute_head``.

:func:`recomputed` is activation checkpointing of one piece (``torch.utils.checkpoint``,
non-reentrant, the RNG state preserved, so dropout draws the same mask): the forward keeps the
piece's inputs only, and backward runs the piece once more to get what its own backward needs.
The gradients are those of the plain piece. What a second forward would change is put back:
every buffer of the piece (batch-norm running statistics and ``num_batches_tracked``) is
restored after the recomputation to what the forward left, so the statistics move once per step.
The recomputation uses the batch's own statistics in training mode, as the forward did.

A piece may recompute in its own way, keeping less while its backward runs than checkpointing
would bring back at once: a method ``recompute_lean(*inputs, scope)`` returning the piece's
output, with the same gradients, or None where it does not apply. The official M_E has one
(:meth:`contsup.adapters.InputEncoder.recompute_lean`: its second layer in channel chunks).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

Scope = Callable[[], Any]  # a context manager factory wrapped around each recomputation


@contextlib.contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """Whatever the body of the ``with`` does to ``module``'s buffers (a batch norm's running
    statistics, its batch counter) is undone at its end."""
    saved = [(b, b.clone()) for b in module.buffers() if b is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, before in saved:
                b.copy_(before)


def recomputed(fn: Callable[..., torch.Tensor], module: nn.Module, *inputs: torch.Tensor, scope: Scope = contextlib.nullcontext) -> torch.Tensor:
    """``fn(*inputs)`` (the forward of ``module``, or of a piece holding it), keeping only
    ``inputs`` for backward; backward runs ``fn`` again under ``scope()`` with ``module``'s
    buffers restored afterwards. Without autograd (evaluation) it is plain ``fn(*inputs)``."""
    if not torch.is_grad_enabled():
        return fn(*inputs)
    lean = getattr(module, "recompute_lean", None) if fn is module else None
    if lean is not None:
        out = lean(*inputs, scope=scope)
        if out is not None:
            return out
    calls = 0

    def run(*args: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:  # the forward: nothing to restore
            return fn(*args)
        with buffers_kept(module), scope():
            return fn(*args)

    return checkpoint(run, *inputs, use_reentrant=False, preserve_rng_state=True)


__all__ = ["recomputed", "buffers_kept", "Scope"]
