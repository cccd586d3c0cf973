"""``atv eval``: score one model (a folder, or a probe cell re-created in memory) on harness JSONL
benchmarks and/or lmms-eval tasks, and its retention against a dense run (with 95% bootstrap intervals
paired on the items, for the harness tasks whose per-item scores the dense run kept too).

Tasks are told apart by form: an existing file or a name ending in ``.jsonl`` is a harness benchmark
(:mod:`evaluation.harness`), anything else an lmms-eval task name (through :mod:`evaluation.lmms_bridge`,
which needs the ``lmms`` extra).

A probe cell is named ``RESULTS:pathway/pool/sparsity``, e.g. ``runs/probe/results.jsonl:text/visual/0.5``
(RESULTS may also be the study folder). It is re-created from the study's pinned setup (``study.json``
next to the results): the model folder (unless ``model`` is given), dtype, method, seed, calibration
file and nsamples. As ``atv probe`` did, the global RNGs are seeded with the study's seed before the model
and the calibration samples are loaded; the probe is attached and the path pruned with
``PruneConfig(method, sparsity, pool=probe_pool(pool), seed)``. The calibration images are read from
``images`` when given, else the setup's ``images`` entry, else ``<calib folder>/images``; relative
paths in the setup are tried from the working directory, then from the study folder's parent. Harness
scores of a re-created cell equal the study's record for that cell (tested).

Example::

    result = run_eval_job(EvalJob(tasks=("suite/digits.jsonl", "pope"),
                                  probe_from=ProbeCell.parse("runs/probe:text/visual/0.5"),
                                  dense_results=Path("runs/probe/results.jsonl")))
    print(result.to_json())
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from analysis.tables import with_interval
from evaluation.benchmarks import FIDELITY, Benchmark, load_benchmark
from evaluation.harness import evaluate, fidelity_reference
from evaluation.install import INSTALL_HINT
from evaluation.intervals import Bootstrap, score_interval
from evaluation.reports import defined_retention
from mot_probe.routing import PATHS
from mot_probe.surgery import PROBE_POOLS
from pruning.errors import ConfigError, ToolkitError, forward_failed
from pruning.io import LoadOptions, load_model
from pruning.options import SEED_RANGE, check_fields, option
from pruning.outputs import MARKER, check_output_file, check_output_path, write_text_atomic, written_by_toolkit

from .cells import compact_items, paired_retention, prune_summary
from .records import RESULTS, SETUP, file_digest, inputs_changed, model_inputs, read_records, read_setup
from .share import CARD, append_results, environment, results_section

log = logging.getLogger(__name__)
EVAL_TOKENS = 2048  # tokens per item (its image's tokens and the text) assumed by the memory plan


# -- probe cells -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeCell:
    """One cell of a probe study: its results file and (pathway, pool, sparsity)."""

    results: Path  # the study's results.jsonl (study.json sits next to it)
    pathway: str = option(help="the pruned path", choices=PATHS)
    pool: str = option(help="calibration pool", choices=tuple(PROBE_POOLS))
    sparsity: float = option(help="the cell's sparsity", within="(0, 1)")

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def parse(cls, spec: str) -> "ProbeCell":
        """``RESULTS:pathway/pool/sparsity`` -> a cell; RESULTS is results.jsonl or its study folder."""
        path, sep, cell = str(spec).rpartition(":")
        parts = cell.split("/")
        if not sep or not path or len(parts) != 3:
            raise ConfigError(f"--probe-from must look like runs/probe/results.jsonl:text/visual/0.5 "
                              f"(RESULTS:pathway/pool/sparsity), got {spec!r}")
        try:
            sparsity = float(parts[2])
        except ValueError:
            raise ConfigError(f"--probe-from {spec!r}: sparsity {parts[2]!r} is not a number") from None
        results = Path(path)
        if results.is_dir():
            results = results / RESULTS
        return cls(results, parts[0], parts[1], sparsity)

    @property
    def cell(self) -> dict[str, Any]:
        """The cell as the study keys it in its records."""
        return {"pathway": self.pathway, "pool": self.pool, "sparsity": self.sparsity}

    @property
    def label(self) -> str:
        return f"{self.pathway}/{self.pool}/{self.sparsity:g}"


@dataclass
class StudySetup:
    """What re-creating a cell needs from ``study.json`` (paths resolved)."""

    model: Path
    calib: Path
    images: Path
    method: str
    seed: int
    nsamples: int
    dtype: str
    record: dict[str, Any] | None  # the study's record of the cell (None if it was never computed)
    max_length: int | None = None  # calibration records longer than this were skipped
    calib_batch_size: int = 1      # calibration samples per forward
    calibration_ids: list[str] | None = None  # the samples the study pinned (None: a study of an older version)


def _locate(value: str | Path, study_dir: Path) -> Path:
    """A path from a setup: as written (relative to the working directory), else from the study folder's parent."""
    path = Path(value)
    if path.exists() or path.is_absolute():
        return path
    return study_dir.parent / path if (study_dir.parent / path).exists() else path


