"""``python -m sempa_exp.archive SOURCE [SOURCE ...] --to DEST [--update]``: the records of finished runs (no
weights) copied to ``DEST/<run.group>/<run name>`` (sempa_exp.records.archive). Archive a study's sweeps into the
repository (``--to study/records``); copy them back (``study/records --to runs``) on a fresh machine so that a
relaunched sweep skips what they hold. Exits 1 when a run was refused or left differing."""

from __future__ import annotations

import argparse
from pathlib import Path

from sempa_exp.config.errors import reporting_user_errors
from sempa_exp.records.archive import archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Copies the records of finished runs, without their weights.")
    parser.add_argument("sources", nargs="+", type=Path, help="run, sweep or runs directories")
    parser.add_argument("--to", required=True, type=Path, dest="dest", help="destination (a runs-directory layout)")
    parser.add_argument("--update", action="store_true",
                        help="replace destination files whose content differs (e.g. a results.json a later "
                             "gen_eval added to); without it they are left as they are and named")
    args = parser.parse_args(argv)
    with reporting_user_errors():
        report = archive(args.sources, args.dest, update=args.update)
    print("\n".join(report.lines()))
    return 1 if report.refused or report.differs else 0


if __name__ == "__main__":
    raise SystemExit(main())
