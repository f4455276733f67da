"""What launch/README.md tells a cluster user to type becomes the sbatch line it promises (no scheduler needed: the
submission script is generated, not submitted)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sempa_exp.config.location import CONF_DIR
from sempa_exp.config.registry import register_all


@pytest.fixture(autouse=True)
def srun_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit's SlurmExecutor refuses to exist without an `srun` on PATH, though nothing here is submitted; a stand-in
    that fails if it is ever run keeps these tests off any real scheduler."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/sh\necho 'srun must not run in test_slurm_docs' >&2\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def submission_script(*overrides: str) -> str:
    from hydra_plugins.sempa_exp_launcher.sempa_launcher import SlurmLauncher

    register_all()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["cluster=example_gpu", *overrides], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    executor = SlurmLauncher(**params)._executor()
    return executor._executor._make_submission_file_text("python -c pass", "uid")


@pytest.mark.parametrize(("override", "line"), [
    ("hydra.launcher.partition=gpu", "#SBATCH --partition=gpu"),
    ("hydra.launcher.account=mylab", "#SBATCH --account=mylab"),
    ("hydra.launcher.qos=normal", "#SBATCH --qos=normal"),
    ("hydra.launcher.constraint=a100", "#SBATCH --constraint=a100"),
    ("hydra.launcher.gres=gpu:a100:4", "#SBATCH --gres=gpu:a100:4"),
    ("hydra.launcher.timeout_min=1440", "#SBATCH --time=1440"),
    ("+hydra.launcher.additional_parameters.reservation=paper", "#SBATCH --reservation=paper"),
])
def test_each_documented_field_becomes_its_sbatch_line(override, line):
    assert line in submission_script(override).splitlines()


def test_jobs_ask_for_requeue_unless_told_not_to():
    assert "#SBATCH --requeue" in submission_script().splitlines()
    off = submission_script("+hydra.launcher.additional_parameters.requeue=false").splitlines()
    assert "#SBATCH --no-requeue" in off and not any(x.startswith("#SBATCH --requeue") for x in off)