def read_study_setup(cell: ProbeCell, *, model: Path | None = None, calib: Path | None = None,
                     images: Path | None = None) -> StudySetup:
    """The pinned setup of ``cell``'s study, with overrides; every path checked before any loading."""
    if not cell.results.is_file():
        raise ConfigError(f"probe results {str(cell.results)!r} do not exist; give the results.jsonl (or the study "
                          "folder) that atv probe wrote")
    study_dir = cell.results.parent
    setup_path = study_dir / SETUP
    if not setup_path.is_file():
        raise ConfigError(f"{str(setup_path)!r} is missing: the probe setup (method, seed, calibration) is pinned "
                          "there; re-creating a cell needs it")
    setup = read_setup(study_dir)
    config = setup.get("config", {})
    records = read_records(cell.results)
    record = next((r for r in records if r.get("cell") == cell.cell), None)
    if record is None:
        computed = [f"{r['cell']['pathway']}/{r['cell']['pool']}/{r['cell']['sparsity']:g}" for r in records
                    if r.get("cell", {}).get("pathway") != "dense"]
        if cell.pathway not in config.get("pathways", ()) or cell.pool not in config.get("pools", ()) or \
                cell.sparsity not in config.get("sparsities", ()):
            raise ConfigError(f"cell {cell.label} is not in the study's grid (computed cells: {computed}); "
                              "choose one of them")
        log.warning("cell %s is in the grid of %s but was not computed yet; re-creating it anyway", cell.label,
                    study_dir)
    missing = [key for key in ("model", "calib", "nsamples") if key not in setup and
               not (key == "model" and model) and not (key == "calib" and calib)]
    if missing or "method" not in config or "seed" not in config:
        raise ConfigError(f"{setup_path} lacks {missing or ['config.method/seed']}; it was not written by atv probe "
                          "(pass --model / --calib for a study run from Python)")
    model_dir = Path(model) if model else _locate(setup["model"], study_dir)
    if model and "model" in setup and Path(setup["model"]).resolve() != Path(model).resolve():
        log.warning("the study pruned %s; evaluating %s as asked", setup["model"], model)
    calib_path = Path(calib) if calib else _locate(setup["calib"], study_dir)
    if not calib_path.is_file():
        raise ConfigError(f"calibration file {str(calib_path)!r} (from {setup_path}) does not exist; pass --calib")
    if images is not None:
        image_dir = Path(images)
    elif setup.get("images"):
        image_dir = _locate(setup["images"], study_dir)
    else:
        image_dir = calib_path.parent / "images"
    if not image_dir.is_dir():
        raise ConfigError(f"calibration image folder {str(image_dir)!r} does not exist; pass --images (the folder "
                          "atv probe --images was given)")
    _check_study_inputs(study_dir, setup, model_dir, model, calib_path, calib)
    return StudySetup(model_dir, calib_path, image_dir, config["method"], int(config["seed"]), int(setup["nsamples"]),
                      setup.get("dtype", "float32"), record, setup.get("max_length"),
                      int(setup.get("calib_batch_size", 1)), setup.get("calibration_ids"))


def _check_study_inputs(study_dir: Path, setup: dict[str, Any], model_dir: Path, model: Path | None,
                        calib_path: Path, calib: Path | None) -> None:
    """Refuse to re-create a cell from a model folder or calibration file whose fingerprints changed since the
    study pinned them (as a resume does); an explicit --model / --calib other than the study's is used as asked."""
    def own(given: Path | None, key: str) -> bool:
        return given is None or key not in setup or Path(setup[key]).resolve() == Path(given).resolve()

    current = {}
    if own(model, "model") and model_dir.is_dir():
        current.update(model_inputs(model_dir))
    if own(calib, "calib"):
        current["calibration file"] = file_digest(calib_path)
    changed = inputs_changed(study_dir, current, subset=True,
                             remedy="re-run the study in a new --out to re-create its cells")
    if changed:
        raise ToolkitError(f"input changed since the study in {study_dir} ran: {', '.join(changed)}; its cells were "
                           "computed on the old input(s) and cannot be re-created from these. Restore them, or re-run "
                           "the study in a new --out")


# -- loading ------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: nn.Module
    processor: Any
    setup: StudySetup | None = None  # for a probe cell
    prune: dict[str, Any] | None = None  # the re-pruned path's summary
    reference: Any = None  # fidelity reference from the dense model, when asked for


