"""``check_backbone`` and ``check_dataset``: a backbone's units and head, and a dataset's items,
against what the engine does with them; every problem one line naming the shape or split."""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch
from torch import nn

from contsup.testing.report import Problems, instance, who
from contsup.types import BackboneParts, DatasetInfo, Shape

BATCH = 4


def check_backbone(backbone: Any, *, input_shapes: Sequence[Shape] = ((3, 32, 32),), num_classes: int = 10) -> None:
    """Check a backbone (a class, built with default options, or an instance).

    For each of ``input_shapes``: ``build(input_shape, num_classes)`` returns a
    ``BackboneParts`` of at least one unit and a head, all ``nn.Module`` s, with fresh weights
    on every call (no parameter shared with another build) drawn from torch's seeded generator
    (the same seed, the same weights), no parameter shared between two units or a unit and the
    head (each module trains its own); in train and eval mode, the units chained on x:
    (B, *input_shape) each give a finite (B, C, H, W) tensor and leave their input as it was
    (the engine keeps inputs as other modules' context), and the head gives (B, num_classes);
    every parameter gets a gradient from the head's output.
    """
    backbone = instance(backbone)
    problems = Problems(who("backbone", backbone), "backbone")
    if not callable(getattr(backbone, "build", None)):
        problems.add("it has no build(input_shape, num_classes) method; see docs/plugins/hooks.md")
        problems.raise_if_any()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            for shape in input_shapes:
                _check_build(backbone, tuple(shape), num_classes, problems)
    finally:
        torch.set_num_threads(threads)
    problems.raise_if_any()


def _build(backbone: Any, shape: Shape, num_classes: int, seed: int) -> BackboneParts:
    torch.manual_seed(seed)
    return backbone.build(shape, num_classes)


def _check_build(backbone: Any, shape: Shape, num_classes: int, problems: Problems) -> None:
    at = f"x {_shape(shape)}"
    try:
        parts, again, other = (_build(backbone, shape, num_classes, seed) for seed in (0, 0, 1))
    except Exception as exc:
        problems.add(f"{at}: build raised {type(exc).__name__}: {_text(exc)}")
        return
    if not _well_formed(parts, at, problems):
        return
    modules = [*parts.units, parts.head]
    own = [{id(q) for q in m.parameters()} for m in modules]
    for i, ids in enumerate(own[:-1]):
        if any(ids & later for later in own[i + 1 :]):
            problems.add(f"{at}: unit {i} shares parameters with a later unit or the head; each module trains its own, share none")
    if {id(q) for q in other.head.parameters()} & own[-1] or any({id(q) for q in u.parameters()} & own[i] for i, u in enumerate(other.units)):
        problems.add(f"{at}: two calls of build share parameters; build a new network on every call")
    if not _same_weights(parts, again):
        problems.add(f"{at}: two builds from the same seed differ; draw initial weights from torch's seeded generator")
    x = torch.randn(BATCH, *shape)
    for mode in ("train", "eval"):
        for m in modules:
            m.train(mode == "train")
        _check_forward(parts, x, num_classes, f"{at} ({mode} mode)", problems, backward=mode == "train")


def _well_formed(parts: Any, at: str, problems: Problems) -> bool:
    if not isinstance(parts, BackboneParts):
        problems.add(f"{at}: build returned {type(parts).__name__}; expected contsup.types.BackboneParts(units=[...], head=...)")
        return False
    units = list(parts.units)
    if not units or not all(isinstance(u, nn.Module) for u in units) or not isinstance(parts.head, nn.Module):
        problems.add(f"{at}: build must give at least one unit, every unit and the head an nn.Module")
        return False
    return True


def _check_forward(parts: BackboneParts, x: torch.Tensor, num_classes: int, at: str, problems: Problems, backward: bool) -> None:
    h = x
    for u, unit in enumerate(parts.units):
        kept = h.detach().clone()
        try:
            out = unit(h)
        except Exception as exc:
            problems.add(f"{at}: unit {u} raised {type(exc).__name__}: {_text(exc)}")
            return
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != BATCH or not torch.isfinite(out).all():
            shown = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            problems.add(f"{at}: unit {u} gave {shown}; expected a finite (B, C, H, W) tensor with B = {BATCH}")
            return
        if not torch.equal(h.detach(), kept):
            problems.add(f"{at}: unit {u} changed its input in place (an inplace ReLU first?); the engine keeps inputs as context")
        h = out
    try:
        z = parts.head(h)
    except Exception as exc:
        problems.add(f"{at}: the head raised {type(exc).__name__}: {_text(exc)}")
        return
    if not isinstance(z, torch.Tensor) or tuple(z.shape) != (BATCH, num_classes) or not torch.isfinite(z).all():
        shown = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        problems.add(f"{at}: the head gave {shown}; expected finite logits of shape {(BATCH, num_classes)}")
        return
    if backward:
        _check_gradients(parts, z, at, problems)


