"""The ``contsup`` command. Problems with the user's input print one line each and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import attrs

from contsup.errors import ContsupError, one_line, report_failure
from contsup.tools.tables import format_table

LIST_KINDS = {
    "backbones": "backbones",
    "partitioners": "partitioners",
    "context_selectors": "context_selectors",
    "contexts": "context_selectors",
    "objectives": "objectives",
    "decoders": "decoders",
    "datasets": "datasets",
    "methods": "methods",
    "optimizers": "optimizers",
    "schedules": "schedules",
    "loggers": "loggers",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as ContsupError (one line, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ContsupError(f"{self.prog}: {message} (see {self.prog} --help)")


def _registries(keep_clashes: bool = False):
    """The plugin manager and registries, load problems printed as warnings
    (:func:`contsup.core.registry.load_registries`, imported here, not at start-up)."""
    from contsup.core.registry import load_registries

    return load_registries(keep_clashes=keep_clashes)


def _recipe(args: argparse.Namespace):
    from contsup.config.recipe import load_recipe

    pm, registries = _registries()
    return pm, load_recipe(args.recipe, args.set or (), registries)


def cmd_validate(args: argparse.Namespace) -> int:
    _, recipe = _recipe(args)
    print(f"{args.recipe}: ok ({recipe.backbone.use}, K={recipe.partition.modules}, context {recipe.context.use}, {recipe.run.mode})")
    return 0


def _json_only(on: bool) -> Any:
    """With ``--json``, what plugins print while the command works goes to stderr: stdout holds the JSON alone."""
    import contextlib

    from contsup.core.output import stdout_to_stderr

    return stdout_to_stderr() if on else contextlib.nullcontext()


def cmd_plan(args: argparse.Namespace) -> int:
    from contsup.tools.plan import plan_data, plan_main

    if not args.json:
        _, recipe = _recipe(args)
        return plan_main(recipe, False)
    with _json_only(True):
        _, recipe = _recipe(args)
        data = plan_data(recipe)
    print(json.dumps(data, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """``contsup train RECIPE`` or ``--resume RUN_DIR``: :func:`contsup.api.train` does it all."""
    from contsup.api import train

    train(args.recipe, args.set or (), resume=args.resume, new=args.new, force=args.force)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """``contsup predict RUN IMAGES...``: :func:`contsup.tools.predict.predict` does it all."""
    from contsup.tools.predict import predict_main

    output = "json" if args.json else "csv" if args.csv else "table"
    with _json_only(args.json):
        registries = _registries()[1]
    return predict_main(args.run, args.images, registries, top_k=args.top_k, batch_size=args.batch_size,
                        device=args.device, output=output)


def cmd_sweep(args: argparse.Namespace) -> int:
    from contsup.tools.sweep import sweep_main

    _, registries = _registries()
    return sweep_main(args.sweep, registries, dry_run=args.dry_run)


def cmd_results(args: argparse.Namespace) -> int:
    from contsup.tools.results import results_main

    _, registries = _registries()
    return results_main(args.dirs, registries, csv_path=args.csv, md_path=args.markdown, error=args.error)


def cmd_eval(args: argparse.Namespace) -> int:
    from contsup.training.run_evaluation import evaluate_run

    with _json_only(args.json):
        _, registries = _registries()
        report = evaluate_run(
            Path(args.run_dir), args.data or (), args.device, registries,
            warn=lambda line: print(f"warning: {one_line(line)}", file=sys.stderr, flush=True),
        )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{report['run_dir']}: {report['weights']}; {report['dataset']} test set, {report['images']} images"
    )
    print(f"test error: {report['test_error_pct']:.2f}% (loss {report['test_loss']:.4f})")
    rows = [("module", "head", "test accuracy %")]
    k = len(report["local_acc_pct"])
    for i, acc in enumerate(report["local_acc_pct"], start=1):
        rows.append((str(i), "final" if i == k else "local", "-" if acc is None else f"{acc:.2f}"))
    print(format_table(rows))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from contsup.tools.probe import probe_main
    from contsup.tools.probe_options import ProbeOptions, check_options

    names = [f.name for f in attrs.fields(ProbeOptions)]
    values = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    options = check_options(values, flag=lambda n: "--" + n.replace("_", "-"))
    return probe_main(args.runs, options, args.modules, args.device, args.output, args.reuse)


def cmd_weights(args: argparse.Namespace) -> int:
    from contsup.tools.weights import weights_main

    return weights_main(args.run, args.output, args.raw)


def cmd_report(args: argparse.Namespace) -> int:
    from contsup.tools.report import report_main

    _, registries = _registries()
    return report_main(args.dirs, args.output, registries)


def cmd_profile(args: argparse.Namespace) -> int:
    from contsup.tools.profiling import profile_data, profile_text

    with _json_only(args.json):
        _, recipe = _recipe(args)
        if args.repeats < 1:
            raise ContsupError(f"contsup profile: --repeats must be >= 1, got {args.repeats}")
        print(f"profiling {args.recipe}: measuring every unit, head and adapter at batch {recipe.data.batch_size}", file=sys.stderr, flush=True)
        data = profile_data(recipe, repeats=args.repeats)
    print(json.dumps(data, indent=2) if args.json else profile_text(data, format_table))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Three benchmarks behind one command: inference cost of context (--inference), one
    process against N for a distributed recipe, else greedy against end-to-end training."""
    from contsup.tools.bench_command import bench_main

    if args.inference:
        from contsup.tools.inference import bench_inference_main

        _, registries = _registries()
        warmup = 1 if args.warmup is None else args.warmup
        return bench_inference_main(
            args.recipe, args.set or (), registries, args.device, args.repeats, warmup, args.batch_size, args.json
        )
    _, recipe = _recipe(args)
    return bench_main(args, recipe, _registries()[1] if args.variant else None)