def load_eval_model(model_dir: Path | None, cell: ProbeCell | None = None, *, calib: Path | None = None,
                    images: Path | None = None, load: LoadOptions | None = None,
                    reference_benchmarks: list[Benchmark] | None = None, progress: bool = False,
                    processor=None, allow_outside: bool = False, setup: StudySetup | None = None) -> LoadedModel:
    """A model folder, or (``cell``) the probe cell re-created in memory, with its processor.

    ``load``: revision, dtype, device and device map (a probe cell's dtype 'auto' is the study's).
    ``reference_benchmarks``: fidelity benchmarks whose dense reference is computed before the path is
    pruned (the study's reference). ``processor`` overrides the one saved with the model. ``setup``: the
    cell's study setup when already read (:func:`read_study_setup`).
    """
    load = load or LoadOptions()

    if cell is None:
        if model_dir is None:
            raise ConfigError("give --model DIR, or --probe-from RESULTS:pathway/pool/sparsity")
        model, loaded = load_model(model_dir, load, with_processor=processor is None)
        processor = processor if processor is not None else loaded
        reference = (fidelity_reference(model, processor, reference_benchmarks, progress=progress)
                     if reference_benchmarks else None)
        return LoadedModel(model, processor, reference=reference)

    from transformers import set_seed

    from mot_probe.surgery import attach_probe_, probe_pool
    from pruning.config import PruneConfig
    from pruning.data import load_llava_conversations

    setup = setup or read_study_setup(cell, model=model_dir, calib=calib, images=images)
    set_seed(setup.seed)  # as run_probe_job, before loading model and calibration
    if load.dtype == "auto":
        load = dataclasses.replace(load, dtype=setup.dtype)
    model, loaded = load_model(setup.model, load, with_processor=processor is None)
    processor = processor if processor is not None else loaded
    calibration, _ = load_llava_conversations(setup.calib, setup.images, processor, setup.nsamples, setup.seed,
                                              setup.max_length, batch_size=setup.calib_batch_size,
                                              allow_outside=allow_outside)
    probe = attach_probe_(model)
    reference = (fidelity_reference(model, processor, reference_benchmarks, progress=progress)
                 if reference_benchmarks else None)
    config = PruneConfig(setup.method, sparsity=cell.sparsity, pool=probe_pool(cell.pool), seed=setup.seed)
    report = probe.prune_path_(cell.pathway, config, calibration, progress=progress)
    log.info("re-created probe cell %s: %s path at %.3f sparsity", cell.label, cell.pathway, report.sparsity)
    return LoadedModel(model, processor, setup, prune_summary(report), reference)


def load_cell_for_bridge(model_dir: Path, probe_from: str, *, calib: str | None = None, images: str | None = None,
                         dtype: str = "auto", device: str | None = None) -> tuple[nn.Module, Any]:
    """The lmms-eval bridge's ``probe_from=`` loader: the probe cell re-created in memory, with its processor."""
    loaded = load_eval_model(model_dir, ProbeCell.parse(probe_from), calib=Path(calib) if calib else None,
                             images=Path(images) if images else None, load=LoadOptions(dtype=dtype, device=device))
    return loaded.model, loaded.processor


def lmms_manifest():
    """Entry point of group ``lmms_eval.models``: ``--model atv``, with ``probe_from=`` support registered."""
    from evaluation import lmms_bridge

    lmms_bridge.set_cell_loader(load_cell_for_bridge)
    return lmms_bridge.manifest()


# -- the job ------------------------------------------------------------------------------------------


def is_harness_task(task: str | Path) -> bool:
    """A harness benchmark (an existing file, or a ``.jsonl`` name) rather than an lmms-eval task name."""
    return str(task).endswith(".jsonl") or Path(task).is_file()


def require_lmms_eval(tasks: list[str]) -> None:
    """Raise a ToolkitError saying how to install the extra when lmms-eval cannot be imported."""
    try:
        import lmms_eval.evaluator  # noqa: F401
    except ImportError as err:
        raise ToolkitError(f"{tasks} are lmms-eval task names (not .jsonl files), but lmms-eval cannot be imported "
                           f"({err}); {INSTALL_HINT}") from None


