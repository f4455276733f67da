"""Build hook only (the project's metadata lives in pyproject.toml): ship the repository's ``conf/`` in the package.

``conf/`` stays at the repository root, the one copy in git. A wheel (``pip install .``, ``pip wheel .``,
``python -m build``) carries every ``conf/**/*.yaml`` as package data at ``sempa_exp/conf/``, and the sdist carries
``conf/`` so a wheel built from it does too; ``sempa_exp.config.location`` finds them there. An editable install
(``pip install -e .``) copies nothing: it reads the repository's ``conf/`` directly.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONF_SRC = "conf"  # relative to the project root, where the build runs
CONF_PACKAGE = "sempa_exp.conf"


class BuildPyWithConf(build_py):
    """``build_py`` whose package data also maps ``conf/**/*.yaml`` to ``sempa_exp/conf/**``."""

    def _conf_data_files(self) -> list[tuple[str, str, str, list[str]]]:
        if self.editable_mode:
            return []
        root = Path(CONF_SRC)
        files = sorted(path.relative_to(root).as_posix() for path in root.rglob("*.yaml") if path.is_file())
        if not files:
            raise FileNotFoundError(f"no YAML under {root.resolve()}: the package would ship without its configs")
        build_dir = str(Path(self.build_lib, *CONF_PACKAGE.split(".")))
        return [(CONF_PACKAGE, CONF_SRC, build_dir, files)]

    # build_py computes ``data_files`` (package, src_dir, build_dir, filenames) from these two: the first feeds the
    # wheel, the second the sdist's file list.
    def _get_data_files(self):
        return super()._get_data_files() + self._conf_data_files()

    def get_data_files_without_manifest(self):
        return super().get_data_files_without_manifest() + self._conf_data_files()


setup(cmdclass={"build_py": BuildPyWithConf})
