"""Where a run computes: the device, the seeds, and the peak memory it reached."""

from __future__ import annotations

import random
import resource
import sys
from typing import TYPE_CHECKING

import numpy as np
import torch

from contsup.errors import ContsupError
from contsup.training.memory_fit import check_fits
from contsup.training.precision import check_precision

if TYPE_CHECKING:
    from contsup.config.recipe import Recipe


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ContsupError(f"run.device: '{name}' was asked for but CUDA is not available here; use \"auto\" or \"cpu\"")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ContsupError("run.device: 'mps' was asked for but is not available here; use \"auto\" or \"cpu\"")
    return torch.device(name)


def preflight(recipe: Recipe) -> None:
    """What a valid recipe can still ask for in vain on this machine (an absent device, fp16 on a
    CPU, a first step larger than the device's memory): found before a run directory is made."""
    device = resolve_device(recipe.run.device)
    check_precision(recipe.run.precision, device)
    check_fits(recipe, device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): CUDA max allocated, else the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_peak_rss"


__all__ = ["seed_everything", "resolve_device", "preflight", "peak_memory"]