@dataclass
class EvalJob:
    """Everything ``atv eval`` does: what is scored (a model folder or a re-created probe cell), on which tasks,
    compared with which dense run, and where the results go. :func:`run_eval_job` runs it.

    Args:
        tasks: harness ``.jsonl`` files and/or lmms-eval task names (those need the lmms extra).
        model: HF model folder or Hub id (default with ``probe_from``: the study's).
        probe_from: a probe cell to re-create, e.g. ``runs/probe/results.jsonl:text/visual/0.5``.
        calib: overrides the study's calibration file.
        images: calibration images (default: the study's, else ``<calib folder>/images``).
        dense_model: dense model for fidelity benchmarks (without ``probe_from``).
        dense_results: the dense run to compare with: an ``atv eval`` JSON or a probe ``results.jsonl``.
        out: write the result JSON here.
        overwrite: replace an existing ``out`` file.
        allow_outside_paths: accept benchmark and calibration image paths outside their folder.
        batch_size: items per forward.
        max_new_tokens: answer length of harness open answers (lmms-eval tasks set their own).
        limit: lmms-eval: at most this many items per task.
        bootstrap_iters: lmms-eval: bootstrap iterations of the standard errors (0: none).
        log_samples: lmms-eval: keep every item's prompt, answer and score (in ``output_path``).
        output_path: lmms-eval: write its own result files into this folder.
        lmms_model: score lmms-eval tasks with lmms-eval's own model class for the family (``auto``: from
            config.json).
        lmms_model_args: with ``lmms_model``: more model_args, ``k=v,...``.
        lmms_force_simple: with ``lmms_model``: lmms-eval's simple class even where it has a chat one.
        lmms_include: folders of extra lmms-eval task YAMLs.
        lmms_defaults: also index lmms-eval's own tasks (False: only ``lmms_include``).
        load: how the model loads.
        seed: seed of the evaluation (and lmms-eval's samplers).
        memory_check: refuse, before loading, a model the memory plan says will not fit (``--no-memory-check``
            turns it off).
        out_card: append the results to the model card of the ``model`` folder that ``atv prune`` wrote.
    """
    tasks: tuple[str, ...] = option(help="harness .jsonl files and/or lmms-eval task names (those need the "
                                         "lmms extra)")
    model: str | None = option(None, "HF model folder or Hub id (default with --probe-from: the study's)")
    probe_from: ProbeCell | str | None = option(None, "re-create a probe cell, e.g. "
                                                      "runs/probe/results.jsonl:text/visual/0.5",
                                                metavar="RESULTS:PATHWAY/POOL/SPARSITY")
    calib: Path | None = option(None, "override the study's calibration file")
    images: Path | None = option(None, "calibration images (default: the study's, else <calib folder>/images)")
    dense_model: Path | None = option(None, "dense model for fidelity benchmarks (without --probe-from)")
    dense_results: Path | None = option(None, "dense run to compare with: an `atv eval` JSON or a probe "
                                              "results.jsonl (with per-item scores: paired retention intervals)")
    out: Path | None = option(None, "write the result JSON here")
    overwrite: bool = option(False, "replace an existing --out file")
    allow_outside_paths: bool = option(False, "accept benchmark and calibration image paths outside their folder")
    batch_size: int = option(8, "items per forward", within=">= 1")
    max_new_tokens: int = option(8, "harness open answers (lmms-eval tasks set their own)", within=">= 1")
    limit: int | None = option(None, "lmms-eval: at most this many items per task (a smoke test)")
    bootstrap_iters: int = option(0, "lmms-eval: standard errors of the metrics (0: none; lmms-eval's own "
                                     "default is 100000)")
    log_samples: bool = option(False, "lmms-eval: keep every item's prompt, answer and score (in --output-path)")
    output_path: Path | None = option(None, "lmms-eval: write its own result files into this folder "
                                            "(<model>/<date>_results.json, samples_<task>.jsonl)", metavar="DIR")
    lmms_model: str | None = option(None, "score the lmms-eval tasks with lmms-eval's own model class for the "
                                          "family (auto: from config.json; e.g. llava_hf, qwen2_vl, qwen2_5_vl) "
                                          "loading the --model folder, as published tables were made",
                                    metavar="NAME")
    lmms_model_args: str = option("", "--lmms-model: more model_args, k=v,... (e.g. max_pixels=12845056, "
                                      "batch_size=1)", metavar="K=V,...")
    lmms_force_simple: bool = option(False, "--lmms-model: lmms-eval's simple class even where it has a chat one "
                                            "(chat classes only generate: multiple-choice tasks need this)")
    lmms_include: tuple[Path, ...] = option((), "folders of extra lmms-eval task YAMLs")
    lmms_defaults: bool = option(True, "index only --lmms-include tasks (faster)", flag="--no-lmms-defaults")
    load: LoadOptions = option(default_factory=LoadOptions, cli=False)  # revision, dtype, device, device map
    seed: int = option(0, "seed of the evaluation (and lmms-eval's samplers)", within=SEED_RANGE)
    memory_check: bool = option(True, "skip the memory plan's check (load even when it predicts too little free "
                                      "memory)", flag="--no-memory-check")
    out_card: bool = option(False, "append the results to the model card (README.md) of the --model folder that "
                                   "atv prune wrote")

    def __post_init__(self) -> None:
        self.tasks = tuple(str(t) for t in self.tasks)
        if isinstance(self.probe_from, str):
            self.probe_from = ProbeCell.parse(self.probe_from)
        if not self.tasks:
            raise ConfigError("--tasks is empty; give harness .jsonl files and/or lmms-eval task names")
        check_fields(self)
        if self.model is None and self.probe_from is None:
            raise ConfigError("give --model DIR, or --probe-from RESULTS:pathway/pool/sparsity")
        if self.out_card and (self.model is None or not (Path(self.model) / CARD).is_file()):
            raise ConfigError(f"--out-card appends to the model card of a pruned folder; {self.model!r} holds no "
                              f"{CARD} (prune it with atv prune, or drop --out-card)")
        if self.out_card and not written_by_toolkit(self.model):
            raise ConfigError(f"--out-card appends to the model card atv prune wrote; {self.model!r} was not written "
                              f"by atv-toolkit (no {MARKER} file in it), so its {CARD} is left alone: drop --out-card")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"--tasks names a task twice: {list(self.tasks)}")
        self._check_lmms_options()

    def _check_lmms_options(self) -> None:
        from evaluation.lmms_runs import parse_model_args

        self.lmms_run()  # validates the run settings
        flags = {"--bootstrap-iters": self.bootstrap_iters, "--log-samples": self.log_samples,
                 "--output-path": self.output_path, "--lmms-model": self.lmms_model,
                 "--lmms-model-args": self.lmms_model_args, "--lmms-force-simple": self.lmms_force_simple}
        given = [flag for flag, value in flags.items() if value]
        if given and all(is_harness_task(t) for t in self.tasks):
            raise ConfigError(f"{given} apply to lmms-eval tasks, and --tasks names none (only harness files)")
        if self.lmms_model is None:
            if self.lmms_model_args or self.lmms_force_simple:
                raise ConfigError("--lmms-model-args and --lmms-force-simple configure --lmms-model; give it too")
            return
        if self.probe_from is not None:
            raise ConfigError(f"--lmms-model {self.lmms_model} loads a saved folder with lmms-eval's own class, but a "
                              "probe cell exists only in memory: drop --lmms-model (the bridge scores probe cells), "
                              "or score a folder saved by atv prune")
        parse_model_args(self.lmms_model_args)

    def lmms_run(self):
        """lmms-eval's run settings (:class:`evaluation.lmms_runs.LmmsRun`)."""
        from evaluation.lmms_runs import LmmsRun

        return LmmsRun(self.limit, self.bootstrap_iters, self.log_samples, self.output_path, self.seed)


