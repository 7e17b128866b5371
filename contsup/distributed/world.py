"""torch.distributed for contsup: launch checks, the process group and its collectives under
deadlines, lost ranks, and what every distributed run shares.

torchrun gives every process RANK, WORLD_SIZE and LOCAL_RANK. Every wait on another rank has a
deadline (``distributed.timeout_s``); a rank that ends or stops answering makes the others stop
with one line naming it. :mod:`contsup.distributed.launch` starts a run on the ranks;
:mod:`contsup.distributed.data_parallel` and :mod:`contsup.distributed.pipeline` hold the two
ways of training.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import attrs
import torch
import torch.distributed as dist

from contsup.training.failures import TrainingFailed
from contsup.errors import ContsupError, one_line, reason
from contsup.config.recipe import Recipe

GRACE_S = 3.0  # how long a rank that saw a failure waits to learn which rank it was
HEARTBEAT_S = 0.5  # how often each rank says in the store that its process still runs
START_TIMEOUT_S = 600.0  # how long ranks wait for each other (and for rank 0's recipe) at the start


@attrs.frozen
class Launch:
    """Where torchrun put this process: its rank, the number of processes, its rank on its machine."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The torchrun variables of this process, or None when it was not started by torchrun."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return None
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except (KeyError, ValueError):
        raise ContsupError(
            "the launcher's RANK, WORLD_SIZE and LOCAL_RANK are not all whole numbers; start contsup with "
            "torchrun --nproc_per_node=N -m contsup train RECIPE"
        ) from None
    if not 0 <= rank < world:
        raise ContsupError(f"the launcher gave RANK={rank} with WORLD_SIZE={world}; a rank must be 0..{world - 1}")
    return Launch(rank, world, local)


def check_single_process(recipe: Recipe) -> None:
    """A recipe asking for several processes but run without torchrun: say how to launch it."""
    mode = recipe.distributed.mode
    if mode != "none":
        raise ContsupError(
            f"{recipe.source}: distributed.mode = \"{mode}\" needs several processes started by torchrun: "
            f"torchrun --nproc_per_node=N -m contsup train {recipe.source} (see docs/distributed.md), "
            f"or --set distributed.mode=none for one process"
        )


def check_launch(recipe: Recipe, launch: Launch) -> None:
    """Every problem between the recipe and the processes torchrun started, one line each."""
    d, n, k = recipe.distributed, launch.world_size, recipe.partition.modules
    where = recipe.source
    problems = []
    if d.mode == "none" and n > 1:
        problems.append(
            f"{where}: distributed.mode is \"none\" but torchrun started {n} processes; set distributed.mode = "
            f"\"data\" or \"pipeline\" (--set distributed.mode=pipeline), or run one process"
        )
    if d.mode == "pipeline" and d.replicas == 1:
        if n > k:
            problems.append(
                f"{where}: distributed.mode = \"pipeline\" with {n} processes needs at least {n} modules, and "
                f"partition.modules is {k}; start at most {k} processes (--nproc_per_node) or raise partition.modules"
            )
        if d.stages and len(d.stages) != n:
            problems.append(
                f"{where}: distributed.stages has {len(d.stages)} entries but torchrun started {n} processes; "
                f"give one module count per process, or [] to balance them automatically"
            )
    if d.mode == "pipeline" and d.replicas > 1:
        problems += _grid_problems(recipe, n)
    if d.mode == "data" and recipe.data.batch_size < n:
        problems.append(
            f"{where}: data.batch_size = {recipe.data.batch_size} is smaller than the {n} processes; each process "
            f"needs at least one image of every batch (data.batch_size is the batch of all processes together)"
        )
    device = recipe.run.device
    if device.startswith("cuda:"):
        problems.append(
            f"{where}: run.device = \"{device}\": under torchrun each process uses the GPU numbered by its "
            f"LOCAL_RANK; use \"auto\" or \"cuda\""
        )
    cuda = device != "cpu" and torch.cuda.is_available()
    if d.backend == "nccl" and not cuda:
        problems.append(f"{where}: distributed.backend = \"nccl\" needs CUDA devices; use \"auto\" or \"gloo\"")
    if d.backend == "gloo" and cuda:
        problems.append(
            f"{where}: distributed.backend = \"gloo\" cannot pass CUDA tensors between ranks; use \"auto\" "
            f"(NCCL for CUDA tensors, gloo for the rest) or run.device = \"cpu\""
        )
    if problems:
        raise ContsupError(*problems)


