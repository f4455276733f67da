"""Metrics sink: every record goes to ``metrics.jsonl`` in the run directory and, when enabled, to Weights & Biases.

The local file is the source of truth. W&B is best effort: if it cannot start or fails mid-run, training goes on and
``python -m sempa_exp.sync_wandb <run_dir>`` replays the local file later. W&B steps are optimizer steps, logged with
an explicit ``step=``: after a resume, records W&B already has (steps past the last checkpoint that are replayed) are
dropped by W&B instead of duplicated.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import netrc
import os
import time
from pathlib import Path
from typing import Any

from sempa_exp.config.schema import ConfigError, LoggerConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def wandb_mode(cfg: LoggerConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl; a line that is not a JSON object (cut by a kill, or damaged) is skipped with a
    warning naming the file and line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if isinstance(row, dict) and isinstance(row.get("step", 0), int):
            rows.append(row)
        else:
            log.warning("%s line %d is not a metrics record; skipped", path, number)
    return rows


def rewind_metrics(run_dir: Path, step: int) -> int:
    """Before resuming from the checkpoint at ``step``: records of later steps move to metrics.superseded.jsonl."""
    rows = read_metrics(run_dir)
    keep = [r for r in rows if r.get("step", 0) <= step]
    later = [r for r in rows if r.get("step", 0) > step]
    if later:
        with (Path(run_dir) / "metrics.superseded.jsonl").open("a") as f:
            for r in later:
                f.write(json.dumps(r) + "\n")
        tmp = Path(run_dir) / (METRICS_FILE + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, Path(run_dir) / METRICS_FILE)
    return len(later)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def init_wandb_run(cfg: LoggerConfig, mode: str, *, run_id: str, group: str, name: str, config: dict,
                   run_dir: Path) -> Any:
    """The W&B run of a run directory (also used by sync_wandb): a deterministic id, resumed if it exists.

    It is the directory's own run or none. ``reinit="create_new"``: a run left active in this process (a job of a
    sweep whose W&B finish failed) is not handed back. And the id is checked: W&B's service has answered a run started
    right after another finished in the same process with the earlier run's id (CI, wandb 0.31, offline), so that
    every record went to the earlier run. Then the service is restarted and the run started once more; a second
    mismatch raises ConfigError (metrics.jsonl keeps everything; sync_wandb replays it later)."""
    import wandb

    for attempt in (1, 2):
        run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=group, name=f"{group}/{name}", id=run_id,
            resume="allow", config=config, tags=list(cfg.tags), mode=mode, dir=str(run_dir), reinit="create_new",
            settings=wandb.Settings(init_timeout=120, console="off", silent=True))
        if run.id == run_id:
            break
        log.warning("W&B started run %s for %s, whose run is %s (attempt %d of 2); restarting W&B's service",
                    run.id, run_dir, run_id, attempt)
        with contextlib.suppress(Exception):
            run.finish()  # the record it answered with is another run's: not to be marked failed
        try:
            wandb.teardown()
        except (Exception, SystemExit) as exc:  # teardown exits with a failed service's status: W&B never ends a run
            log.warning("W&B's service did not shut down cleanly (%s)", exc)
    else:
        raise ConfigError(f"W&B started run {run.id} instead of {run_id} for {run_dir} twice; its metrics stay in "
                          f"{Path(run_dir) / METRICS_FILE}: python -m sempa_exp.sync_wandb {run_dir} replays them")
    run.define_metric("samples_seen")
    run.define_metric("*", step_metric="samples_seen", step_sync=True)
    return run


class RunLogger:
    def __init__(self, run_dir: Path, cfg: LoggerConfig, *, run_id: str, group: str, name: str,
                 config: dict, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = enabled  # False on non-zero ranks
        self.wandb = None
        self.wandb_mode: str | None = None  # the mode W&B started in (None: not started)
        if enabled and cfg.backend == "wandb":
            self._start_wandb(cfg, run_id=run_id, group=group, name=name, config=config)

    def _start_wandb(self, cfg: LoggerConfig, *, run_id: str, group: str, name: str, config: dict) -> None:
        mode = wandb_mode(cfg)
        if mode == "disabled":
            return
        try:
            self.wandb = init_wandb_run(cfg, mode, run_id=run_id, group=group, name=name, config=config,
                                        run_dir=self.run_dir)
            self.wandb_mode = mode
        except Exception as exc:  # W&B is never a reason to lose a run
            log.warning("W&B could not start (%s); metrics stay in %s and can be synced later", exc, self.path)
            self.wandb = None

    def log(self, metrics: dict[str, float], *, step: int, samples_seen: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "samples_seen": samples_seen, "time": time.time(), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.wandb is not None:
            try:
                self.wandb.log({"samples_seen": samples_seen, **metrics}, step=step)
            except Exception as exc:
                log.warning("W&B logging failed (%s); continuing with local metrics only", exc)
                self._drop_wandb()

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb is not None:
            try:
                self.wandb.summary.update(values)
            except Exception as exc:
                log.warning("W&B summary failed (%s)", exc)

    def _drop_wandb(self) -> None:
        run, self.wandb = self.wandb, None
        with contextlib.suppress(Exception):
            run.finish(exit_code=1)

    def finish(self, exit_code: int = 0) -> None:
        if self.wandb is not None:
            try:
                self.wandb.finish(exit_code=exit_code)
            except Exception as exc:
                log.warning("W&B finish failed (%s)", exc)
            self.wandb = None
