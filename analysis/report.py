"""``python -m analysis.report SOURCE [SOURCE ...] [--out DIR]``: the paper's experimental section from runs.

SOURCE is a sweep directory (``<runs_dir>/<group>``), a run directory, a results.json, a whole runs directory, or
``wandb:GROUP`` / ``wandb:ENTITY/PROJECT/GROUP`` (the W&B API, online). Writes DIR/index.html and DIR/index.md with
the tables (DIR/tables/*.csv|md) and figures (DIR/figures/*.png|pdf, plus the plotted points as *.csv). What the
runs do not have is shown as missing.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from analysis import artifacts, dashboard, figures, study, tables
from analysis.figures import FigureResult
from analysis.paper import load_paper_sts
from analysis.render import Section, markdown_table, write_page
from analysis.runs import RunRecord, SourceError, collect_local, shorten_names
from analysis.tables import Table

log = logging.getLogger("analysis.report")


@dataclass
class Report:
    out: Path
    runs: list[RunRecord]
    tables: dict[str, Table] = field(default_factory=dict)
    figures: dict[str, FigureResult] = field(default_factory=dict)
    pages: dict[str, Path] = field(default_factory=dict)


def collect(sources: list[str], project: str | None = None, entity: str | None = None) -> list[RunRecord]:
    local = [s for s in sources if not s.startswith("wandb:")]
    runs = collect_local(local) if local else []
    for spec in (s for s in sources if s.startswith("wandb:")):
        from analysis.wandb_source import collect_wandb

        runs += collect_wandb(spec, project, entity)
    return runs


def build_report(runs: list[RunRecord], out: Path, *, sources: list[str] | None = None,
                 dashboard_urls: list[str] | None = None, project: str = dashboard.DEFAULT_PROJECT) -> Report:
    out = Path(out)
    paper = load_paper_sts()
    shorten_names(runs)
    report = Report(out, runs)
    pca_panels, pca_problems = artifacts.pca_panels(runs)
    tokens, token_problems = artifacts.aligned_tokens(runs)
    t = report.tables
    t["runs"] = tables.runs_overview(runs)
    t["main_sts"] = tables.main_sts_table(runs, paper)
    t["gain"] = tables.gain_table(runs, paper)
    t["templates"] = tables.template_table(runs)
    t["templates_stsb_dev"] = tables.template_table(runs, "stsb_dev")
    t["geometry"] = tables.geometry_table(runs)
    t["gar"] = tables.gar_table(runs)
    t["aligned_tokens"] = tables.aligned_tokens_table(tokens, token_problems)
    t["generation"] = tables.generation_table(runs)
    t["study"] = study.study_table(runs)
    t["study_contrasts"] = study.study_contrasts_table(runs)
    t["study_generation"] = study.study_generation_table(runs)
    t["study_benchmarks"] = study.study_benchmarks_table(runs)
    f = report.figures
    f["data_size"] = figures.data_size_figure(runs, paper)
    f["pca"] = figures.pca_figure(pca_panels, pca_problems)
    f["training_curves"] = figures.training_curves_figure(runs)
    f["study_curves"] = study.study_curves_figure(runs)

    groups = sorted({r.group for r in runs})
    finished = sum(r.finished for r in runs)
    intro = [f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by `python -m analysis.report` "
             f"from {len(runs)} runs ({finished} finished, {len(runs) - finished} not) of sweep(s) "
             f"{', '.join(groups)}.",
             "Sources: " + ", ".join(sources or sorted({str(r.origin) for r in runs})),
             "Cells and figures the runs do not provide are marked 'missing'; the paper's numbers come from "
             "analysis/data with their source, and paper values that are not sourced are marked 'not sourced'."]
    (out).mkdir(parents=True, exist_ok=True)
    (out / "dashboard.md").write_text(dashboard.describe(project, groups))
    dash_text = "The W&B panel set that shows the same curves grouped by sweep: dashboard.md."
    if dashboard_urls:
        dash_text += " Created: " + ", ".join(dashboard_urls)
    sections = [
        Section("Runs", tables=[t["runs"]]),
        Section("Main STS results", tables=[t["main_sts"], t["gain"]]),
        Section("Training data size", figures=[f["data_size"]]),
        Section("Paraphrase and embedding templates", tables=[t["templates"], t["templates_stsb_dev"]]),
        Section("Uniformity and isotropy", tables=[t["geometry"]]),
        Section("Embedding space (PCA)", figures=[f["pca"]]),
        Section("Aligned tokens and GAR", tables=[t["gar"], t["aligned_tokens"]]),
        Section("Training curves", figures=[f["training_curves"]]),
        Section("Generation capability", tables=[t["generation"]]),
        Section("Small-backbone study",
                tables=[t["study"], t["study_contrasts"], t["study_generation"], t["study_benchmarks"]],
                figures=[f["study_curves"]]),
        Section("W&B dashboard", text=dash_text),
    ]
    report.pages = write_page("SemPA reproduction report", intro, sections, out)
    return report


def default_out(runs: list[RunRecord]) -> Path:
    return Path("reports") / "+".join(sorted({r.group for r in runs}) or ["empty"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", help="sweep/run dirs, results.json files, or wandb:GROUP")
    parser.add_argument("--out", type=Path, help="report folder (default: reports/<group[+group...]>)")
    parser.add_argument("--wandb-project", default=dashboard.DEFAULT_PROJECT)
    parser.add_argument("--wandb-entity", default=None)
    parser.add_argument("--create-dashboard", action="store_true",
                        help="also save the W&B dashboard views (online, needs credentials)")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> Report:
    """The command without its exit code: collect, build, print the main table and the paths; SourceError on bad
    sources."""
    args = parse_args(argv)
    runs = collect(args.sources, args.wandb_project, args.wandb_entity)
    urls = None
    if args.create_dashboard:
        try:
            urls = dashboard.create_dashboards(args.wandb_entity, args.wandb_project, sorted({r.group for r in runs}))
        except Exception as exc:  # offline or no credentials: the report is still written
            print(f"warning: W&B dashboard not created ({exc}); see dashboard.md in the report", file=sys.stderr)
    out = args.out or default_out(runs)
    report = build_report(runs, out, sources=args.sources, dashboard_urls=urls, project=args.wandb_project)
    print(markdown_table(report.tables["main_sts"]))
    data_size = report.figures["data_size"]
    if data_size.figure is not None:
        print(f"\ndata-size figure: {out / 'figures' / 'data_size.png'}")
    print(f"\nreport: {report.pages['html']}  ({report.pages['md']})")
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(argv)
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
