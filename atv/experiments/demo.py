"""``atv demo``: the whole study on the embedded default model, in one output folder.

Steps (each resumable: re-running the same command skips what is finished):

1. build (or reuse) the default model ``smol-llava`` and write the offline benchmark suite;
2. evaluate the dense model (scores next to chance);
3. the MoT probe grid (pathway x calibration pool x sparsity);
4. full demo: the sensitivity map (one layer's path pruned at a time, scored by KL on held-out prompts from
   the suite's train split);
5. ATV vs Wanda vs ATV with the OWL allocation and ATV with the map's allocation on the shared weights;
6. analysis artefacts (hidden states, pool masks, drift) and every figure;
7. ``report.md`` with the tables (every value with its 95% bootstrap interval over items), the paired
   differences behind the study's findings and what each shows, the figures and a timing table (wall and
   CPU time per step).

The defaults sit where the 135M default model is not collapsed (30-50% sparsity; at 60% every method keeps
about a third of the dense scores and the findings drown in noise). ``--quick`` probes both pathways at 40%
with the mixed pool and compares ATV with Wanda at 40%, on 12 items per benchmark and 8 calibration samples:
five evaluations and no map, enough items for finding B's paired interval to separate from 0, in a few
minutes.
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
from pruning.options import check_seed, option
from pruning.outputs import MARKER, check_resumable_folder, mark_folder, write_text_atomic

from .executors import ExecutorOptions

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """``atv demo``: the whole study on the embedded default model (the quick variant with ``quick``).

    Args:
        out: output folder (suite, results, figures, report.md; default ``runs/demo``, quick ``runs/demo-quick``).
        quick: smaller grid, fewer items and calibration samples (a few minutes).
        seed: seed of the suite, the calibration sampling and the pruners.
        cache_dir: where the default model is built (default ``$ATV_CACHE`` or ``~/.cache/atv-toolkit``).
        nsamples: calibration samples (default 32, quick 8).
        n_eval: items per benchmark (default 20, quick 12).
        probe_sparsities: probe sparsities (default 0.3 0.4 0.5, quick 0.4).
        pools: probe calibration pools (default text visual mixed, quick mixed).
        settings: method settings, e.g. ``50%`` or ``2:4`` (default 40% 50%, quick 40%).
        methods: methods on the shared weights, ``METHOD`` or ``METHOD+ALLOCATION``.
        allocation_map: a sensitivity map for the ``atv+map`` cells instead of the full demo's own map step.
        no_map: full demo: leave out the sensitivity map step and the ``atv+map`` cells.
        map_items: prompts of the map step.
        batch_size: evaluation items per forward.
        calib_batch_size: calibration samples per forward.
        run: where the cells run (in this process, or as Ray tasks).
    """
    out: Path | None = option(None, "output folder (suite, results, figures, report.md; default runs/demo, with "
                                    "--quick runs/demo-quick)")
    quick: bool = option(False, "smaller grid, fewer items and calibration samples (a few minutes)")
    seed: int = option(0, "seed of the suite, the calibration sampling and the pruners")
    cache_dir: Path | None = option(None, "where the default model is built (default $ATV_CACHE or "
                                          "~/.cache/atv-toolkit)")
    nsamples: int | None = option(None, "calibration samples (default 32, quick 8)")
    n_eval: int | None = option(None, "items per benchmark (default 20, quick 12; the text-only ones hold at most "
                                      "44 and 40)")
    probe_sparsities: tuple[float, ...] = option((), "probe sparsities (default 0.3 0.4 0.5, quick 0.4)")
    pools: tuple[str, ...] = option((), "probe calibration pools (default text visual mixed, quick mixed)")
    settings: tuple[str, ...] = option((), "method settings, e.g. 50% 2:4 (default 40% 50%, quick 40%)")
    methods: tuple[str, ...] = option((), "methods on the shared weights, METHOD or METHOD+ALLOCATION (default atv "
                                          "wanda atv+owl, plus atv+map with --allocation-map; quick atv wanda)")
    allocation_map: Path | None = option(None, "a sensitivity map (atv probe --map folder or its "
                                               "sensitivity_map.json) for the atv+map cells, instead of the "
                                               "full demo's own map step")
    no_map: bool = option(False, "full demo: leave out the sensitivity map step and the atv+map cells")
    map_items: int = option(16, "prompts of the map step (held-out questions of the suite's train split)")
    batch_size: int = option(16, "evaluation items per forward")
    calib_batch_size: int = option(8, "calibration samples per forward (padded; padding is masked out)")
    run: ExecutorOptions = option(default_factory=ExecutorOptions, cli=False)  # probe and method cells: here or Ray

    def __post_init__(self) -> None:
        given = {"nsamples": self.nsamples, "n_eval": self.n_eval}  # 0 is refused below, not taken as "default"
        self.out = Path(self.out) if self.out is not None else Path("runs/demo-quick" if self.quick else "runs/demo")
        self.nsamples = self.nsamples or (8 if self.quick else 32)
        self.n_eval = self.n_eval or (12 if self.quick else 20)
        self.probe_sparsities = tuple(self.probe_sparsities) or ((0.4,) if self.quick else (0.3, 0.4, 0.5))
        self.pools = tuple(self.pools) or (("mixed",) if self.quick else ("text", "visual", "mixed"))
        with_map = ("atv+map",) if self.map_folder is not None else ()
        self.methods = tuple(self.methods) or (("atv", "wanda") if self.quick else ("atv", "wanda", "atv+owl")
                                               + with_map)
        self.settings = tuple(self.settings) or (("40%",) if self.quick else ("40%", "50%"))
        sizes = {"nsamples": self.nsamples, "n_eval": self.n_eval, "batch_size": self.batch_size,
                 "calib_batch_size": self.calib_batch_size, "map_items": self.map_items}
        sizes.update({k: v for k, v in given.items() if v is not None})
        bad = {k: v for k, v in sizes.items() if v < 1}
        if bad:
            raise ConfigError(f"{', '.join(f'{k}={v}' for k, v in bad.items())}: must be >= 1")
        check_seed(self.seed)
        if self.allocation_map is not None:
            self.allocation_map = Path(self.allocation_map)
        self.study_config(), self.compare_config()  # refuses a bad pool, sparsity, method or setting now

    @property
    def map_step(self) -> bool:
        """Whether the demo computes its own sensitivity map (the full demo, unless --no-map or a given map)."""
        return not self.quick and not self.no_map and self.allocation_map is None

    @property
    def map_folder(self) -> Path | None:
        """The sensitivity map the atv+map cells read: the given one, the map step's, or none."""
        if self.allocation_map is not None:
            return Path(self.allocation_map)
        return self.out / "map" if self.map_step else None

    def study_config(self):
        """The probe grid's :class:`~atv.experiments.probe_study.StudyConfig`."""
        from .probe_study import StudyConfig

        return StudyConfig(pools=self.pools, sparsities=self.probe_sparsities, seed=self.seed,
                           batch_size=self.batch_size)

    def compare_config(self):
        """The method grid's :class:`~atv.experiments.compare.CompareConfig`."""
        from .compare import CompareConfig

        return CompareConfig(methods=self.methods, settings=self.settings, seed=self.seed, batch_size=self.batch_size,
                             allocation_map=None if self.map_folder is None else str(self.map_folder))


