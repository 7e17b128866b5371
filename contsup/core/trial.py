"""What a third-party component gave, in words, and what a module does on one input: the
helpers :mod:`contsup.core.guard` checks contracts with. A module is tried on fake tensors
(no memory, no statistics changed), else once for real on zeros."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable

from contsup.errors import reason

if TYPE_CHECKING:  # torch is imported where a check runs
    from torch import nn


def shape_text(x: Any) -> str:
    return "x".join(str(d) for d in x.shape) if hasattr(x, "shape") else "?"


def describe(value: Any) -> str:
    """A returned value in a few words: ``None``, ``a tensor of shape 8x10``, ``the int 5``."""
    import torch

    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape ({', '.join(str(d) for d in value.shape)})" if value.dim() else "a scalar tensor"
    if isinstance(value, (int, float, str, bool)):
        return f"the {type(value).__name__} {value!r}"[:80]
    if isinstance(value, (list, tuple)):
        inner = ", ".join(describe(v) for v in value[:3]) + (", ..." if len(value) > 3 else "")
        return f"a {type(value).__name__} of {len(value)} ({inner})"
    return f"a {type(value).__name__}"


# -- trying a module on one input of fake tensors ----------------------------------------------------


def try_shape(module: "nn.Module", shape: tuple[int, ...]) -> tuple[int, ...] | BaseException:
    """The output shape of ``module`` on one input (2, *shape), run in eval mode (no statistic
    changes) on fake tensors, else for real on zeros; the exception when it fails both ways."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    was = module.training
    module.eval()
    # built inside a cost model's fake mode (its weights fake already): tried in that mode, as it is
    outer = any(isinstance(t, FakeTensor) for t in [*module.parameters(), *module.buffers()])
    try:
        try:
            with torch.no_grad(), (contextlib.nullcontext() if outer else FakeTensorMode(allow_non_fake_inputs=True)):
                out = module(torch.empty((2, *shape)))
            return tuple(out.shape) if isinstance(out, torch.Tensor) else TypeError(f"it returned {describe(out)}")
        except Exception:  # an op fake tensors cannot run: once for real
            first = next((p for p in module.parameters()), None)
            device = first.device if first is not None and first.device.type != "meta" else torch.device("cpu")
            try:
                with torch.no_grad():
                    out = module(torch.zeros((2, *shape), device=device))
            except Exception as exc:  # noqa: BLE001 - reported by the caller, naming the plugin
                return exc
            return tuple(out.shape) if isinstance(out, torch.Tensor) else TypeError(f"it returned {describe(out)}")
    finally:
        module.train(was)


def module_problem(module: "nn.Module", shape: tuple[int, ...], want: Callable[[tuple[int, ...]], str | None]) -> str | None:
    got = try_shape(module, tuple(shape))
    if isinstance(got, BaseException):
        return f"a module that fails on an input of shape (2, {', '.join(map(str, shape))}): {type(got).__name__}: {reason(got, 150)}"
    return want(got)


__all__ = ["shape_text", "describe", "try_shape", "module_problem"]