def cmd_plugins(args: argparse.Namespace) -> int:
    from contsup.core.plugins import ALLOW_ENV
    from contsup.core.registry import KINDS

    with _json_only(args.json):
        pm, registries = _registries(keep_clashes=True)  # list everything, then report the clashes
    provided = registries.by_plugin()
    observers = {"on_run_start", "on_epoch_end", "on_run_end"}
    rows = []
    for name, info in pm.info.items():
        plugin = pm.get_plugin(name)
        hooks = sorted(c.name for c in (pm.get_hookcallers(plugin) or ())) if plugin is not None else []
        rows.append(
            {
                "name": name,
                "distribution": info.distribution,
                "version": info.version,
                "builtin": info.builtin,
                "entry_point": info.entry_point or None,
                "hooks": hooks,
                "registered": [{"kind": k, "name": n} for k, n in provided.get(name, [])],
            }
        )
    skipped = [
        {"name": i.name, "distribution": i.distribution, "version": i.version, "entry_point": i.entry_point}
        for i in pm.skipped
    ]
    status = 2 if registries.clashes else 0  # scripts must notice a clash: every other command stops on it
    if args.json:
        errors = [*pm.load_errors, *registries.clashes]
        print(json.dumps({"plugins": rows, "skipped": skipped, "errors": errors, "warnings": pm.warnings}, indent=2))
        return status
    plural = {kind: attr.replace("_", " ") for attr, kind in KINDS.items()}
    table = [("plugin", "distribution", "registered")]
    for row in rows:
        groups: dict[str, list[str]] = {}
        for item in row["registered"]:
            groups.setdefault(plural[item["kind"]], []).append(item["name"])
        parts = [f"{kind}: {', '.join(names)}" for kind, names in groups.items()]
        hooks = [h for h in row["hooks"] if h in observers]
        if hooks:
            parts.append(f"observers: {', '.join(hooks)}")
        table.append((row["name"], f"{row['distribution']} {row['version']}", "; ".join(parts) or "-"))
    print(format_table(table))
    for item in skipped:
        print(f"not loaded ({ALLOW_ENV} leaves it out): {item['name']} ({item['distribution']} {item['version']})")
    for line in registries.clashes:
        print(f"error: {line}", file=sys.stderr)
    return status


