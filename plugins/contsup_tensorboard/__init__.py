"""Built-in logger: TensorBoard scalars of every epoch, in ``<run dir>/tensorboard``.

Enabled by ``[log] use = ["tensorboard"]`` or its synonym ``[log] tensorboard = true``; it needs the optional ``tensorboard`` package
(``pip install 'contsup[tensorboard]'``), which recipe validation checks before a run starts.
The step of every scalar is the epoch; a resumed run drops what the interrupted one logged
after its checkpoint, so no epoch appears twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from contsup import hookimpl
from contsup.errors import ContsupError

LOG_DIR = "tensorboard"

# one writer per run directory being trained in this process
_writers: dict[Path, Any] = {}

SCALARS = {
    "test/error_pct": "test_error_pct",
    "test/loss": "test_loss",
    "train/lr": "lr",
    "speed/images_per_s": "images_per_s",
    "speed/epoch_time_s": "epoch_time_s",
    "memory/peak_bytes": "peak_memory_bytes",
}
PER_MODULE = ("train_loss", "train_acc_pct", "test_local_acc_pct")


def enabled(run: Any) -> bool:
    """Whether the run's recipe asks for TensorBoard (``[log] tensorboard = true``, or
    ``"tensorboard"`` in ``[log] use``)."""
    log = getattr(run.recipe, "log", None)
    return bool(getattr(log, "tensorboard", False)) or "tensorboard" in getattr(log, "use", ())


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ContsupError(
            "log.tensorboard: true needs the 'tensorboard' package, which is not installed; "
            "pip install 'contsup[tensorboard]', or set it to false"
        ) from None
    return SummaryWriter


def on_run_start(run):
    if not enabled(run):
        return
    writer_class = _summary_writer()
    purge = run.epoch + 1 if run.epoch > 0 else None  # resuming: forget epochs after the checkpoint
    _writers[Path(run.run_dir)] = writer_class(log_dir=str(Path(run.run_dir) / LOG_DIR), purge_step=purge)


def on_epoch_end(run, epoch, metrics):
    writer = _writers.get(Path(run.run_dir))
    if writer is None:
        return
    for tag, key in SCALARS.items():
        if metrics.get(key) is not None:
            writer.add_scalar(tag, metrics[key], epoch)
    for key in PER_MODULE:
        for index, value in enumerate(metrics.get(key) or [], start=1):
            if value is not None:
                writer.add_scalar(f"{key}/module_{index:02d}", value, epoch)
    writer.flush()  # nothing lost if the run is killed


def on_run_end(run, metrics):
    writer = _writers.pop(Path(run.run_dir), None)
    if writer is not None:
        writer.close()


class TensorBoardLogger:
    """TensorBoard scalars of every epoch in <run dir>/tensorboard (the tensorboard package: pip install 'contsup[tensorboard]')."""

    name = "tensorboard"
    requires = (("tensorboard", "pip install 'contsup[tensorboard]'"),)

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options: "TensorBoardLogger.Options") -> None:
        self.options = options

    def on_run_start(self, run: Any) -> None:
        on_run_start(run)

    def on_epoch_end(self, run: Any, epoch: int, metrics: dict) -> None:
        on_epoch_end(run, epoch, metrics)

    def on_run_end(self, run: Any, metrics: dict | None) -> None:
        on_run_end(run, metrics)


@hookimpl
def register_loggers(register):
    register(TensorBoardLogger)
