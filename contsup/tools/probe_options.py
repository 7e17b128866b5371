"""The information probe's options (architecture and training budget), kept free of torch so
that building the command line stays fast."""

from __future__ import annotations

from typing import Any, Callable

import attrs

from contsup.errors import ContsupError
from contsup.options import at_least, in_range, option


def _depth(_instance: Any, _attribute: Any, value: int) -> None:
    if value < 8 or (value - 2) % 6:
        raise ValueError(f"must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {value!r}")


def _positive(_instance: Any, _attribute: Any, value: float) -> None:
    if not value > 0:
        raise ValueError(f"must be > 0, got {value!r}")


@attrs.frozen
class ProbeOptions:
    """The probe's architecture and training budget."""

    epochs: int = option(10, doc="training epochs of each probe", validator=at_least(1))
    depth: int = option(8, doc="depth of the probe's CIFAR-style ResNet, 6n+2 (the paper: 32)", validator=_depth)
    width: int = option(16, doc="channels of the probe's first stage (then 2x, 4x; the paper: 16)", validator=at_least(1))
    size: int = option(0, doc="side the feature is resized to in the probe's first layer; 0 = the network's input size, as the paper", validator=at_least(0))
    batch_size: int = option(64, doc="probe training batch size", validator=at_least(2))
    lr: float = option(0.05, doc="SGD learning rate (cosine decay to 0, Nesterov momentum 0.9)", validator=_positive)
    weight_decay: float = option(5e-4, doc="SGD weight decay", validator=at_least(0.0))
    val_fraction: float = option(0.1, doc="share of the training features held out to pick the probe's best epoch; 0 = last epoch", validator=in_range(0.0, 0.5))
    train_size: int = option(0, doc="use a seeded random subset of this many training images; 0 = all", validator=at_least(0))
    seed: int = option(0, doc="seed of the probes' initialisation, splits and shuffling")
    repeats: int = option(1, doc="probes per module, seeded seed, seed+1, ...; the estimate is their mean (and std)", validator=at_least(1))
    cache_mib: int = option(1024, doc="features kept in memory per pass over the data (MiB); more modules per pass when they fit", validator=at_least(1))


def check_options(values: dict[str, Any], flag: Callable[[str], str] = lambda n: n) -> ProbeOptions:
    """ProbeOptions from ``values``, every invalid one reported (one line each, named by ``flag``)."""
    problems = []
    for f in attrs.fields(ProbeOptions):
        if f.name in values and f.validator is not None:
            try:
                f.validator(None, f, values[f.name])
            except ValueError as exc:
                problems.append(f"{flag(f.name)}: {exc}")
    if problems:
        raise ContsupError(*problems)
    return ProbeOptions(**values)
