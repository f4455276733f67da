"""The package installs like a package: a wheel built from the checkout carries ``conf/`` as ``sempa_exp/conf``, and
the installed copy (not the editable checkout) runs ``python -m sempa_exp.train`` from it.

The wheel is built from a copy of the checkout in a temporary folder, so the build's ``build/`` and ``*.egg-info``
never land in the working tree. Building, installing and the ``python -m sempa_exp.train`` calls take under a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
# Never copied into the build tree: environments, run outputs and earlier builds at the top, caches anywhere.
SKIP_AT_ROOT = {".git", ".venv", "venv", "build", "dist", "runs", "outputs", "multirun", "wandb", ".cache", "bench"}
SKIP_ANYWHERE = {"__pycache__", ".pytest_cache", ".ruff_cache"}
PROBE = (
    "import json, sempa_exp, hydra_plugins.sempa_exp_launcher as plugin\n"
    "from sempa_exp.config.location import CONF_DIR\n"
    "print(json.dumps({'package': sempa_exp.__file__, 'plugin': plugin.__file__, 'conf_dir': CONF_DIR}))\n"
)


def _ignore(directory: str, names: list[str]) -> set[str]:
    at_root = Path(directory).resolve() == ROOT
    return {
        name
        for name in names
        if name in SKIP_ANYWHERE or name.endswith(".egg-info") or (at_root and name in SKIP_AT_ROOT)
    }


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    shown = f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}\n{shown}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=_ignore, symlinks=True)
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(source)], cwd=tmp)
    (built,) = dist.glob("sempa_exp-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """(target folder, environment that imports from it only, empty working directory)."""
    tmp = tmp_path_factory.mktemp("installed")
    target = tmp / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
          str(wheel)], cwd=tmp)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEMPA_", "PYTHON"))}
    env.update(PYTHONPATH=str(target), PYTHONNOUSERSITE="1", HYDRA_FULL_ERROR="1")
    cwd = tmp / "cwd"
    cwd.mkdir()
    return target, env, cwd


def test_wheel_carries_every_config_and_the_analysis_data(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(path.relative_to(ROOT / "conf").as_posix() for path in (ROOT / "conf").rglob("*.yaml"))
    assert "config.yaml" in configs and "experiment/smoke.yaml" in configs
    missing = [name for name in configs if f"sempa_exp/conf/{name}" not in names]
    assert not missing, f"conf/ files missing from {wheel.name}: {missing}"
    data_dir = ROOT / "analysis" / "data"
    data = sorted(p.relative_to(ROOT).as_posix() for pattern in ("*.csv", "*.md") for p in data_dir.glob(pattern))
    assert data, f"no analysis data under {data_dir}"
    missing = [name for name in data if name not in names]
    assert not missing, f"analysis data missing from {wheel.name}: {missing}"
    assert "sempa_exp/config/location.py" in names
    assert "hydra_plugins/sempa_exp_launcher/__init__.py" in names


def test_installed_copy_is_imported_and_reads_its_own_conf(installed):
    target, env, cwd = installed
    probe = json.loads(_run([sys.executable, "-c", PROBE], cwd=cwd, env=env).stdout.strip().splitlines()[-1])
    site = target.resolve()
    assert Path(probe["package"]).resolve().is_relative_to(site), f"imported {probe['package']}, not the wheel's copy"
    assert Path(probe["plugin"]).resolve().is_relative_to(site), probe["plugin"]
    assert Path(probe["conf_dir"]).resolve() == site / "sempa_exp" / "conf"
    assert (site / "sempa_exp" / "conf" / "experiment" / "smoke.yaml").is_file()


def test_installed_train_runs_help_and_the_smoke_config(installed):
    target, env, cwd = installed
    shown = _run([sys.executable, "-m", "sempa_exp.train", "--help"], cwd=cwd, env=env).stdout
    assert "smoke" in shown, shown  # the experiment group's options come from the shipped conf/
    # WANDB_MODE=offline makes transformers print a line on import: `--cfg job` must stay pure YAML all the same
    job = _run([sys.executable, "-m", "sempa_exp.train", "+experiment=smoke", "--cfg", "job"], cwd=cwd,
               env={**env, "WANDB_MODE": "offline"}).stdout
    assert "group: smoke" in job, job
    cfg = OmegaConf.create(job)
    assert cfg.run.group == "smoke"
    assert not list(cwd.iterdir()), "--cfg job must not write anything"