def cmd_list(args: argparse.Namespace) -> int:
    from contsup.options import describe_default, doc, field_types, type_name
    from contsup.config.validation import component_registry
    from contsup.tools.reference import summary

    kind = LIST_KINDS.get(args.kind)
    if kind is None:
        from contsup.suggest import did_you_mean

        raise ContsupError(f"contsup list: unknown kind '{args.kind}'; {did_you_mean(args.kind, LIST_KINDS)}")
    _, registries = _registries()
    registry = component_registry(kind, registries)
    for name in registry.names():
        entry = registry.entry(name)
        print(f"{name}  ({entry.plugin})  {summary(entry.component)}".rstrip())
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

    def recipe_command(name: str, help: str, optional: bool = False):
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("recipe", nargs="?" if optional else None, help="a TOML recipe file")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. --set optimizer.lr=0.05 (repeatable)")
        return p

    p = recipe_command("train", "train a recipe into a new run directory, or continue one with --resume", optional=True)
    p.add_argument("--new", action="store_true", help="if the run directory exists, use a fresh suffixed one")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run exactly from its newest usable checkpoint")
    p.add_argument("--force", action="store_true", help="with --resume: accept a recipe that differs from the run's")
    p.set_defaults(func=cmd_train)
    p = recipe_command("validate", "check a recipe and report every problem")
    p.set_defaults(func=cmd_validate)
    p = recipe_command("plan", "show each module's units, context sources, parameters and shapes")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("sweep", help="train every combination of a sweep file (finished runs are skipped)")
    p.add_argument("sweep", help="a sweep file: [sweep] recipes, out_dir and [axes]")
    p.add_argument("--dry-run", action="store_true", help="print one contsup train command per unfinished run instead")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("results", help="mean ± std test error per configuration of finished runs, beside the paper's")
    p.add_argument("dirs", nargs="+", help="run directories or folders holding them (searched recursively)")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    p.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    p.add_argument(
        "--error", choices=("final", "best"), default="final",
        help="which test error the table shows: each run's final epoch's (default) or its best over the epochs "
        "(the official code's); the CSV has both",
    )
    p.set_defaults(func=cmd_results)
    p = sub.add_parser("eval", help="test error and every local head's accuracy of a run", description=(
        "Evaluate a run's model.pt (or, for an unfinished run, its newest checkpoint) on the test set."
    ))
    p.add_argument("run_dir", help="a run directory written by contsup train")
    p.add_argument("--data", action="append", metavar="KEY=VALUE", help="override a key of the run's [data] table, e.g. --data root=/data/cifar (repeatable)")
    p.add_argument("--device", help='evaluate on this device (default: the recipe\'s run.device)')
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("predict", help="classify image files with a trained run (top-k classes and scores)")
    p.add_argument("run", help="a run directory written by contsup train")
    p.add_argument("images", nargs="+", help="image files, or folders searched for them recursively")
    formats = p.add_mutually_exclusive_group()
    formats.add_argument("--json", action="store_true", help="print JSON (default: a table)")
    formats.add_argument("--csv", action="store_true", help="print CSV (default: a table)")
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="the K most likely classes of each image (default 1)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", help="predict on this device (default: the recipe's run.device)")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("probe", help="estimate the task-relevant information I(h_l, y) of every module of finished runs")
    p.add_argument("runs", nargs="+", help="run directories (several are drawn in one figure)")
    p.add_argument("-o", "--output", metavar="PNG", help="the figure (default RUN_DIR/probe.png for one run, ./probe.png for several)")
    p.add_argument("--modules", metavar="LIST", help="modules to probe, e.g. 0,4,8-16 (0 = the input x; default all)")
    p.add_argument("--device", default="auto", help='"auto", "cpu" or "cuda"')
    p.add_argument("--reuse", action="store_true", help="reuse a run's probe.json made with the same options")
    from contsup.tools.probe_options import ProbeOptions

    for f in attrs.fields(ProbeOptions):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), metavar="N" if type(f.default) is int else "X",
                       help=f"{f.metadata['doc']} (default {f.default})")
    p.set_defaults(func=cmd_probe)
    p = sub.add_parser("weights", help="heat map of the context adapters' weights (source x destination)")
    p.add_argument("run", help="a finished run directory")
    p.add_argument("-o", "--output", metavar="PNG", help="the figure (default RUN_DIR/weights.png)")
    p.add_argument("--raw", action="store_true", help="do not fold a following batch norm into the weights")
    p.set_defaults(func=cmd_weights)
    p = sub.add_parser("report", help="plots and a Markdown page from finished runs and sweep folders")
    p.add_argument("dirs", nargs="+", help="run directories or folders holding them (searched recursively)")
    p.add_argument("-o", "--output", default="report", metavar="DIR", help="output folder (default report/)")
    p.set_defaults(func=cmd_report)
    p = recipe_command("profile", "measure per unit and per module the bytes kept for backward and the time")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per piece, after one warm-up (default 3)")
    p.set_defaults(func=cmd_profile)
    p = recipe_command(
        "bench",
        "benchmarks: greedy against end-to-end training (memory, step time); with a distributed recipe, "
        "one process against --nproc under torchrun; with --inference, inference with and without context",
    )
    p.add_argument("--inference", action="store_true", help="time inference over the test set with and without the context adapters; RECIPE may also be a run directory")
    p.add_argument("--steps", type=int, default=20, help="training: timed steps of each, alternating (default 20)")
    p.add_argument("--warmup", type=int, help="untimed steps (training, default 3) or passes (--inference, default 1) first")
    p.add_argument("--baseline", choices=("backbone", "recipe"), default="backbone",
                   help="training: the end-to-end side is the plain backbone (default) or the recipe's network with its adapters")
    p.add_argument("--segments", default="auto", metavar="auto|none|S,S,..",
                   help="training: also end-to-end under activation checkpointing over S groups of units; auto tries 2, 4, 8, K and sqrt(units) (default auto)")
    p.add_argument("--variant", action="append", metavar="LABEL:KEY=VALUE[;KEY=VALUE..]",
                   help="training: also measure the recipe's greedy training with these overrides, labelled LABEL "
                        "(repeatable), e.g. 'DGL:context.use=none'")
    p.add_argument("--recompute", action="store_true",
                   help="training: also the variant context.recompute, the recipe's greedy training with context.recompute = true (the context adapters run again in backward)")
    p.add_argument("--out", help="training: output path without suffix, writes PATH.json, PATH.md and, with checkpointing or variants, the memory-versus-time figure PATH.png (default bench/<recipe name>); distributed: output folder")
    p.add_argument("--nproc", type=int, default=2, help="distributed recipe: processes of the distributed run (default 2)")
    p.add_argument("--device", default="", help="--inference: device (default: the recipe's run.device)")
    p.add_argument("--repeats", type=int, default=5, help="--inference: timed passes of each kind; the median is reported (default 5)")
    p.add_argument("--batch-size", type=int, help="--inference: test batch size (default: the recipe's)")
    p.add_argument("--json", metavar="FILE", help="--inference: also write the timings as JSON")
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
    from contsup.core import console

    argv = list(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):
        console.lenient_encoding(stream)  # a path with é under an ASCII locale is escaped, not a crash
    console.ignore_file_size_signal()  # past ulimit -f, a refused write (one line) instead of SIGXFSZ
    _line_buffered()
    original = sys.stdout
    if argv[:1] in (["train"], ["sweep"]) and sys.stdout is not None:
        sys.stdout = console.LenientOutput(sys.stdout)  # a run is never stopped by the lines it prints
    try:
        code = _run(argv, console)
        lost = console.finish_output()
        if lost is not None:
            print(f"error: {lost}", file=sys.stderr, flush=True)
            code = code or 1
        return code
    finally:
        if isinstance(sys.stdout, console.LenientOutput):
            sys.stdout = original


