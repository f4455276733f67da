"""Run directory files: the saved config, checkpoints to resume from, atomic JSON writes, provenance."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.yaml"
KEY_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "hydra-core", "wandb", "numpy",
                 "scipy")


def start_run_dir(run_dir: Path, resolved: dict) -> None:
    """Creates the run directory and writes the resolved config as config.json (read back by the same-experiment
    check) and config.yaml (for people)."""
    from omegaconf import OmegaConf

    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", resolved)
    (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))


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
