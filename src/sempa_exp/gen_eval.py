"""``python -m sempa_exp.gen_eval [gen.target=DIR] [gen=quick] [gen.limit=N] [overrides]``: generation benchmarks
(lm-eval) and the perplexity proxy on the untrained backbone, a run's final adapter or one of its checkpoints
(sempa_exp.pipelines.generation); exits 1 when a benchmark failed."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from sempa_exp.config.errors import reporting_user_errors
from sempa_exp.config.location import CONF_DIR
from sempa_exp.config.registry import register_all


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> int:
    # imported here, not at the top: --help and --cfg answer without loading torch and transformers
    from sempa_exp.pipelines import generation

    with reporting_user_errors():
        record = generation.run(cfg)
    failed = [name for name, r in record["tasks"].items() if r.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    register_all()
    sys.exit(main())
