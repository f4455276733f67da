"""``python -m sempa_exp.train [+experiment=NAME] [overrides] [-m]``: one training run per composed config
(sempa_exp.pipelines.training); returns the run's sweep objective (final STS average, else STS-B dev) to Hydra."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sempa_exp.config.errors import reporting_user_errors
from sempa_exp.config.location import CONF_DIR
from sempa_exp.config.registry import register_all


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    # imported here, not at the top: --help and --cfg answer without loading torch and transformers
    from sempa_exp.launch.distributed import export_from_submitit
    from sempa_exp.launch.termination import EXIT_CODE, StopRequested, stopping_on_sigterm
    from sempa_exp.pipelines import training
    from sempa_exp.records.results import sweep_objective

    export_from_submitit()  # one process per GPU under SLURM: before anything reads RANK/WORLD_SIZE
    with reporting_user_errors():
        try:
            with stopping_on_sigterm():  # over submitit's own handler, which ignores SIGTERM
                return sweep_objective(training.run(cfg))
        except StopRequested as stop:
            print(f"[sempa-exp] {stop}: training stopped; the run resumes from its last checkpoint", flush=True)
            raise SystemExit(EXIT_CODE) from None


if __name__ == "__main__":
    register_all()
    main()
