"""A run's checkpoints while it trains: what one holds (:func:`capture`), writing it (refused when
parameters became non-finite; a full disk stops the run in one line), restoring one
(:func:`restore`), and what is left to resume from, for failure messages."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from contsup.core.version import __version__
from contsup.errors import ContsupError, reason
from contsup.training.checkpoint import FORMAT, checkpoint_dir, checkpoint_name, checkpoint_paths, describe, rng_state, save_checkpoint, set_rng_state
from contsup.training.failures import NonFiniteLoss, TrainingFailed
from contsup.training.processes import Processes
from contsup.training.rundir import METRICS_FILE, forget_metrics, refused_writes
from contsup.training.strategies import StepStats, Strategy


@attrs.define
class EpochState:
    """Where one epoch stands: what a mid-epoch checkpoint records and a resumed epoch continues."""

    epoch: int
    start_state: torch.Tensor  # the loader generator's state when the epoch began: fixes its order
    stats: StepStats
    done: int = 0  # batches trained
    images: int = 0
    elapsed_s: float = 0.0  # training time before ``restart_clock``
    started_at: float = 0.0

    def restart_clock(self) -> None:
        self.started_at = time.perf_counter()

    def elapsed(self) -> float:
        return self.elapsed_s + time.perf_counter() - self.started_at


@attrs.frozen
class Position:
    """Where a run stands between two steps: the optimizer steps taken and the epochs recorded."""

    step: int
    epochs_done: int


def capture(
    recipe: Any, strategy: Strategy, processes: Processes, position: Position, history: list[dict], epoch: EpochState | None,
    steps_per_epoch: int, generator_state: torch.Tensor,
) -> dict:
    """Everything a resumed run needs, as tensors and plain containers (``weights_only`` loads
    it); ``epoch`` is the epoch under way (None between epochs). Collective: the strategy's state
    and the running sums come from every process, and each process's RNG."""
    stats = None
    if epoch is not None:
        stats = StepStats.from_tensor(processes.sum(epoch.stats.as_tensor(strategy.modules), "summing the training metrics"), epoch.stats.modules)
    state = strategy.state()
    own_rng = rng_state()
    rngs = processes.gather(own_rng, "gathering a checkpoint")
    out = {
        "format": FORMAT,
        "contsup": __version__,
        "recipe": recipe.table(),
        "epoch": epoch.epoch if epoch is not None else position.epochs_done + 1,
        "batch": epoch.done if epoch is not None else 0,
        "steps_per_epoch": steps_per_epoch,
        "global_step": position.step,
        "model": state["model"],
        "optimizers": state["optimizers"],
        "schedulers": state["schedulers"],
        "scalers": state["scalers"],
        "rng": own_rng,
        "data_generator": epoch.start_state if epoch is not None else generator_state,
        "partial": None if epoch is None else {
            "loss": list(stats.loss), "correct": list(stats.correct), "seen": list(stats.seen),
            "images": epoch.images, "elapsed_s": epoch.elapsed(),
        },
        "history": [dict(m) for m in history],
    }
    if recipe.distributed.mode != "none":
        out["distributed"] = {"mode": recipe.distributed.mode, "world_size": processes.size, "rng": list(rngs or [])}
    return out


