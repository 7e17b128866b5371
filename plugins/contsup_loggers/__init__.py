"""Built-in loggers, and the observer that drives every logger a recipe names.

``[log] use = ["csv", "mlflow", "wandb"]`` chooses loggers registered through
``register_loggers`` (these three here, ``tensorboard`` in contsup_tensorboard, any plugin's);
``[log.NAME]`` tables hold their options. This plugin's observer hooks make one instance of each
for a run when it starts (``recipe.loggers``) and pass it every epoch:

- ``csv``: ``<run dir>/metrics.csv``, one row per epoch, one column per scalar, per-module lists
  flattened as ``name_1`` .. ``name_K`` (:mod:`contsup_loggers.csv_file`);
- ``mlflow``: an MLflow run in a local file store ``<run dir>/mlruns`` or a tracking URI
  (:mod:`contsup_loggers.mlflow_run`; ``pip install 'contsup[mlflow]'``);
- ``wandb``: a Weights & Biases run, offline by default (:mod:`contsup_loggers.wandb_run`;
  ``pip install wandb``).

A logger that fails once the run is under way (a full disk, a tracking server gone) is dropped
with one warning line: the run goes on, and metrics.jsonl keeps every epoch. One that cannot
start stops the run before its first epoch, in one line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from contsup import hookimpl
from contsup.errors import ContsupError, one_line
from contsup_loggers.csv_file import CsvLogger
from contsup_loggers.mlflow_run import MlflowLogger
from contsup_loggers.wandb_run import WandbLogger

# the loggers of each run being trained in this process
_active: dict[Path, list[Any]] = {}


@hookimpl
def register_loggers(register):
    register(CsvLogger)
    register(MlflowLogger)
    register(WandbLogger)


def _warn(logger: Any, what: str, exc: Exception) -> None:
    why = one_line(" ".join(str(exc).split()) or type(exc).__name__)
    print(f"warning: log.use: the {logger.name} logger failed {what} ({why}); it records nothing more in this run "
          f"(metrics.jsonl has every epoch)", file=sys.stderr, flush=True)


@hookimpl
def on_run_start(run):
    loggers = []
    try:
        for chosen in getattr(run.recipe, "loggers", ()):
            logger = chosen.create()
            logger.on_run_start(run)
            loggers.append(logger)
    except ContsupError:
        for logger in loggers:
            logger.on_run_end(run, None)
        raise
    except Exception as exc:  # a tracking store that cannot be opened: one line, before any training
        for logger in loggers:
            logger.on_run_end(run, None)
        why = one_line(" ".join(str(exc).split()) or type(exc).__name__)
        raise ContsupError(f"log.use: the {chosen.use} logger cannot start ({why})") from None
    _active[Path(run.run_dir)] = loggers


@hookimpl
def on_epoch_end(run, epoch, metrics):
    loggers = _active.get(Path(run.run_dir), [])
    for logger in list(loggers):
        try:
            logger.on_epoch_end(run, epoch, metrics)
        except Exception as exc:  # noqa: BLE001 - a logger never stops a run under way
            _warn(logger, f"at epoch {epoch}", exc)
            loggers.remove(logger)


@hookimpl
def on_run_end(run, metrics):
    for logger in _active.pop(Path(run.run_dir), []):
        try:
            logger.on_run_end(run, metrics)
        except Exception as exc:  # noqa: BLE001
            _warn(logger, "at the end of the run", exc)
