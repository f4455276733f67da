"""``python -m sempa_exp.sync_wandb RUN_DIR [RUN_DIR ...] [--mode online|offline] [--project P] [--entity E]``:
replays run directories' local metrics into Weights & Biases (sempa_exp.records.wandb_sync)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sempa_exp.config.errors import reporting_user_errors
from sempa_exp.records.wandb_sync import sync


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Replays run directories' local metrics into Weights & Biases.")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories holding config.json and metrics.jsonl")
    parser.add_argument("--mode", choices=("auto", "online", "offline"), default="auto",
                        help="auto: online when W&B credentials exist (default)")
    parser.add_argument("--project", help="W&B project (default: the run's logger.project)")
    parser.add_argument("--entity", help="W&B entity (default: the run's logger.entity)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with reporting_user_errors():
        for run_dir in args.run_dirs:
            run_id = sync(run_dir, mode=args.mode, project=args.project, entity=args.entity)
            print(f"{run_dir}: W&B run {run_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