def _check_gradients(parts: BackboneParts, z: torch.Tensor, at: str, problems: Problems) -> None:
    modules = [*parts.units, parts.head]
    for m in modules:
        m.zero_grad(set_to_none=True)
    z.square().mean().backward()
    for i, m in enumerate(modules):
        dead = [n for n, q in m.named_parameters() if q.requires_grad and q.grad is None]
        if dead:
            where = "the head" if i == len(modules) - 1 else f"unit {i}"
            problems.add(f"{at}: {where}'s parameter {dead[0]} gets no gradient from the head's output; it would never train")


def _same_weights(a: BackboneParts, b: BackboneParts) -> bool:
    sa = [t for m in [*a.units, a.head] for t in m.state_dict().values()]
    sb = [t for m in [*b.units, b.head] for t in m.state_dict().values()]
    return len(sa) == len(sb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(sa, sb))


def check_dataset(dataset: Any, *, samples: int = 8) -> None:
    """Check a dataset (a class, built with default options, or an instance).

    ``info()`` is a ``DatasetInfo`` with at least two classes and one mean and one std > 0 per
    channel; ``load(train)`` for both splits is a map-style dataset, not empty, whose items
    (``samples`` of them, spread over the split) are (x, y) with x a finite float tensor of
    ``info().input_shape`` and y an integer label in 0..num_classes-1; ``classes()``, where
    there is one, names every class once. This reads the data: give it a small configuration.
    """
    dataset = instance(dataset)
    problems = Problems(who("dataset", dataset), "dataset")
    try:
        info = dataset.info()
    except Exception as exc:
        problems.add(f"info() raised {type(exc).__name__}: {_text(exc)}")
        problems.raise_if_any()
    if not _check_info(info, problems):
        problems.raise_if_any()
    for train in (True, False):
        _check_split(dataset, info, train, samples, problems)
    names = getattr(dataset, "classes", None)
    if callable(names):
        got = tuple(names())
        if len(got) != info.num_classes or len(set(got)) != len(got) or not all(isinstance(n, str) for n in got):
            problems.add(f"classes() gave {len(got)} names; expected {info.num_classes} different strings, in label order")
    problems.raise_if_any()


def _check_info(info: Any, problems: Problems) -> bool:
    if not isinstance(info, DatasetInfo):
        problems.add(f"info() returned {type(info).__name__}; expected contsup.types.DatasetInfo")
        return False
    c = info.input_shape[0] if len(info.input_shape) == 3 else None
    if c is None or any(d < 1 for d in info.input_shape):
        problems.add(f"info().input_shape is {info.input_shape}; expected (C, H, W), each at least 1")
        return False
    if info.num_classes < 2:
        problems.add(f"info().num_classes is {info.num_classes}; expected at least 2")
    if len(info.mean) != c or len(info.std) != c or any(s <= 0 for s in info.std):
        problems.add(f"info() has mean {info.mean} and std {info.std}; expected one of each per channel ({c}), every std > 0")
    return problems.count == 0


def _check_split(dataset: Any, info: DatasetInfo, train: bool, samples: int, problems: Problems) -> None:
    at = "the train split" if train else "the test split"
    try:
        data = dataset.load(train)
        n = len(data)
    except Exception as exc:
        problems.add(f"{at}: load raised {type(exc).__name__}: {_text(exc)}")
        return
    if n == 0:
        problems.add(f"{at} is empty")
        return
    for i in sorted({round(j * (n - 1) / max(1, samples - 1)) for j in range(samples)}):
        try:
            x, y = data[i]
        except Exception as exc:
            problems.add(f"{at}: item {i} raised {type(exc).__name__}: {_text(exc)}; expected an (x, y) pair")
            return
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(info.input_shape) or not x.dtype.is_floating_point or not torch.isfinite(x).all():
            shown = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            problems.add(f"{at}: item {i}'s x is {shown}; expected a finite float tensor of shape {tuple(info.input_shape)}")
            return
        label = int(y) if isinstance(y, numbers.Integral) or (isinstance(y, torch.Tensor) and y.dim() == 0 and not y.dtype.is_floating_point) else None
        if label is None or isinstance(y, bool) or not 0 <= label < info.num_classes:
            problems.add(f"{at}: item {i}'s y is {y!r}; expected an integer label in 0..{info.num_classes - 1}")
            return


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


__all__ = ["check_backbone", "check_dataset"]