@dataclass
class DemoResult:
    out: Path
    dense: dict[str, Any]
    probe_table: str
    method_table: str                         # mean retention per method x setting
    method_scores: str                        # per-benchmark scores of every cell
    differences: str                          # the findings' paired differences (mean retention, intervals)
    verdicts: list[str]                       # what each finding's differences show, in words
    figures: list[str]
    skipped: dict[str, str]
    seconds: dict[str, float]                 # wall time per step
    cpu_seconds: dict[str, float]             # CPU time per step (user + system, this process and its children)
    load_average: list[float] | None          # the machine's 1, 5 and 15 minute load averages at the end
    map_summary: str = ""                     # the map step's text - visual KL contrasts (full demo)


def check_demo_folder(config: DemoConfig) -> Path:
    """Refuse (before any work) an --out the demo may not write into: the working folder, one holding or inside
    the model cache, or a non-empty folder atv-toolkit did not write (a demo folder written before folders
    were marked is known by its suite's marker)."""
    from atv.default_model import cache_root

    return check_resumable_folder(config.out, [cache_root(config.cache_dir)], known=(f"suite/{MARKER}",))


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
    """Run (or resume) every step of the demo; see the module docstring.

    Args:
        config: the demo's options.
        progress: show progress bars.

    Returns:
        The tables, findings, figures and timings also written to ``report.md`` in the output folder.

    Raises:
        ToolkitError: a subclass naming what to change (e.g. an output folder the toolkit did not write).
    """
    from transformers import set_seed

    from analysis.tables import differences_summary, method_table, probe_table, scores_table, to_markdown
    from atv.default_model import build_default_model
    from atv.experiments.cells import CellInputs
    from atv.experiments.compare import CompareCells, run_compare_cells, run_method_comparison
    from atv.experiments.executors import make_executor
    from atv.experiments.probe_study import ProbeCells, run_probe_cells, run_probe_study
    from atv.experiments.records import file_digest, model_inputs
    from pruning.allocation import read_sensitivity_map
    from pruning.data import load_llava_conversations
    from pruning.io import load_model

    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    clock, cpu_clock = time.perf_counter(), cpu_seconds()

    def lap(name: str) -> None:
        nonlocal clock, cpu_clock
        now, cpu_now = time.perf_counter(), cpu_seconds()
        seconds[name], cpu[name] = round(now - clock, 1), round(cpu_now - cpu_clock, 1)
        clock, cpu_clock = now, cpu_now

    check_demo_folder(config)
    if config.allocation_map is not None:
        read_sensitivity_map(config.allocation_map)  # a missing or broken map is named now, not after the grid
    mark_folder(config.out, "demo")
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
    probe_config = config.study_config()
    compare_config = config.compare_config()
    executor = make_executor(config.run)
    try:
        if executor.remote:  # every cell loads the model itself, as this process loaded it
            inputs = CellInputs(str(model_dir), str(suite / "calib.json"), str(suite), tuple(map(str, benches)),
                                config.nsamples, config.seed, calib_batch_size=config.calib_batch_size)
            probe = run_probe_cells(ProbeCells(inputs, probe_config), config.out / "probe", executor,
                                    calibration_batches=len(calibration), setup_extra=extra, progress=progress)
            lap("probe")
            sensitivity = _map_step(model, processor, calibration, config, extra, progress, lap)
            methods = run_compare_cells(CompareCells(inputs, compare_config), config.out / "methods", executor,
                                        calibration_batches=len(calibration), setup_extra=extra, progress=progress,
                                        dense_record=probe.records[0])
        else:
            probe = run_probe_study(model, processor, calibration, benches, config.out / "probe", probe_config,
                                    setup_extra=extra, progress=progress)
            lap("probe")
            sensitivity = _map_step(model, processor, calibration, config, extra, progress, lap)
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
    contrasts = map_contrasts(sensitivity.records, config.seed) if sensitivity is not None else {}
    result = DemoResult(config.out, dense, to_markdown(probe_table(probe.records)),
                        to_markdown(method_table(methods.records)), to_markdown(scores_table(methods.records, label)),
                        to_markdown(differences_summary(differences)),
                        finding_verdicts(differences) + map_verdicts(contrasts), made, skipped, seconds, cpu,
                        _load_average(), _contrast_table(contrasts) if contrasts else "")
    _write_report(result, config)
    return result


