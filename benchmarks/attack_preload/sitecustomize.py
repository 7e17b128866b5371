"""Kill points for benchmarks/attack.py, loaded through PYTHONPATH into the ``contsup`` processes
the harness starts (never part of the library). ``ATTACK_HOOK=POINT:N`` sends this process
SIGKILL at the N-th occurrence of POINT:

- ``step:N``: right after global optimizer step N (before any checkpoint written at N)
- ``backward:N``: before the N-th ``Tensor.backward`` (inside a step; one call per module)
- ``eval:N``: on entering the N-th end-of-epoch evaluation
- ``write:PREFIX:N``: in the middle of the N-th digested write of a file named PREFIX...
  (``step-`` a checkpoint, ``model.pt``), after about half of its bytes
- ``rename:PREFIX:N``: before the N-th rename of a finished temporary file onto PREFIX... (for a
  checkpoint or model.pt: its digest is in place, the file itself not yet)
- ``prune:N``: after deleting the N-th old checkpoint, before its digest
- ``metrics:N``: before the N-th fsync of metrics.jsonl (the line written, not synced)

``ATTACK_STEPS=FILE`` appends each finished global step to FILE (how much work a kill cost).
"""

from __future__ import annotations

import os

_HOOK = os.environ.get("ATTACK_HOOK", "")
_STEPS = os.environ.get("ATTACK_STEPS", "")


def _install() -> None:
    import pathlib
    import signal
    import tempfile

    import torch

    from contsup.training import loop, progress, rundir

    parts = _HOOK.split(":") if _HOOK else [""]
    point, arg = parts[0], parts[1:]
    target = int(arg[-1]) if arg else 0
    prefix = arg[0] if len(arg) == 2 else ""
    counts: dict[str, int] = {}
    tmp_names: dict[int, str] = {}
    HALF = 400_000  # bytes: about half of the tiny run's model.pt, a seventh of a checkpoint

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def hit(name: str) -> bool:
        counts[name] = counts.get(name, 0) + 1
        return point == name and counts[name] == target

    update = progress.Progress.update

    def counted_update(self, step, losses):
        update(self, step, losses)
        done = (self.epoch - 1) * self.steps + step
        if _STEPS:
            with open(_STEPS, "a") as f:
                f.write(f"{done}\n")
        if point == "step" and done == target:
            die()

    progress.Progress.update = counted_update

    backward = torch.Tensor.backward

    def killing_backward(self, *args, **kwargs):
        if hit("backward"):
            die()
        return backward(self, *args, **kwargs)

    torch.Tensor.backward = killing_backward

    evaluate = loop.Trainer._evaluate

    def killing_evaluate(self, *args, **kwargs):
        if hit("eval"):
            die()
        return evaluate(self, *args, **kwargs)

    loop.Trainer._evaluate = killing_evaluate

    mkstemp = tempfile.mkstemp

    def named_mkstemp(*args, **kwargs):
        fd, name = mkstemp(*args, **kwargs)
        tmp_names[fd] = os.path.basename(name)
        return fd, name

    tempfile.mkstemp = named_mkstemp

    writer_write = rundir._HashingWriter.write

    def killing_write(self, data):
        if not hasattr(self, "_attack"):
            name = tmp_names.get(self.f.fileno(), "")
            self._attack = point == "write" and name.startswith("." + prefix) and hit("write")
        if self._attack and self.size + len(data) >= HALF:
            die()
        return writer_write(self, data)

    rundir._HashingWriter.write = killing_write

    replace = os.replace

    def killing_replace(src, dst, *args, **kwargs):
        name = os.path.basename(os.fspath(dst))
        if point == "rename" and name.startswith(prefix) and not name.endswith(".sha256") and hit("rename"):
            die()
        return replace(src, dst, *args, **kwargs)

    os.replace = killing_replace

    unlink = pathlib.Path.unlink

    def killing_unlink(self, *args, **kwargs):
        unlink(self, *args, **kwargs)
        if self.parent.name == "checkpoints" and self.name.endswith(".pt") and hit("prune"):
            die()

    pathlib.Path.unlink = killing_unlink

    fsync = os.fsync

    def killing_fsync(fd):
        if point == "metrics":
            try:
                path = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
            except OSError:
                path = ""
            if path.endswith("metrics.jsonl") and hit("metrics"):
                die()
        return fsync(fd)

    os.fsync = killing_fsync


if _HOOK or _STEPS:
    _install()
