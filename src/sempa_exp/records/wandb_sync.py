"""Replays a run directory's local metrics into Weights & Biases (``python -m sempa_exp.sync_wandb RUN_DIR``).

``metrics.jsonl`` is the source of truth (sempa_exp.records.metrics). When W&B was unreachable, or failed mid-run,
this logs every record again into the W&B run with the run directory's deterministic id (``identity.wandb_run_id``):
the same run a training process would have written, resumed when it exists. W&B keeps the steps it already holds and
ignores replayed records below its last step, so syncing twice duplicates nothing."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sempa_exp.config.schema import ConfigError, LoggerConfig
from sempa_exp.records import identity
from sempa_exp.records.metrics import init_wandb_run, read_metrics, wandb_mode
from sempa_exp.records.results import read_results

log = logging.getLogger(__name__)

NOT_LOGGED = ("step", "time")  # the record's own bookkeeping, not W&B metrics


def _number(value: Any) -> Any:
    """metrics.jsonl writes NaN/inf as strings (JSON has no such numbers); W&B gets them back as floats."""
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
        return float(value)
    return value


def replay_records(rows: Iterable[dict]) -> Iterator[tuple[int, dict]]:
    """(step, metrics) in file order, exactly what RunLogger.log sent to W&B."""
    for row in rows:
        yield int(row["step"]), {k: _number(v) for k, v in row.items() if k not in NOT_LOGGED}


def logger_config(saved: dict, *, mode: str | None, project: str | None, entity: str | None) -> LoggerConfig:
    known = {f.name for f in dataclasses.fields(LoggerConfig)}
    cfg = LoggerConfig(**{k: v for k, v in (saved.get("logger") or {}).items() if k in known})
    return dataclasses.replace(cfg, mode=mode or "auto", project=project or cfg.project,
                               entity=entity if entity is not None else cfg.entity)


def sync(run_dir: Path, *, mode: str | None = None, project: str | None = None, entity: str | None = None) -> str:
    """Logs the run's metrics (and its final scores as the summary) to W&B; returns the W&B run id."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.exists():
        raise ConfigError(f"{run_dir} is not a run directory: it has no config.json")
    rows = read_metrics(run_dir)
    if not rows:
        raise ConfigError(f"{run_dir} has no metrics to sync (metrics.jsonl is missing or empty)")
    config = json.loads(config_file.read_text())
    cfg = logger_config(config, mode=mode, project=project, entity=entity)
    group = (config.get("run") or {}).get("group") or run_dir.parent.name
    run_id = identity.wandb_run_id(run_dir)
    run = init_wandb_run(cfg, wandb_mode(cfg), run_id=run_id, group=group, name=run_dir.name, config=config,
                         run_dir=run_dir)
    exit_code = 1
    try:
        for step, metrics in replay_records(rows):
            run.log(metrics, step=step)
        results = read_results(run_dir)
        if results is not None and results.final:
            run.summary.update(results.final)
        exit_code = 0
    finally:
        run.finish(exit_code=exit_code)
    log.info("synced %d records of %s to W&B run %s", len(rows), run_dir, run_id)
    return run_id


def rebuild_offline(run_dir: Path) -> Path | None:
    """A finished run's offline W&B folder, rebuilt from metrics.jsonl: each allocation of a preempted or requeued run
    left its own ``offline-run-*-<id>`` folder (overlapping steps, and holes where a killed one lost its last records);
    they are replaced by one folder holding every step once, in order, so that ``wandb sync`` of the run's
    ``wandb/`` uploads exactly the run's history. Returns the new folder (None when there was nothing offline)."""
    import shutil

    run_dir = Path(run_dir)
    run_id = identity.wandb_run_id(run_dir)
    earlier = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    if not earlier:
        return None
    for folder in earlier:
        shutil.rmtree(folder)
    sync(run_dir, mode="offline")
    rebuilt = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    log.info("W&B offline history of %s rebuilt from metrics.jsonl (%d allocation folders replaced): %s", run_dir,
             len(earlier), rebuilt[-1] if rebuilt else None)
    return rebuilt[-1] if rebuilt else None

