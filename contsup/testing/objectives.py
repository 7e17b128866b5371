"""``check_objective`` and ``check_decoder``: a local objective's heads and loss, and a decoder's
reconstruction, loss and weights, against what the engine does with them; every problem one line
naming the shape it failed on."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from contsup.testing.report import Problems, graph_leaves, instance, who
from contsup.testing.selectors import SHAPE_PROFILES
from contsup.types import DatasetInfo, HeadSpec, Shape

BATCH = 8
UNITS_PER_STAGE = 2


def check_objective(objective: Any, *, profiles: dict | None = None, num_classes: int = 10) -> None:
    """Check a local objective (a class, built with default options, or an instance).

    For the head of every module but the last of a small network on each of ``profiles``
    (default ``SHAPE_PROFILES``: two units per stage, one unit per module, the backbone's units
    and shapes in the ``HeadSpec`` as the engine gives them): ``head(spec)`` is a new
    ``nn.Module`` on every call that shares no parameter with another head or with the
    backbone's units, and maps h: (B, C, H, W) to a tensor with B first, in train and eval mode;
    ``loss(z, y)`` is a finite floating scalar whose gradient reaches h and the head's own
    parameters and nothing else, leaving h and y as they were; ``predict(z)`` is None or (B,)
    integer labels in [0, num_classes).
    """
    objective = instance(objective)
    problems = Problems(who("objective", objective), "objective")
    for method in ("head", "loss", "predict"):
        if not callable(getattr(objective, method, None)):
            problems.add(f"it has no {method}(...) method; see docs/plugins/hooks.md")
    if problems.count == 0:
        _with_seed(lambda: _check_objective(objective, SHAPE_PROFILES if profiles is None else profiles, num_classes, problems))
    problems.raise_if_any()


def check_decoder(decoder: Any, *, profiles: dict | None = None, max_modules: int = 32) -> None:
    """Check a decoder (a class, built with default options, or an instance).

    For every stage's feature shape of each of ``profiles`` (default ``SHAPE_PROFILES``):
    ``build(feature_shape, info)`` is a new ``nn.Module`` on every call, mapping h: (B, C, H, W)
    to (B, *info.input_shape) in train and eval mode; ``loss(reconstruction, x, info)`` is a
    finite floating scalar whose gradient reaches h and the decoder's own parameters and
    nothing else, leaving h and x as they were. ``weights(l, K)`` for 1 <= l < K <= ``max_modules``
    is two finite numbers >= 0, not both 0, the same every call.
    """
    decoder = instance(decoder)
    problems = Problems(who("decoder", decoder), "decoder")
    for method in ("build", "loss", "weights"):
        if not callable(getattr(decoder, method, None)):
            problems.add(f"it has no {method}(...) method; see docs/plugins/hooks.md")
    if problems.count == 0:
        _check_weights(decoder, max_modules, problems)
        _with_seed(lambda: _check_decoder(decoder, SHAPE_PROFILES if profiles is None else profiles, problems))
    problems.raise_if_any()


def _with_seed(check: Any) -> None:
    """Run ``check`` seeded, on one thread, leaving the caller's random state and threads alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: more threads only wait on each other
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            check()
    finally:
        torch.set_num_threads(threads)


# -- objectives ------------------------------------------------------------------------------------


def profile_network(input_shape: Shape, stages: Sequence[Shape]) -> tuple[list[nn.Module], list[Shape]]:
    """Units of a small network with ``UNITS_PER_STAGE`` units at each stage's shape: a 3x3 conv,
    pooling to the stage's size and a ReLU each; and their output shapes."""
    units, shapes, channels = [], [], input_shape[0]
    for shape in stages:
        for _ in range(UNITS_PER_STAGE):
            units.append(nn.Sequential(nn.Conv2d(channels, shape[0], 3, padding=1), nn.AdaptiveAvgPool2d(tuple(shape[1:])), nn.ReLU()))
            shapes.append(tuple(shape))
            channels = shape[0]
    return units, shapes


def head_specs(input_shape: Shape, stages: Sequence[Shape], num_classes: int) -> list[HeadSpec]:
    """The HeadSpec of every module but the last of the profile's network, one unit per module."""
    units, shapes = profile_network(input_shape, stages)
    k = len(units)
    return [
        HeadSpec(shapes[u], shapes[-1], num_classes, module=u + 1, num_modules=k, last_unit=u, units=units, unit_shapes=shapes)
        for u in range(k - 1)
    ]