@dataclass
class TaskScore:
    name: str
    source: str  # 'harness' or 'lmms-eval'
    metric: str  # harness: the benchmark kind's score (%); lmms-eval: the task's first metric
    score: float
    metrics: dict[str, float] = field(default_factory=dict)
    n: int | None = None
    stderr: float | None = None  # lmms-eval: the main metric's standard error (with --bootstrap-iters > 0)
    interval: list[float] | None = None  # harness: 95% bootstrap interval of the score over the items
    items: dict[str, Any] | None = None  # harness: per-item scores, {"ids": digest of the item ids, "scores": [...]}


@dataclass
class EvalResult:
    model: str
    probe: dict[str, Any] | None
    tasks: list[TaskScore]
    retention: dict[str, float] | None = None  # task -> % of the dense score (where the dense score is > 0)
    mean_retention: float | None = None
    # 95% bootstrap intervals of the retention, paired on the items the dense run scored too (--dense-results
    # with per-item scores); the mean's only when every retention task is paired
    retention_intervals: dict[str, list[float] | None] | None = None
    mean_retention_interval: list[float] | None = None
    seconds: float = 0.0
    environment: dict[str, Any] = field(default_factory=dict)  # library versions, device, dtype
    seed: int = 0
    lmms: dict[str, Any] | None = None  # how lmms-eval tasks were run: model class, model_args, limit, stderr, files

    def scores(self) -> dict[str, float]:
        return {t.name: t.score for t in self.tasks}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass
class DenseRun:
    """What ``--dense-results`` holds: task -> score, and task -> per-item scores where it kept them."""

    scores: dict[str, float]
    items: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> {"ids": digest, "scores": [...]}


