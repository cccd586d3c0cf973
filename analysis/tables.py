"""Tables of the study: pure functions from result records to rows, and rows to Markdown / CSV / LaTeX.

A *probe record* (one per finished cell of ``atv probe``, see :mod:`atv.experiments.probe_study`) looks like::

    {"cell": {"pathway": "text", "pool": "visual", "sparsity": 0.5}, "mean_retention": 94.3,
     "retention": {"bench": 95.0, ...}, "scores": {"bench": 61.0, ...}}

The dense baseline has ``"cell": {"pathway": "dense"}``.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Iterable, Sequence

Table = tuple[list[str], list[list[str]]]  # (header, rows)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def sparsity_label(sparsity: float) -> str:
    return f"{100 * sparsity:g}% sparsity"


def probe_table(records: Iterable[dict[str, Any]]) -> Table:
    """Mean retention (% of dense) per pathway x calibration pool (rows) and sparsity (columns),
    in the layout of the paper's probe table. Missing cells show as '–'."""
    records = [r for r in records if r["cell"]["pathway"] != "dense"]
    sparsities = sorted({r["cell"]["sparsity"] for r in records})
    rows_order: list[tuple[str, str]] = []
    values: dict[tuple[str, str, float], float] = {}
    for r in records:
        key = (r["cell"]["pathway"], r["cell"]["pool"])
        if key not in rows_order:
            rows_order.append(key)
        values[key + (r["cell"]["sparsity"],)] = r["mean_retention"]
    header = ["pathway", "calibration"] + [sparsity_label(s) for s in sparsities]
    rows = [[p, q] + [_pct(values.get((p, q, s))) for s in sparsities] for p, q in rows_order]
    return header, rows


def scores_table(records: Iterable[dict[str, Any]], label: Any = None) -> Table:
    """Per-benchmark scores of every record (rows) with the mean retention; ``label(record)`` names a row."""
    records = list(records)
    label = label or (lambda r: " / ".join(str(v) for v in r["cell"].values()))
    benches = list(records[0]["scores"]) if records else []
    header = ["setting"] + benches + ["mean retention"]
    rows = [[label(r)] + [_pct(r["scores"].get(b)) for b in benches] + [_pct(r.get("mean_retention"))]
            for r in records]
    return header, rows


def method_table(records: Iterable[dict[str, Any]]) -> Table:
    """Mean retention (% of dense) per method (rows) and setting (columns, e.g. '50%', '60%', '2:4'),
    from method records ``{"cell": {"method", "setting"}, "mean_retention", ...}``; the dense record
    is left out (100 by definition). Rows and columns keep the records' order; missing cells show '–'."""
    records = [r for r in records if r["cell"]["method"] != "dense"]
    methods = list(dict.fromkeys(r["cell"]["method"] for r in records))
    settings = list(dict.fromkeys(r["cell"]["setting"] for r in records))
    values = {(r["cell"]["method"], r["cell"]["setting"]): r.get("mean_retention") for r in records}
    header = ["method"] + [str(s) for s in settings]
    rows = [[m] + [_pct(values.get((m, s))) for s in settings] for m in methods]
    return header, rows


def _numeric_columns(table: Table) -> list[bool]:
    """Per column: every cell is a number or a dash (right-aligned), else text (left-aligned)."""
    header, rows = table

    def numeric(cell: str) -> bool:
        try:
            float(cell)
        except ValueError:
            return cell.strip() in ("–", "-", "")
        return True

    return [bool(rows) and all(numeric(row[i]) for row in rows) for i in range(len(header))]


def to_markdown(table: Table) -> str:
    header, rows = table
    align = ["---:" if numeric else "---" for numeric in _numeric_columns(table)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    header, rows = table
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                          ("–", "--")):
        text = text.replace(char, escaped)
    return text


def to_latex(table: Table, caption: str | None = None) -> str:
    """A booktabs tabular (in a table environment when ``caption`` is given)."""
    header, rows = table
    spec = "".join("r" if numeric else "l" for numeric in _numeric_columns(table))
    body = [r"\begin{tabular}{" + spec + "}", r"\toprule",
            " & ".join(_latex_escape(h) for h in header) + r" \\", r"\midrule"]
    body += [" & ".join(_latex_escape(c) for c in row) + r" \\" for row in rows]
    body += [r"\bottomrule", r"\end{tabular}"]
    if caption is None:
        return "\n".join(body) + "\n"
    return "\n".join([r"\begin{table}[t]", r"\centering", *body, rf"\caption{{{_latex_escape(caption)}}}",
                      r"\end{table}"]) + "\n"


def write_table(table: Table, stem: str, folder, formats: Sequence[str] = ("md", "csv", "tex")) -> list:
    """Write ``table`` as ``folder/stem.{md,csv,tex}``; returns the paths."""
    from pathlib import Path

    writers = {"md": to_markdown, "csv": to_csv, "tex": to_latex}
    paths = []
    for fmt in formats:
        path = Path(folder) / f"{stem}.{fmt}"
        path.write_text(writers[fmt](table), encoding="utf-8")
        paths.append(path)
    return paths
