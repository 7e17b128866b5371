"""Run directories: the resolved recipe, plugin versions, metrics and the trained model.

Files are written atomically (temporary file in the same folder, fsync, rename) so a crash
never leaves a half-written model; runs never overwrite each other.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from contsup.core import tomlw
from contsup.errors import ContsupError, reason
from contsup.core.plugins import plugin_versions
from contsup.model.network import build_network
from contsup.config.recipe import Recipe, load_recipe

RECIPE_FILE = "recipe.toml"
PLUGINS_FILE = "plugins.json"
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.pt"
CLASSES_FILE = "classes.json"


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once, at import (before any thread)
    os.umask(mask)
    return mask


UMASK = _read_umask()


def atomic_write(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write ``path`` through ``write(fileobj)`` into a temporary sibling, fsync, then rename.
    The file gets the permissions any new file gets (0666 less the umask), not the temporary
    file's private 0600, so colleagues on a shared machine can read results."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def default_run_dir(recipe: Recipe) -> Path:
    return Path(recipe.run.out_dir) if recipe.run.out_dir else Path("runs") / recipe.name


def create_run_dir(path: Path, new: bool = False) -> Path:
    """Create the run directory; an existing non-empty one is an error unless ``new`` asks for
    a fresh suffixed sibling (``name-2``, ``name-3``, ...)."""
    path = Path(path)
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
    path.mkdir(parents=True, exist_ok=True)
    return path


def discard_unstarted(run_dir: Path) -> None:
    """Remove a run directory that holds only what ``contsup train`` writes before training
    (the recipe and the versions): a run that could not start leaves nothing behind, so the
    same command works once the problem is fixed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    names = {p.name for p in run_dir.iterdir()}
    if names <= {RECIPE_FILE, PLUGINS_FILE, CLASSES_FILE}:
        for name in names:
            (run_dir / name).unlink()
        run_dir.rmdir()


def write_recipe(run_dir: Path, recipe: Recipe) -> None:
    """The resolved recipe into ``run_dir``; ``run.out_dir`` names ``run_dir`` itself when
    ``--new`` chose a fresh sibling of the recipe's directory."""
    header = f"The resolved recipe of this run (from {recipe.source}); every key with its value.\n"
    table = recipe.table()
    if Path(run_dir) != default_run_dir(recipe):
        table["run"]["out_dir"] = str(run_dir)
    text = tomlw.dumps(table, header=header)
    atomic_write(run_dir / RECIPE_FILE, lambda f: f.write(text), binary=False)


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
    """The class names a run recorded, or None when its dataset names none."""
    path = Path(run_dir) / CLASSES_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def append_metrics(run_dir: Path, metrics: dict) -> None:
    """Append one epoch's metrics as one JSON line (flushed and synced)."""
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(metrics) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """Replace metrics.jsonl with ``history`` (on resume: exactly the epochs the checkpoint holds)."""
    text = "".join(json.dumps(m) + "\n" for m in history)
    atomic_write(Path(run_dir) / METRICS_FILE, lambda f: f.write(text), binary=False)


def read_metrics(run_dir: Path) -> list[dict]:
    """Every complete line of metrics.jsonl (a torn last line from a crash is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def save_model(run_dir: Path, network: torch.nn.Module) -> None:
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    atomic_write(run_dir / MODEL_FILE, lambda f: torch.save(state, f))


def load_model(run_dir: str | Path, map_location: str = "cpu") -> torch.nn.Module:
    """The network of a finished run as one ordinary ``nn.Module`` in eval mode."""
    run_dir = Path(run_dir)
    if not (run_dir / RECIPE_FILE).exists():
        raise ContsupError(f"{run_dir}: not a run directory (no {RECIPE_FILE})")
    if not (run_dir / MODEL_FILE).exists():
        raise ContsupError(
            f"{run_dir}: has no {MODEL_FILE}; the run has not finished (continue it with contsup train --resume "
            f"{run_dir}, or evaluate its last checkpoint with contsup eval {run_dir})"
        )
    recipe = load_recipe(run_dir / RECIPE_FILE)
    network = build_network(recipe).network
    try:
        state = torch.load(run_dir / MODEL_FILE, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ContsupError(f"{run_dir / MODEL_FILE}: cannot be read ({type(exc).__name__}: {exc})") from None
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise ContsupError(f"{run_dir / MODEL_FILE}: does not fit the network of {run_dir / RECIPE_FILE} ({reason(exc)})") from None
    return network.eval()