def _grid_problems(recipe: Recipe, n: int) -> list[str]:
    """A grid of stages x replicas: the processes must fill it, each stage needs a module and
    each replica an image of every batch."""
    d, k, where = recipe.distributed, recipe.partition.modules, recipe.source
    r = d.replicas
    if d.stages and len(d.stages) * r != n:
        return [
            f"{where}: distributed.stages has {len(d.stages)} entries and distributed.replicas is {r}, which needs "
            f"{len(d.stages)} x {r} = {len(d.stages) * r} processes, but torchrun started {n}; start "
            f"{len(d.stages) * r} processes (--nproc_per_node) or change distributed.replicas"
        ]
    if n % r:
        return [
            f"{where}: distributed.replicas = {r} needs a number of processes that {r} divides (stages x replicas), "
            f"but torchrun started {n}; start a multiple of {r} processes (--nproc_per_node) or change "
            f"distributed.replicas"
        ]
    problems = []
    if n // r > k:
        problems.append(
            f"{where}: distributed.mode = \"pipeline\" with {n} processes in {r} replicas needs at least {n // r} "
            f"modules, and partition.modules is {k}; start at most {k * r} processes (--nproc_per_node) or raise "
            f"partition.modules"
        )
    if recipe.data.batch_size < r:
        problems.append(
            f"{where}: data.batch_size = {recipe.data.batch_size} is smaller than the {r} replicas "
            f"(distributed.replicas); each replica needs at least one image of every batch (data.batch_size is the "
            f"batch of all replicas together)"
        )
    return problems


def check_device(recipe: Recipe, launch: Launch) -> None:
    """This process's own GPU: the one numbered by its LOCAL_RANK must exist."""
    device = recipe.run.device
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        count = torch.cuda.device_count()
        if launch.local_rank >= count:
            raise ContsupError(
                f"rank {launch.rank}: LOCAL_RANK is {launch.local_rank} but this machine has {count} GPU"
                f"{'s' if count != 1 else ''}; start at most {count} processes per machine (--nproc_per_node)"
            )


def choose_backend(option: str, device: torch.device) -> str:
    """``auto``: NCCL for CUDA tensors and gloo for CPU tensors on a GPU run, gloo alone on a CPU run."""
    if option != "auto":
        return option
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


# -- failures --------------------------------------------------------------------------------


class PeerLost(TrainingFailed):
    """Another rank ended or stopped answering; the message names it."""


class Silent(ContsupError):
    """Stop with ``exit_code`` and print nothing: rank 0 has already said why."""

    def __init__(self, exit_code: int) -> None:
        super().__init__()
        self.exit_code = exit_code


def is_communication_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from the process group (a closed connection, a timeout), not from a bug."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        mark in text for mark in ("gloo", "Gloo", "NCCL", "nccl", "Connection", "Timed out", "timed out", "Broken pipe")
    )


# -- the process group -------------------------------------------------------------------------


