"""The W&B dashboard: the report's curves as a saved workspace view, one per sweep (run group) or across sweeps.

The panel set is data (PANEL_SET): it is written into the report as documentation (dashboard.md) and, when online,
created through the W&B Workspace API (``python -m analysis.report ... --create-dashboard``). Line plots use
``samples_seen`` as x axis, the step metric RunLogger declares, so runs with different batch sizes line up.
"""

from __future__ import annotations

from dataclasses import dataclass

from analysis.runs import STS_AVG, STS_TASKS

DEFAULT_PROJECT = "sempa-exp"  # conf/logger/wandb.yaml


@dataclass(frozen=True)
class Panel:
    kind: str  # "line" (history vs samples_seen), "scatter" (summary vs config), "bar" (summary per run)
    title: str
    metrics: tuple[str, ...]
    x: str = "samples_seen"


STS_METRICS = tuple(f"eval/{t}" for t in (*STS_TASKS, STS_AVG))
PANEL_SET: dict[str, tuple[Panel, ...]] = {
    "Training (DPO)": (
        Panel("line", "DPO loss", ("train/loss",)),
        Panel("line", "Reward margin (chosen - rejected)", ("train/rewards/margins",)),
        Panel("line", "Reward accuracy", ("train/rewards/accuracies",)),
        Panel("line", "Rewards of chosen and rejected", ("train/rewards/chosen", "train/rewards/rejected")),
        Panel("line", "Learning rate", ("train/learning_rate",)),
    ),
    "Evaluation during training": (
        Panel("line", "STS-B dev", ("eval/stsb_dev",)),
        Panel("line", "7-task STS average", ("eval/sts_avg",)),
        Panel("line", "Uniformity", ("eval/uniformity",)),
        Panel("line", "Isotropy", ("eval/isotropy",)),
    ),
    "Data size (paper Fig. 3)": (
        Panel("scatter", "Final STS-B dev vs data.size", ("eval/stsb_dev",), x="data.size"),
        Panel("scatter", "Final 7-task STS avg vs data.size", ("eval/sts_avg",), x="data.size"),
    ),
    "Final STS (paper Table 3)": (
        Panel("bar", "STS tasks and average (final)", STS_METRICS),
    ),
    "Geometry and GAR": (
        Panel("bar", "Uniformity (final)", ("eval/uniformity",)),
        Panel("bar", "Isotropy (final)", ("eval/isotropy",)),
        Panel("bar", "GAR (final)", ("eval/gar",)),
    ),
}


def view_name(group: str | None) -> str:
    return f"sempa-exp sweep {group}" if group else "sempa-exp sweeps"


def describe(project: str = DEFAULT_PROJECT, groups: list[str] | None = None) -> str:
    """Markdown documentation of the panel set and how to create it."""
    lines = [
        "# W&B dashboard for these sweeps", "",
        f"Project `{project}`; runs are named `<group>/<run name>` and their W&B group is `run.group` (the sweep).",
        "Two saved views show the report's curves:", "",
        "- per sweep: runset filtered on `Group == <group>`, one line per run;",
        "- across sweeps: runset grouped by `Group`, one line (mean, min-max band) per sweep.", "",
        "Create them (online, with W&B credentials):", "",
        "```",
        "python -m analysis.report <sweep dirs> --create-dashboard [--wandb-entity E] [--wandb-project P]",
        "```",
        "", "Panels (line plots: x = `samples_seen`; scatter: x = config key vs summary; bar: summary per run):", "",
    ]
    for section, panels in PANEL_SET.items():
        lines.append(f"**{section}**")
        lines += [f"- {p.kind}: {p.title}: `{'`, `'.join(p.metrics)}`" + (f" vs `{p.x}`" if p.kind != "bar" else "")
                  for p in panels]
        lines.append("")
    if groups:
        lines.append("Sweeps in this report: " + ", ".join(f"`{g}`" for g in groups))
    return "\n".join(lines) + "\n"


def build_workspace(entity: str, project: str, group: str | None = None):
    """A wandb_workspaces Workspace for one sweep (group) or for all sweeps grouped by group; not saved."""
    import wandb_workspaces.expr as expr
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def panel(p: Panel):
        if p.kind == "line":
            return wr.LinePlot(title=p.title, x=p.x, y=list(p.metrics))
        if p.kind == "scatter":
            return wr.ScatterPlot(title=p.title, x=wr.Config(p.x), y=wr.SummaryMetric(p.metrics[0]))
        return wr.BarPlot(title=p.title, metrics=[wr.SummaryMetric(m) for m in p.metrics])

    sections = [ws.Section(name=name, panels=[panel(p) for p in panels], is_open=True)
                for name, panels in PANEL_SET.items()]
    if group:
        runset = ws.RunsetSettings(filters=[expr.Metric("Group") == group])
    else:
        runset = ws.RunsetSettings(groupby=[expr.Metric("Group")])
    return ws.Workspace(entity=entity, project=project, name=view_name(group), sections=sections,
                        runset_settings=runset)


def create_dashboards(entity: str | None, project: str, groups: list[str]) -> list[str]:
    """Saves one view per sweep and one across sweeps; returns their URLs. Needs W&B credentials and network."""
    import wandb

    entity = entity or wandb.Api().default_entity
    urls = []
    for group in [*groups, None]:
        urls.append(build_workspace(entity, project, group).save().url)
    return urls
