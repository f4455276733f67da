"""``python -m sempa_exp.select backbone=NAME method=token_prepending|contrastive_prompting``: a training-free
method's layer settings for one backbone, chosen on STS-B dev (sempa_exp.pipelines.selection); prints the block for
``conf/backbone/<backbone>.yaml``."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from sempa_exp.config.errors import reporting_user_errors
from sempa_exp.config.location import CONF_DIR
from sempa_exp.config.registry import register_all


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="select")
def main(cfg: DictConfig) -> float:
    # imported here, not at the top: --help and --cfg answer without loading torch and transformers
    from sempa_exp.pipelines.selection import select

    command = " ".join(["python -m sempa_exp.select", *sys.argv[1:]])
    with reporting_user_errors():
        return select(cfg, command)["best"]["stsb_dev"]


if __name__ == "__main__":
    register_all()
    main()
