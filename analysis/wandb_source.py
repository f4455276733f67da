"""Runs from the W&B API (when online): ``wandb:GROUP`` or ``wandb:ENTITY/PROJECT/GROUP`` as a report source.

The W&B side holds what RunLogger sent: the resolved config, the history (``samples_seen``, ``train/*``, ``eval/*``
at optimizer steps) and, for a finished run, the final evaluation in the summary. The local results files stay the
source of truth; W&B is for runs whose directories are on another machine.
"""

from __future__ import annotations

from typing import Any

from analysis.dashboard import DEFAULT_PROJECT
from analysis.runs import RunRecord, SourceError, train_rows_from
from sempa_exp.records.results import group_evaluations, kind_of_config, method_of_config


def parse_source(spec: str, project: str | None, entity: str | None) -> tuple[str | None, str, str]:
    """'wandb:GROUP' or 'wandb:ENTITY/PROJECT/GROUP' -> (entity, project, group)."""
    parts = spec.removeprefix("wandb:").split("/")
    if len(parts) == 1 and parts[0]:
        return entity, project or DEFAULT_PROJECT, parts[0]
    if len(parts) == 3 and all(parts):
        return parts[0], parts[1], parts[2]
    raise SourceError(f"{spec!r}: a W&B source is wandb:GROUP or wandb:ENTITY/PROJECT/GROUP")


def _name(config: dict, section: str) -> str | None:
    value = config.get(section)
    return value.get("name") if isinstance(value, dict) else None


def record_from_wandb(run: Any) -> RunRecord:
    """A RunRecord from a wandb.apis.public.Run (or anything with its attributes)."""
    config = {k: v for k, v in dict(run.config).items() if not k.startswith("_")}
    rows = []
    for row in run.scan_history():
        row = {k: v for k, v in row.items() if v is not None}
        if "_step" in row:
            row["step"] = int(row.pop("_step"))
        rows.append(row)
    evaluations = group_evaluations(rows)
    train_rows = train_rows_from(rows)
    finished = run.state == "finished"
    summary = {k: v for k, v in dict(run.summary).items() if k.startswith("eval/")}
    last_step = max((r["step"] for r in rows if "step" in r), default=None)
    last = next((r for r in reversed(rows) if r.get("step") == last_step), {})
    group = run.group or (config.get("run") or {}).get("group") or ""
    name = run.name.removeprefix(f"{group}/") if run.name else run.id
    return RunRecord(
        group=group, name=name, status="finished" if finished else str(run.state),
        method=method_of_config(config), kind=kind_of_config(config).value,
        backbone=_name(config, "backbone"), template=_name(config, "template"), embed=_name(config, "embed"),
        data_size=(config.get("data") or {}).get("size"), samples_seen=last.get("samples_seen"),
        final_step=last_step, start=next((e for e in evaluations if e["step"] == 0), {}),
        final=summary if finished else {}, evaluations=evaluations, train_rows=train_rows, run_dir=None,
        origin=f"wandb:{'/'.join(run.path)}", config=config)


def collect_wandb(spec: str, project: str | None = None, entity: str | None = None, api: Any = None) -> list[RunRecord]:
    entity, project, group = parse_source(spec, project, entity)
    try:
        if api is None:
            import wandb

            api = wandb.Api(timeout=60)
        path = f"{entity}/{project}" if entity else project
        runs = list(api.runs(path, filters={"group": group}))
    except Exception as exc:  # no network, no credentials, no such project
        raise SourceError(f"{spec}: cannot read W&B runs of group {group!r} in {project!r} ({exc}); "
                          f"use the local sweep directory instead") from exc
    if not runs:
        raise SourceError(f"{spec}: no W&B runs in group {group!r} of project {project!r}")
    return [record_from_wandb(r) for r in runs]
