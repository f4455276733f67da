"""Run directory files: the saved config, checkpoints to resume from, atomic JSON writes, provenance."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from sempa_exp.config.schema import ConfigError

CONFIG_FILE = "config.yaml"
log = logging.getLogger(__name__)

KEY_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "hydra-core", "wandb", "numpy",
                 "scipy")


LOCK_FILE = ".lock"


@contextmanager
def exclusive(run_dir: Path) -> Iterator[None]:
    """One writer per run directory: a second process that reaches it while the first still runs is refused, naming
    the first. The lock is the kernel's (flock): it goes away with the process that holds it, even after a kill."""
    import fcntl

    from sempa_exp.config.schema import ConfigError

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    with path.open("a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ConfigError(f"{run_dir} is being written by {holder}; wait for it to end (or stop it) and launch "
                              f"again") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def start_run_dir(run_dir: Path, resolved: dict) -> None:
    """Creates the run directory and writes the resolved config as config.json (read back by the same-experiment
    check) and config.yaml (for people)."""
    from omegaconf import OmegaConf

    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", resolved)
    (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))


# What a resume reads from a checkpoint besides trainer_state.json (HF Trainer's file names).
TORCH_STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth")
ADAPTER_FILE = "adapter_model.safetensors"


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a file missing, cut or unreadable); None when every file it needs
    loads. HF writes trainer_state.json last, and not atomically: a kill during that write leaves it truncated."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"trainer_state.json: {exc}"
    if (checkpoint / ADAPTER_FILE).exists() or (checkpoint / "adapter_config.json").exists():
        try:
            from safetensors.torch import load_file

            load_file(str(checkpoint / ADAPTER_FILE))
        except Exception as exc:  # truncated, garbage or missing: the checkpoint is not usable, whatever the cause
            return f"{ADAPTER_FILE}: {exc}"
    for name in TORCH_STATE_FILES:
        if (checkpoint / name).exists():
            try:
                import torch

                # the run's own files; HF's RNG state holds numpy objects that weights_only refuses
                torch.load(checkpoint / name, map_location="cpu", weights_only=False)
            except Exception as exc:
                return f"{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return None


def latest_checkpoint(checkpoints_dir: Path, set_aside: bool = True) -> Path | None:
    """The newest HF Trainer checkpoint that can be resumed from. A newer one that cannot (a file cut or damaged) is
    named in a warning and, with ``set_aside``, renamed to ``damaged-checkpoint-N`` (kept, never deleted; HF Trainer
    does not see it)."""
    if not checkpoints_dir.exists():
        return None
    found = sorted(checkpoints_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for checkpoint in found:
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        log.warning("checkpoint %s cannot be resumed from (%s)%s", checkpoint, problem,
                    "; set aside as damaged-" + checkpoint.name if set_aside else "")
        if set_aside:
            target = checkpoint.with_name(f"damaged-{checkpoint.name}")
            suffix = 1
            while target.exists():
                target, suffix = checkpoint.with_name(f"damaged-{checkpoint.name}.{suffix}"), suffix + 1
            os.replace(checkpoint, target)
    return None


ATTEMPTS_FILE = "attempts.jsonl"  # one line per start of a run: when, which SLURM job, where it started from


class RunStalledError(ConfigError):
    """A requeued job keeps restarting a run at the same point (one line for the user, no traceback)."""


def record_attempt(run_dir: Path, progress: dict, max_without_progress: int) -> None:
    """Appends this start to the run's attempts; under a requeued SLURM job (SLURM_RESTART_COUNT > 0), refuses to go
    on when the ``max_without_progress`` attempts before it all started from this same point: the job is stopped
    each time before it records anything new (its time limit is too short for the next checkpoint or evaluation
    suite), and submitit would requeue it until max_num_timeout. 0 disables the check; manual relaunches (no SLURM
    restart) never trip it."""
    path = run_dir / ATTEMPTS_FILE
    earlier = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                earlier.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: that attempt's record is lost, nothing else
                continue
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    with path.open("a") as f:
        f.write(json.dumps({"time": time.time(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                            "slurm_restart": restarts, "progress": progress}) + "\n")
    recent = [a.get("progress") for a in earlier[-max_without_progress:]] if max_without_progress > 0 else []
    if restarts > 0 and len(recent) == max_without_progress > 0 and all(p == progress for p in recent):
        raise RunStalledError(
            f"{run_dir}: the last {max_without_progress} attempts all started from {progress} and recorded nothing "
            f"new: the job's time limit ends each one before the next checkpoint or evaluation suite is done. Raise "
            f"hydra.launcher.timeout_min (or lower trainer.checkpoint_every_samples) and relaunch; "
            f"run.max_attempts_without_progress=0 keeps retrying")


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