FINDINGS = {  # finding -> the claim its pairs test (A − B > 0 when it holds)
    "B": "the text pathway is more fragile than the visual one (visual path − text path, same pool)",
    "A": "a path keeps more with its own modality's calibration pool (own pool − other pool)",
    "methods": "ATV keeps more than Wanda on the shared weights (ATV − Wanda)",
    "allocation": "a non-uniform allocation keeps more than the uniform one (METHOD+ALLOCATION − METHOD)",
}


def finding_pairs(probe_records: list[dict[str, Any]], method_records: list[dict[str, Any]]
                  ) -> list[tuple[str, str, str]]:
    """(finding, cell A, cell B) of the study's claims (:data:`FINDINGS`), for the cells the logs hold: B, per
    sparsity and pool, visual path vs text path (the text pathway is the more fragile); A, per sparsity, each
    path with its own modality's pool vs the other's; methods, per setting, ATV vs Wanda; allocation, per
    setting, each 'METHOD+ALLOCATION' vs its uniform METHOD."""
    from .compare import cell_label

    have = {cell_label(r) for r in probe_records + method_records}
    cells = [r["cell"] for r in probe_records if cell_label(r) != "dense"]
    sparsities = list(dict.fromkeys(c["sparsity"] for c in cells))
    pools = list(dict.fromkeys(c["pool"] for c in cells))
    pairs = [("B", f"visual/{q}/{s}", f"text/{q}/{s}") for s in sparsities for q in pools]
    pairs += [("A", f"{p}/{p}/{s}", f"{p}/{o}/{s}") for s in sparsities for p, o in (("text", "visual"),
                                                                                        ("visual", "text"))]
    methods = [r["cell"] for r in method_records if cell_label(r) != "dense"]
    settings = list(dict.fromkeys(c["setting"] for c in methods))
    pairs += [("methods", f"atv/{s}", f"wanda/{s}") for s in settings]
    allocated = [m for m in dict.fromkeys(c["method"] for c in methods) if "+" in m]
    pairs += [("allocation", f"{m}/{s}", f"{m.split('+')[0]}/{s}") for s in settings for m in allocated]
    return [pair for pair in pairs if pair[1] in have and pair[2] in have]


