"""One table of the local-learning methods: final test error over the seeds a sweep finished, the
plan's activation peak and the step time relative to end-to-end from one ``contsup bench`` run.

    python benchmarks/methods_table.py runs/sweeps/digits_methods_2024 \
        --bench bench/digits_methods_2024.json --label digits_dgl=DGL --label digits_man=MAN ...

Each folder under the sweep directory is one recipe (``<out_dir>/<recipe name>/<axes>``, as
``contsup sweep`` lays them out); its finished runs (those with ``model.pt``) are averaged, and n
says how many there were. The activation peak is what ``contsup plan`` prints as "largest module"
for the first run's resolved recipe, and its ratio to every unit at once (end-to-end's figure).
``--label RECIPE=LABEL`` names a row and, where the bench has a variant of that label (or the
bench's recipe is that recipe), takes its step time; the bench's own recipe is the greedy row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

import torch  # noqa: E402

from contsup.config.recipe import load_recipe  # noqa: E402
from contsup.core.registry import load_registries  # noqa: E402
from contsup.model.network import build_network  # noqa: E402
from contsup.tools.plan import plan_memory  # noqa: E402
from contsup.tools.plotting import new_figure, save_png  # noqa: E402
from contsup.tools.results import find_runs, load_run  # noqa: E402
from contsup.training.rundir import RECIPE_FILE  # noqa: E402

MIB = 2**20


def plan_peak(run_dir: Path, registries) -> tuple[int, int]:
    """(largest module's bytes, every unit's bytes) kept for backward, as ``contsup plan`` counts them."""
    recipe = load_recipe(run_dir / RECIPE_FILE, (), registries)
    with torch.random.fork_rng(devices=[]):
        built = build_network(recipe)
    memory = plan_memory(recipe, built.network, built.plans, [p.units for p in built.plans])
    return max(m.bytes for m in memory.modules), memory.units_bytes


def step_ratios(bench: dict) -> dict[str, float]:
    """{label: median step / end-to-end's}; the bench's own recipe under the label "greedy"."""
    e2e = bench["e2e"]["step_ms_median"]
    out = {"greedy": bench["greedy"]["step_ms_median"] / e2e}
    out.update({v["label"]: v["step_ms_median"] / e2e for v in bench.get("variants", [])})
    return out


def measure(folder: Path, registries) -> dict | None:
    """The finished runs' final test errors (%) and the plan's peak for one recipe's folder;
    None before any of its runs has written an epoch."""
    runs = [load_run(d) for d in find_runs([folder])] if folder.is_dir() else []
    if not runs:
        return None
    errors = [r.final["test_error_pct"] for r in runs if r.finished]
    peak, units = plan_peak(runs[0].run_dir, registries)
    return {"errors": errors, "peak": peak, "units": units}


def row(name: str, label: str, m: dict, ratio: float | None) -> str:
    errors = m["errors"]
    mean = f"{statistics.mean(errors):.2f}" if errors else "-"
    std = f" ± {statistics.stdev(errors):.2f}" if len(errors) > 1 else ""
    seeds = ", ".join(f"{e:.2f}" for e in errors)
    step = f"{ratio:.2f}" if ratio is not None else "-"
    return (f"| {label} | `{name}.toml` | {mean}{std} | {len(errors)} | {seeds} | "
            f"{m['peak'] / MIB:.2f} ({m['peak'] / m['units']:.2f}) | {step} |")


def plot(measured: dict[str, dict], path: Path) -> Path:
    """Final test error (mean, bars one std) against the plan's activation peak, one point a method."""
    fig, ax = new_figure(6.5, 4.2)
    for i, (label, m) in enumerate(measured.items()):
        if not m["errors"]:
            continue
        mean = statistics.mean(m["errors"])
        std = statistics.stdev(m["errors"]) if len(m["errors"]) > 1 else 0.0
        ax.errorbar(m["peak"] / MIB, mean, yerr=std, fmt="o", capsize=3)
        ax.annotate(f"{label} (n={len(m['errors'])})", (m["peak"] / MIB, mean), textcoords="offset points",
                    xytext=(5, 4 if i % 2 else -11), fontsize=8)
    ax.set_xlabel("activation peak kept for backward (MiB, contsup plan, largest module)")
    ax.set_ylabel("final test error (%)")
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--bench", type=Path, required=True, help="the JSON that contsup bench --out wrote")
    parser.add_argument("--label", action="append", default=[], help="RECIPE=LABEL, in table order")
    parser.add_argument("--plot", type=Path, help="also draw error against activation peak into this PNG")
    parser.add_argument("--greedy", default="DGL", help="the label of the bench's own recipe (default DGL)")
    args = parser.parse_args(argv)
    _, registries = load_registries()
    ratios = step_ratios(json.loads(args.bench.read_text()))
    ratios[args.greedy] = ratios.pop("greedy")
    print("| method | recipe | final test error % | n | per seed | activation peak MiB (/ end-to-end) | step / end-to-end |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    measured = {}
    for item in args.label:
        name, label = item.split("=", 1)
        m = measure(args.sweep_dir / name, registries)
        if m is None:
            print(f"| {label} | `{name}.toml` | not run | 0 | | | |")
            continue
        measured[label] = m
        print(row(name, label, measured[label], ratios.get(label)))
    if args.plot:
        print(f"wrote {plot(measured, args.plot)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
