"""Running lmms-eval tasks as papers report them: one ``simple_evaluate`` call for the bridge (an in-memory
model, :mod:`evaluation.lmms_bridge`) and for lmms-eval's own ("stock") model class of a family, which
loads a saved folder itself, so its numbers are comparable with published tables.

A run's settings (:class:`LmmsRun`) are lmms-eval's: ``limit`` docs per task, ``bootstrap_iters`` for the
standard errors (0: none; for mean metrics lmms-eval's stderr is the closed form, others are
bootstrapped), ``log_samples`` and ``output_path``, where lmms-eval's own files are written:
``<output_path>/<model>/<date>_results.json`` and, with ``log_samples``, ``<date>_samples_<task>.jsonl``.
They are written into a hidden folder first and moved in when complete (the results file last), so a
failed run leaves nothing half-written. Under several processes (:mod:`evaluation.processes`) process 0
alone writes, and every process returns the same scores.

Example::

    run = LmmsRun(limit=100, bootstrap_iters=1000, log_samples=True, output_path=Path("logs"))
    scores = run_stock_tasks(stock_model("qwen2_vl", "pruned/atv-50"), ["mme"], run=run)
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pruning.errors import ConfigError, ToolkitError
from pruning.io import LoadOptions
from pruning.options import check_seed

from . import processes
from .install import INSTALL_HINT

log = logging.getLogger(__name__)

# transformers model_type -> lmms-eval's model class for that family (``--lmms-model auto``). Only classes
# that load that model_type from a local folder; lmms-eval's qwen3_vl picks its MoE class from the folder
# *name* (``A3B``), so a pruned Qwen3-VL MoE folder is not listed: name its class yourself.
STOCK_MODELS = {
    "llava": "llava_hf", "llava_next": "llava_hf", "llava_onevision": "llava_hf",
    "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl",
    "gemma3": "gemma3", "idefics2": "idefics2", "mistral3": "mistral3_vl", "internvl": "internvl_hf",
}
AUTO = "auto"
BRIDGE = "atv"  # the bridge's own name in lmms-eval (lmms_bridge.MODEL_NAME); a stock class is any other


@dataclass(frozen=True)
class LmmsRun:
    """lmms-eval's run settings (the names of its ``simple_evaluate`` arguments)."""

    limit: int | None = None  # at most this many docs per task (a smoke test; published numbers use all)
    bootstrap_iters: int = 0  # standard errors: 0 = none (lmms-eval's own default is 100000)
    log_samples: bool = False  # keep every doc's prompt, response and score (written into output_path)
    output_path: Path | None = None  # lmms-eval's results folder
    seed: int = 0  # python/numpy/torch/few-shot seeds

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.bootstrap_iters < 0:
            raise ConfigError(f"bootstrap_iters must be >= 0 (0: no standard errors), got {self.bootstrap_iters}")
        check_seed(self.seed)
        if self.log_samples and self.output_path is None:
            raise ConfigError("--log-samples writes one samples file per task into --output-path; give "
                              "--output-path DIR")
        if self.output_path is not None:
            object.__setattr__(self, "output_path", Path(self.output_path))
            if self.output_path.exists() and not self.output_path.is_dir():
                raise ConfigError(f"--output-path {str(self.output_path)!r} is a file; lmms-eval writes a folder "
                                  "there (give a folder)")


@dataclass
class LmmsScore:
    """One lmms-eval task's outcome: its main metric and every metric (filter ',none' dropped)."""

    name: str
    metric: str
    score: float
    metrics: dict[str, float] = field(default_factory=dict)
    n: int | None = None
    stderr: float | None = None  # the main metric's standard error (with bootstrap_iters > 0)


def task_manager(include_path: Sequence[str | Path] = (), include_defaults: bool = True):
    """An lmms-eval TaskManager over its own tasks (``include_defaults``) and the folders in ``include_path``."""
    from lmms_eval.tasks import TaskManager

    paths = [str(Path(p).resolve()) for p in include_path] or None
    if paths:
        missing = [p for p in paths if not Path(p).is_dir()]
        if missing:
            raise ConfigError(f"lmms-eval task folder(s) {missing} do not exist")
    return TaskManager("WARNING", include_path=paths, include_defaults=include_defaults)


