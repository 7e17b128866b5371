"""Run directories: the resolved recipe, plugin versions, metrics and the trained model.

Files are written atomically (temporary file in the same folder, fsync, rename) so a crash
never leaves a half-written model; runs never overwrite each other.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import torch

from contsup.core import tomlw
from contsup.core.files import JSON_LIMIT, METRICS_LIMIT, RECIPE_LIMIT, file_size, read_file, read_text
from contsup.errors import ContsupError, reason
from contsup.core.plugins import plugin_versions
from contsup.model.network import build_network
from contsup.config.recipe import Recipe, load_recipe
from contsup.training.digests import (  # what reads a digested file, beside what writes one
    DamagedFile, check_digest, check_size, digest_record, load_tensors, sidecar,
)
from contsup.training.failures import TrainingFailed

RECIPE_FILE = "recipe.toml"
PLUGINS_FILE = "plugins.json"
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.pt"
CLASSES_FILE = "classes.json"
LOCK_FILE = ".lock"
# what atomic_write leaves behind when a kill cuts a write short: .NAME.XXXXXXXX.tmp
PARTIAL_WRITE = re.compile(r"^\.(recipe\.toml(\.sha256)?|plugins\.json|classes\.json|metrics\.jsonl|model\.pt(\.sha256)?)\..+\.tmp$")


def _stderr_warning(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once, at import (before any thread)
    os.umask(mask)
    return mask


UMASK = _read_umask()


def atomic_write(
    path: Path, write: Callable[[Any], None], binary: bool = True, before_rename: Callable[[], None] | None = None,
) -> None:
    """Write ``path`` through ``write(fileobj)`` into a temporary sibling, fsync, then rename.
    The file gets the permissions any new file gets (0666 less the umask), not the temporary
    file's private 0600, so colleagues on a shared machine can read results. ``before_rename``
    runs once the data is on disk, before it takes the name (a digest written first means a file
    never shows under its name without its digest). An operating system refusal (a full disk, a
    read-only file system) is raised as an ``OSError`` naming ``path``, not the temporary file,
    and ``path`` keeps what it held before."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise named(exc, path) from None
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        # surrogateescape: a name read from a non-UTF-8 command line (its bytes) is written back as those bytes
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.filename in (None, tmp):
            raise named(exc, path) from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def named(exc: OSError, path: Path) -> OSError:
    """``exc`` with ``path`` as its file (a write's own error names no file, or the temporary one)."""
    if exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))


# -- writes the operating system refuses ----------------------------------------------------

# the refusals that are the machine's, not the run's: a full disk or quota, a read-only file
# system, no permission to write
REFUSED_WRITES = {errno.ENOSPC: "space is freed", errno.EDQUOT: "space is freed (or the quota raised)",
                  errno.EROFS: "the file system is writable again", errno.EACCES: "the run directory is writable",
                  errno.EPERM: "the run directory is writable",
                  errno.EFBIG: "the limit on the size of a file is raised (ulimit -f)"}


class WriteFailed(TrainingFailed):
    """The operating system refused a file of a run (full disk, quota, read-only file system,
    permissions): a failure of the machine, not of the input, so exit status 1, as any failure
    of a run under way. The line names the file and the run, what is safe, and how to finish."""


def refused_write(exc: BaseException) -> OSError | None:
    """The operating system's refusal (:data:`REFUSED_WRITES`) behind ``exc``, or None: ``exc``
    itself, or an error raised while handling one (torch's zip writer answers a failed write with
    ``RuntimeError: ... unexpected pos``; the ``OSError`` is its context)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in REFUSED_WRITES:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def write_failed(run_dir: Path, exc: OSError, safe: str, then: str | None = None) -> WriteFailed:
    """One line for a refused write into ``run_dir``: the file, the reason, ``safe`` (what is
    kept) and ``then`` (default: resuming the run finishes it)."""
    what = exc.filename or run_dir
    when = REFUSED_WRITES.get(exc.errno, "it can be written")
    then = then or f"once {when}, contsup train --resume {run_dir} finishes the run"
    return WriteFailed(f"cannot write {what} ({exc.strerror or exc}) for the run {run_dir}; {safe}; "
                       f"{then.replace('{when}', when)}")


@contextlib.contextmanager
def refused_writes(run_dir: Path, safe: Callable[[], str], then: str | None = None) -> Iterator[None]:
    """Turn a refused write inside the block into :class:`WriteFailed` (``safe()`` says what is
    kept; ``then`` what to do, ``{when}`` standing for "space is freed" or the like)."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        refusal = refused_write(exc)
        if refusal is None:
            raise
        raise write_failed(Path(run_dir), refusal, safe(), then) from None


