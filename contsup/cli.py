"""The ``contsup`` command. Problems with the user's input print one line each and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import attrs

from contsup.errors import ContsupError, one_line, report_failure

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


def plan_data(recipe: Any) -> dict:
    """What ``contsup plan --json`` prints: per module its units, sources, parameters, shapes."""
    import torch

    from contsup.model.memory import backlink_spans, plan_memory
    from contsup.model.network import build_network, count_params

    torch.manual_seed(recipe.run.seed)
    built = build_network(recipe)
    k = len(built.plans)
    link = recipe.backlink.units if recipe.run.mode == "greedy" else 0
    spans = backlink_spans([p.units for p in built.plans], link)
    modules = []
    for plan, m in zip(built.plans, built.network.blocks):
        stage = recipe.stage(plan.index)
        last = plan.index == k
        w_rec, w_local = m.weights
        details = []
        for s in plan.sources:
            adapter = m.adapters[str(s)]
            details.append(
                {
                    "name": str(s),
                    "adapter": getattr(adapter, "adapter_kind", None) or type(adapter).__name__,
                    "class": type(adapter).__name__,
                    "params": count_params(adapter),
                    "source_shape": list(built.info.input_shape if s.is_input else built.plans[s.index].input_shape),
                }
            )
        split = {
            "body": count_params(m.body),
            "head": count_params(m.head),
            "adapters": count_params(m.adapters),
            "decoder": count_params(m.decoder) if m.decoder is not None else 0,
        }
        modules.append(
            {
                "index": plan.index,
                "units": plan.units,
                "unit_range": list(plan.unit_range),
                "sources": [str(s) for s in plan.sources],
                "source_details": details,
                "params": count_params(m),
                "params_split": split,
                "input_shape": list(plan.input_shape),
                "output_shape": list(plan.output_shape),
                "context": stage.context.use,
                "objective": "cross_entropy (backbone head)" if last else stage.objective.use,
                "head": "backbone" if last else getattr(stage.objective.options, "head", type(m.head).__name__),
                "decoder": None if last or stage.decoder is None else stage.decoder.use,
                "weights": {"reconstruction": w_rec, "local": w_local},
                "auglocal": _auglocal_entry(m.head, built.unit_shapes),
                "backlink": None if spans[plan.index - 1] is None else {
                    "units": spans[plan.index - 1][1] - spans[plan.index - 1][0] + 1,
                    "unit_range": list(spans[plan.index - 1]),
                    "trained_by": plan.index + 1,
                },
            }
        )
    memory = plan_memory(recipe, built.network, built.plans, [p.units for p in built.plans])
    for entry, mem in zip(modules, memory.modules):
        entry["memory"] = {
            "bytes": mem.bytes, "adapter_bytes": mem.adapter_bytes, "body_bytes": mem.body_bytes,
            "body_flops": mem.body_flops, "adapter_flops": mem.adapter_flops, "backlink_bytes": mem.backlink_bytes,
            "head_bytes": mem.head_bytes,
        }
    return {
        "backbone": recipe.backbone.use,
        "input_shape": list(built.info.input_shape),
        "num_units": len(built.unit_shapes),
        "modules": modules,
        "recompute": {"adapters": recipe.context_options.recompute, "head": recipe.context_options.recompute_head},
        "memory": {
            "batch_size": memory.batch, "measured_batch": memory.measured_batch,
            "units_bytes": memory.units_bytes, "largest_module_bytes": max(m.bytes for m in memory.modules),
            "notes": list(memory.notes),
        },
    }


def _auglocal_entry(head: Any, unit_shapes: Sequence[Any]) -> dict | None:
    """What the plan says of an AugLocal head (one built from copies of later units): its depth,
    the units it copies with their output shapes, and its parameters; None for any other head."""
    inner = next((s for s in head.modules() if hasattr(s, "sampled") and hasattr(s, "depth")), None)
    if inner is None:
        return None
    return {
        "depth": int(inner.depth),
        "units": [int(u) for u in inner.sampled],
        "unit_shapes": [list(unit_shapes[u]) for u in inner.sampled],
        "params": sum(p.numel() for p in head.parameters()),
    }


def _print_auglocal(modules: Sequence[dict]) -> None:
    """The plan's AugLocal table: per local module, its head's depth, copied units, parameters and memory."""
    rows = [("module", "depth", "copies of units (output shape)", "head params", "head memory (MiB)")]
    for m in modules:
        a = m["auglocal"]
        if a is None:
            continue
        copied = ", ".join(f"{u} ({_shape(s)})" for u, s in zip(a["units"], a["unit_shapes"]))
        rows.append((str(m["index"]), str(a["depth"]), copied, f"{a['params']:,}", _mib(m["memory"]["head_bytes"])))
    print("auglocal heads: fresh copies (own weights, reinitialised) of later backbone units, then pool + linear:")
    print(_table(rows))
    print()


def cmd_plan(args: argparse.Namespace) -> int:
    _, recipe = _recipe(args)
    data = plan_data(recipe)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    varied = bool(recipe.stages) or recipe.decoder is not None
    header = ["module", "units", "unit range", "sources", "params", "output shape"]
    if varied:
        header += ["context", "objective", "head", "decoder (w_rec, w_local)"]
    linked = any(m["backlink"] for m in data["modules"])
    if linked:
        header.append("backlink")
    rows = [tuple(header)]
    for m in data["modules"]:
        w = m["weights"]
        row = [
            str(m["index"]),
            str(m["units"]),
            f"{m['unit_range'][0]}-{m['unit_range'][1]}",
            ", ".join(m["sources"]) or "-",
            f"{m['params']:,}",
            "x".join(str(d) for d in m["output_shape"]),
        ]
        if varied:
            decoder = f"{m['decoder']} ({w['reconstruction']:g}, {w['local']:g})" if m["decoder"] else "-"
            row += [m["context"], m["objective"], m["head"], decoder]
        if linked:
            b = m["backlink"]
            row.append(f"{b['unit_range'][0]}-{b['unit_range'][1]} (+ loss {b['trained_by']})" if b else "-")
        rows.append(tuple(row))
    context = "per [[modules]] range" if recipe.stages else recipe.context.use
    print(
        f"{data['backbone']}: {data['num_units']} units, input "
        f"{'x'.join(str(d) for d in data['input_shape'])}, {len(data['modules'])} modules, context {context}"
    )
    print(_table(rows))
    total = sum(m["params"] for m in data["modules"])
    print(f"total parameters: {total:,}")
    if any(m["backlink"] for m in data["modules"]):
        n = recipe.backlink.units
        print(f"backlink: the loss of module l+1 also trains the last {n} unit{'s' if n != 1 else ''} of module l "
              f"(column \"backlink\": those units); earlier units and all context stay isolated")
    if not varied and len(data["modules"]) > 1:
        first = data["modules"][0]
        print(f"local objective of modules 1..{len(data['modules']) - 1}: {first['objective']}, head {first['head']}")
    print()
    parts = "body + head + adapters" + (" + decoder" if any(m["params_split"]["decoder"] for m in data["modules"]) else "")
    print(f"each module's input shape, the adapter serving each source, and params = {parts}:")
    print(_table(_detail_rows(data["modules"])))
    print()
    if any(m["auglocal"] for m in data["modules"]):
        _print_auglocal(data["modules"])
    _print_memory(data, recipe)
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def _print_memory(data: dict, recipe: Any) -> None:
    """The plan's third part: what training each module keeps for backward, against end to end,
    and one warning line when context adapters cost more than the bodies they feed."""
    mem = data["memory"]
    print(f"activation memory kept for backward at batch {mem['batch_size']} (MiB):")
    linked = any(m["memory"]["backlink_bytes"] for m in data["modules"])
    recompute = data["recompute"]["adapters"]
    rows = [("module", "training", "its adapters", "its units", "MFLOPs per image: body / adapters")]
    if linked:
        rows[0] += ("backlink (in training)",)
    for m in data["modules"]:
        x = m["memory"]
        flops = f"{x['body_flops'] / 1e6:,.1f} / {x['adapter_flops'] / 1e6:,.1f}"
        row = (str(m["index"]), _mib(x["bytes"]), _mib(x["adapter_bytes"]), _mib(x["body_bytes"]), flops)
        row += (_mib(x["backlink_bytes"]),) if linked else ()
        rows.append(row)
    print(_table(rows))
    if recompute or data["recompute"]["head"]:
        pieces = " and ".join(p for p, on in (("context adapters", recompute), ("heads", data["recompute"]["head"])) if on)
        counted = "; ".join(c for c, on in (
            ("\"training\" counts the adapters' inputs, not their own activations (\"its adapters\")", recompute),
            ("\"training\" still counts the heads' activations", data["recompute"]["head"]),
        ) if on)
        print(f"context.recompute: the {pieces} keep only their inputs through the forward and run again in backward, "
              f"one at a time ({counted}; contsup bench --recompute measures the peak)")
    if linked:
        print("backlink: each module's training figure includes the linked units of the module before it, kept "
              "until its backward (estimated from their measurements)")
    units, largest = mem["units_bytes"], mem["largest_module_bytes"]
    ratio = f" ({largest / units:.2f}x)" if units else ""
    print(f"largest module: {_mib(largest)} MiB{ratio}; every unit at once, as end-to-end training keeps them: {_mib(units)} MiB")
    for note in mem["notes"]:
        print(f"note: {note}", file=sys.stderr)
    heavy = [m for m in data["modules"] if m["memory"]["adapter_bytes"] > m["memory"]["body_bytes"]
             or m["memory"]["adapter_flops"] > m["memory"]["body_flops"]]
    if heavy:
        worst = max(heavy, key=lambda m: m["memory"]["adapter_bytes"])["memory"]
        names = _span([m["index"] for m in heavy])
        options = getattr(recipe.context, "options", None)
        remedies = []
        if getattr(options, "encoder", "fast") != "fast":
            remedies.append('context.encoder = "fast" (pool x to the module\'s size first, then one conv)')
        if getattr(options, "shortcut", "paper") == "official":
            remedies.append('context.shortcut = "paper" (pool first, then the 1x1 conv)')
        cheaper = "set " + " and ".join(remedies) if remedies else "choose a cheaper adapter for these modules"
        if not recipe.context_options.recompute:
            cheaper += "; or, for memory alone and the same training, context.recompute = true (the adapters run again in backward)"
        print(
            f"warning: the context adapters of module{'s' if len(heavy) > 1 else ''} {names} cost more memory or "
            f"arithmetic than the module's body (the largest: {_mib(worst['adapter_bytes'])} MiB against "
            f"{_mib(worst['body_bytes'])} MiB); {cheaper}",
            file=sys.stderr,
        )


def _span(indices: Sequence[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    parts, start = [], None
    for i, k in enumerate(indices):
        if start is None:
            start = k
        if i + 1 == len(indices) or indices[i + 1] != k + 1:
            parts.append(str(start) if start == k else f"{start}-{k}")
            start = None
    return ", ".join(parts)


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _detail_rows(modules: Sequence[dict]) -> list[tuple[str, ...]]:
    """The second table of ``contsup plan``: each module's input shape, the adapter serving each
    source with its parameter count, and the module's parameters split into its parts."""
    decoders = any(m["params_split"]["decoder"] for m in modules)
    header = ["module", "input shape", "sources (adapter, params)", "body", "head", "adapters"]
    header += ["decoder"] if decoders else []
    rows = [tuple(header)]
    for m in modules:
        split = m["params_split"]
        context = ", ".join(f"{d['name']} ({d['adapter']}, {d['params']:,})" for d in m["source_details"])
        row = [str(m["index"]), _shape(m["input_shape"]), context or "-", f"{split['body']:,}", f"{split['head']:,}", f"{split['adapters']:,}"]
        row += [f"{split['decoder']:,}"] if decoders else []
        rows.append(tuple(row))
    return rows


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    """``contsup train RECIPE`` or ``--resume RUN_DIR``: :func:`contsup.api.train` does it all."""
    from contsup.api import train

    train(args.recipe, args.set or (), resume=args.resume, new=args.new, force=args.force)
    return 0


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
    print(_table(rows))
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

    _, recipe = _recipe(args)
    if args.repeats < 1:
        raise ContsupError(f"contsup profile: --repeats must be >= 1, got {args.repeats}")
    print(f"profiling {args.recipe}: measuring every unit, head and adapter at batch {recipe.data.batch_size}", file=sys.stderr, flush=True)
    data = profile_data(recipe, repeats=args.repeats)
    print(json.dumps(data, indent=2) if args.json else profile_text(data, _table))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Three benchmarks behind one command: inference cost of context (--inference), one
    process against N for a distributed recipe, else greedy against end-to-end training."""
    if args.inference:
        from contsup.tools.inference import bench_inference_main

        _, registries = _registries()
        warmup = 1 if args.warmup is None else args.warmup
        return bench_inference_main(
            args.recipe, args.set or (), registries, args.device, args.repeats, warmup, args.batch_size, args.json
        )
    _, recipe = _recipe(args)
    if recipe.distributed.mode != "none":
        return _bench_distributed(args, recipe)
    from contsup.tools.bench import bench_figure, bench_markdown, bench_rows, configuration_rows, run_bench
    from contsup.training.rundir import atomic_write

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
    variants = _variants(args, recipe)
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
    print(_table([("figure", "end-to-end", "greedy", "greedy / e2e"), *bench_rows(result)]))
    if configurations:
        print()
        print(_table([("configuration", "peak MiB", "peak / e2e", "step ms", "step / e2e"), *configuration_rows(result)]))
        print(f"wrote {json_path}, {md_path} and {png_path}")
    else:
        print(f"wrote {json_path} and {md_path}")
    return 0


def _variants(args: argparse.Namespace, recipe: Any) -> list[tuple[str, Any]]:
    """--variant "LABEL:key=value;key=value": the recipe (with its --set) and those overrides too,
    measured beside it; it must keep the recipe's data and backbone (the bench feeds all the same batches)."""
    from contsup.config.recipe import RecipeError, load_recipe

    out = []
    registries = _registries()[1] if args.variant else None
    for text in args.variant or ():
        label, colon, rest = text.partition(":")
        sets = [part.strip() for part in rest.split(";") if part.strip()]
        if not colon or not label.strip() or not sets:
            raise ContsupError(
                f"contsup bench: --variant {text!r}: expected LABEL:key=value[;key=value...], such as "
                f"'BackLink:context.use=none;backlink.units=1'"
            )
        try:
            variant = load_recipe(args.recipe, [*(args.set or ()), *sets], registries)
        except RecipeError as exc:
            raise ContsupError(f"contsup bench: --variant {text!r}: {'; '.join(exc.problems)}") from None
        if variant.data != recipe.data or variant.backbone != recipe.backbone or variant.run.mode != "greedy":
            raise ContsupError(
                f"contsup bench: --variant {text!r} changes the data, the backbone or run.mode; a variant "
                f"trains greedily on the recipe's batches: change context, objective, partition or backlink keys"
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
    from contsup.tools.distributed_bench import compare, format_comparison
    from contsup.training.rundir import atomic_write

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


def cmd_plugins(args: argparse.Namespace) -> int:
    from contsup.core.plugins import ALLOW_ENV
    from contsup.core.registry import KINDS

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
    print(_table(table))
    for item in skipped:
        print(f"not loaded ({ALLOW_ENV} leaves it out): {item['name']} ({item['distribution']} {item['version']})")
    for line in registries.clashes:
        print(f"error: {line}", file=sys.stderr)
    return status


def cmd_list(args: argparse.Namespace) -> int:
    from contsup.options import describe_default, doc, field_types, type_name
    from contsup.config.recipe import component_registry
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
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except (ContsupError, KeyboardInterrupt, OSError) as exc:
        return report_failure(exc)