def restore(state: dict, strategy: Strategy, processes: Processes, modules: int, steps_per_epoch: int, generator: torch.Generator) -> EpochState | None:
    """Load a checkpoint's weights, optimizers, schedules and scalers, data order and (last) RNG
    states; returns the epoch it stopped inside (None: it stopped between epochs). A checkpoint
    that does not fit this run is one line saying so."""
    try:
        strategy.load_state(state)
        if state["batch"] > 0 and state["steps_per_epoch"] != steps_per_epoch:
            raise ValueError(
                f"it stopped inside an epoch of {state['steps_per_epoch']} steps, this recipe has "
                f"{steps_per_epoch} steps per epoch"
            )
        generator.set_state(state["data_generator"])
        resumed = _resumed_epoch(state, modules, processes.keeps_sums)
        saved = state.get("distributed") or {}
        rngs = saved.get("rng") or []
        own = rngs[processes.rank] if saved.get("world_size") == processes.size and len(rngs) == processes.size else None
        set_rng_state(own if own is not None else state["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ContsupError(
            f"the checkpoint cannot be restored into this run ({reason(exc)}); "
            f"if the recipe changed, resume with the run's own recipe"
        ) from None
    return resumed


def _resumed_epoch(state: dict, modules: int, keeps_sums: bool) -> EpochState | None:
    partial = state.get("partial")
    if partial is None:
        return None
    stats = StepStats(modules)
    if keeps_sums:
        stats.loss, stats.correct, stats.seen = list(partial["loss"]), list(partial["correct"]), list(partial["seen"])
        if not len(stats.loss) == len(stats.correct) == len(stats.seen) == modules:
            raise ValueError("its running sums do not have one entry per module")
    return EpochState(
        state["epoch"], state["data_generator"], stats, done=state["batch"],
        images=int(partial["images"]), elapsed_s=float(partial["elapsed_s"]),
    )


class Checkpointer:
    """Writes a run's checkpoints into ``run_dir/checkpoints`` (the main process writes, every
    process takes part) and remembers the last one, for what failure messages say is kept."""

    def __init__(self, run_dir: Path, processes: Processes, enabled: bool = True) -> None:
        self.run_dir, self.processes, self.enabled = Path(run_dir), processes, enabled
        self.last: tuple[Path, str, Position] | None = None  # path, where it stands, position
        self.writing = False  # inside a write: the run directory is not consistent

    def save(self, position: Position, state: Any, network: torch.nn.Module, calmer: str) -> Path | None:
        """Write ``state()`` (a callable: nothing is gathered when nothing changed since the last
        checkpoint) at ``position``; None when checkpoints are off. Parameters that became
        non-finite stop the run instead, keeping the last good checkpoint."""
        if not self.enabled:
            return None
        if self.last is not None and self.last[2] == position:
            return self.last[0]
        full = state()
        if not self.processes.is_main:
            self.last = (checkpoint_dir(self.run_dir) / checkpoint_name(position.step), describe(full), position)
            return self.last[0]
        for m in getattr(network, "blocks", ()):
            floats = [t.detach().flatten().float() for k, t in full["model"].items() if k.startswith(f"blocks.{m.index - 1}.") and t.is_floating_point()]
            if floats and not bool(torch.isfinite(torch.cat(floats)).all()):
                raise NonFiniteLoss(
                    f"the parameters of module {m.index} became non-finite by step {position.step}; {calmer}; {self.describe_kept()}"
                )
        self.writing = True
        try:
            with self.refused_writes(has_history=bool(full["history"])):
                path = save_checkpoint(self.run_dir, full)
        except OSError as exc:  # anything else the file system answers (an I/O error)
            raise TrainingFailed(f"cannot write a checkpoint into {self.run_dir}: {exc.strerror or exc}; {self.describe_kept()}") from None
        self.writing = False
        self.last = (path, describe(full), position)
        return path

    def describe_kept(self) -> str:
        """What is left to resume from, for failure messages."""
        if not self.enabled:
            return "checkpoints are off, nothing was saved"
        if self.last is None:
            return "no checkpoint was written yet"
        path, where, _ = self.last
        return f"the last good checkpoint is {path} ({where})"

    def refused_writes(self, has_history: bool) -> contextlib.AbstractContextManager[None]:
        """A write into the run directory that the operating system refuses (a full disk) stops
        the run in one line naming the file, what is kept and that resuming finishes the run."""
        return refused_writes(self.run_dir, lambda: self._kept_after_refusal(has_history))

    def _kept_after_refusal(self, has_history: bool) -> str:
        kept = self.describe_kept()
        on_disk = checkpoint_paths(self.run_dir) if self.enabled else []
        if self.last is None and on_disk:  # resumed, and no checkpoint written since
            kept = f"the last good checkpoint is {on_disk[-1]}"
        safe = f"{kept}, and no half-written file replaced a complete one"
        if self.enabled and not on_disk and self.processes.is_main and has_history:
            # no checkpoint holds the epochs metrics.jsonl records: a resume trains them again,
            # so they go (truncating needs no space), or the resume would take them for lost work
            forget_metrics(self.run_dir)
            safe += f" ({METRICS_FILE} was emptied: a resume trains its epochs again)"
        return safe


__all__ = ["Checkpointer", "EpochState", "Position", "capture", "restore"]
