"""A run on the processes torchrun started: rank 0 starts it, every rank trains its part.

Rank 0 reads and checks the recipe (or the run to resume) and hands the resolved recipe to the
others through the launcher's store, before any process group exists, so a refusal on rank 0
stops the others at once; it alone writes the run directory (recipe, metrics, checkpoints,
model), prints progress and runs the observers.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

import torch.distributed as dist

from contsup.config.recipe import Recipe
from contsup.config.validation import build_recipe
from contsup.core.registry import Registries
from contsup.distributed.data_parallel import DataParallel
from contsup.distributed.pipeline import Pipeline
from contsup.distributed.world import (
    GRACE_S, START_TIMEOUT_S, Launch, PeerLost, Silent, World, check_device, check_launch,
)
from contsup.errors import ContsupError, one_line, reason
from contsup.training.device import preflight, resolve_device
from contsup.training.failures import Interrupted
from contsup.training.loop import Trainer
from contsup.training.rundir import append_metrics, discard_unstarted
from contsup.training.start import Request, Started, open_run, prepare

START_KEY = "contsup/start"


def make_processes(world: World, recipe: Recipe, run_dir: Path | None = None) -> DataParallel | Pipeline:
    """This rank's part in a ``distributed.mode = "data"`` or ``"pipeline"`` run into ``run_dir``."""
    kind = DataParallel if recipe.distributed.mode == "data" else Pipeline
    return kind(world, recipe, run_dir)


def bootstrap_store(launch: Launch) -> Any:
    """The launcher's key-value store (torchrun's, or rank 0's without torchrun), before any
    process group exists: rank 0 hands the recipe to the others through it."""
    timeout = datetime.timedelta(seconds=START_TIMEOUT_S)
    try:
        store, _, _ = next(dist.rendezvous("env://", rank=launch.rank, world_size=launch.world_size, timeout=timeout))
    except (RuntimeError, ValueError) as exc:
        raise ContsupError(
            f"rank {launch.rank}: cannot reach the launcher's store ({reason(exc)}); start every process with "
            f"the same torchrun command (docs/distributed.md)"
        ) from None
    return store


def _warn(line: str) -> None:
    print(f"warning: {one_line(line)}", file=sys.stderr, flush=True)


def _start_on_main(request: Request, launch: Launch, pm: Any, registries: Registries) -> Started | Recipe:
    """Rank 0: read and check the recipe, then make (or reopen) the run directory; a recipe for
    one process that torchrun started alone comes back as it is."""
    prepared = prepare(request, registries, _warn)
    recipe = prepared.recipe
    try:  # a resumed run's directory is locked: until the run ends, or released at once here
        check_launch(recipe, launch)
        if recipe.distributed.mode == "none":
            prepared.release()  # the caller prepares the run again and locks it
            return recipe
        preflight(recipe)
        n = launch.world_size
        on = f" on {n} processes" if prepared.resume_dir is not None else f" on {n} processes ({recipe.distributed.mode} parallel)"
        return open_run(prepared, pm, request.new, on, warn=_warn)
    except BaseException:
        prepared.release()
        raise


def _start(request: Request, launch: Launch, store: Any, pm: Any, registries: Registries) -> tuple[Started, bool] | None:
    """Every rank: the recipe and where the run goes, decided by rank 0 and passed on through the
    store, and whether a checkpoint is to be loaded; None when the recipe is for one process (and
    torchrun started one)."""
    if launch.is_main:
        try:
            started = _start_on_main(request, launch, pm, registries)
        except ContsupError as exc:
            exc.print()  # now: torchrun ends this process as soon as another one stops
            store.set(START_KEY, json.dumps({"status": "error", "exit_code": exc.exit_code}))
            _wait_until_read(store, launch.world_size - 1)  # this process may hold the store
            raise Silent(exc.exit_code) from None
        if isinstance(started, Recipe):
            store.set(START_KEY, json.dumps({"status": "single"}))
            return None
        public = {"status": "ok", "run_dir": str(started.run_dir), "resume": started.state is not None}
        store.set(START_KEY, json.dumps({**public, "recipe": started.recipe.table(), "source": started.recipe.source}))
        return started, public["resume"]
    store.set_timeout(datetime.timedelta(seconds=START_TIMEOUT_S))
    try:
        start = json.loads(store.get(START_KEY))
        store.add(f"{START_KEY}/read", 1)
    except Exception as exc:
        raise ContsupError(f"rank {launch.rank}: rank 0 did not start the run ({reason(exc)})") from None
    if start["status"] == "error":
        raise Silent(start["exit_code"])
    try:
        recipe = build_recipe(start["recipe"], start["source"], registries)
    except ContsupError as exc:
        raise ContsupError(*(f"rank {launch.rank}: {line}" for line in exc.lines)) from None
    return Started(recipe, Path(start["run_dir"]), None, start["resume"]), start["resume"]


