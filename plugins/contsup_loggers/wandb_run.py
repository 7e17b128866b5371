"""The ``wandb`` logger: one Weights & Biases run per contsup run, offline by default (files
under ``<run dir>/wandb``, uploaded later with ``wandb sync`` if you wish).

The run's config is the resolved recipe; every epoch's numbers are logged at step = epoch,
per-module lists as ``name_1`` .. ``name_K``. The W&B run's id is kept in
``<run dir>/wandb.json``, so a resumed run continues it. ``wandb`` is imported only when a run
starts and is not a contsup dependency: ``pip install wandb``.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Literal

import attrs

from contsup.options import option
from contsup_loggers.flat import flatten, numbers

STATE_FILE = "wandb.json"


class WandbLogger:
    """Every epoch's metrics into a Weights & Biases run, offline by default (files under the run directory), the recipe as its config."""

    name = "wandb"
    requires = (("wandb", "pip install wandb"),)

    @attrs.frozen
    class Options:
        project: str = option("contsup", doc="the W&B project")
        mode: Literal["offline", "online"] = option(
            "offline", doc='"offline": files under <run dir>/wandb only (wandb sync uploads them); "online": to the W&B '
            "server you are logged in to",
        )
        entity: str = option("", doc='the W&B team or user; "" = your default')

    def __init__(self, options: "WandbLogger.Options") -> None:
        self.options = options
        self.run: Any = None

    def on_run_start(self, run: Any) -> None:
        import wandb

        run_dir = Path(run.run_dir)
        state = run_dir / STATE_FILE
        saved = json.loads(state.read_text(encoding="utf-8")) if state.is_file() else {}
        run_id = saved.get("run_id") or uuid.uuid4().hex[:12]  # W&B run ids: lower-case letters and digits
        self.run = wandb.init(
            project=self.options.project, entity=self.options.entity or None, mode=self.options.mode,
            dir=str(run_dir), id=run_id, resume="allow", name=run_dir.name, config=run.recipe.table(),
        )
        if not saved:
            tmp = state.with_name(f".{state.name}.tmp")
            tmp.write_text(json.dumps({"run_id": run_id, "project": self.options.project}, indent=1), encoding="utf-8")
            os.replace(tmp, state)

    def on_epoch_end(self, run: Any, epoch: int, metrics: dict) -> None:
        self.run.log(numbers(flatten(metrics)), step=epoch)

    def on_run_end(self, run: Any, metrics: dict | None) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