def _check_objective(objective: Any, profiles: dict, num_classes: int, problems: Problems) -> None:
    y = torch.tensor([0, 1, 2, num_classes - 1] * (BATCH // 4)) % num_classes  # every class twice: contrastive losses have pairs
    for label, (input_shape, stages) in profiles.items():
        for spec in head_specs(input_shape, stages, num_classes):
            at = f"{label}: module {spec.module} of {spec.num_modules}, h {_shape(spec.shape)}"
            before = problems.count
            _check_head(objective, spec, y, num_classes, at, problems)
            if problems.count > before:
                break  # the first failing module of a profile says enough


def _fresh_module(build: Callable[[], Any], call: str, made: str, at: str, problems: Problems) -> nn.Module | None:
    """What ``build()`` makes, called twice as the engine does (once per module): the first
    result when it is an ``nn.Module`` (a problem, too, when the two share parameters), else None
    with the problem said."""
    try:
        first, second = build(), build()
    except Exception as exc:
        problems.add(f"{at}: {call} raised {type(exc).__name__}: {_text(exc)}")
        return None
    if not isinstance(first, nn.Module):
        problems.add(f"{at}: {call} returned {type(first).__name__}; expected an nn.Module")
        return None
    own = {id(p) for p in first.parameters()}
    if second is first or own & {id(p) for p in second.parameters()}:
        problems.add(f"{at}: two calls of {call} share parameters; build a new {made} on every call (each module trains its own)")
    return first


def _check_head(objective: Any, spec: HeadSpec, y: torch.Tensor, num_classes: int, at: str, problems: Problems) -> None:
    head = _fresh_module(lambda: objective.head(spec), "head(spec)", "head", at, problems)
    if head is None:
        return
    own = {id(p) for p in head.parameters()}
    if own & {id(p) for unit in spec.units for p in unit.parameters()}:
        problems.add(f"{at}: the head holds the backbone's own units; copy them (copy.deepcopy), never share them")
        return
    head.train()
    h = torch.randn(BATCH, *spec.shape, requires_grad=True)
    z = _loss_and_graph(head, objective.loss, h, (y,), own, at, problems, "head")
    if z is not None:
        _check_prediction(objective, z.detach(), num_classes, f"{at} (train mode)", problems)
    head.eval()
    with torch.no_grad():
        z = _forward(head, h.detach(), at + " (eval mode)", problems, "head")
    if z is not None:
        _check_prediction(objective, z, num_classes, f"{at} (eval mode)", problems)


def _forward(module: nn.Module, h: torch.Tensor, at: str, problems: Problems, what: str, shape: Shape | None = None) -> torch.Tensor | None:
    """``module(h)`` when it is a tensor with the batch first (of ``shape`` when given) and finite."""
    try:
        out = module(h)
    except Exception as exc:
        problems.add(f"{at}: the {what}'s forward raised {type(exc).__name__}: {_text(exc)}")
        return None
    if not isinstance(out, torch.Tensor):
        problems.add(f"{at}: the {what} returned {type(out).__name__}; expected a tensor")
        return None
    expected = f"({BATCH}, ...)" if shape is None else str((BATCH, *shape))
    if out.dim() == 0 or out.shape[0] != BATCH or (shape is not None and tuple(out.shape[1:]) != tuple(shape)):
        problems.add(f"{at}: the {what} returned shape {tuple(out.shape)}; expected {expected}")
        return None
    if not out.dtype.is_floating_point or not torch.isfinite(out).all():
        problems.add(f"{at}: the {what} returned non-finite or non-float values")
        return None
    return out


def _loss_and_graph(
    module: nn.Module, loss_fn: Any, h: torch.Tensor, extra: tuple, own: set[int], at: str, problems: Problems, what: str,
    shape: Shape | None = None,
) -> torch.Tensor | None:
    """Forward h, the loss on the output (and ``extra``), backward: the output when all is well."""
    kept = [h.detach().clone(), *(e.clone() for e in extra)]
    out = _forward(module, h, at, problems, what, shape)
    if out is None:
        return None
    try:
        loss = loss_fn(out, *extra)
    except Exception as exc:
        problems.add(f"{at}: loss raised {type(exc).__name__}: {_text(exc)}")
        return None
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.dtype.is_floating_point:
        shown = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        problems.add(f"{at}: loss returned {shown}; expected a floating scalar tensor (shape ())")
        return None
    if not torch.isfinite(loss):
        problems.add(f"{at}: loss is {float(loss.detach())}; expected a finite number")
        return None
    if not loss.requires_grad:
        problems.add(f"{at}: the loss has no gradient; compute it from the {what}'s output with torch operations")
        return None
    for leaf in graph_leaves(loss):
        if leaf is not h and id(leaf) not in own:
            problems.add(
                f"{at}: the loss reaches a tensor of shape {tuple(leaf.shape)} that is neither h nor a parameter of the "
                f"{what}; register weights as nn.Parameters of the {what}, share none"
            )
    loss.backward()
    if h.grad is None or not torch.isfinite(h.grad).all():
        problems.add(f"{at}: the loss gives h no (finite) gradient, so the module before the {what} would not learn from it")
    if own and not any(p.grad is not None for p in module.parameters()):
        problems.add(f"{at}: no parameter of the {what} gets a gradient from the loss, so it never trains")
    if not all(torch.equal(a, b) for a, b in zip([h.detach(), *extra], kept)):
        problems.add(f"{at}: the {what} or its loss changed its input in place; compute out of place")
    module.zero_grad(set_to_none=True)
    return out


def _check_prediction(objective: Any, z: torch.Tensor, num_classes: int, at: str, problems: Problems) -> None:
    try:
        labels = objective.predict(z)
    except Exception as exc:
        problems.add(f"{at}: predict raised {type(exc).__name__}: {_text(exc)}")
        return
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (BATCH,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        shown = f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        problems.add(f"{at}: predict returned {shown}; expected None or integer labels of shape ({BATCH},)")
    elif labels.min() < 0 or labels.max() >= num_classes:
        problems.add(f"{at}: predict returned labels outside 0..{num_classes - 1}")


# -- decoders --------------------------------------------------------------------------------------


def _check_weights(decoder: Any, max_modules: int, problems: Problems) -> None:
    for k in range(2, max_modules + 1):
        for module in range(1, k):
            try:
                w, again = decoder.weights(module, k), decoder.weights(module, k)
                values = [float(v) for v in w]
            except Exception as exc:
                problems.add(f"weights(l, K) raised {type(exc).__name__}: {_text(exc)}", module, k)
                continue
            if len(values) != 2 or not all(math.isfinite(v) and v >= 0 for v in values):
                problems.add(f"weights returned {w!r}; expected (reconstruction weight, local weight), finite and >= 0", module, k)
            elif values == [0.0, 0.0]:
                problems.add("weights returned (0, 0): the module would get no loss at all", module, k)
            elif tuple(again) != tuple(w):
                problems.add(f"weights returned {w!r}, then {again!r}; it must give the same every time", module, k)


def _check_decoder(decoder: Any, profiles: dict, problems: Problems) -> None:
    for label, (input_shape, stages) in profiles.items():
        c = input_shape[0]
        info = DatasetInfo(tuple(input_shape), 10, mean=(0.5,) * c, std=(0.25,) * c)
        for shape in stages:
            at = f"{label}: h {_shape(shape)} to x {_shape(input_shape)}"
            before = problems.count
            _check_reconstruction(decoder, tuple(shape), info, at, problems)
            if problems.count > before:
                break


def _check_reconstruction(decoder: Any, shape: Shape, info: DatasetInfo, at: str, problems: Problems) -> None:
    module = _fresh_module(lambda: decoder.build(shape, info), "build", "decoder", at, problems)
    if module is None:
        return
    own = {id(p) for p in module.parameters()}
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    x = (torch.rand(BATCH, *info.input_shape) - mean) / std  # normalised as the datasets give it
    module.train()
    h = torch.randn(BATCH, *shape, requires_grad=True)
    _loss_and_graph(module, lambda out, x: decoder.loss(out, x, info), h, (x,), own, at, problems, "decoder", info.input_shape)
    module.eval()
    with torch.no_grad():
        _forward(module, h.detach(), at + " (eval mode)", problems, "decoder", info.input_shape)


# -- helpers ---------------------------------------------------------------------------------------


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


__all__ = ["check_objective", "check_decoder", "head_specs", "profile_network"]
