"""The report's figures. Each builder returns the Figure together with the exact points it plotted (written beside
the PNG/PDF as CSV, so a figure can be checked against the runs), a caption that says where the points come from,
and what is missing. A figure with nothing to plot is None, never an empty frame passed off as a result."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from analysis.artifacts import ROLES, PcaPanel  # noqa: E402
from analysis.paper import PAPER_BACKBONE_LABELS, PaperRow, paper_value  # noqa: E402
from analysis.runs import STS_AVG, RunRecord, method_label  # noqa: E402
from analysis.tables import METHOD_ORDER, pick  # noqa: E402

TRAIN_CURVES = {"train/loss": "DPO loss", "train/rewards/margins": "reward margin (chosen - rejected)",
                "train/rewards/accuracies": "reward accuracy"}
DATA_SIZE_PANELS = {"stsb_dev": "STS-B dev (Spearman x 100)", STS_AVG: "7-task STS avg (Spearman x 100)"}
PAPER_TRAIN_SIZE = 275_601  # SimCSE NLI triplets: the paper's full training set (its Table 3 numbers)


@dataclass
class FigureResult:
    key: str
    title: str
    figure: Figure | None
    caption: str
    series: list[dict[str, Any]] = field(default_factory=list)  # one row per plotted point
    missing: list[str] = field(default_factory=list)

    def points(self, panel: str, series: str) -> list[tuple[float, float]]:
        return [(p["x"], p["y"]) for p in self.series if p["panel"] == panel and p["series"] == series]


def _plot_line(ax, result: FigureResult, panel: str, name: str, source: str, points, **style) -> None:
    if not points:
        return
    xs, ys = zip(*points, strict=True)
    ax.plot(xs, ys, label=name, **style)
    result.series += [{"panel": panel, "series": name, "source": source, "x": x, "y": y} for x, y in points]


def _data_size_lines(runs: list[RunRecord]) -> list[tuple[str, str, list[RunRecord]]]:
    """(line name, mode, runs): a run group holding >= 2 data sizes of a backbone is a set of separate data-size runs;
    a backbone without one is drawn from the checkpoints of its largest PromptEOL run."""
    by_backbone: dict[str, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.is_sempa_training:
            by_backbone[run.backbone or "unknown"][run.group].append(run)
    lines = []
    for backbone, groups in sorted(by_backbone.items()):
        sweeps = {g: rs for g, rs in groups.items() if len({r.data_size for r in rs}) >= 2}
        for group, members in sorted(sweeps.items()):
            name = backbone if len(sweeps) == 1 else f"{backbone} ({group})"
            lines.append((name, "runs", members))
        if not sweeps:
            candidates = [r for rs in groups.values() for r in rs]
            run = pick([r for r in candidates if r.embed == "prompteol"] or candidates)
            lines.append((backbone, "checkpoints", [run]))
    return lines


def data_size_figure(runs: list[RunRecord], paper: list[PaperRow]) -> FigureResult:
    result = FigureResult("data_size", "STS vs training samples seen (the paper's Fig. 3)", None, "")
    lines = _data_size_lines(runs)
    if not lines:
        result.missing.append("no training (SemPA) run: nothing to plot")
        result.caption = "Missing: no training runs."
        return result
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    captions = []
    for color, (name, mode, members) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, lines, strict=False):
        for ax, metric in zip(axes, DATA_SIZE_PANELS, strict=True):
            if mode == "runs":
                points = sorted((r.samples_seen, v) for r in members if r.finished and r.samples_seen
                                and (v := r.value("final", metric)) is not None)
                _plot_line(ax, result, metric, name, "final evaluation of separate runs", points, color=color,
                           marker="o")
                largest = pick(members)
                ckpt = largest.series(metric, include_start=False) if largest else []
                if len(ckpt) > 1:
                    _plot_line(ax, result, metric, f"{name} checkpoints of {largest.short_name or largest.name}",
                               f"checkpoints of {largest.label}", ckpt, color=color, linestyle=":", marker=".")
                no_final = [r.name for r in members if r.value("final", metric) is None]
                if no_final:
                    result.missing.append(f"{metric}: no final value in {', '.join(sorted(no_final))}")
            else:
                run = members[0]
                points = run.series(metric, include_start=False)
                _plot_line(ax, result, metric, name, f"checkpoints of {run.label}", points, color=color, marker="o")
                if len(points) < 2:
                    result.missing.append(f"{metric}: {run.label} has {len(points)} evaluation(s) after step 0")
            starts = [v for r in members if (v := r.value("start", metric)) is not None]
            if starts:
                ax.axhline(starts[0], color=color, linestyle="--", linewidth=1)
                label = f"{name} PromptEOL baseline (step 0)"
                result.series.append({"panel": metric, "series": label, "source": f"step 0 of {members[0].label}",
                                      "x": None, "y": starts[0]})
                ax.plot([], [], color=color, linestyle="--", linewidth=1, label=label)
            else:
                result.missing.append(f"{metric}: no step-0 baseline for {name}")
        backbone = members[0].backbone or ""
        sempa = paper_value(paper, backbone, "sempa")
        if sempa is not None:
            axes[1].plot([PAPER_TRAIN_SIZE], [sempa], marker="*", markersize=12, color=color, linestyle="none",
                         label=f"paper SemPA, {PAPER_BACKBONE_LABELS.get(backbone, backbone)} (Table 3)")
            result.series.append({"panel": STS_AVG, "series": f"paper SemPA {backbone}", "source": "paper Table 3",
                                  "x": PAPER_TRAIN_SIZE, "y": sempa})
        sizes = sorted({r.data_size for r in members if r.data_size})
        captions.append(f"{name}: " + (f"final evaluation of {len(members)} separate runs of group "
                                       f"'{members[0].group}' (data.size = {', '.join(map(str, sizes))}); dotted: "
                                       f"the checkpoints of the largest" if mode == "runs"
                                       else f"the checkpoint evaluations of one run, {members[0].label}"))
    for ax, ylabel in zip(axes, DATA_SIZE_PANELS.values(), strict=True):
        ax.set_xlabel("training samples seen")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(result.title)
    fig.tight_layout()
    result.figure = fig
    result.caption = ("Points: " + "; ".join(captions) + ". Dashed: the untrained PromptEOL baseline (step 0). The "
                      "paper's Fig. 3 values are not sourced in analysis/data; for LLaMA backbones the star is the "
                      "paper's Table 3 SemPA average at its full 275,601 triplets.")
    return result


def training_curves_figure(runs: list[RunRecord]) -> FigureResult:
    result = FigureResult("training_curves", "DPO training curves vs samples seen", None, "")
    with_rows = sorted((r for r in runs if r.train_rows), key=lambda r: r.label)
    if not with_rows:
        result.missing.append("no run has train/* records in metrics.jsonl")
        result.caption = "Missing: no training records."
        return result
    fig, axes = plt.subplots(1, len(TRAIN_CURVES), figsize=(15, 4))
    for ax, (key, ylabel) in zip(axes, TRAIN_CURVES.items(), strict=True):
        for run in with_rows:
            points = [(row["samples_seen"], float(row[key])) for row in run.train_rows
                      if isinstance(row.get(key), (int, float)) and "samples_seen" in row]
            name = run.label + ("" if run.finished else f" ({run.status})")
            _plot_line(ax, result, key, name, str(run.origin), points, linewidth=1.2)
            if not points:
                result.missing.append(f"{key}: none in {run.label}")
        ax.set_xlabel("training samples seen")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=7)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * (len(labels) // 3), 1, 1))
    result.figure = fig
    result.caption = "One line per run, every logged optimizer step (metrics.jsonl / W&B history)."
    return result


MARKERS = {"anchors": ("o", "tab:blue"), "positives": ("^", "tab:green"), "negatives": ("x", "tab:red")}


def pca_figure(panels: list[PcaPanel], problems: list[str]) -> FigureResult:
    result = FigureResult("pca", "PCA of the embedding space: anchors, positives (entailments), negatives "
                                 "(contradictions)", None, "")
    result.missing += problems
    wanted = ("mean", "prompteol", "sempa")
    result.missing += [f"no PCA data for {method_label(m)}" for m in wanted if m not in {p.method for p in panels}]
    if not panels:
        result.caption = ("Missing: no PCA data file (*pca*.npz/json/csv) in any run directory; the method "
                          "evaluations (python -m sempa_exp.evaluate) write it.")
        return result
    panels = sorted(panels, key=lambda p: (METHOD_ORDER.index(p.method) if p.method in METHOD_ORDER else 99,
                                           p.origin))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        title = method_label(panel.method)
        for role in ROLES:
            if role not in panel.points:
                result.missing.append(f"{title}: no {role} in {panel.origin}")
                continue
            marker, color = MARKERS[role]
            xy = panel.points[role]
            ax.scatter(xy[:, 0], xy[:, 1], marker=marker, color=color, s=18, label=role)
            result.series += [{"panel": title, "series": role, "source": panel.origin, "x": float(x), "y": float(y)}
                              for x, y in xy]
        if panel.explained:
            ax.set_xlabel(f"PC1 ({panel.explained[0]:.0%})")
            ax.set_ylabel(f"PC2 ({panel.explained[1]:.0%})")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    result.figure = fig
    result.caption = "Each panel: its method's embeddings projected on their own first two principal components."
    return result