def read_dense_run(path: Path) -> DenseRun:
    """The dense scores (and per-item scores, where present) of an ``atv eval`` result JSON, or of the dense
    record of a probe/compare results.jsonl. Files written before per-item scores were kept give none."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--dense-results {str(path)!r} does not exist")
    if path.suffix == ".jsonl":
        dense = [r for r in read_records(path) if r.get("cell", {}).get("pathway") == "dense"
                 or r.get("cell", {}).get("method") == "dense"]
        if not dense:
            raise ConfigError(f"{path} holds no dense record; give an `atv eval` JSON of the dense model")
        scores, items = dense[0]["scores"], dense[0].get("items") or {}
    else:
        try:
            tasks = json.loads(path.read_text(encoding="utf-8"))["tasks"]
            scores = {task["name"]: task["score"] for task in tasks}
            items = {task["name"]: task["items"] for task in tasks if task.get("items")}
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"--dense-results {str(path)!r} is not an `atv eval` result JSON ({err})") from None
    try:
        run = DenseRun({k: float(v) for k, v in scores.items()},
                       {k: {"ids": str(v["ids"]), "scores": [float(x) for x in v["scores"]]} for k, v in items.items()})
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"--dense-results {str(path)!r}: unreadable scores or items ({err!r}); give the file "
                          "`atv eval` or `atv probe` wrote") from None
    bad = [k for k, v in run.items.items() if not all(0.0 <= x <= 1.0 for x in v["scores"])]
    if bad:
        raise ConfigError(f"--dense-results {str(path)!r}: item scores of {bad} are outside [0, 1]; give the file "
                          "`atv eval` or `atv probe` wrote")
    return run


def read_dense_scores(path: Path) -> dict[str, float]:
    """Task -> score from an ``atv eval`` result JSON, or from the dense record of a probe/compare results.jsonl."""
    return read_dense_run(path).scores


@dataclass
class _Plan:
    """What ``run_eval_job`` checked before loading anything."""

    harness_paths: list[str]
    lmms_names: list[str]
    benches: list[Benchmark]
    dense: DenseRun | None  # the dense run's scores and items (--dense-results)
    setup: StudySetup | None = None  # the pinned setup of --probe-from's study
    manager: Any = None  # lmms-eval's task manager
    stock: Any = None  # evaluation.lmms_runs.StockModel (with --lmms-model)

    @property
    def fidelity(self) -> list[Benchmark]:
        return [b for b in self.benches if b.kind == FIDELITY]


def _plan(job: EvalJob) -> _Plan:
    """Every cheap check: outputs, benchmark files, lmms-eval, tasks, the stock class and its arguments."""
    harness_paths = [t for t in job.tasks if is_harness_task(t)]
    lmms_names = [t for t in job.tasks if not is_harness_task(t)]
    benches = [load_benchmark(p, job.allow_outside_paths) for p in harness_paths]  # bad files fail before loading
    setup = None if job.probe_from is None else read_study_setup(job.probe_from, model=job.model, calib=job.calib,
                                                                  images=job.images)
    inputs = [*harness_paths, *(i.image for b in benches for i in b.items), job.model, job.calib, job.images,
              job.dense_model, job.dense_results, *job.lmms_include, *_study_files(job.probe_from, setup)]
    if job.out is not None:  # a bad --out fails now, not after the evaluation
        check_output_file(job.out, job.overwrite, inputs)
    if job.output_path is not None:
        check_output_path(job.output_path, inputs, what="--output-path")
    if lmms_names:
        require_lmms_eval(lmms_names)
    dense = read_dense_run(job.dense_results) if job.dense_results else None
    plan = _Plan(harness_paths, lmms_names, benches, dense, setup)
    if plan.fidelity and job.probe_from is None and job.dense_model is None:
        raise ConfigError(f"{[b.name for b in plan.fidelity]} measure fidelity to a dense model: pass --dense-model "
                          "DIR (or --probe-from, whose dense model is the reference)")
    if lmms_names:
        from evaluation.lmms_runs import task_manager

        plan.manager = task_manager(job.lmms_include, job.lmms_defaults)
        unknown = [t for t in lmms_names if t not in plan.manager.all_tasks]
        if unknown:
            raise ConfigError(f"unknown lmms-eval task(s) {unknown} (and no such .jsonl file); list tasks with "
                              "`lmms-eval --tasks list`, or add their folder with --lmms-include")
        if job.lmms_model is not None:
            plan.stock = _stock_model(job)
    return plan


def _study_files(cell: ProbeCell | None, setup: StudySetup | None) -> list[Path]:
    """What re-creating a probe cell reads: the study's records and setup, its model, calibration and images."""
    if cell is None:
        return []
    return [cell.results, cell.results.parent / SETUP, setup.model, setup.calib, setup.images]


def _stock_model(job: EvalJob):
    """lmms-eval's class for --lmms-model (``auto``: the family's, from config.json) and its model_args."""
    from evaluation.lmms_runs import AUTO, parse_model_args, stock_model, stock_model_name
    from pruning.io import load_config

    model_type = load_config(job.model, job.load).model_type if job.lmms_model == AUTO else None
    return stock_model(stock_model_name(job.lmms_model, model_type), job.model, load=job.load,
                       extra_args=parse_model_args(job.lmms_model_args), force_simple=job.lmms_force_simple)


@contextlib.contextmanager
def _forwards(what: str) -> Iterator[None]:
    """Model forwards on inputs its own processor built: transformers' own refusals (an image size, a token
    count, a shape its files disagree about) become one :class:`~pruning.errors.ForwardError` line."""
    try:
        yield
    except ToolkitError:
        raise
    except (RuntimeError, ValueError) as err:
        raise forward_failed(err, what) from err


