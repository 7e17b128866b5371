"""The run-directory lock: one process at a time trains into a run directory.

An advisory ``fcntl.flock`` on ``RUN_DIR/.lock``, which holds the holder's pid and host. The
process that writes the run (the only one, or rank 0 of a distributed run) takes it when the run
starts or resumes and keeps it until the run ends, also on errors. The kernel releases a flock
when its process dies, so a lock file that exists but is not locked was left by a process that
ended without releasing it (``kill -9``, power loss): it is taken over with one warning.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import Callable

from contsup.errors import ContsupError
from contsup.training.rundir import LOCK_FILE


def _holder(fd: int) -> tuple[str, str] | None:
    """(pid, host) as the lock file records them; None when it is empty or unreadable."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").split()
    except OSError:
        return None
    return (text[0], text[1]) if len(text) >= 2 else None


def _alive(pid: str, host: str) -> bool:
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return int(pid) != os.getpid()


class RunLock:
    """The lock on one run directory, held by this process until :meth:`release`."""

    def __init__(self, run_dir: Path, fd: int | None) -> None:
        self.run_dir, self._fd = Path(run_dir), fd

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_FILE

    @classmethod
    def take(cls, run_dir: Path, warn: Callable[[str], None]) -> "RunLock":
        """Lock ``run_dir`` for this process, or raise a one-line error naming the holder."""
        run_dir = Path(run_dir)
        path = run_dir / LOCK_FILE
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ContsupError(f"{run_dir}: cannot take its lock {path} ({exc.strerror or exc})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                who = f"process {holder[0]} on {holder[1]}" if holder else "another process"
                raise ContsupError(
                    f"{run_dir} is in use by {who} (it holds {path}); wait for it to end, or stop it first"
                ) from None
            except OSError as exc:  # a file system without flock (some network mounts)
                os.close(fd)
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                    raise ContsupError(f"{run_dir}: cannot take its lock {path} ({exc.strerror or exc})") from None
                warn(f"{run_dir}: cannot be locked on this file system ({exc.strerror}); make sure no other process trains into it")
                return cls(run_dir, None)
            try:  # the file we locked may have been removed by a holder releasing it meanwhile
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _holder(fd)
        if stale is not None:
            pid, host = stale
            state = "is still running but does not hold the lock" if _alive(pid, host) else "is no longer running"
            warn(f"{run_dir}: took over the lock left by process {pid} on {host}, which {state}")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError:  # a full disk: the flock holds all the same, only the holder goes unnamed
            pass
        return cls(run_dir, fd)

    def release(self) -> None:
        """Remove the lock file and unlock (idempotent). Removing it first means a lock file found
        unlocked was always left by a process that died."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def release(lock: RunLock | None) -> None:
    """Release ``lock`` if there is one."""
    if lock is not None:
        lock.release()


__all__ = ["RunLock", "release"]
