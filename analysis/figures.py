"""``atv figures``: regenerate every figure and table from a results folder, without any model.

Results folder layout (each part optional; what is missing is skipped with the reason)::

    DIR/probe/results.jsonl          probe records (atv probe)         -> sensitivity, probe_table.*
    DIR/methods/results.jsonl        method records                    -> methods_retention, methods_scores,
                                                                          method_table.*
    DIR/map/results.jsonl            sensitivity map (atv probe --map) -> sensitivity_map, map_table.*,
                                                                          map_top1.*
    DIR/analysis/hidden_states.pt    analysis.tsne.save_hidden_states  -> tsne
    DIR/analysis/pool_masks.pt       analysis.masks.save_pool_masks    -> mask_iou
    DIR/analysis/drift.pt            analysis.drift.save_drift         -> drift, drift_patches (needs a
                                                                          saved image and a square grid)

Example::

    report = make_figures("results", "figures")
    print(report.summary())
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pruning.errors import ToolkitError
from pruning.io import read_log
from pruning.options import check_seed

from .records import check_records

log = logging.getLogger(__name__)

PROBE_RECORDS = Path("probe") / "results.jsonl"
# what each log's cells (but the dense one) hold: cell keys, record keys
PROBE_KEYS = ("pathway", "pool", "sparsity"), ("mean_retention",)
METHOD_KEYS = ("method", "setting"), ("scores",)
MAP_KEYS = ("layer", "pathway", "group"), ("kl", "top1")
METHOD_RECORDS = Path("methods") / "results.jsonl"
MAP_RECORDS = Path("map") / "results.jsonl"
HIDDEN_STATES = Path("analysis") / "hidden_states.pt"
POOL_MASKS = Path("analysis") / "pool_masks.pt"
DRIFT = Path("analysis") / "drift.pt"


@dataclass
class FiguresReport:
    """What :func:`make_figures` wrote, and what it did not make and why.

    Args:
        made: figure files written.
        tables: table files written.
        skipped: figure or table name -> why it was not made.
    """
    made: list[Path] = field(default_factory=list)           # figure files written
    tables: list[Path] = field(default_factory=list)         # table files written
    skipped: dict[str, str] = field(default_factory=dict)    # figure/table name -> why it was not made

    def summary(self) -> str:
        lines = [f"{len(self.made)} figure files and {len(self.tables)} table files written"]
        lines += [f"  {p}" for p in self.made + self.tables]
        lines += [f"skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


class _Maker:
    """Shared state of one make_figures call: where to read, where to write, what happened."""

    def __init__(self, results: Path, out: Path, formats: tuple[str, ...], report: FiguresReport):
        self.results, self.out, self.formats, self.report = results, out, formats, report

    def skip(self, name: str, reason: str) -> None:
        self.report.skipped[name] = reason
        log.warning("skipped %s: %s", name, reason)

    def source(self, names: Sequence[str], relative: Path) -> Path | None:
        path = self.results / relative
        if path.is_file():
            return path
        for name in names:
            self.skip(name, f"{path} not found")
        return None

    def load(self, names: Sequence[str], relative: Path, loader: Callable[[Path], Any]) -> Any | None:
        """``loader(path)`` of an existing file, or None (every figure in ``names`` skipped) when the file is
        missing or the loader raises a ToolkitError (corrupt or foreign content)."""
        path = self.source(names, relative)
        if path is None:
            return None
        try:
            return loader(path)
        except ToolkitError as err:
            for name in names:
                self.skip(name, str(err) if str(path) in str(err) else f"{path}: {err}")
            return None

    def figure(self, name: str, build: Callable[[], Any]) -> None:
        """Build one figure (``build`` returns a Figure or (data, Figure)) and save it; a ToolkitError
        from bad or insufficient data becomes a skip with its message, anything else propagates."""
        from .style import save_figure

        try:
            built = build()
        except ToolkitError as err:
            self.skip(name, str(err))
            return
        fig = built[1] if isinstance(built, tuple) else built
        self.report.made += save_figure(fig, self.out / name, self.formats)

    def table(self, name: str, build: Callable[[], Any]) -> None:
        from .tables import write_table

        try:
            table = build()
        except (ToolkitError, KeyError, TypeError) as err:
            self.skip(name, f"records do not make a table: {err!r}")
            return
        if not table[1]:
            self.skip(name, "no rows (only a dense record?)")
            return
        self.report.tables += write_table(table, name, self.out)


def make_figures(results_dir: str | Path, out_dir: str | Path, formats: Sequence[str] = ("png", "pdf"),
                 seed: int = 0) -> FiguresReport:
    """Make every figure and table the results folder has data for (layout in the module docstring).

    Args:
        results_dir: a results folder (``probe/results.jsonl``, ``methods/results.jsonl``, ``map/results.jsonl``,
            ``analysis/*.pt``), e.g. a demo's.
        out_dir: where the figures and tables go (an ``out_dir`` this call created stays only when something was
            made).
        formats: figure formats, from ``png``, ``pdf``, ``svg``.
        seed: the t-SNE seed.

    Returns:
        A report listing the written files and, per figure or table not made, the reason.

    Raises:
        ToolkitError: only when ``results_dir`` does not exist, ``out_dir`` cannot be created, or ``formats``
            (or ``seed``) is bad.
    """
    from .style import check_formats

    results, out = Path(results_dir), Path(out_dir)
    formats = check_formats(formats)
    check_seed(seed)
    if not results.is_dir():
        raise ToolkitError(f"results folder {results} does not exist")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ToolkitError(f"output folder {out} cannot be created: it, or a folder above it, is a file; choose "
                           "another --out") from None
    maker = _Maker(results, out, formats, FiguresReport())
    _probe(maker)
    _methods(maker)
    _map(maker)
    _tsne(maker, seed)
    _masks(maker)
    _drift(maker)
    if created and not any(out.iterdir()):
        out.rmdir()  # nothing made: leave no empty folder behind
    log.info("figures: %d files made, %d skipped", len(maker.report.made), len(maker.report.skipped))
    return maker.report


def _reader(cell_keys: Sequence[str], values: Sequence[str]) -> Callable[[Path], list[dict[str, Any]]]:
    """A result log's records, refused (naming the file and record) when one lacks what the figures read."""
    return lambda path: check_records(read_log(path), path, cell_keys, values)


def _probe(maker: _Maker) -> None:
    from .sensitivity import sensitivity_figure
    from .tables import probe_table

    records = maker.load(["sensitivity", "probe_table"], PROBE_RECORDS, _reader(*PROBE_KEYS))
    if records is None:
        return
    maker.figure("sensitivity", lambda: sensitivity_figure(records))
    maker.table("probe_table", lambda: probe_table(records))


def _methods(maker: _Maker) -> None:
    from .sensitivity import method_figure
    from .tables import method_table

    records = maker.load(["methods_retention", "methods_scores", "method_table"], METHOD_RECORDS, _reader(*METHOD_KEYS))
    if records is None:
        return
    maker.figure("methods_retention", lambda: method_figure(records, "retention"))
    maker.figure("methods_scores", lambda: method_figure(records, "scores"))
    maker.table("method_table", lambda: method_table(records))


def _map(maker: _Maker) -> None:
    from .sensitivity_map import map_figure, map_table

    records = maker.load(["sensitivity_map", "map_table", "map_top1"], MAP_RECORDS, _reader(*MAP_KEYS))
    if records is None:
        return
    maker.figure("sensitivity_map", lambda: map_figure(records))
    maker.table("map_table", lambda: map_table(records, "kl"))
    maker.table("map_top1", lambda: map_table(records, "top1"))


def _tsne(maker: _Maker, seed: int) -> None:
    from .tsne import load_hidden_states, tsne_figure

    states = maker.load(["tsne"], HIDDEN_STATES, load_hidden_states)
    if states is not None:
        maker.figure("tsne", lambda: tsne_figure(states, seed=seed))


def _masks(maker: _Maker) -> None:
    from .masks import DEFAULT_PAIRS, iou_figure, load_pool_masks, pool_iou

    saved = maker.load(["mask_iou"], POOL_MASKS, load_pool_masks)
    if saved is None:
        return

    def build():
        pairs = [p for p in DEFAULT_PAIRS if set(p) <= set(saved["masks"])]
        if not pairs:
            raise ToolkitError(f"pool masks hold pools {saved['pools']}; the IoU needs text+visual or all+text")
        return iou_figure(pool_iou(saved, pairs), saved["sparsity"], saved["method"])

    maker.figure("mask_iou", build)


def _drift(maker: _Maker) -> None:
    from .drift import drift_figure, load_drift, overlay_layout, patch_overlay_figure

    data = maker.load(["drift", "drift_patches"], DRIFT, load_drift)
    if data is None:
        return
    maker.figure("drift", lambda: drift_figure(data))
    side, reason = overlay_layout(data)
    if side is None:
        maker.skip("drift_patches", reason)
    else:
        maker.figure("drift_patches", lambda: patch_overlay_figure(data))