# -- scores (pure) -------------------------------------------------------------------------------------


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def task_score(name: str, out: dict[str, Any]) -> LmmsScore:
    """The main metric (first of the task's ``metric_list`` that it reported), every numeric metric and the
    main metric's stderr, from ``simple_evaluate``'s output."""
    results = out["results"].get(name)
    if results is None:
        raise ToolkitError(f"lmms-eval returned no results for {name!r} (it returned {sorted(out['results'])})")
    values, stderrs = {}, {}
    for key, value in results.items():
        metric, _, filt = key.partition(",")
        if not filt or not _number(value):
            continue
        label = metric if filt == "none" else key
        if metric.endswith("_stderr"):
            stderrs[label.replace("_stderr", "", 1)] = float(value)
        elif "_stderr" not in metric:
            values[label] = float(value)
    metric_list = out.get("configs", {}).get(name, {}).get("metric_list") or []
    names = [m["metric"] for m in metric_list if isinstance(m.get("metric"), str)]
    main = next((m for m in names if m in values), next(iter(values), None))
    if main is None:
        raise ToolkitError(f"lmms-eval task {name!r} reported no numeric metric (got {sorted(results)})")
    n = out.get("n-samples", {}).get(name, {}).get("effective")
    return LmmsScore(name, main, values[main], values, n, stderrs.get(main))


# -- one evaluation ------------------------------------------------------------------------------------


def check_tasks(manager, tasks: Sequence[str]) -> None:
    """Refuse task names that ``manager`` does not know, naming them."""
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lmms-eval task(s) {unknown}; list them with `lmms-eval --tasks list`, or add "
                          "their folder with --lmms-include")


def evaluate_tasks(model: Any, tasks: Sequence[str], *, manager=None, run: LmmsRun | None = None,
                   model_args: str = "", batch_size: int | None = None, device: str | None = None,
                   force_simple: bool = False) -> list[LmmsScore]:
    """``simple_evaluate`` on ``model`` (an lmms-eval model object, or a registered model name whose class
    gets ``model_args``); one score per task, on every process. ``model_args`` also names the model in the
    written files (``pretrained=...``)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.utils import get_datetime_str

    run = run or LmmsRun()
    manager = manager if manager is not None else task_manager()
    check_tasks(manager, tasks)
    stage = _stage(run.output_path) if run.output_path is not None and processes.is_main() else None
    try:
        tracker = EvaluationTracker(output_path=str(stage)) if stage is not None else None
        date = get_datetime_str()  # lmms-eval's default is fixed when it is imported
        out = simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), task_manager=manager,
                              batch_size=batch_size, device=device, force_simple=force_simple, limit=run.limit,
                              bootstrap_iters=run.bootstrap_iters, log_samples=run.log_samples,
                              evaluation_tracker=tracker, datetime_str=date, random_seed=run.seed,
                              numpy_random_seed=run.seed, torch_random_seed=run.seed, fewshot_random_seed=run.seed,
                              distributed_executor_backend=_executor_backend())
        if out is None and processes.launched_processes() == 1:  # lmms-eval returns None on processes > 0
            raise ToolkitError("lmms-eval returned no results")
        scores = [task_score(name, out) for name in tasks] if out is not None else None
        scores = processes.share_from_main(scores)
        if stage is not None:
            _save(tracker, out, run, date)
            _move_in(stage, run.output_path)
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    return scores


def _stage(output_path: Path) -> Path:
    """A new hidden folder inside ``output_path`` for lmms-eval's files until they are complete."""
    output_path.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".atv-lmms-partial-{os.getpid()}-", dir=output_path))