def finding_verdicts(differences: list[dict[str, Any]], row: str = "mean retention") -> list[str]:
    """One sentence per finding of ``differences`` (:func:`finding_differences`): its claim, in how many pairs
    the 95% interval of A − B lies above 0 (holds), below 0 (reversed) or holds 0 (not separated), and every
    pair's difference with its interval."""
    lines = []
    for finding, claim in FINDINGS.items():
        rows = [(d["a"], d["b"], d["rows"][row]) for d in differences
                if d.get("finding") == finding and row in d["rows"] and d["rows"][row].get("diff_ci")]
        if not rows:
            continue
        verdicts = [_verdict(entry["diff_ci"]) for _, _, entry in rows]
        counts = ", ".join(f"{word} in {verdicts.count(word)}" for word in ("holds", "reversed", "not separated")
                           if word in verdicts)
        pairs = "; ".join(f"{a} − {b} = {entry['diff']:.1f} [{entry['diff_ci'][0]:.1f}, {entry['diff_ci'][1]:.1f}]"
                          f" ({verdict})" for (a, b, entry), verdict in zip(rows, verdicts))
        lines.append(f"**{finding}**: {claim}. Of {len(rows)} pair(s): {counts}. {pairs}.")
    return lines


def _verdict(interval: list[float]) -> str:
    return "holds" if interval[0] > 0 else "reversed" if interval[1] < 0 else "not separated"


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