# -- digests: a SHA-256 and size beside a file, computed while it is written -------------------


class _HashingWriter:
    """Passes bytes to ``f`` and hashes them on the way, so the file is not read back."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0
        self.error: OSError | None = None  # what the file refused, which torch reports as a RuntimeError

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def save_digested(path: Path, obj: Any) -> None:
    """``torch.save(obj)`` into ``path`` atomically, its digest (``NAME.sha256``) written before
    the file takes its name, so the file is never there without the digest that matches it."""
    path = Path(path)
    digest: dict[str, Any] = {}

    def write(f: BinaryIO) -> None:
        w = _HashingWriter(f)
        try:
            torch.save(obj, w)
        except RuntimeError:
            if w.error is None:
                raise
            raise w.error from None  # torch's zip writer hides the file's refusal (ENOSPC) as "unexpected pos"
        digest.update(sha256=w.sha.hexdigest(), size=w.size)

    def write_digest() -> None:
        atomic_write(sidecar(path), lambda f: f.write(f"{digest['sha256']}  {digest['size']}\n"), binary=False)

    atomic_write(path, write, before_rename=write_digest)


def default_run_dir(recipe: Recipe) -> Path:
    """``run.out_dir`` (a leading ``~`` is the home folder, as in a shell), else ``runs/<recipe name>``."""
    return Path(recipe.run.out_dir).expanduser() if recipe.run.out_dir else Path("runs") / recipe.name


def create_run_dir(path: Path, new: bool = False) -> Path:
    """Create the run directory; an existing non-empty one is an error unless ``new`` asks for
    a fresh suffixed sibling (``name-2``, ``name-3``, ...)."""
    path = Path(path)
    if path.exists() and not path.is_dir() and not new:
        raise ContsupError(f"run directory {path} is a file, not a directory; set run.out_dir to a directory "
                           f"(or pass --new for a fresh {path.name}-N directory beside it)")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not new:
            raise ContsupError(
                f"run directory {path} already exists; pass --new for a fresh {path.name}-N directory, "
                f"--resume {path} to continue it, or set run.out_dir"
            )
        i = 2
        while (path.parent / f"{path.name}-{i}").exists():
            i += 1
        path = path.parent / f"{path.name}-{i}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the machine's problem, not the path's
            raise write_failed(path, named(exc, path), "nothing was trained yet", "once {when}, the same command starts the run") from None
        where = f" at {exc.filename}" if exc.filename and Path(exc.filename) != path else ""
        raise ContsupError(f"run directory {path} cannot be created ({exc.strerror or exc}{where}); "
                           f"set run.out_dir to a directory that can be written") from None
    return path


def discard_unstarted(run_dir: Path) -> None:
    """Remove a run directory that holds only what ``contsup train`` writes before training
    (the recipe and the versions): a run that could not start leaves nothing behind, so the
    same command works once the problem is fixed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    names = {p.name for p in run_dir.iterdir()}
    if names <= {RECIPE_FILE, RECIPE_FILE + ".sha256", PLUGINS_FILE, CLASSES_FILE, LOCK_FILE}:
        for name in names:
            (run_dir / name).unlink()
        run_dir.rmdir()


def write_recipe(run_dir: Path, recipe: Recipe) -> None:
    """The resolved recipe into ``run_dir``; ``run.out_dir`` names ``run_dir`` itself when
    ``--new`` chose a fresh sibling of the recipe's directory."""
    table = recipe.table()
    if Path(run_dir) != default_run_dir(recipe):
        table["run"]["out_dir"] = str(run_dir)
    write_recipe_table(run_dir, table, str(recipe.source))


def write_recipe_table(run_dir: Path, table: dict, origin: str) -> None:
    """``recipe.toml`` from a resolved recipe's table (``origin``: where it came from), with its
    digest (``recipe.toml.sha256``, written before the file takes its name): a later edit of
    the file is told from the recipe the run trained with (:func:`edited_recipe`)."""
    text = tomlw.dumps(table, header=f"The resolved recipe of this run (from {origin}); every key with its value.\n")
    data = text.encode("utf-8", "surrogateescape")
    path = Path(run_dir) / RECIPE_FILE
    line = f"{hashlib.sha256(data).hexdigest()}  {len(data)}\n"
    atomic_write(path, lambda f: f.write(data),
                 before_rename=lambda: atomic_write(sidecar(path), lambda f: f.write(line), binary=False))


