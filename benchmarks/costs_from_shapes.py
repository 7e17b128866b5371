"""Per-piece memory costs counted from shapes (fake tensors) against the same count with real
arithmetic: equal or not, and the seconds each takes, per recipe.

    OMP_NUM_THREADS=1 python benchmarks/costs_from_shapes.py recipes/paper/resnet110_cifar10.toml \
        --set data.batch_size=128 --set context.use=R1E

Each recipe's network is costed twice at its batch size (every unit, head and adapter the costs
table and the even split need): ``method = "saved"`` runs the real arithmetic, ``method =
"shapes"`` (the default) runs on fake tensors. Seconds are wall-clock, one after the other in
one process: compare the two, not across machines.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

from contsup.config.recipe import load_recipe  # noqa: E402
from contsup.core.plugins import get_plugin_manager  # noqa: E402
from contsup.core.registry import Registries  # noqa: E402
from contsup.model.build import recipe_parts
from contsup.model.costs import CostModel, even_split  # noqa: E402


def cost(recipe, parts, shapes, info, method: str):
    """(every piece, the costs table and the even split's module costs, seconds) for ``method``."""
    start = time.perf_counter()
    model = CostModel(recipe, parts, shapes, info, method=method)
    k = recipe.partition.modules
    tables = (model.costs(k), model.plan_costs(even_split(model.n, k)))
    pieces = [*model.units, *model._heads.values(), *model._adapters.values()]
    return pieces, tables, time.perf_counter() - start, model.notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--set", action="append", default=[], help="an override for every recipe, as contsup train's")
    args = parser.parse_args(argv)
    registries = Registries.from_plugin_manager(get_plugin_manager(entry_points=False))
    print("| recipe | overrides | pieces | equal | real arithmetic (s) | shapes (s) | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for path in args.recipes:
        recipe = load_recipe(path, args.set, registries)
        parts, shapes, info = recipe_parts(recipe)
        real, real_tables, real_s, _ = cost(recipe, parts, shapes, info, "saved")
        fake, fake_tables, fake_s, notes = cost(recipe, parts, shapes, info, "shapes")
        equal = real == fake and real_tables == fake_tables
        print(f"| {path} | {' '.join(args.set)} | {len(real)} | {'yes' if equal else 'NO'} | {real_s:.2f} | {fake_s:.2f} | {real_s / fake_s:.1f}x |")
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
