"""Numeric precision and device settings of a run: autocast, grad scalers, channels-last,
deterministic algorithms. fp32 is the reference: it adds no autocast and its scalers are no-ops."""

from __future__ import annotations

import contextlib
import os
from typing import ContextManager

import torch

from contsup.errors import ContsupError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(mode: str, device: torch.device) -> None:
    """What a run accepts: fp16 only on CUDA (on a CPU it is slow and buys nothing; bf16 is the
    CPU's reduced precision), bf16 only where the device supports it."""
    if mode not in ("fp32", *DTYPES):
        raise ContsupError(f"run.precision: '{mode}' is not a precision; use \"fp32\", \"bf16\" or \"fp16\"")
    if mode == "fp16" and device.type != "cuda":
        raise ContsupError(
            f"run.precision: \"fp16\" needs a CUDA device (this run is on {device.type}); "
            f"use \"bf16\" or \"fp32\" here (--set run.precision=bf16)"
        )
    if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ContsupError("run.precision: this GPU does not support bf16; use \"fp16\" or \"fp32\"")


class Precision:
    """``autocast()`` around forward passes and losses; ``scaler()`` for each optimizer."""

    def __init__(self, mode: str = "fp32", device: torch.device | str = "cpu") -> None:
        if mode not in ("fp32", *DTYPES):
            raise ContsupError(f"run.precision: '{mode}' is not a precision; use \"fp32\", \"bf16\" or \"fp16\"")
        self.mode = mode
        self.device = torch.device(device)

    def autocast(self) -> ContextManager:
        """Mixed precision for the code inside (nothing for fp32)."""
        if self.mode == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.mode])

    def scaler(self) -> torch.amp.GradScaler:
        """A loss scaler for one optimizer: active for fp16, otherwise it passes straight through."""
        return torch.amp.GradScaler(self.device.type, enabled=self.mode == "fp16")


def apply_device_options(deterministic: bool, device: torch.device) -> None:
    """Process-wide: deterministic algorithms (warning on ops that have none) or, on CUDA, cuDNN
    autotuning for speed."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """An image batch x: (B, C, H, W) in channels-last layout when asked (other tensors unchanged)."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