def check_recipe_unchanged(run_dir: Path) -> None:
    """Refuse a run whose ``recipe.toml`` was edited after the run wrote it (its digest says so):
    its network and test set would be rebuilt from a recipe the run did not train with."""
    why = edited_recipe(run_dir)
    if why is not None:
        raise ContsupError(
            f"{Path(run_dir) / RECIPE_FILE}: not the recipe the run trained with ({why}); put the run's own back "
            f"(every checkpoint holds it), or keep it and evaluate other data with --data KEY=VALUE"
        )


def edited_recipe(run_dir: Path) -> str | None:
    """Why ``recipe.toml`` is not the recipe the run wrote (its digest says it changed), or None:
    it is, or the run wrote no digest (runs from before digests)."""
    path = Path(run_dir) / RECIPE_FILE
    try:
        record = digest_record(path)
        if record is None:
            return None
        check_digest(path, read_file(path, RECIPE_LIMIT, "a recipe"))
    except DamagedFile as exc:
        if "digest file" in str(exc):
            return str(exc)
        return f"it was edited after the run wrote it, as {sidecar(path).name} shows"
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    return None


def write_versions(run_dir: Path, recipe: Recipe, pm: Any) -> None:
    import timm

    data = {
        "contsup": pm.info[next(iter(pm.info))].version if pm.info else "?",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "plugins": plugin_versions(pm, recipe.providers()),
    }
    atomic_write(run_dir / PLUGINS_FILE, lambda f: json.dump(data, f, indent=2), binary=False)


def write_classes(run_dir: Path, names: Sequence[str]) -> None:
    """The dataset's class names in label order (``classes.json``: a JSON list; label i is
    ``names[i]``), for datasets that name their classes."""
    names = [str(n) for n in names]
    atomic_write(Path(run_dir) / CLASSES_FILE, lambda f: json.dump(names, f, indent=1), binary=False)


