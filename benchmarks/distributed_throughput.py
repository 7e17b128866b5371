"""One process against N under torchrun: training throughput and each rank's utilisation.

    python benchmarks/distributed_throughput.py [RECIPE] [--nproc 2] [--mode pipeline] [--set KEY=VALUE ...]

trains RECIPE (default recipes/digits_pipeline.toml) once with one process and once with N
processes, both through ``torchrun --standalone``, then prints images per second (training only,
epochs after the first), the speed-up, and the share of each rank's time spent computing.
Every process of both runs gets OMP_NUM_THREADS = CPUs / N (--threads to override), so the
one-process run is one worker of the same size: the CPU counterpart of one GPU against N. The runs and
``comparison.json`` go to --out (default benchmarks/out/<recipe>). See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from contsup.tools.distributed_bench import compare, format_comparison

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "digits_pipeline.toml"))
    parser.add_argument("--nproc", type=int, default=2, help="processes of the distributed run (default 2)")
    parser.add_argument("--mode", choices=["pipeline", "data"], default="pipeline")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every process of both runs (default CPUs / --nproc)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for both runs")
    parser.add_argument("--out", help="folder for the runs and comparison.json")
    args = parser.parse_args(argv)
    recipe = Path(args.recipe)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "out" / recipe.stem
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} is not empty; remove it or pass --out")
    result = compare(recipe, args.nproc, args.mode, out, args.set, args.threads, log=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(result, indent=2))
    print(format_comparison(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