class World:
    """This process's place among the ranks, and the collectives contsup uses, each under a
    deadline; a failed one becomes :class:`PeerLost` naming the lost rank."""

    def __init__(self, launch: Launch, store: Any, backend: str, timeout_s: float, device: torch.device) -> None:
        self.rank = launch.rank
        self.size = launch.world_size
        self.launch = launch
        self.store = dist.PrefixStore("contsup/", store)
        self.backend = backend
        self.timeout_s = timeout_s
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.device = device
        self.control_device = device if backend == "nccl" else torch.device("cpu")
        self.describe_kept: Callable[[], str] = lambda: "no checkpoint was written yet"
        self._stopped = threading.Event()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, launch: Launch, store: Any, options: Any, device: torch.device) -> "World":
        """Join the other processes in a process group (``store``: :func:`bootstrap_store`'s)."""
        backend = choose_backend(options.backend, device)
        timeout = datetime.timedelta(seconds=options.timeout_s)
        if device.type == "cuda":
            torch.cuda.set_device(launch.local_rank)
        try:
            dist.init_process_group(backend, store=store, rank=launch.rank, world_size=launch.world_size, timeout=timeout)
        except (RuntimeError, ValueError) as exc:
            raise ContsupError(
                f"rank {launch.rank}: cannot join the other {launch.world_size - 1} processes ({reason(exc)}); "
                f"start every process with the same torchrun command (docs/distributed.md)"
            ) from None
        world = cls(launch, store, backend, options.timeout_s, device)
        world.start_heartbeat()
        return world

    def start_heartbeat(self) -> None:
        """Count up ``beat/<rank>`` in the store every :data:`HEARTBEAT_S` from a thread, while
        this process runs: a rank blocked in a wait on a third one still beats, a lost one does
        not (see :meth:`lost`)."""
        def beat() -> None:
            while not self._stopped.wait(HEARTBEAT_S):
                try:
                    self.store.add(f"beat/{self.rank}", 1)
                except Exception:
                    return

        threading.Thread(target=beat, name=f"contsup-heartbeat-{self.rank}", daemon=True).start()

    def close(self) -> None:
        self._stopped.set()
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- collectives, each turning a communication failure into PeerLost ---------------

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run communication; a closed connection or a timeout becomes :class:`PeerLost`."""
        try:
            yield
        except PeerLost:
            raise
        except Exception as exc:
            if not is_communication_error(exc):
                raise
            raise self.lost(what, exc) from None

    def all_reduce(self, tensor: torch.Tensor, what: str, op: Any = None) -> torch.Tensor:
        with self.guard(what):
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (in place)."""
        with self.guard(what):
            dist.broadcast(tensor, src=0)
        return tensor

    def groups(self, layout: Sequence[Sequence[int]]) -> list["Group"]:
        """One :class:`Group` per list of ranks in ``layout``; every rank calls this with the same
        layout (torch creates process groups collectively, in the same order everywhere)."""
        out = []
        for ranks in layout:
            with self.guard("creating the process groups"):
                handle = dist.new_group(list(ranks), timeout=self.timeout) if len(ranks) > 1 else None
            out.append(Group(self, tuple(ranks), handle))
        return out

    def broadcast_object(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        with self.guard(what):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any, what: str) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
        out: list[Any] | None = [None] * self.size if self.is_main else None
        with self.guard(what):
            dist.gather_object(obj, out, dst=0)
        return out

    # -- which rank was lost ---------------------------------------------------------------

    def publish_failure(self, exc: BaseException) -> None:
        """Leave this rank's reason for stopping where the others look for it (a rank that stops
        because of another, or silently after rank 0, only says it is still there)."""
        if isinstance(exc, (PeerLost, Silent)):
            with contextlib.suppress(Exception):
                self.store.set_timeout(datetime.timedelta(seconds=GRACE_S))
                self.store.set(f"alive/{self.rank}", "1")
            return
        if isinstance(exc, ContsupError):
            text = "; ".join(exc.lines)
        elif isinstance(exc, KeyboardInterrupt):
            text = "interrupted"
        else:
            text = f"{type(exc).__name__}: {reason(exc, 200)}"
        try:
            self.store.set_timeout(datetime.timedelta(seconds=GRACE_S))
            self.store.set(f"failed/{self.rank}", one_line(text))
        except Exception:
            pass

    def linger(self) -> None:
        """After this rank failed: close its connections so the others notice at once, and give
        them a moment to read why (rank 0 may hold the store they read it from)."""
        with contextlib.suppress(Exception):
            self.close()
        deadline = time.monotonic() + GRACE_S
        others = [k for k in range(self.size) if k != self.rank]
        while others and time.monotonic() < deadline:
            try:
                others = [k for k in others if not self.store.check([f"alive/{k}"])]
            except Exception:
                return
            time.sleep(0.05)

    def _failures(self) -> dict[int, str]:
        out = {}
        for k in range(self.size):
            if k != self.rank and self.store.check([f"failed/{k}"]):
                out[k] = self.store.get(f"failed/{k}").decode("utf-8", "replace")
        return out

    def _beats(self) -> dict[int, int]:
        """Every other rank's heartbeat count (0 for a rank that never beat)."""
        return {k: int(self.store.add(f"beat/{k}", 0)) for k in range(self.size) if k != self.rank}

    def lost(self, what: str, exc: BaseException) -> PeerLost:
        """The one-line error for a failed exchange: which rank stopped (and why, if it said) or
        was lost, and what there is to resume from. A rank that says it is still there, or whose
        heartbeat goes on (it waits on another), is not lost."""
        kept = self.describe_kept()
        try:
            self.store.set_timeout(datetime.timedelta(seconds=GRACE_S))
            self.store.set(f"alive/{self.rank}", "1")
            deadline = time.monotonic() + GRACE_S
            first_beats = self._beats()
            while True:
                failed = self._failures()
                if failed:
                    k = min(failed)
                    said = failed[k] if failed[k].endswith(kept) else f"{failed[k]}; {kept}"
                    return PeerLost(f"rank {self.rank}: stopping because rank {k} stopped: {said}")
                beats = self._beats()
                missing = [k for k in beats if beats[k] == first_beats[k] and not self.store.check([f"alive/{k}"])]
                if not missing or time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        except Exception:
            return PeerLost(
                f"rank {self.rank}: lost contact with the other ranks while {what} and with the rendezvous store "
                f"(rank 0 or the launcher ended); {kept}"
            )
        if missing:
            names = ", ".join(str(k) for k in missing)
            return PeerLost(
                f"rank {self.rank}: rank{'s' if len(missing) > 1 else ''} {names} {'were' if len(missing) > 1 else 'was'} "
                f"lost while {what} (the process ended, or did not answer within distributed.timeout_s = "
                f"{self.timeout_s:g} s); {kept}"
            )
        return PeerLost(
            f"rank {self.rank}: an exchange failed while {what} though every rank is still running "
            f"({reason(exc, 160)}); a rank slower than distributed.timeout_s = {self.timeout_s:g} s, or the network; {kept}"
        )