def _save(tracker, out: dict[str, Any], run: LmmsRun, date: str) -> None:
    """lmms-eval's own writers (as its command line calls them); they log and swallow their errors, so the
    results file is checked for."""
    out = dict(out)
    samples = out.pop("samples", None) if run.log_samples else None
    out.pop("samples", None)
    tracker.save_results_aggregated(results=out, samples=samples, datetime_str=date)
    for task, task_samples in (samples or {}).items():
        tracker.save_results_samples(task_name=task, samples=task_samples)
    if not any(Path(tracker.output_path).rglob("*_results.json")):
        raise ToolkitError(f"lmms-eval could not write its results into --output-path {str(run.output_path)!r} "
                           "(see its log above); nothing was written")


def _move_in(stage: Path, output_path: Path) -> None:
    """Move the staged files to the same places under ``output_path``, the results file last; an existing
    file is never replaced."""
    files = sorted((p for p in stage.rglob("*") if p.is_file()), key=lambda p: p.name.endswith("_results.json"))
    targets = [output_path / p.relative_to(stage) for p in files]
    taken = [str(t) for t in targets if t.exists()]
    if taken:
        raise ToolkitError(f"--output-path already holds {taken} (a run of the same model in the same second); "
                           "run again")
    for source, target in zip(files, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)


# -- lmms-eval's stock model classes -------------------------------------------------------------------


def stock_model_name(name: str, model_type: str | None) -> str:
    """``name``, or with ``auto`` the family's class for ``model_type`` (see :data:`STOCK_MODELS`)."""
    if name != AUTO:
        if name == BRIDGE:
            raise ConfigError(f"--lmms-model {BRIDGE} is the toolkit's bridge, which scores lmms-eval tasks "
                              "without --lmms-model; drop it, or name lmms-eval's class for the family "
                              f"(e.g. {', '.join(sorted(set(STOCK_MODELS.values())))})")
        return name
    if model_type not in STOCK_MODELS:
        raise ConfigError(f"--lmms-model auto knows no lmms-eval class for model_type {model_type!r} (it knows "
                          f"{sorted(STOCK_MODELS)}); name the class, e.g. --lmms-model llava_hf")
    return STOCK_MODELS[model_type]


def stock_model_class(name: str, force_simple: bool = False) -> type:
    """lmms-eval's class for ``name`` (as ``lmms-eval --model NAME`` resolves it: its chat class when it has
    one, unless ``force_simple``), imported now so that a missing dependency is named before any loading."""
    try:
        from lmms_eval import models
    except ImportError as err:
        raise ToolkitError(f"--lmms-model needs lmms-eval ({err}); {INSTALL_HINT}") from None
    registry = models.MODEL_REGISTRY_V2
    if name not in registry.list_model_names():
        raise ConfigError(f"--lmms-model {name!r} is not an lmms-eval model name; e.g. "
                          f"{', '.join(sorted(set(STOCK_MODELS.values())))} (or auto: the family's own)")
    try:
        return registry.get_model_class(name, force_simple=force_simple)
    except ImportError as err:
        raise ToolkitError(f"lmms-eval's model class {name!r} cannot be imported ({err}); it needs lmms-eval's "
                           "own dependencies: pip install lmms-eval (or the missing package)") from None


# set by our flags (trust_remote_code too: whether a folder's Python runs is --trust-remote-code's call alone)
def _executor_backend() -> str:
    """lmms-eval's collectives under several processes: torch.distributed's own ('torchrun'), in the process
    group accelerate set up. Its 'accelerate' path gathers each process's request count as a 0-d tensor,
    which torch 2.15 hands back 0-d (lmms-eval 0.7.3 then fails iterating an int); one process keeps lmms-eval's
    default."""
    return "torchrun" if processes.launched_processes() > 1 else "accelerate"


OWN_ARGS = {"pretrained": "--model", "device": "--device", "device_map": "--device-map",
            "trust_remote_code": "--trust-remote-code"}


