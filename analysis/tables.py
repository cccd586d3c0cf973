"""Tables of the study: pure functions from result records to rows, and rows to Markdown / CSV / LaTeX.

A *probe record* (one per finished cell of ``atv probe``, see :mod:`atv.experiments.probe_study`) looks like::

    {"cell": {"pathway": "text", "pool": "visual", "sparsity": 0.5}, "mean_retention": 94.3,
     "retention": {"bench": 95.0, ...}, "scores": {"bench": 61.0, ...}}

The dense baseline has ``"cell": {"pathway": "dense"}``. A record may carry ``"intervals"`` (95% bootstrap
intervals over items, see :mod:`atv.experiments.cells`): a value with an interval is written
``71.30 [64.0, 78.1]`` (the point to two decimals, the bounds to one: their Monte Carlo error is larger);
a record without intervals (written before they existed) shows the point alone.
"""

from __future__ import annotations

import csv
import io
import re
from typing import Any, Iterable, Mapping, Sequence

Table = tuple[list[str], list[list[str]]]  # (header, rows)
_WITH_INTERVAL = re.compile(r"^([+-]?[0-9.]+) \[[+-]?[0-9.]+, [+-]?[0-9.]+\]$")


def with_interval(value: float | None, interval: Sequence[float] | None = None) -> str:
    """'71.30', or '71.30 [64.0, 78.1]' with an interval; '–' for a missing value."""
    if value is None:
        return "–"
    if interval is None:
        return f"{value:.2f}"
    return f"{value:.2f} [{interval[0]:.1f}, {interval[1]:.1f}]"


_pct = with_interval  # the short name the tables below use


def record_interval(record: Mapping[str, Any], kind: str, name: str | None = None) -> list[float] | None:
    """A record's interval of ``kind`` ('mean_retention'; 'scores' or 'retention' of benchmark ``name``), or
    None when the record has none (written before intervals, or the items do not define one)."""
    found = (record.get("intervals") or {}).get(kind)
    if name is not None:
        found = (found or {}).get(name)
    return found if isinstance(found, (list, tuple)) and len(found) == 2 else None


def sparsity_label(sparsity: float) -> str:
    return f"{100 * sparsity:g}% sparsity"


def probe_table(records: Iterable[dict[str, Any]]) -> Table:
    """Mean retention (% of dense) per pathway x calibration pool (rows) and sparsity (columns),
    in the layout of the paper's probe table. Missing cells show as '–'."""
    records = [r for r in records if r["cell"]["pathway"] != "dense"]
    sparsities = sorted({r["cell"]["sparsity"] for r in records})
    rows_order: list[tuple[str, str]] = []
    values: dict[tuple[str, str, float], str] = {}
    for r in records:
        key = (r["cell"]["pathway"], r["cell"]["pool"])
        if key not in rows_order:
            rows_order.append(key)
        values[key + (r["cell"]["sparsity"],)] = _pct(r["mean_retention"], record_interval(r, "mean_retention"))
    header = ["pathway", "calibration"] + [sparsity_label(s) for s in sparsities]
    rows = [[p, q] + [values.get((p, q, s), "–") for s in sparsities] for p, q in rows_order]
    return header, rows


def scores_table(records: Iterable[dict[str, Any]], label: Any = None) -> Table:
    """Per-benchmark scores of every record (rows) with the mean retention; ``label(record)`` names a row."""
    records = list(records)
    label = label or (lambda r: " / ".join(str(v) for v in r["cell"].values()))
    benches = list(records[0]["scores"]) if records else []
    header = ["setting"] + benches + ["mean retention"]
    rows = [[label(r)] + [_pct(r["scores"].get(b), record_interval(r, "scores", b)) for b in benches]
            + [_pct(r.get("mean_retention"), record_interval(r, "mean_retention"))] for r in records]
    return header, rows