def _check_memory(job: EvalJob, plan: _Plan, load: LoadOptions) -> None:
    """Refuse, before loading, a model that will not fit: the memory plan of each model the run loads (the
    dense reference is freed before the model itself is loaded), from its config alone."""
    from pruning.io import load_config
    from pruning.memory import EVAL_REMEDIES, check_memory, plan_eval_memory

    models = [(job.dense_model, False)] if plan.fidelity and job.probe_from is None else []
    models.append((plan.setup.model if plan.setup is not None else job.model, job.probe_from is not None))
    dispatched = load.device_map not in (None, "cpu")
    for model, probed in models:
        memory = plan_eval_memory(load_config(model, load), job.batch_size, EVAL_TOKENS, load.dtype,
                                  device=load.device, dispatched=dispatched, probed=probed)
        log.info("%s: %s", model, memory.summary())
        check_memory(memory, remedies=EVAL_REMEDIES)


def _process_load(load: LoadOptions) -> LoadOptions:
    """Several processes (torchrun / accelerate launch): each loads on its own device unless --device or
    --device-map say where."""
    from evaluation.processes import process_device

    device = process_device() if load.device is None and load.device_map is None else None
    return load if device is None else dataclasses.replace(load, device=str(device))


def run_eval_job(job: EvalJob, progress: bool = True, processor=None) -> EvalResult:
    """Check everything cheap, load (or re-create) the model, score every task, compare to the dense run.

    Under several processes every process scores (lmms-eval tasks split between them) and returns the same
    result; process 0 alone writes ``out``, ``output_path`` and the model card.

    Args:
        job: the job.
        progress: show progress bars.
        processor (transformers.ProcessorMixin): overrides the one saved with the model (e.g. one built in memory).

    Returns:
        Every task's score with its interval, and the retention against the dense run when one is given.

    Raises:
        ToolkitError: a subclass naming what to change (a bad task or probe cell, a missing extra, an output
            that may not be replaced), before the model loads where it can.
    """
    from evaluation.processes import is_main, launched_processes

    start = time.perf_counter()
    plan = _plan(job)
    load = _process_load(job.load)
    if job.memory_check:
        _check_memory(job, plan, load)
    reference = None
    if plan.fidelity and job.probe_from is None:  # the dense model's reference, then the model itself
        with _forwards("the fidelity reference's items"):
            dense_loaded = load_eval_model(job.dense_model, load=load, reference_benchmarks=plan.fidelity,
                                           progress=progress, processor=processor)
        reference = dense_loaded.reference
        del dense_loaded
    loaded = None
    if plan.benches or (plan.lmms_names and plan.stock is None):  # a stock class loads the folder itself
        loaded = load_eval_model(job.model, job.probe_from, calib=job.calib, images=job.images, load=load,
                                 progress=progress, processor=processor, allow_outside=job.allow_outside_paths,
                                 reference_benchmarks=plan.fidelity if job.probe_from is not None else None,
                                 setup=plan.setup)
        reference = reference if reference is not None else loaded.reference
    env = environment(loaded.model if loaded is not None else None)

    tasks: list[TaskScore] = []
    if plan.benches:
        if launched_processes() > 1:
            log.warning("harness benchmarks are not split between processes: each of the %d scores all of them",
                        launched_processes())
        with _forwards("the benchmark items"):
            report = evaluate(loaded.model, loaded.processor, plan.benches, reference=reference,
                              batch_size=job.batch_size, max_new_tokens=job.max_new_tokens, progress=progress,
                              seed=job.seed, return_items=True)
        boot = Bootstrap(seed=job.seed)
        tasks += [TaskScore(r.name, "harness", f"{r.kind} score (%)", r.score, dict(r.metrics), r.n,
                            interval=score_interval([i.score for i in r.items], r.name, boot).to_list(),
                            items=compact_items(r.items))
                  for r in report.results]
    if plan.lmms_names:
        tasks += _lmms_scores(job, plan, loaded)
    order = {name: i for i, name in enumerate(job.tasks)}
    tasks.sort(key=lambda t: order.get(t.name, order.get(_path_of(t.name, plan.harness_paths), len(order))))

    result = EvalResult(str(loaded.setup.model if loaded is not None and loaded.setup else job.model),
                        _probe_record(job, loaded), tasks, environment=env, seed=job.seed,
                        lmms=_lmms_record(job, plan) if plan.lmms_names else None)
    if plan.dense is not None:
        kept = defined_retention(result.scores(), plan.dense.scores)
        if kept is not None:
            result.retention, result.mean_retention = kept.per_benchmark, kept.mean
            _pair_with_dense(result, plan.dense, Bootstrap(seed=job.seed))
    result.seconds = round(time.perf_counter() - start, 2)
    if is_main():
        if job.out is not None:
            write_text_atomic(job.out, result.to_json())
        if job.out_card:
            _append_to_card(Path(job.model), result, job.seed)
    return result


