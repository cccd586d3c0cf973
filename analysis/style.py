"""One look for every figure: a colour-blind-safe palette, fonts, constrained layout, and saving.

Figures are built as bare :class:`matplotlib.figure.Figure` objects (never through ``pyplot``), so
no GUI backend is touched, nothing is registered in pyplot's global figure list, and a figure is
freed as soon as it is no longer referenced; :func:`save_figure` renders with the Agg canvas.

Example::

    with style_context():
        fig = new_figure(6, 4)
        ax = fig.add_subplot()
        ...
    paths = save_figure(fig, out_dir / "sensitivity", ("png", "pdf"))
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Sequence

import matplotlib
from matplotlib.figure import Figure

from pruning.errors import ConfigError

log = logging.getLogger(__name__)

# seaborn's "colorblind" palette (Okabe-Ito-like), spelled out so that building a figure does not
# need seaborn's import; tests check it is the same list seaborn returns.
PALETTE = ("#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc", "#ca9161", "#fbafe4", "#949494",
           "#ece133", "#56b4e9")

# Fixed colours for the concepts that recur across figures, so "text" is the same blue everywhere.
MODALITY_COLORS = {"text": PALETTE[0], "visual": PALETTE[1]}
POOL_COLORS = {"text": PALETTE[0], "visual": PALETTE[1], "mixed": PALETTE[2], "all": PALETTE[2],
               "atv": PALETTE[3], "random-visual": PALETTE[4]}
PATHWAY_LINESTYLES = {"text": "-", "visual": "--"}
DENSE_COLOR = "#4d4d4d"

FORMATS = ("png", "pdf", "svg")
DPI = 200

RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.prop_cycle": matplotlib.cycler(color=list(PALETTE)),
    "pdf.fonttype": 42,  # embed TrueType, so the PDF text stays editable/searchable
    "figure.constrained_layout.use": True,
}


@contextlib.contextmanager
def style_context() -> Iterator[None]:
    """Apply the toolkit's rc parameters while figures are built (artists read them on creation)."""
    with matplotlib.rc_context(RC):
        yield


def new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure of ``width`` x ``height`` inches with constrained layout."""
    return Figure(figsize=(width, height), layout="constrained")


def color_for(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    formats = tuple(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"figure formats must be among {list(FORMATS)}, got {list(formats)}")
    return formats


# No creation date (and for PNG no software tag): the same results give byte-identical files.
STABLE_METADATA = {"pdf": {"CreationDate": None}, "png": {"Software": None}, "svg": {"Date": None}}


def save_figure(fig: Figure, stem: str | Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``fig`` as ``stem.<fmt>`` for every format and release its canvas; returns the paths."""
    formats = check_formats(formats)
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(path, dpi=DPI, format=fmt, metadata=STABLE_METADATA.get(fmt))
        paths.append(path)
        log.info("wrote %s", path)
    fig.clear()
    return paths


def wrap_label(text: str, width: int = 14) -> str:
    """Break a long tick label on spaces/underscores/dashes so neighbouring labels do not overlap."""
    if len(text) <= width:
        return text
    import textwrap

    return "\n".join(textwrap.wrap(text.replace("_", "_ ").replace("-", "- "), width)).replace("_ ", "_").replace(
        "- ", "-")
