"""Writes the report folder: tables as CSV + Markdown, figures as PNG + PDF + CSV of the plotted points, and one
page (index.md and index.html) that shows everything with its notes and what is missing."""

from __future__ import annotations

import csv
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from analysis.figures import FigureResult
from analysis.tables import Table

MISSING = "missing"


def cell_text(value: Any, decimals: int = 2) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{decimals}f}"
    return str(value)


def csv_value(value: Any) -> Any:
    return "" if value is None else value


def markdown_table(table: Table) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(c) for c in table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    for row in table.rows:
        lines.append("| " + " | ".join(esc(cell_text(v, table.decimals.get(c, 2)))
                                       for c, v in zip(table.columns, row, strict=True)) + " |")
    if not table.rows:
        lines.append("| " + " | ".join([MISSING] + [""] * (len(table.columns) - 1)) + " |")
    return "\n".join(lines)


def html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = []
    source = table.columns.index("source") if "source" in table.columns else None
    for row in table.rows:
        cells = []
        is_paper = source is not None and str(row[source]).startswith("paper")
        for c, v in zip(table.columns, row, strict=True):
            text = html.escape(cell_text(v, table.decimals.get(c, 2)))
            cls = ' class="missing"' if v is None else (' class="paper"' if is_paper else "")
            cells.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    if not table.rows:
        body.append(f'<tr><td class="missing" colspan="{len(table.columns)}">{MISSING}</td></tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def write_table(table: Table, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = folder / f"{table.key}.csv", folder / f"{table.key}.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(table.columns)
        writer.writerows([csv_value(v) for v in row] for row in table.rows)
    notes = "".join(f"\n- {n}" for n in table.notes)
    md_path.write_text(f"### {table.title}\n\n{markdown_table(table)}\n{notes}\n")
    return {"csv": csv_path, "md": md_path}


def write_figure(result: FigureResult, folder: Path) -> dict[str, Path]:
    """PNG, PDF and the plotted points as CSV; nothing but a note when there is no figure."""
    folder.mkdir(parents=True, exist_ok=True)
    if result.figure is None:
        return {}
    paths = {ext: folder / f"{result.key}.{ext}" for ext in ("png", "pdf", "csv")}
    result.figure.savefig(paths["png"], dpi=130)
    result.figure.savefig(paths["pdf"])
    plt.close(result.figure)
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["panel", "series", "source", "x", "y"])
        writer.writeheader()
        writer.writerows({k: csv_value(p.get(k)) for k in writer.fieldnames} for p in result.series)
    return paths


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[FigureResult] = field(default_factory=list)


def write_page(title: str, intro: list[str], sections: list[Section], out: Path) -> dict[str, Path]:
    """Writes every table and figure, then index.md and index.html that link them (relative paths)."""
    md = [f"# {title}", "", *intro, ""]
    body = [f"<h1>{html.escape(title)}</h1>", *(f"<p>{html.escape(p)}</p>" for p in intro)]
    for section in sections:
        md += [f"## {section.title}", ""]
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            md += [section.text, ""]
            body.append(f"<p>{html.escape(section.text)}</p>")
        for table in section.tables:
            files = write_table(table, out / "tables")
            rel = {k: v.relative_to(out).as_posix() for k, v in files.items()}
            md += [f"### {table.title}", "", markdown_table(table), "", *(f"- {n}" for n in table.notes),
                   "", f"Files: [{rel['csv']}]({rel['csv']}), [{rel['md']}]({rel['md']})", ""]
            body += [f"<h3>{html.escape(table.title)}</h3>", html_table(table),
                     "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in table.notes) + "</ul>",
                     f'<p class="files"><a href="{rel["csv"]}">{rel["csv"]}</a> · <a href="{rel["md"]}">'
                     f"{rel['md']}</a></p>"]
        for result in section.figures:
            files = write_figure(result, out / "figures")
            md.append(f"### {result.title}")
            body.append(f"<h3>{html.escape(result.title)}</h3>")
            if files:
                rel = {k: v.relative_to(out).as_posix() for k, v in files.items()}
                md += ["", f"![{result.title}]({rel['png']})", "",
                       f"Files: [{rel['png']}]({rel['png']}), [{rel['pdf']}]({rel['pdf']}), plotted points "
                       f"[{rel['csv']}]({rel['csv']})"]
                body += [f'<img src="{rel["png"]}" alt="{html.escape(result.title)}">',
                         f'<p class="files"><a href="{rel["pdf"]}">PDF</a> · <a href="{rel["csv"]}">plotted points '
                         f"(CSV)</a></p>"]
            else:
                md += ["", f"**{MISSING}**"]
                body.append(f'<p class="missing">{MISSING}</p>')
            md += ["", result.caption, *(f"- missing: {m}" for m in result.missing), ""]
            body += [f"<p>{html.escape(result.caption)}</p>",
                     "<ul>" + "".join(f'<li class="missing">missing: {html.escape(m)}</li>'
                                      for m in result.missing) + "</ul>"]
    out.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out / "index.md", out / "index.html"
    md_path.write_text("\n".join(md) + "\n")
    html_path.write_text(HTML_PAGE.format(title=html.escape(title), body="\n".join(body)))
    return {"md": md_path, "html": html_path}


HTML_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 1250px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; margin: 0.5em 0; }}
th, td {{ border: 1px solid #ccc; padding: 3px 7px; text-align: right; }}
th {{ background: #f0f0f0; }}
td.missing, li.missing, p.missing {{ color: #b00; font-style: italic; }}
td.paper {{ background: #f6f6ff; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
p.files {{ font-size: 12px; color: #555; }}
</style></head>
<body>
{body}
</body></html>
"""