def method_table(records: Iterable[dict[str, Any]]) -> Table:
    """Mean retention (% of dense) per method (rows) and setting (columns, e.g. '50%', '60%', '2:4'),
    from method records ``{"cell": {"method", "setting"}, "mean_retention", ...}``; the dense record
    is left out (100 by definition). Rows and columns keep the records' order; missing cells show '–'."""
    records = [r for r in records if r["cell"]["method"] != "dense"]
    methods = list(dict.fromkeys(r["cell"]["method"] for r in records))
    settings = list(dict.fromkeys(r["cell"]["setting"] for r in records))
    values = {(r["cell"]["method"], r["cell"]["setting"]): _pct(r.get("mean_retention"),
                                                                record_interval(r, "mean_retention"))
              for r in records}
    header = ["method"] + [str(s) for s in settings]
    rows = [[m] + [values.get((m, s), "–") for s in settings] for m in methods]
    return header, rows


def difference_table(difference: Mapping[str, Any]) -> Table:
    """Two cells side by side and their paired difference, per benchmark (score points, %) and in mean
    retention, from ``{"a": label, "b": label, "rows": {name: {"a", "a_ci", "b", "b_ci", "diff", "diff_ci"}}}``
    (``atv.experiments.compare.compare_cells``); an interval that excludes 0 is marked '*'."""
    a, b = difference["a"], difference["b"]
    header = ["", a, b, f"{a} − {b}", "separates"]
    rows = [[name, _pct(row["a"], row.get("a_ci")), _pct(row["b"], row.get("b_ci")),
             _pct(row["diff"], row.get("diff_ci")), _separates(row.get("diff_ci"))]
            for name, row in difference["rows"].items()]
    return header, rows


def differences_summary(differences: Iterable[Mapping[str, Any]], row: str = "mean retention") -> Table:
    """One line per compared pair: each cell's ``row`` (mean retention by default) and A − B, with intervals;
    a first column names each pair's ``"finding"`` when the differences carry one."""
    differences = [d for d in differences if row in d["rows"]]
    named = any("finding" in d for d in differences)
    header = (["finding"] if named else []) + ["A", "B", f"A: {row}", f"B: {row}", "A − B", "separates"]
    rows = []
    for d in differences:
        entry = d["rows"][row]
        rows.append(([str(d.get("finding", ""))] if named else []) + [
            d["a"], d["b"], _pct(entry["a"], entry.get("a_ci")), _pct(entry["b"], entry.get("b_ci")),
            _pct(entry["diff"], entry.get("diff_ci")), _separates(entry.get("diff_ci"))])
    return header, rows


def _separates(interval: Sequence[float] | None) -> str:
    """'yes' when the difference's interval excludes 0, 'no' when it holds 0, '–' without an interval."""
    if interval is None:
        return "–"
    return "yes" if interval[0] > 0 or interval[1] < 0 else "no"


def _numeric_columns(table: Table) -> list[bool]:
    """Per column: every cell is a number or a dash (right-aligned), else text (left-aligned)."""
    header, rows = table

    def numeric(cell: str) -> bool:
        try:
            float(cell)
        except ValueError:
            return cell.strip() in ("–", "-", "") or bool(_WITH_INTERVAL.match(cell))
        return True

    return [bool(rows) and all(numeric(row[i]) for row in rows) for i in range(len(header))]


def to_markdown(table: Table) -> str:
    """A Markdown table (numeric columns right-aligned).

    Args:
        table: ``(header, rows)``, every cell a string.

    Returns:
        The table's Markdown, ending with a newline.
    """
    header, rows = table
    align = ["---:" if numeric else "---" for numeric in _numeric_columns(table)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """The table as CSV.

    Args:
        table: ``(header, rows)``, every cell a string.

    Returns:
        The CSV text, header first.
    """
    header, rows = table
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                          ("–", "--"), ("−", "$-$"), ("[", "{[}"), ("]", "{]}")):
        text = text.replace(char, escaped)
    return text


def to_latex(table: Table, caption: str | None = None) -> str:
    """A booktabs tabular (in a table environment when ``caption`` is given).

    Args:
        table: ``(header, rows)``, every cell a string (LaTeX's special characters are escaped).
        caption: the table's caption; None gives the bare tabular.

    Returns:
        The LaTeX source.
    """
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