def _run(argv: list[str], console: Any) -> int:
    """The command ``argv``; what it raises that a user should read as one line, as one line."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except (ContsupError, KeyboardInterrupt, OSError) as exc:
        if isinstance(exc, OSError) and exc.filename is None and exc.errno in console.LOST_OUTPUT:
            print(f"error: cannot write standard output ({exc.strerror}); what the command printed is lost",
                  file=sys.stderr, flush=True)
            console.finish_output()  # said once: what is still buffered is dropped, not reported again
            return 1
        return report_failure(exc)
    except UnicodeEncodeError as exc:  # a path with é where file names are ASCII (PYTHONUTF8=0 under LC_ALL=C)
        if exc.encoding.lower().replace("-", "") != sys.getfilesystemencoding().lower().replace("-", ""):
            raise
        return console.report_unencodable(exc)
    except Exception as exc:  # inside a third-party plugin's own code: one line naming it
        code = console.report_blamed(exc)
        if code is None:
            raise
        return code


def _line_buffered() -> None:
    """Flush standard output at every line, as a terminal does, also into a pipe or a file: a
    warning on standard error then stands where it was printed, not before every line of a
    command's output (what ``contsup plan 2>&1 | less`` or a test reads)."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and not sys.stdout.line_buffering:
        try:
            reconfigure(line_buffering=True)
        except (ValueError, OSError):  # a stream that cannot change (closed, or not a text file)
            pass
