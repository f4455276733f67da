"""Run identity, defined once: what makes two runs the same experiment, a run's name and directory, its W&B id.

- **Name**: the command-line overrides that change what a run computes, sorted and joined (``data.size=256,
  template=p2``; ``default`` when there are none), unless ``run.name`` is given. The overrides left out of names are
  :data:`NOT_IN_NAME` (where a run goes, how it logs, how fast it runs); Hydra computes the joined string
  (``hydra.job.override_dirname``) from this list, which :func:`register_identity_config` hands to it.
- **Directory**: ``<paths.runs_dir>/<run.group>/<name>``, for the entry point and for the sweep launcher alike.
- **Same experiment**: a directory holding a run whose :data:`SECTIONS` of the resolved config differ is never
  resumed, skipped or overwritten; the check comes before any skip of a finished run.
- **W&B id**: a hash of ``<group>/<name>``, so a requeued or relaunched run continues its W&B run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sempa_exp.config.schema import ConfigError
from sempa_exp.records.results import RunKind

log = logging.getLogger(__name__)

# Overrides that do not change what a run computes: left out of run names.
NOT_IN_NAME = (
    "experiment", "run.group", "run.name", "run.resume", "run.skip_finished", "run.device", "run.num_threads",
    "run.max_attempts_without_progress", "run.archive_to",
    "logger", "logger.mode", "logger.project", "logger.entity",
    "paths.data_dir", "paths.runs_dir", "paths.cache_dir",
    "eval.batch_size",
    "gen", "gen.at_end", "gen.limit", "gen.source", "gen.tasks", "gen.batch_size", "gen.max_gen_toks", "gen.dtype",
    "gen.target",
    "hydra.launcher", "cluster",
)
# The resolved-config sections that define an experiment of each kind.
SECTIONS: dict[RunKind, tuple[str, ...]] = {
    RunKind.TRAINING: ("backbone", "template", "embed", "data", "lora", "trainer", "objective", "seed"),
    RunKind.EVALUATION: ("backbone", "embed", "method", "eval", "seed"),
}
# The sections of a training run's config that rebuild its model state and held-out data (gen_eval of a run).
MODEL_STATE_SECTIONS = ("backbone", "data", "template")
CONFIG_JSON = "config.json"
IDENTITY_JSON = "identity.json"  # digests of the data a run read
MAX_NAME_CHARS = 200  # file names are limited to 255 bytes; leaves room for suffixes such as ".json"


def safe_folder(value: str) -> str:
    """``run.group`` as one folder name, for the paths Hydra writes its own files to before the run's config is
    checked (``hydra.run.dir``, ``hydra.sweep.dir``): a group such as ``../x`` must not put them outside the runs
    root; the run itself is then refused by :func:`run_dir`."""
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", str(value)).strip(".") or "_"


# conf/config.yaml's Hydra paths use it; registered on import, as the job processes of a sweep import this module.
OmegaConf.register_new_resolver("run_folder", safe_folder, replace=True)


def register_identity_config() -> None:
    """The ``run_identity`` node of conf/config.yaml's defaults: Hydra's override_dirname settings."""
    ConfigStore.instance().store(name="run_identity", package="_global_", provider="sempa_exp", node={
        "hydra": {"job": {"config": {"override_dirname": {
            "kv_sep": "=", "item_sep": ",", "exclude_keys": list(NOT_IN_NAME)}}}}})


def name_from_overrides(override_dirname: str) -> str:
    """A filesystem-safe name from the joined overrides; 'default' when there are none. A name longer than
    MAX_NAME_CHARS is cut and ends with a hash of the whole, so it stays unique and deterministic."""
    name = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", override_dirname).strip("_")
    if len(name) > MAX_NAME_CHARS:
        digest = hashlib.sha1(name.encode()).hexdigest()[:12]
        name = f"{name[:MAX_NAME_CHARS - 13]}_{digest}"
    return name or "default"


def _override_dirname(cfg: DictConfig) -> str:
    if "hydra" in cfg:  # a sweep job's config, as the launcher composes it
        return str(cfg.hydra.job.override_dirname)
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().job.override_dirname
    except ValueError:  # outside a Hydra job (tests, notebooks)
        return ""


def run_name(cfg: DictConfig) -> str:
    return name_from_overrides(cfg.run.name or _override_dirname(cfg))


def _one_folder(key: str, value: str) -> str:
    """A group or run name is one folder inside the runs root: never the root itself, its parent or another path."""
    if not value or value in (".", "..") or "/" in value or "\\" in value:
        raise ConfigError(f"{key}={value!r} must name one folder inside paths.runs_dir (no '/', '.' or '..')")
    return value


def run_dir(cfg: DictConfig) -> Path:
    """``<paths.runs_dir>/<run.group>/<name>``."""
    group = _one_folder("run.group", str(cfg.run.group))
    return Path(cfg.paths.runs_dir).expanduser() / group / _one_folder("run.name", run_name(cfg))


def wandb_run_id(path: Path) -> str:
    key = f"{path.parent.name}/{path.name}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def saved_config(path: Path) -> dict[str, Any] | None:
    """The resolved config a run directory was started with; None when it holds none."""
    file = Path(path) / CONFIG_JSON
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file} is damaged ({exc}); move the run directory away or restore the file") from None


def content_digest(items: Any) -> str:
    """sha256 of a JSON-able value (e.g. the training triplets as lists of strings)."""
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()


def check_same_data(path: Path, fingerprint: dict[str, str]) -> None:
    """Refuses a run directory whose run was computed on other data (``identity.json``: a digest of each kind of data
    it reads, by content, not path); a directory without the file (new, or from before it existed) gets it."""
    file = Path(path) / IDENTITY_JSON
    if file.exists():
        try:
            saved = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{file} is damaged ({exc}); move the run directory away or delete the file") from None
        differing = [k for k in sorted(set(saved) | set(fingerprint)) if k in saved and saved[k] != fingerprint.get(k)]
        if differing and holds_results(path):
            raise ConfigError(
                f"{path} holds a run computed on other data ({', '.join(differing)} differ by content); it is left "
                f"untouched. Point paths.data_dir back to the data it used, or pick another run.name or run.group.")


def write_data_identity(path: Path, fingerprint: dict[str, str]) -> None:
    from sempa_exp.records.rundir import write_json_atomic

    write_json_atomic(Path(path) / IDENTITY_JSON, fingerprint)


def holds_results(path: Path) -> bool:
    """Whether a run directory holds anything an earlier attempt computed: a results.json, a checkpoint, a metric."""
    path = Path(path)
    metrics = path / "metrics.jsonl"
    return ((path / "results.json").exists() or any((path / "checkpoints").glob("checkpoint-*"))
            or (metrics.exists() and metrics.stat().st_size > 0) or (path / "adapter").exists())


_MISSING = object()
# Keys the schema no longer has, with the value that computed what today's code computes: a run saved with it is
# the same experiment; with another value it is not.
RETIRED_KEYS: dict[str, Any] = {
    "eval.adapter_precision": "float32",  # removed after commit b9d8aab (bench/README.md: dominated by folding)
}


def _differs(saved: Any, current: Any, path: str = "") -> bool:
    """Whether a saved config value is another experiment than the current one. A key the saved config lacks was
    added to the schema after the run was made; new keys default to the computation runs had before (or one equal
    to it up to float rounding, like the speed-ups), so it is not a difference. A saved key the schema has dropped
    is one unless :data:`RETIRED_KEYS` says its value is today's computation."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return any(
            (RETIRED_KEYS.get(f"{path}{key}", _MISSING) != value) if key not in current
            else _differs(value, current[key], f"{path}{key}.")
            for key, value in saved.items())
    return saved != current



def check_same_experiment(path: Path, resolved: dict[str, Any], kind: RunKind) -> None:
    """Refuses a run directory that holds another experiment (differing SECTIONS), naming what differs."""
    saved = saved_config(path)
    if saved is None:
        return
    differing = [k for k in SECTIONS[kind] if _differs(saved.get(k), resolved.get(k), f"{k}.")]
    if differing and not holds_results(path):
        log.warning("%s holds only the config of an attempt that produced nothing (a different %s); starting over",
                    path, ", ".join(differing))
        return
    if differing:
        article = "an" if kind.value[0] in "aeiou" else "a"
        raise ConfigError(
            f"{path} holds {article} {kind.value} run with a different {', '.join(differing)} config; it is left "
            f"untouched. Pick another run.name or run.group, or move that directory away.")
