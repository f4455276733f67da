"""Where the Hydra configs live: ``CONF_DIR``, the one definition every entry point and test composes from.

In order:

1. ``$SEMPA_CONF_DIR`` when set (made absolute against the working directory);
2. the ``conf/`` folder shipped inside the installed package (``sempa_exp/conf``; a wheel built with
   ``pip install .`` or ``pip wheel .`` carries the repository's ``conf/`` there, see ``setup.py``);
3. the source checkout's ``conf/`` at the repository root: an editable install (``pip install -e .``) reads it
   directly, so edits to ``conf/`` are seen at once.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def _conf_dir() -> str:
    override = os.environ.get("SEMPA_CONF_DIR")
    if override:
        return str(Path(override).expanduser().absolute())
    shipped = resources.files("sempa_exp") / "conf"
    if isinstance(shipped, Path) and (shipped / "config.yaml").is_file():
        return str(shipped)
    return str(Path(__file__).resolve().parents[3] / "conf")  # src/sempa_exp/config/location.py -> repository root


CONF_DIR: str = _conf_dir()