def read_classes(run_dir: str | Path) -> list[str] | None:
    """The class names a run recorded, or None when its dataset names none; a ContsupError when
    ``classes.json`` is there but not a JSON list of names."""
    path = Path(run_dir) / CLASSES_FILE
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        names = json.loads(read_text(path, JSON_LIMIT, "a classes.json"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else reason(exc, 120)
        raise ContsupError(f"{path}: cannot be read ({why}); it should hold the run's class names, a JSON list") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ContsupError(f"{path}: holds a {type(names).__name__}, not the run's class names (a JSON list of strings)")
    return names


def append_metrics(run_dir: Path, metrics: dict) -> None:
    """Append one epoch's metrics as one JSON line (flushed and synced). A write the operating
    system refuses names the file; a line it cut short is the torn last line that
    :func:`read_metrics` skips and a resume rewrites."""
    path = Path(run_dir) / METRICS_FILE
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise named(exc, path) from None


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """Replace metrics.jsonl with ``history`` (on resume: exactly the epochs the checkpoint holds)."""
    text = "".join(json.dumps(m) + "\n" for m in history)
    atomic_write(Path(run_dir) / METRICS_FILE, lambda f: f.write(text), binary=False)


def forget_metrics(run_dir: Path) -> None:
    """Empty metrics.jsonl (in place: on a full disk too) when no checkpoint holds its epochs."""
    with contextlib.suppress(FileNotFoundError):
        os.truncate(Path(run_dir) / METRICS_FILE, 0)


def read_metrics(run_dir: Path, warn: Callable[[str], None] | None = None, *, warn_torn: bool = False) -> list[dict]:
    """Every complete line of metrics.jsonl. A torn last line from a crash is skipped, quietly
    unless ``warn_torn`` (a reader reporting figures, which then stop an epoch early); a damaged
    line before it (not UTF-8, not a JSON object) is skipped with one line through ``warn``
    naming the file and the line."""
    path = Path(run_dir) / METRICS_FILE
    if not (path.exists() or path.is_symlink()):
        return []
    lines = read_file(path, METRICS_LIMIT, "a metrics.jsonl").split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for number, raw in enumerate(lines, 1):
        last = number == len(lines)
        try:
            metrics = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            problem = f"is not UTF-8 (byte {exc.start + 1} of the line)"
        except json.JSONDecodeError:
            if last and not warn_torn:
                continue  # torn by a crash while it was written
            problem = "is cut short (a write that did not finish)" if last else "is not JSON"
        else:
            if isinstance(metrics, dict):
                out.append(metrics)
                continue
            problem = f"holds a {type(metrics).__name__}, not an epoch's metrics"
        if warn is not None:
            warn(f"{path}: line {number} {problem}; skipped")
    return out


def remove_partial_writes(run_dir: Path) -> None:
    """Remove the temporary files of writes a kill cut short (``.model.pt.XXXX.tmp``)."""
    for leftover in Path(run_dir).iterdir():
        if PARTIAL_WRITE.match(leftover.name):
            leftover.unlink(missing_ok=True)


def save_model(run_dir: Path, network: torch.nn.Module) -> None:
    """The final weights as ``model.pt`` with its digest ``model.pt.sha256``."""
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    save_digested(Path(run_dir) / MODEL_FILE, state)


class UnusableModel(ContsupError):
    """``model.pt`` cannot be used; ``why`` says why in a few words (the line also names the file)."""

    def __init__(self, line: str, why: str) -> None:
        super().__init__(line)
        self.why = why


def read_model_file(
    path: Path, warn: Callable[[str], None] | None = None, map_location: str = "cpu",
) -> dict[str, torch.Tensor]:
    """The state dict in ``model.pt``, checked against its digest (a missing digest, as in runs
    written before contsup recorded one, is one warning) and checked to be a state dict of tensors;
    raises :class:`UnusableModel` otherwise."""
    path = Path(path)
    try:
        size = file_size(path)
        check_size(path, size)  # a truncated or huge file is refused unread
        raw = read_file(path, None)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise UnusableModel(f"{path}: cannot be read ({why})", why) from None
    except MemoryError:
        why = f"it holds {size:,} bytes, more than this process can hold in memory"
        raise UnusableModel(f"{path}: cannot be read ({why})", why) from None
    except DamagedFile as exc:
        raise UnusableModel(f"{path} is damaged: {exc}; evaluate the run's last checkpoint instead "
                            f"(move {path.name} away and run contsup eval)", str(exc)) from None
    try:
        verified = check_digest(path, raw)
    except DamagedFile as exc:
        raise UnusableModel(f"{path} is damaged: {exc}; evaluate the run's last checkpoint instead "
                            f"(move {path.name} away and run contsup eval)", str(exc)) from None
    if not verified:
        (warn or _stderr_warning)(f"{path} could not be verified: it has no digest ({sidecar(path).name})")
    try:
        state = load_tensors(raw, map_location)
    except MemoryError:
        why = f"it holds {len(raw):,} bytes, more than this process can hold in memory"
        raise UnusableModel(f"{path}: cannot be read ({why})", why) from None
    except DamagedFile as exc:
        raise UnusableModel(f"{path}: {exc}, so it is not the file contsup wrote; contsup train --resume "
                            f"{path.parent} writes it again from the run's final checkpoint", str(exc)) from None
    except Exception as exc:  # torch raises many kinds for damaged files
        why = f"{type(exc).__name__}: {reason(exc, 200)}"
        raise UnusableModel(f"{path}: cannot be read ({why})", why) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        what = f"a {type(state).__name__}" if not isinstance(state, dict) else "a dict of other things than tensors"
        why = f"it holds {what}, not a network's weights"
        raise UnusableModel(f"{path}: holds {what}, not a network's weights (a state dict of tensors)", why)
    return state


def load_model(
    run_dir: str | Path, map_location: str = "cpu", warn: Callable[[str], None] | None = None,
) -> torch.nn.Module:
    """The network of a finished run as one ordinary ``nn.Module`` in eval mode."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / RECIPE_FILE).exists():
        raise ContsupError(f"{run_dir}: not a run directory (no {RECIPE_FILE})")
    if not (run_dir / MODEL_FILE).exists():
        raise ContsupError(
            f"{run_dir}: has no {MODEL_FILE}; the run has not finished (continue it with contsup train --resume "
            f"{run_dir}, or evaluate its last checkpoint with contsup eval {run_dir})"
        )
    check_recipe_unchanged(run_dir)
    recipe = load_recipe(run_dir / RECIPE_FILE)
    network = build_network(recipe).network
    state = read_model_file(run_dir / MODEL_FILE, warn, map_location)
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise ContsupError(f"{run_dir / MODEL_FILE}: does not fit the network of {run_dir / RECIPE_FILE} ({reason(exc)})") from None
    return network.eval()
