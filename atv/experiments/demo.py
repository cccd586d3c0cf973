"""``atv demo``: the whole study on the embedded default model, in one output folder.

Steps (each resumable: re-running the same command skips what is finished):

1. build (or reuse) the default model ``smol-llava`` and write the offline benchmark suite;
2. evaluate the dense model (scores next to chance);
3. the MoT probe grid (pathway x calibration pool x sparsity);
4. ATV vs Wanda vs SparseGPT vs magnitude on the shared weights (50%, 60%, 2:4);
5. analysis artefacts (hidden states, pool masks, drift) and every figure;
6. ``report.md`` with the tables (every value with its 95% bootstrap interval over items), the paired
   differences behind the study's findings, the figures and a timing table.

``--quick`` runs a smaller grid on fewer items and calibration samples.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pruning.errors import ConfigError
from pruning.options import option

from .executors import ExecutorOptions

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: Path = option(Path("runs/demo"), "output folder (suite, results, figures, report.md)")
    quick: bool = option(False, "smaller grid, fewer items and calibration samples (a few minutes)")
    seed: int = option(0, "seed of the suite, the calibration sampling and the pruners")
    cache_dir: Path | None = option(None, "where the default model is built (default $ATV_CACHE or "
                                          "~/.cache/atv-toolkit)")
    nsamples: int | None = option(None, "calibration samples (default 32, quick 8)")
    n_eval: int | None = option(None, "items per image benchmark (default 20, quick 6)")
    probe_sparsities: tuple[float, ...] = option((), "probe sparsities (default 0.5 0.6, quick 0.6)")
    settings: tuple[str, ...] = option((), "method settings, e.g. 50% 2:4 (default 50% 60% 2:4, quick 60%)")
    methods: tuple[str, ...] = option((), "methods on the shared weights (default atv wanda sparsegpt magnitude, "
                                          "quick without sparsegpt)")
    batch_size: int = option(16, "evaluation items per forward")
    calib_batch_size: int = option(8, "calibration samples per forward (padded; padding is masked out)")
    run: ExecutorOptions = option(default_factory=ExecutorOptions, cli=False)  # probe and method cells: here or Ray

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.nsamples = self.nsamples or (8 if self.quick else 32)
        self.n_eval = self.n_eval or (6 if self.quick else 20)
        self.probe_sparsities = tuple(self.probe_sparsities) or ((0.6,) if self.quick else (0.5, 0.6))
        self.methods = tuple(self.methods) or (("atv", "wanda", "magnitude") if self.quick
                                               else ("atv", "wanda", "sparsegpt", "magnitude"))
        self.settings = tuple(self.settings) or (("60%",) if self.quick else ("50%", "60%", "2:4"))
        sizes = {"nsamples": self.nsamples, "n_eval": self.n_eval, "batch_size": self.batch_size,
                 "calib_batch_size": self.calib_batch_size}
        bad = {k: v for k, v in sizes.items() if v < 1}
        if bad:
            raise ConfigError(f"{', '.join(f'{k}={v}' for k, v in bad.items())}: must be >= 1")


@dataclass
class DemoResult:
    out: Path
    dense: dict[str, Any]
    probe_table: str
    method_table: str                         # mean retention per method x setting
    method_scores: str                        # per-benchmark scores of every cell
    differences: str                          # the findings' paired differences (mean retention, intervals)
    figures: list[str]
    skipped: dict[str, str]
    seconds: dict[str, float]


def _suite(config: DemoConfig) -> Path:
    from atv.suite import write_suite

    folder = config.out / "suite"
    pinned = {"seed": config.seed, "n_eval": config.n_eval, "n_calib": config.nsamples}
    summary = folder / "suite.json"
    if summary.is_file():
        saved = json.loads(summary.read_text(encoding="utf-8"))
        if {k: saved.get(k) for k in pinned} == pinned:
            return folder
        raise ConfigError(f"{folder} holds a suite written with {({k: saved.get(k) for k in pinned})}, not {pinned}; "
                          "use another --out")
    return write_suite(folder, seed=config.seed, n_eval=config.n_eval, n_calib=config.nsamples)


def _benchmarks(suite: Path) -> list[Path]:
    summary = json.loads((suite / "suite.json").read_text(encoding="utf-8"))
    return [suite / f"{name}.jsonl" for name in summary["benchmarks"]]


def run_demo(config: DemoConfig, progress: bool = True) -> DemoResult:
    """Run (or resume) every step of the demo; see the module docstring."""
    from transformers import set_seed

    from analysis.tables import differences_summary, method_table, probe_table, scores_table, to_markdown
    from atv.default_model import build_default_model
    from atv.experiments.cells import CellInputs
    from atv.experiments.compare import CompareCells, CompareConfig, run_compare_cells, run_method_comparison
    from atv.experiments.executors import make_executor
    from atv.experiments.probe_study import ProbeCells, StudyConfig, run_probe_cells, run_probe_study
    from atv.experiments.records import file_digest, model_inputs
    from pruning.data import load_llava_conversations
    from pruning.io import load_model

    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now

    config.out.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)
    model_dir = build_default_model(config.cache_dir, progress=progress)
    suite = _suite(config)
    benches = _benchmarks(suite)
    model, processor = load_model(model_dir)
    calibration, data_report = load_llava_conversations(suite / "calib.json", suite, processor, config.nsamples,
                                                        config.seed, batch_size=config.calib_batch_size)
    lap("setup")
    # the model folder relative to the output (no machine path; atv eval --probe-from resolves it from there)
    extra = {"model": os.path.relpath(model_dir, config.out), "calib": str(suite / "calib.json"), "images": str(suite),
             "nsamples": config.nsamples, "calib_batch_size": config.calib_batch_size, "n_eval": config.n_eval,
             "calibration_ids": data_report.ids,
             "inputs": {**model_inputs(model_dir), "calibration file": file_digest(suite / "calib.json")}}
    probe_config = StudyConfig(sparsities=config.probe_sparsities, seed=config.seed, batch_size=config.batch_size)
    compare_config = CompareConfig(methods=config.methods, settings=config.settings, seed=config.seed,
                                   batch_size=config.batch_size)
    executor = make_executor(config.run)
    try:
        if executor.remote:  # every cell loads the model itself, as this process loaded it
            inputs = CellInputs(str(model_dir), str(suite / "calib.json"), str(suite), tuple(map(str, benches)),
                                config.nsamples, config.seed, calib_batch_size=config.calib_batch_size)
            probe = run_probe_cells(ProbeCells(inputs, probe_config), config.out / "probe", executor,
                                    calibration_batches=len(calibration), setup_extra=extra, progress=progress)
            lap("probe")
            methods = run_compare_cells(CompareCells(inputs, compare_config), config.out / "methods", executor,
                                        calibration_batches=len(calibration), setup_extra=extra, progress=progress,
                                        dense_record=probe.records[0])
        else:
            probe = run_probe_study(model, processor, calibration, benches, config.out / "probe", probe_config,
                                    setup_extra=extra, progress=progress)
            lap("probe")
            dense_state = copy.deepcopy(model.state_dict())

            def fresh_model():
                model.load_state_dict(dense_state)
                return model

            methods = run_method_comparison(fresh_model, processor, calibration, benches, config.out / "methods",
                                            compare_config, setup_extra=extra, progress=progress,
                                            dense_record=probe.records[0])
            model.load_state_dict(dense_state)
    finally:
        executor.close()
    lap("methods")
    made, skipped = _analysis(model, calibration, data_report.ids, suite, config, progress)
    lap("analysis")
    dense = _dense_summary(probe.records[0], suite)
    label = lambda r: f"{r['cell']['method']} {r['cell']['setting']}"  # noqa: E731
    differences = finding_differences(probe.records, methods.records, config.seed)
    result = DemoResult(config.out, dense, to_markdown(probe_table(probe.records)),
                        to_markdown(method_table(methods.records)), to_markdown(scores_table(methods.records, label)),
                        to_markdown(differences_summary(differences)), made, skipped, seconds)
    _write_report(result, config)
    return result


def finding_pairs(probe_records: list[dict[str, Any]], method_records: list[dict[str, Any]]
                  ) -> list[tuple[str, str, str]]:
    """(finding, cell A, cell B) of the study's claims, for the cells the logs hold: B, per sparsity and pool,
    visual path vs text path (the text pathway is the more fragile); A, per sparsity, each path with its own
    modality's pool vs the other's; methods, per setting, ATV vs Wanda."""
    from .compare import cell_label

    have = {cell_label(r) for r in probe_records + method_records}
    cells = [r["cell"] for r in probe_records if cell_label(r) != "dense"]
    sparsities = list(dict.fromkeys(c["sparsity"] for c in cells))
    pools = list(dict.fromkeys(c["pool"] for c in cells))
    pairs = [("B", f"visual/{q}/{s}", f"text/{q}/{s}") for s in sparsities for q in pools]
    pairs += [("A", f"{p}/{p}/{s}", f"{p}/{o}/{s}") for s in sparsities for p, o in (("text", "visual"),
                                                                                        ("visual", "text"))]
    settings = list(dict.fromkeys(r["cell"]["setting"] for r in method_records if cell_label(r) != "dense"))
    pairs += [("methods", f"atv/{s}", f"wanda/{s}") for s in settings]
    return [pair for pair in pairs if pair[1] in have and pair[2] in have]


def finding_differences(probe_records: list[dict[str, Any]], method_records: list[dict[str, Any]],
                        seed: int = 0) -> list[dict[str, Any]]:
    """The paired differences (:func:`~atv.experiments.compare.compare_cells`) of :func:`finding_pairs`, each
    tagged with its finding; pairs whose records hold no per-item scores (older logs) are left out, logged."""
    from evaluation.intervals import Bootstrap
    from pruning.errors import ToolkitError

    from .compare import compare_cells

    found = []
    for finding, a, b in finding_pairs(probe_records, method_records):
        records = probe_records if a.split("/")[0] in ("text", "visual") else method_records
        try:
            found.append({"finding": finding, **compare_cells(records, a, b, Bootstrap(seed=seed))})
        except ToolkitError as err:
            log.warning("no paired difference for %s vs %s: %s", a, b, err)
    return found


def _dense_summary(record: dict[str, Any], suite: Path) -> dict[str, Any]:
    summary = json.loads((suite / "suite.json").read_text(encoding="utf-8"))["benchmarks"]
    intervals = (record.get("intervals") or {}).get("scores", {})

    def percent(chance: float | None) -> float | None:
        return None if chance is None else 100 * chance  # suite.json holds fractions

    return {name: {"score": score, "interval": intervals.get(name), "chance": percent(summary[name]["chance"]),
                   "kind": summary[name]["kind"]} for name, score in record["scores"].items()}


def _analysis(model, calibration, calib_ids: list[str], suite: Path, config: DemoConfig,
              progress: bool) -> tuple[list[str], dict[str, str]]:
    """Collect the analysis artefacts (dense model) into OUT/analysis, then draw every figure."""
    from PIL import Image

    from analysis.drift import collect_drift, save_drift
    from analysis.figures import make_figures
    from analysis.masks import collect_pool_masks, save_pool_masks
    from analysis.tsne import collect_hidden_states, save_hidden_states
    from pruning.adapters import get_adapter

    folder = config.out / "analysis"
    n_layers = len(get_adapter(model).decoder_layers(model))
    layers = sorted({0, n_layers // 2, n_layers - 1})
    if not (folder / "hidden_states.pt").is_file():
        states = collect_hidden_states(model, calibration, layers, max_per_modality=300 if config.quick else 1000,
                                       seed=config.seed)
        save_hidden_states(states, folder / "hidden_states.pt")
    if not (folder / "pool_masks.pt").is_file():
        save_pool_masks(collect_pool_masks(model, calibration, sparsity=0.5), folder / "pool_masks.pt")
    if not (folder / "drift.pt").is_file():
        records = {str(r.get("id")): r for r in json.loads((suite / "calib.json").read_text(encoding="utf-8"))}
        with Image.open(suite / records[calib_ids[0]]["image"]) as image:
            save_drift(collect_drift(model, calibration), folder / "drift.pt", image=image.convert("RGB"),
                       image_sample=0)
    formats = ("png",) if config.quick else ("png", "pdf")
    report = make_figures(config.out, config.out / "figures", formats=formats)
    return [str(p) for p in report.made], dict(report.skipped)


def _write_report(result: DemoResult, config: DemoConfig) -> Path:
    lines = [f"# ATV toolkit demo on smol-llava{' (quick)' if config.quick else ''}", "",
             f"Seed {config.seed}; {config.nsamples} calibration samples; {config.n_eval} items per image benchmark.",
             "Values in brackets are 95% percentile-bootstrap intervals over the benchmark items (2000 resamples; "
             "retention resampled together with the dense model's items). A value without brackets comes from a "
             "record written before per-item scores were kept.",
             "", "## Dense model", "", "| benchmark | kind | dense score (%) | 95% interval | chance (%) |",
             "|---|---|---:|---:|---:|"]
    for name, row in result.dense.items():
        chance = "–" if row["chance"] is None else f"{row['chance']:.1f}"
        interval = "–" if row.get("interval") is None else "[{:.1f}, {:.1f}]".format(*row["interval"])
        lines.append(f"| {name} | {row['kind']} | {row['score']:.1f} | {interval} | {chance} |")
    lines += ["", "Fidelity scores are top-1 agreement with the dense model (100 by definition when dense).", "",
              "## MoT probe (mean retention, % of dense)", "", result.probe_table,
              "## Methods on the shared weights (mean retention, % of dense)", "", result.method_table,
              "Per benchmark (scores, %):", "", result.method_scores,
              "## Findings as paired differences (mean retention, % of dense)", "",
              "A − B resampled on the same items of both cells and of the dense model; 'separates': its 95% "
              "interval excludes 0. B: the visual path keeps more than the text path (same pool); A: a path keeps "
              "more with its own modality's calibration pool; methods: ATV vs Wanda.", "",
              result.differences or "(no pair with per-item scores)\n", "## Figures", ""]
    lines += [f"![{Path(p).stem}](figures/{Path(p).name})" for p in result.figures if p.endswith(".png")]
    if result.skipped:
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in result.skipped.items())]
    lines += ["", "## Time", "", timing_table(result.seconds)]
    path = result.out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    (result.out / "demo.json").write_text(json.dumps({"config": asdict(config), **asdict(result)}, indent=2,
                                                     default=str), encoding="utf-8")
    return path


def timing_table(seconds: dict[str, float]) -> str:
    """The steps' wall times as a Markdown table (m:ss and seconds), with their total."""
    def clock(value: float) -> str:
        minutes, rest = divmod(round(value), 60)
        return f"{minutes}:{rest:02d}"

    rows = [*seconds.items(), ("total", sum(seconds.values()))]
    lines = ["| step | wall time | seconds |", "|---|---:|---:|"]
    lines += [f"| {step} | {clock(value)} | {value:.1f} |" for step, value in rows]
    return "\n".join(lines) + "\n"
