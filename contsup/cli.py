"""The ``contsup`` command. Problems with the user's input print one line each and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import attrs

from contsup.errors import ContsupError

LIST_KINDS = {
    "backbones": "backbones",
    "partitioners": "partitioners",
    "context_selectors": "context_selectors",
    "contexts": "context_selectors",
    "objectives": "objectives",
    "decoders": "decoders",
    "datasets": "datasets",
    "optimizers": "optimizers",
    "schedules": "schedules",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as ContsupError (one line, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ContsupError(f"{self.prog}: {message} (see {self.prog} --help)")


def _registries():
    from contsup.plugins import get_plugin_manager
    from contsup.registry import Registries

    pm = get_plugin_manager()
    for line in pm.load_errors:
        print(f"warning: {line}", file=sys.stderr)
    return pm, Registries.from_plugin_manager(pm)


def _recipe(args: argparse.Namespace):
    from contsup.recipe import load_recipe

    pm, registries = _registries()
    return pm, load_recipe(args.recipe, args.set or (), registries)


def cmd_validate(args: argparse.Namespace) -> int:
    _, recipe = _recipe(args)
    print(f"{args.recipe}: ok ({recipe.backbone.use}, K={recipe.partition.modules}, context {recipe.context.use}, {recipe.run.mode})")
    return 0


def plan_data(recipe: Any) -> dict:
    """What ``contsup plan --json`` prints: per module its units, sources, parameters, shapes."""
    import torch

    from contsup.network import build_network, count_params

    torch.manual_seed(recipe.run.seed)
    built = build_network(recipe)
    modules = []
    for plan, m in zip(built.plans, built.network.blocks):
        modules.append(
            {
                "index": plan.index,
                "units": plan.units,
                "unit_range": list(plan.unit_range),
                "sources": [str(s) for s in plan.sources],
                "params": count_params(m),
                "output_shape": list(plan.output_shape),
            }
        )
    return {
        "backbone": recipe.backbone.use,
        "input_shape": list(built.info.input_shape),
        "num_units": len(built.unit_shapes),
        "modules": modules,
    }


def cmd_plan(args: argparse.Namespace) -> int:
    _, recipe = _recipe(args)
    data = plan_data(recipe)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [("module", "units", "unit range", "sources", "params", "output shape")]
    for m in data["modules"]:
        rows.append(
            (
                str(m["index"]),
                str(m["units"]),
                f"{m['unit_range'][0]}-{m['unit_range'][1]}",
                ", ".join(m["sources"]) or "-",
                f"{m['params']:,}",
                "x".join(str(d) for d in m["output_shape"]),
            )
        )
    print(
        f"{data['backbone']}: {data['num_units']} units, input "
        f"{'x'.join(str(d) for d in data['input_shape'])}, {len(data['modules'])} modules, "
        f"context {recipe.context.use}"
    )
    print(_table(rows))
    total = sum(m["params"] for m in data["modules"])
    print(f"total parameters: {total:,}")
    return 0


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from contsup import __version__
    from contsup.engine import Trainer
    from contsup.rundir import append_metrics, create_run_dir, default_run_dir, save_model, write_recipe, write_versions

    pm, recipe = _recipe(args)
    run_dir = create_run_dir(default_run_dir(recipe), new=args.new)
    write_recipe(run_dir, recipe)
    write_versions(run_dir, recipe, pm)
    print(f"contsup {__version__}: training {recipe.source} into {run_dir}", flush=True)
    trainer = Trainer(recipe, run_dir, hook=pm.hook)
    history = trainer.fit(on_epoch=lambda m: append_metrics(run_dir, m))
    save_model(run_dir, trainer.network)
    last = history[-1]
    best = min(history, key=lambda m: m["test_error_pct"])
    print(
        f"final test error: {last['test_error_pct']:.2f}% "
        f"(best {best['test_error_pct']:.2f}% at epoch {best['epoch']}); run directory: {run_dir}"
    )
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from contsup.profiling import profile_data, profile_text

    _, recipe = _recipe(args)
    if args.repeats < 1:
        raise ContsupError(f"contsup profile: --repeats must be >= 1, got {args.repeats}")
    print(f"profiling {args.recipe}: measuring every unit, head and adapter at batch {recipe.data.batch_size}", file=sys.stderr, flush=True)
    data = profile_data(recipe, repeats=args.repeats)
    print(json.dumps(data, indent=2) if args.json else profile_text(data, _table))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from contsup.bench import bench_markdown, bench_rows, run_bench
    from contsup.rundir import atomic_write

    _, recipe = _recipe(args)
    if args.steps < 1 or args.warmup < 0:
        raise ContsupError(f"contsup bench: --steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    out = Path(args.out or Path("bench") / recipe.name)
    json_path, md_path = Path(f"{out}.json"), Path(f"{out}.md")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ContsupError(f"contsup bench: --out {out}: cannot create {out.parent}: {exc.strerror}") from None
    result = run_bench(recipe, steps=args.steps, warmup=args.warmup, baseline=args.baseline)
    sets = "".join(f" --set {s}" for s in args.set or ())
    command = f"contsup bench {args.recipe}{sets} --steps {args.steps} --warmup {args.warmup} --baseline {args.baseline}"
    try:
        atomic_write(json_path, lambda f: json.dump(result, f, indent=2), binary=False)
        atomic_write(md_path, lambda f: f.write(bench_markdown(result, command)), binary=False)
    except OSError as exc:
        raise ContsupError(f"contsup bench: --out {out}: cannot write the results: {exc.strerror}") from None
    print(_table([("figure", "end-to-end", "greedy", "greedy / e2e"), *bench_rows(result)]))
    print(f"wrote {json_path} and {md_path}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    pm, registries = _registries()
    provided = registries.by_plugin()
    rows = []
    for name, info in pm.info.items():
        rows.append(
            {
                "name": name,
                "distribution": info.distribution,
                "version": info.version,
                "builtin": info.builtin,
                "registered": [{"kind": k, "name": n} for k, n in provided.get(name, [])],
            }
        )
    if args.json:
        print(json.dumps({"plugins": rows, "errors": pm.load_errors}, indent=2))
        return 0
    table = [("kind", "name", "plugin", "distribution")]
    for row in rows:
        for item in row["registered"]:
            table.append((item["kind"], item["name"], row["name"], f"{row['distribution']} {row['version']}"))
    print(_table(table))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from contsup.options import describe_default, doc, field_types, type_name
    from contsup.recipe import component_registry

    kind = LIST_KINDS.get(args.kind)
    if kind is None:
        from contsup.suggest import did_you_mean

        raise ContsupError(f"contsup list: unknown kind '{args.kind}'; {did_you_mean(args.kind, LIST_KINDS)}")
    _, registries = _registries()
    registry = component_registry(kind, registries)
    for name in registry.names():
        entry = registry.entry(name)
        summary = (entry.component.__doc__ or "").strip().splitlines()
        print(f"{name}  ({entry.plugin})  {summary[0] if summary else ''}")
        examples = getattr(entry.component, "examples", ())
        if examples:
            print(f"    also by name: {', '.join(examples)}")
        types = field_types(entry.component.Options)
        for f in attrs.fields(entry.component.Options):
            print(f"    {f.name} = {describe_default(f.default)}  ({type_name(types[f.name])}) {doc(f)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from contsup import __version__

    parser = _Parser(prog="contsup", description="Greedy local learning with context supply.")
    parser.add_argument("--version", action="version", version=f"contsup {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def recipe_command(name: str, help: str):
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("recipe", help="a TOML recipe file")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. --set optimizer.lr=0.05 (repeatable)")
        return p

    p = recipe_command("train", "train a recipe into a new run directory")
    p.add_argument("--new", action="store_true", help="if the run directory exists, use a fresh suffixed one")
    p.set_defaults(func=cmd_train)
    p = recipe_command("validate", "check a recipe and report every problem")
    p.set_defaults(func=cmd_validate)
    p = recipe_command("plan", "show each module's units, context sources, parameters and shapes")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_plan)
    p = recipe_command("profile", "measure per unit and per module the bytes kept for backward and the time")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per piece, after one warm-up (default 3)")
    p.set_defaults(func=cmd_profile)
    p = recipe_command("bench", "measure end-to-end against the recipe's greedy training: memory and step time")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each, alternating (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each first (default 3)")
    p.add_argument("--baseline", choices=("backbone", "recipe"), default="backbone",
                   help="end-to-end side: the plain backbone (default) or the recipe's network with its adapters")
    p.add_argument("--out", help="output path without suffix; writes PATH.json and PATH.md (default bench/<recipe name>)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("plugins", help="list plugins and what they registered")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("list", help="list the components of one kind with their options")
    p.add_argument("kind", help=", ".join(LIST_KINDS))
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except ContsupError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
