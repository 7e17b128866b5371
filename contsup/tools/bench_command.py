"""``contsup bench``'s command line: the options of a training bench (steps, segments, variants),
where its results go, and the distributed comparison for a distributed recipe."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from contsup.config.recipe import RecipeError, load_recipe
from contsup.errors import ContsupError, one_line
from contsup.tools.bench import run_bench
from contsup.tools.bench_output import CONFIGURATION_HEADER, bench_figure, bench_markdown, bench_rows, configuration_rows
from contsup.tools.distributed_bench import compare, format_comparison
from contsup.tools.tables import format_table
from contsup.training.rundir import atomic_write


def bench_main(args: argparse.Namespace, recipe: Any, registries: Any) -> int:
    """Greedy against end-to-end training for ``recipe`` (with its variants, checked against
    ``registries``), or one process against N for a distributed recipe."""
    if recipe.distributed.mode != "none":
        return _bench_distributed(args, recipe)
    warmup = 3 if args.warmup is None else args.warmup
    segments = _segments(args.segments)
    if args.steps < 1 or warmup < 0:
        raise ContsupError(f"contsup bench: --steps must be >= 1 and --warmup >= 0, got {args.steps} and {warmup}")
    out = Path(args.out or Path("bench") / recipe.name)
    json_path, md_path, png_path = Path(f"{out}.json"), Path(f"{out}.md"), Path(f"{out}.png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ContsupError(f"contsup bench: --out {out}: cannot create {out.parent}: {exc.strerror}") from None
    variants = _variants(args, recipe, registries)
    result = run_bench(
        recipe, steps=args.steps, warmup=warmup, baseline=args.baseline, segments=segments, variants=variants,
        recompute=args.recompute,
    )
    sets = "".join(f" --set {s}" for s in args.set or ())
    command = f"contsup bench {args.recipe}{sets} --steps {args.steps} --warmup {warmup} --baseline {args.baseline}"
    if args.segments != "auto":
        command += f" --segments {args.segments}"
    command += "".join(f" --variant '{v}'" for v in args.variant or ())
    if args.recompute:
        command += " --recompute"
    try:
        atomic_write(json_path, lambda f: json.dump(result, f, indent=2), binary=False)
        atomic_write(md_path, lambda f: f.write(bench_markdown(result, command)), binary=False)
        configurations = bool(result["checkpointing"] or result["variants"])
        if configurations:
            bench_figure(result, png_path)
    except OSError as exc:
        raise ContsupError(f"contsup bench: --out {out}: cannot write the results: {exc.strerror}") from None
    print(format_table([("figure", "end-to-end", "greedy", "greedy / e2e"), *bench_rows(result)]))
    if configurations:
        print()
        print(format_table([CONFIGURATION_HEADER, *configuration_rows(result)]))
        print(f"wrote {json_path}, {md_path} and {png_path}")
    else:
        print(f"wrote {json_path} and {md_path}")
    return 0


def _variants(args: argparse.Namespace, recipe: Any, registries: Any) -> list[tuple[str, Any]]:
    """--variant "LABEL:key=value;key=value": the recipe (with its --set) and those overrides too,
    measured beside it; it must keep the recipe's data and backbone (the bench feeds all the same batches)."""
    out = []
    for text in args.variant or ():
        label, colon, rest = text.partition(":")
        sets = [part.strip() for part in rest.split(";") if part.strip()]
        if not colon or not label.strip() or not sets:
            raise ContsupError(
                f"contsup bench: --variant {text!r}: expected LABEL:key=value[;key=value...], such as "
                f"'DGL:context.use=none' or 'L2:partition.modules=2'"
            )
        try:
            variant = load_recipe(args.recipe, [*(args.set or ()), *sets], registries)
        except RecipeError as exc:
            raise ContsupError(f"contsup bench: --variant {text!r}: {'; '.join(exc.problems)}") from None
        if variant.data != recipe.data or variant.backbone != recipe.backbone or variant.run.mode != "greedy":
            raise ContsupError(
                f"contsup bench: --variant {text!r} changes the data, the backbone or run.mode; a variant "
                f"trains greedily on the recipe's batches: change context, objective, partition or a training method's keys"
            )
        out.append((label.strip(), variant))
    return out


def _segments(text: str) -> list[int] | None:
    """--segments: "auto" (None: the bench's default set), "none" ([]) or counts "2,4,16"."""
    if text == "auto":
        return None
    if text == "none":
        return []
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ContsupError(f"contsup bench: --segments must be auto, none or counts such as 2,4,16, got {text!r}")
    return counts


def _bench_distributed(args: argparse.Namespace, recipe: Any) -> int:
    """``contsup bench`` on a distributed recipe: train it with one process and with --nproc under
    torchrun; throughput, speed-up and each rank's utilisation."""
    if args.nproc < 2:
        raise ContsupError(f"contsup bench: --nproc must be >= 2 for a distributed recipe, got {args.nproc}")
    out = Path(args.out or Path("bench") / f"{recipe.name}-{recipe.distributed.mode}-{args.nproc}")
    if out.exists() and any(out.iterdir()):
        raise ContsupError(f"contsup bench: {out} is not empty; remove it or pass --out")
    try:
        result = compare(Path(args.recipe), args.nproc, recipe.distributed.mode, out, list(args.set or ()), log=sys.stderr)
    except RuntimeError as exc:
        raise ContsupError(f"contsup bench: a training run failed: {one_line(str(exc))}") from None
    atomic_write(out / "comparison.json", lambda f: json.dump(result, f, indent=2), binary=False)
    print(format_comparison(result))
    print(f"wrote {out / 'comparison.json'}")
    return 0


__all__ = ["bench_main"]
