"""The ``mlflow`` logger: one MLflow run per contsup run, in a local file store
``<run dir>/mlruns`` unless ``tracking_uri`` names another store or a tracking server.

The run's parameters are the resolved recipe's keys (``optimizer.lr``, ...); every epoch's
numbers are metrics at step = epoch, per-module lists as ``name_1`` .. ``name_K``. The MLflow
run's id is kept in ``<run dir>/mlflow.json``, so a resumed run goes on logging into the same
MLflow run (the epochs it trains again after its checkpoint get a second value at their step);
the MLflow run ends FINISHED with the contsup run. ``mlflow`` (or ``mlflow-skinny``) is imported
only when a run starts: ``pip install 'contsup[mlflow]'``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import attrs

from contsup.options import option
from contsup_loggers.flat import flat_table, flatten, numbers

STATE_FILE = "mlflow.json"
STORE = "mlruns"
PARAM_LENGTH = 500  # what every MLflow version takes as a parameter's value
BATCH = 100  # parameters per request (MLflow's limit)


class MlflowLogger:
    """Every epoch's metrics into an MLflow run (a file store mlruns/ in the run directory, or a tracking URI), the recipe as its parameters."""

    name = "mlflow"
    requires = (("mlflow", "pip install 'contsup[mlflow]'"),)

    @attrs.frozen
    class Options:
        tracking_uri: str = option(
            "", doc='where the MLflow run is recorded: "" = a file store mlruns/ in the run directory; else an MLflow '
            "tracking URI (a server's http://host:5000, sqlite:///path/mlflow.db, file:///path/mlruns)",
        )
        experiment: str = option("contsup", doc="the MLflow experiment holding the run (made when missing)")
        run_name: str = option("", doc='the MLflow run\'s name; "" = the run directory\'s name')

    def __init__(self, options: "MlflowLogger.Options") -> None:
        self.options = options
        self.client: Any = None
        self.run_id = ""

    def tracking_uri(self, run_dir: Path) -> str:
        if self.options.tracking_uri:
            return self.options.tracking_uri
        # MLflow 3 keeps its file store for those who ask for it by this variable; this default
        # store is the one place contsup asks (a user's own "false" is left as it is)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return (run_dir / STORE).absolute().as_uri()

    def on_run_start(self, run: Any) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        run_dir = Path(run.run_dir)
        uri = self.tracking_uri(run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        state = run_dir / STATE_FILE
        saved = json.loads(state.read_text(encoding="utf-8")) if state.is_file() else {}
        if saved.get("tracking_uri") == uri and saved.get("run_id"):
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(self.options.experiment)
        experiment = found.experiment_id if found else self.client.create_experiment(self.options.experiment)
        created = self.client.create_run(
            experiment, run_name=self.options.run_name or run_dir.name, tags={"contsup.run_dir": str(run_dir.absolute())},
        )
        self.run_id = created.info.run_id
        params = [Param(k, v[:PARAM_LENGTH]) for k, v in flat_table(run.recipe.table()).items()]
        for start in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + BATCH])
        text = json.dumps({"tracking_uri": uri, "experiment_id": experiment, "run_id": self.run_id}, indent=1)
        tmp = state.with_name(f".{state.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, state)

    def on_epoch_end(self, run: Any, epoch: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, v, now, epoch) for k, v in numbers(flatten(metrics)).items()]
        self.client.log_batch(self.run_id, metrics=values)

    def on_run_end(self, run: Any, metrics: dict | None) -> None:
        if self.client is not None and self.run_id:
            self.client.set_terminated(self.run_id, "FINISHED")