def _map_step(model, processor, calibration, config: DemoConfig, extra: dict[str, Any], progress: bool, lap):
    """The full demo's sensitivity map (OUT/map) on the dense model, scored on held-out prompts (OUT/map_prompts:
    the suite's train split); None when the demo has no map step."""
    if not config.map_step:
        return None
    from atv.suite import IMAGE_BENCHMARKS, write_prompt_suite

    from .sensitivity_map import MapConfig, run_map_study

    folder, per = config.out / "map_prompts", -(-config.map_items // len(IMAGE_BENCHMARKS))
    summary = folder / "suite.json"
    if not summary.is_file():
        write_prompt_suite(folder, seed=config.seed, per_benchmark=per)
    saved = json.loads(summary.read_text(encoding="utf-8"))
    if (saved.get("seed"), saved.get("per_benchmark")) != (config.seed, per):
        raise ConfigError(f"{folder} holds map prompts written for seed {saved.get('seed')} and "
                          f"{saved.get('per_benchmark')} per benchmark, not {config.seed} and {per}; use another --out")
    result = run_map_study(model, processor, calibration, _benchmarks(folder), config.out / "map",
                           MapConfig(map_items=config.map_items, seed=config.seed, batch_size=config.batch_size),
                           setup_extra=extra, progress=progress)
    lap("map")
    return result


def map_contrasts(records: list[dict[str, Any]], seed: int = 0) -> dict[str, dict[str, Any]]:
    """Finding B on the sensitivity map: text − visual KL over every layer, per projection group and for both
    (:func:`~atv.experiments.sensitivity_map.pathway_contrast`)."""
    from evaluation.intervals import Bootstrap

    from .sensitivity_map import pathway_contrast

    boot = Bootstrap(seed=seed)
    return {name: pathway_contrast(records, group, boot) for name, group in (("attn", "attn"), ("ffn", "ffn"),
                                                                             ("both", None))}


def map_verdicts(contrasts: dict[str, dict[str, Any]]) -> list[str]:
    """One sentence for finding B as the map measures it (KL: more is worse, so text − visual > 0 holds)."""
    if not contrasts:
        return []
    verdicts = [_verdict(c["diff_ci"]) for c in contrasts.values()]
    counts = ", ".join(f"{word} in {verdicts.count(word)}" for word in ("holds", "reversed", "not separated")
                       if word in verdicts)
    pairs = "; ".join(f"{name}: {c['diff']:.3g} [{c['diff_ci'][0]:.3g}, {c['diff_ci'][1]:.3g}] nats ({verdict})"
                      for (name, c), verdict in zip(contrasts.items(), verdicts))
    return [f"**B (map)**: pruning one layer's text path costs more KL than pruning its visual path (text − visual, "
            f"mean over layers and held-out prompts). Of {len(contrasts)} group(s): {counts}. {pairs}."]


def _contrast_table(contrasts: dict[str, dict[str, Any]]) -> str:
    lines = ["| projections | cells | text: mean KL | visual: mean KL | text − visual | separates |",
             "|---|---:|---:|---:|---:|---|"]
    for name, c in contrasts.items():
        low, high = c["diff_ci"]
        separates = "yes" if low > 0 or high < 0 else "no"
        lines.append(f"| {name} | {c['cells']} | {c['text']:.4g} | {c['visual']:.4g} | {c['diff']:.4g} "
                     f"[{low:.3g}, {high:.3g}] | {separates} |")
    return "\n".join(lines) + "\n"


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
    skipped = dict(report.skipped)
    if config.map_folder is None:  # no map in this demo: say so once instead of three "not found"
        skipped = {k: v for k, v in skipped.items() if not k.startswith(("sensitivity_map", "map_"))}
        skipped["sensitivity map"] = "this demo has no map step (the full demo has one)"
    return [str(p) for p in report.made], skipped


def _write_report(result: DemoResult, config: DemoConfig) -> Path:
    lines = [f"# ATV toolkit demo on smol-llava{' (quick)' if config.quick else ''}", "",
             f"Seed {config.seed}; {config.nsamples} calibration samples; {config.n_eval} items per benchmark "
             "(text-only benchmarks hold at most the items written).",
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
              *(["## Sensitivity map (finding B layer by layer)", "",
                 "One layer's text or visual path pruned at a time (its attention or FFN projections, 70% Wanda, mixed "
                 "pool), scored by the mean KL of the next-token distributions against the dense model on held-out "
                 "prompts (the suite's train split); table map/map_table.md, heat map figures/sensitivity_map.png. "
                 "Per prompt, the mean KL over the text cells minus that over the visual cells; 95% interval over "
                 "the prompts.", "", result.map_summary] if result.map_summary else []),
              "## Methods on the shared weights (mean retention, % of dense)", "", result.method_table,
              "Per benchmark (scores, %):", "", result.method_scores,
              "## Findings as paired differences (mean retention, % of dense)", "",
              "A − B resampled on the same items of both cells and of the dense model; 'separates': its 95% "
              "interval excludes 0. B: the visual path keeps more than the text path (same pool); A: a path keeps "
              "more with its own modality's calibration pool; methods: ATV vs Wanda; allocation: ATV with a "
              "non-uniform allocation vs uniform ATV.", "",
              result.differences or "(no pair with per-item scores)\n", "### What this run shows", "",
              *(f"- {line}" for line in result.verdicts or ["(no finding with an interval)"]), "",
              "'holds': the interval lies above 0; 'reversed': below 0; 'not separated': it holds 0 (this run "
              "cannot tell).", "", "## Figures", ""]
    lines += [f"![{Path(p).stem}](figures/{Path(p).name})" for p in result.figures if p.endswith(".png")]
    if result.skipped:
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in result.skipped.items())]
    load = "" if result.load_average is None else (" Load average of the machine at the end (1, 5, 15 min): "
                                                    + ", ".join(f"{v:.2f}" for v in result.load_average) + ".")
    lines += ["", "## Time", "", "Wall and CPU time (user + system, this process and its children) per step; "
              "'setup' includes building the default model when it is not cached." + load, "",
              timing_table(result.seconds, result.cpu_seconds)]
    path = write_text_atomic(result.out / "report.md", "\n".join(lines))
    write_text_atomic(result.out / "demo.json", json.dumps({"config": asdict(config), **asdict(result)}, indent=2,
                                                           default=str))
    return path


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children, in seconds."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None


def timing_table(seconds: dict[str, float], cpu: dict[str, float] | None = None) -> str:
    """The steps' wall times as a Markdown table (m:ss and seconds), with their total; with ``cpu`` (step ->
    CPU seconds) a CPU column too."""
    def clock(value: float) -> str:
        minutes, rest = divmod(round(value), 60)
        return f"{minutes}:{rest:02d}"

    rows = [*seconds.items(), ("total", sum(seconds.values()))]
    cpu_rows = None if cpu is None else {**cpu, "total": sum(cpu.values())}
    lines = ["| step | wall time | seconds |" + (" CPU seconds |" if cpu_rows else ""),
             "|---|---:|---:|" + ("---:|" if cpu_rows else "")]
    for step, value in rows:
        extra = "" if cpu_rows is None else (f" {cpu_rows[step]:.1f} |" if step in cpu_rows else " – |")
        lines.append(f"| {step} | {clock(value)} | {value:.1f} |" + extra)
    return "\n".join(lines) + "\n"