class Group:
    """Some of the ranks (in a grid: those holding one pipeline stage, one per replica) and the
    collectives contsup runs among them, under the world's deadlines and lost-rank reports. It
    offers what :class:`World` offers for the gradient sums and broadcasts (``size``,
    :meth:`all_reduce`, :meth:`broadcast`: from its first rank); a group of one rank does nothing."""

    def __init__(self, world: World, ranks: tuple[int, ...], handle: Any) -> None:
        self.world, self.ranks, self.handle = world, ranks, handle
        self.size = len(ranks)
        self.control_device = world.control_device

    def all_reduce(self, tensor: torch.Tensor, what: str, op: Any = None) -> torch.Tensor:
        if self.size > 1:
            with self.world.guard(what):
                dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=self.handle)
        return tensor

    def broadcast(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        if self.size > 1:
            with self.world.guard(what):
                dist.broadcast(tensor, src=self.ranks[0], group=self.handle)
        return tensor


def any_rank(group: World | Group, wanted: bool, what: str) -> bool:
    """Whether any rank of ``group`` ``wanted`` (one small all-reduce): how ranks agree to stop."""
    flag = torch.tensor([1.0 if wanted else 0.0], device=group.control_device)
    group.all_reduce(flag, what, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


class RankCollectives:
    """The collectives every distributed ``Processes`` answers alike, over its ``world``: sums,
    gathers on rank 0, a deadline guard, and the command that continues the run."""

    world: World

    def sum(self, t: torch.Tensor, what: str) -> torch.Tensor:
        return self.world.all_reduce(t.to(self.world.control_device), what)

    def gather(self, obj: Any, what: str) -> list[Any] | None:
        return self.world.gather_objects(obj, what)

    def guard(self, what: str) -> ContextManager[None]:
        return self.world.guard(what)

    def resume_command(self, run_dir: Path) -> str:
        """The command that continues a run of these processes."""
        return f"torchrun --nproc_per_node={self.world.size} -m contsup train --resume {run_dir}"


__all__ = ["Launch", "World", "Group", "RankCollectives", "PeerLost", "Silent", "any_rank", "launch_from_env", "check_launch", "check_single_process", "check_device"]
