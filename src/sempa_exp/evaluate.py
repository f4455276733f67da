"""``python -m sempa_exp.evaluate [backbone=NAME] [method=NAME] [overrides] [-m]``: one embedding method scored on
``eval.at_end`` (sempa_exp.pipelines.evaluation); results in ``<runs_dir>/<run.group, default eval>/<overrides>``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sempa_exp.config.errors import reporting_user_errors
from sempa_exp.config.location import CONF_DIR
from sempa_exp.config.registry import register_all


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    # imported here, not at the top: --help and --cfg answer without loading torch and transformers
    from sempa_exp.pipelines import evaluation
    from sempa_exp.records.results import sweep_objective

    with reporting_user_errors():
        return sweep_objective(evaluation.run(cfg))


if __name__ == "__main__":
    register_all()
    main()
