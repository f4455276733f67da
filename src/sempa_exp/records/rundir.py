"""Run directories: deterministic paths, finished-run detection, checkpoints to resume from, provenance."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.yaml"
# results.json status of gen_eval's record of an untrained backbone: generation scores only, never trained
GENERATION_ONLY_STATUS = "base"
KEY_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "hydra-core", "wandb", "numpy",
                 "scipy")


MAX_NAME_CHARS = 200  # file names are limited to 255 bytes; leaves room for suffixes such as ".json"


def run_name_from_overrides(override_dirname: str) -> str:
    """A filesystem-safe name from Hydra's ``job.override_dirname``; 'default' when there are no overrides.

    A name longer than MAX_NAME_CHARS is cut and ends with a hash of the whole, so it stays unique and deterministic.
    """
    name = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", override_dirname).strip("_")
    if len(name) > MAX_NAME_CHARS:
        digest = hashlib.sha1(name.encode()).hexdigest()[:12]
        name = f"{name[:MAX_NAME_CHARS - 13]}_{digest}"
    return name or "default"


def run_dir_for(runs_dir: str | Path, group: str, name: str) -> Path:
    return Path(runs_dir).expanduser() / group / name


def run_id_for(run_dir: Path) -> str:
    """The W&B run id: a hash of the run directory's group/name, so a requeued or relaunched run resumes its W&B run."""
    key = f"{run_dir.parent.name}/{run_dir.name}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def read_results(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RESULTS_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_finished(run_dir: Path) -> bool:
    results = read_results(run_dir)
    return bool(results) and results.get("status") == "finished"


def _complete(checkpoint: Path) -> bool:
    """HF writes trainer_state.json last, and not atomically: a kill during that write leaves it truncated."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return True


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete HF Trainer checkpoint (one whose trainer_state.json, written last, is whole)."""
    if not checkpoints_dir.exists():
        return None
    done = [p for p in checkpoints_dir.glob("checkpoint-*") if _complete(p)]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {}
    for name in KEY_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(path: Path | None = None) -> str:
    cwd = Path(path or __file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
