"""Several ranks in one test, on the loopback interface with gloo.

Each rank is a process forked from a server that imported torch and contsup once (the
``forkserver`` start method with a preload), so a launch costs milliseconds instead of the
seconds an interpreter needs to import torch. A rank runs ``contsup.cli.main(argv)`` with the
variables torchrun would give it, one thread, and its output in files; a test can patch the
rank before it starts (``patch(rank)``, a module-level function of a test module, or a
``functools.partial`` of one). A patch may also do all of the rank's work itself and end it
with ``os._exit``.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import attrs

CONTEXT = multiprocessing.get_context("forkserver")
CONTEXT.set_forkserver_preload(["ranks_preload"])


@attrs.frozen
class RankResult:
    """What one rank did: exit status, output, error output, seconds from launch to exit."""

    code: int | None
    out: str
    err: str
    seconds: float

    def lines(self) -> list[str]:
        """Its contsup message lines (error:, stopped:, warning:), never a traceback."""
        assert "Traceback" not in self.err, self.err
        return [line for line in self.err.splitlines() if line.startswith(("error:", "stopped:", "warning:"))]


def _ensure_server() -> None:
    """Start the process server with this process's import path (it does not inherit it)."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, argv: Sequence[str], folder: str, patch: Callable | None) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    out = os.open(os.path.join(folder, f"out.{rank}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open(os.path.join(folder, f"err.{rank}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(err, 2)
    import torch

    torch.set_num_threads(1)
    if patch is not None:
        patch(rank)
    from contsup.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_ranks(
    world: int, argv: Sequence[str], folder: Path, patch: Callable | None = None, timeout: float = 120.0
) -> list[RankResult]:
    """Run ``contsup <argv>`` as ``world`` ranks and wait for all of them (killing any still
    running after ``timeout`` seconds: their code is then None)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _ensure_server()
    port = free_port()
    start = time.monotonic()
    procs = [CONTEXT.Process(target=_rank_main, args=(r, world, port, list(argv), str(folder), patch)) for r in range(world)]
    for p in procs:
        p.start()
    ended: dict[int, float] = {}
    while len(ended) < world and time.monotonic() - start < timeout:
        for r, p in enumerate(procs):
            if r not in ended and not p.is_alive():
                ended[r] = time.monotonic() - start
        time.sleep(0.05)
    results = []
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
        p.join()
        code = p.exitcode if r in ended else None
        results.append(RankResult(
            code, (folder / f"out.{r}").read_text(), (folder / f"err.{r}").read_text(), ended.get(r, timeout),
        ))
    return results


def die_on_message(rank: int, victim: int, nth: int = 3) -> None:
    """A patch (use ``functools.partial(die_on_message, victim=..)``): rank ``victim`` ends
    abruptly, as a killed process does, when its ``nth`` pipeline message arrives."""
    from contsup.distributed import messages as pipeline  # the messages between stages

    if rank != victim:
        return
    original = pipeline.Inbox.receive
    count = {"n": 0}

    def receive(self):
        count["n"] += 1
        if count["n"] == nth:
            os._exit(9)
        return original(self)

    pipeline.Inbox.receive = receive
