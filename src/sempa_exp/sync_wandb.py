"""Replays a run directory's local metrics into Weights & Biases.

    python -m sempa_exp.sync_wandb RUN_DIR [RUN_DIR ...] [--mode online|offline] [--project P] [--entity E]

``metrics.jsonl`` is the source of truth (sempa_exp.records.metrics). When W&B was unreachable, or failed mid-run, this logs
every record again into the W&B run with the run directory's deterministic id (``rundir.run_id_for``): the same run a
training process would have written, resumed when it exists. W&B keeps the steps it already holds and ignores replayed
records below its last step, so syncing twice duplicates nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sempa_exp.config.schema import ConfigError, LoggerConfig
from sempa_exp.records import rundir
from sempa_exp.records.metrics import init_wandb_run, read_metrics, wandb_mode

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
    run_id = rundir.run_id_for(run_dir)
    run = init_wandb_run(cfg, wandb_mode(cfg), run_id=run_id, group=group, name=run_dir.name, config=config,
                         run_dir=run_dir)
    exit_code = 1
    try:
        for step, metrics in replay_records(rows):
            run.log(metrics, step=step)
        results = rundir.read_results(run_dir)
        if results and results.get("final"):
            run.summary.update(results["final"])
        exit_code = 0
    finally:
        run.finish(exit_code=exit_code)
    log.info("synced %d records of %s to W&B run %s", len(rows), run_dir, run_id)
    return run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories holding config.json and metrics.jsonl")
    parser.add_argument("--mode", choices=("auto", "online", "offline"), default="auto",
                        help="auto: online when W&B credentials exist (default)")
    parser.add_argument("--project", help="W&B project (default: the run's logger.project)")
    parser.add_argument("--entity", help="W&B entity (default: the run's logger.entity)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for run_dir in args.run_dirs:
        run_id = sync(run_dir, mode=args.mode, project=args.project, entity=args.entity)
        print(f"{run_dir}: W&B run {run_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