def _pair_with_dense(result: EvalResult, dense: DenseRun, boot: Bootstrap) -> None:
    """Retention intervals of the tasks whose items the dense run scored too (same ids, as many); the others
    keep the point value, and a log line says why."""
    mine = {t.name: t for t in result.tasks}
    found = paired_retention({"items": {n: t.items for n, t in mine.items() if t.items},
                              "retention": result.retention}, {"items": dense.items}, boot)
    result.retention_intervals = found.get("retention")
    result.mean_retention_interval = found.get("mean_retention")
    alone = [name for name in result.retention if name not in (result.retention_intervals or {})]
    if alone:
        why = {name: "no per-item scores (lmms-eval task)" if mine[name].items is None else
               "the dense results hold no per-item scores of it" if name not in dense.items else
               "the dense run scored other items" for name in alone}
        log.warning("retention without interval for %s", "; ".join(f"{n}: {w}" for n, w in why.items()))


def _lmms_scores(job: EvalJob, plan: _Plan, loaded: LoadedModel | None) -> list[TaskScore]:
    """The lmms-eval tasks through lmms-eval's stock class (--lmms-model), else through the bridge."""
    if plan.stock is not None:
        from evaluation.lmms_runs import run_stock_tasks

        if loaded is not None:
            loaded.model = None  # the stock class loads its own copy: drop ours first
        scores = run_stock_tasks(plan.stock, plan.lmms_names, manager=plan.manager, run=job.lmms_run())
    else:
        from evaluation.lmms_bridge import run_lmms_tasks

        scores = run_lmms_tasks(loaded.model, loaded.processor, plan.lmms_names, manager=plan.manager,
                                batch_size=job.batch_size, run=job.lmms_run(), name=_lmms_label(job, loaded))
    return [TaskScore(s.name, "lmms-eval", s.metric, s.score, s.metrics, s.n, s.stderr) for s in scores]


def _lmms_label(job: EvalJob, loaded: LoadedModel) -> str:
    """The model's name in lmms-eval's files: the folder, or the probe cell it was re-created as."""
    if job.probe_from is None:
        label = str(job.model)
    else:
        cell = job.probe_from
        label = f"{Path(loaded.setup.model).name}_probe_{cell.pathway}_{cell.pool}_{cell.sparsity:g}"
    return label.replace(",", "_")  # lmms-eval's model_args are comma-separated


def _lmms_record(job: EvalJob, plan: _Plan) -> dict[str, Any]:
    """How the lmms-eval tasks were run (which model class, with what settings)."""
    from evaluation.lmms_runs import BRIDGE

    stock = plan.stock
    return {"model": stock.name if stock else BRIDGE, "model_args": stock.model_args if stock else None,
            "force_simple": stock.force_simple if stock else False, "limit": job.limit,
            "bootstrap_iters": job.bootstrap_iters, "log_samples": job.log_samples,
            "output_path": str(job.output_path) if job.output_path is not None else None}


def _probe_record(job: EvalJob, loaded: LoadedModel | None) -> dict[str, Any] | None:
    if job.probe_from is None:
        return None
    setup = loaded.setup
    return {**job.probe_from.cell, "results": str(job.probe_from.results), "method": setup.method,
            "seed": setup.seed, "calib": str(setup.calib), "images": str(setup.images),
            "nsamples": setup.nsamples, "calibration_ids": setup.calibration_ids, "prune": loaded.prune,
            "recorded_scores": setup.record["scores"] if setup.record else None}


def _append_to_card(folder: Path, result: EvalResult, seed: int) -> None:
    """Append the scores (and retention) to the model card of a pruned folder, atomically."""
    card = folder / CARD
    kept, kept_ci = result.retention or {}, result.retention_intervals or {}
    rows = [(t.name, t.metric, t.score, t.interval, kept.get(t.name), kept_ci.get(t.name)) for t in result.tasks]
    sources = ", ".join(sorted({t.source for t in result.tasks}))
    mean = with_interval(result.mean_retention, result.mean_retention_interval)
    title = f"atv eval: {sources}, seed {seed}" + ("" if result.mean_retention is None else
                                                   f", mean retention {mean} (% of dense)")
    write_text_atomic(card, append_results(card.read_text(encoding="utf-8"), results_section(title, rows)))


def _path_of(name: str, paths: list[str]) -> str | None:
    """The --tasks entry (a path) of a harness benchmark name (the file stem)."""
    return next((p for p in paths if Path(p).stem == name), None)


__all__ = ["DenseRun", "EvalJob", "EvalResult", "LoadedModel", "ProbeCell", "StudySetup", "TaskScore",
           "is_harness_task", "load_cell_for_bridge", "load_eval_model", "lmms_manifest", "read_dense_run",
           "read_dense_scores", "read_study_setup",
           "require_lmms_eval",
           "run_eval_job"]