def parse_model_args(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` -> a dict (lmms-eval's ``--model_args`` form); bad entries, and keys that the toolkit's
    own flags set, are refused."""
    args: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = entry.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--lmms-model-args entries look like key=value (comma-separated), got {entry!r}")
        if key in OWN_ARGS:
            raise ConfigError(f"--lmms-model-args {key}= is set by {OWN_ARGS[key]}; give that flag instead")
        args[key] = value.strip()
    return args


def stock_model_args(cls: type, pretrained: str, load: LoadOptions, device: str | None,
                     extra: dict[str, str] | None = None) -> dict[str, Any]:
    """The keyword arguments ``cls(...)`` gets: the folder, and of the toolkit's loading options only those
    that ``cls`` declares (its other ``**kwargs`` are often refused); ``extra`` is passed as given and wins.
    ``trust_remote_code`` is always our flag's value (some classes default it to True)."""
    if "trust_remote_code" in (extra or {}):
        raise ConfigError("model_args trust_remote_code= is set by the loading options (LoadOptions.trust_remote_code, "
                          "--trust-remote-code); give it there instead")
    declared = inspect.signature(cls.__init__).parameters
    placement = load.device or device
    wanted: dict[str, Any] = {"pretrained": pretrained, "trust_remote_code": load.trust_remote_code,
                              "revision": load.revision, "dtype": None if load.dtype == "auto" else load.dtype,
                              "device": placement, "device_map": load.device_map or placement}
    args = {k: v for k, v in wanted.items() if v is not None and k in declared}
    return {**args, **(extra or {})}


def format_model_args(args: dict[str, Any]) -> str:
    """A dict -> lmms-eval's ``k=v,...`` string (values may not hold a comma: lmms-eval could not parse it)."""
    bad = {k: v for k, v in args.items() if "," in str(v)}
    if bad:
        raise ConfigError(f"lmms-eval model_args cannot hold a comma: {bad}; rename the folder or drop the value")
    return ",".join(f"{k}={v}" for k, v in args.items())


@dataclass(frozen=True)
class StockModel:
    """lmms-eval's class ``name`` on a saved folder: what ``lmms-eval --model NAME --model_args ...`` runs."""

    name: str
    model_args: str  # lmms-eval's k=v,... string (pretrained=FOLDER first)
    batch_size: int = 1  # lmms-eval's default; several stock chat classes accept only 1
    force_simple: bool = False


def stock_model(name: str, pretrained: str | Path, *, load: LoadOptions | None = None,
                extra_args: dict[str, str] | None = None, force_simple: bool = False) -> StockModel:
    """Resolve (and import) lmms-eval's class ``name`` and build its arguments, before anything is loaded.
    ``extra_args`` (``--lmms-model-args``) may set ``batch_size`` and any argument the class takes."""
    cls = stock_model_class(name, force_simple)
    extra = dict(extra_args or {})
    try:
        batch_size = int(extra.pop("batch_size", 1))
    except ValueError:
        raise ConfigError(f"--lmms-model-args batch_size must be an integer, got "
                          f"{extra_args['batch_size']!r}") from None
    device = processes.accelerator().device  # each process its own (a class may still place itself)
    args = stock_model_args(cls, str(pretrained), load or LoadOptions(), str(device), extra)
    return StockModel(name, format_model_args(args), batch_size, force_simple)


def run_stock_tasks(model: StockModel, tasks: Sequence[str], *, manager=None,
                    run: LmmsRun | None = None) -> list[LmmsScore]:
    """Score a saved model folder (or Hub id) with lmms-eval's stock class on ``tasks``."""
    return evaluate_tasks(model.name, tasks, manager=manager, run=run, model_args=model.model_args,
                          batch_size=model.batch_size, force_simple=model.force_simple)


__all__ = ["AUTO", "BRIDGE", "LmmsRun", "LmmsScore", "OWN_ARGS", "STOCK_MODELS", "check_tasks", "evaluate_tasks",
           "StockModel", "format_model_args", "parse_model_args", "run_stock_tasks", "stock_model", "stock_model_args",
           "stock_model_class",
           "stock_model_name", "task_manager", "task_score"]