def _wait_until_read(store: Any, readers: int) -> None:
    """Give the other ranks a moment to read rank 0's answer before it ends (and the store with it)."""
    deadline = time.monotonic() + 10 * GRACE_S
    with contextlib.suppress(Exception):
        while store.add(f"{START_KEY}/read", 0) < readers and time.monotonic() < deadline:
            time.sleep(0.02)


def train_on_ranks(request: Request, launch: Launch, pm: Any, registries: Registries) -> tuple[Trainer, dict] | None:
    """The run in one of the processes torchrun started, trained and finished: its trainer and its
    timings (``distributed.json``); None when the recipe is for one process and torchrun started
    one (the caller trains it as usual)."""
    store = bootstrap_store(launch)
    start = _start(request, launch, store, pm, registries)
    if start is None:
        return None
    started, has_state = start
    try:  # rank 0 holds the run directory's lock until the run ends
        return _train_started(started, has_state, launch, store, pm)
    finally:
        started.release()


def _train_started(started: Started, has_state: bool, launch: Launch, store: Any, pm: Any) -> tuple[Trainer, dict]:
    recipe, run_dir = started.recipe, started.run_dir
    check_device(recipe, launch)
    world = World.start(launch, store, recipe.distributed, resolve_device(recipe.run.device))
    try:
        state = started.state if world.is_main else None
        if has_state:
            state = world.broadcast_object(state, "handing the checkpoint to every rank")
        processes = make_processes(world, recipe, run_dir)
        try:
            trainer = Trainer(recipe, run_dir, hook=pm.hook, processes=processes, callbacks=[processes.timings])
        except BaseException:
            if world.is_main and not has_state:
                discard_unstarted(run_dir)
            raise
        world.describe_kept = trainer.checkpointer.describe_kept  # lost-rank messages say what there is to resume from
        if state is not None:
            trainer.load_state(state)
        try:
            trainer.fit(on_epoch=lambda m: append_metrics(run_dir, m))
        except Exception as exc:
            if world.is_main and not has_state and not isinstance(exc, Interrupted):
                discard_unstarted(run_dir)  # failed before its first checkpoint
            raise
        trainer.finish()
    except BaseException as exc:
        _fail(world, exc)
    world.close()
    return trainer, processes.timings.report()


def _fail(world: World, exc: BaseException) -> NoReturn:
    """This rank stops on ``exc``: it says why first (torchrun ends the other processes as soon
    as one stops), leaves the reason where the others look, and gives them a moment to read it."""
    agreed_stop = isinstance(exc, Interrupted) and exc.agreed
    quiet = isinstance(exc, Silent) or (agreed_stop and not world.is_main)  # rank 0 says it
    own = not quiet and not isinstance(exc, PeerLost)  # not a consequence of another rank's stop
    if quiet:
        pass
    elif isinstance(exc, ContsupError):
        exc.print()
    elif isinstance(exc, KeyboardInterrupt):
        print("interrupted", file=sys.stderr, flush=True)
    else:
        traceback.print_exc()
        sys.stderr.flush()
    world.publish_failure(exc if own else Silent(0))
    if own:
        world.linger()
    code = getattr(exc, "exit_code", 130 if isinstance(exc, KeyboardInterrupt) else 1)
    raise Silent(code) from None


__all__ = ["train_on_ranks", "make_processes", "bootstrap_store"]
