"""``python -m sempa_exp.gen_report base=RUNS/base/smollm2_135m sempa=RUNS/smoke/default contrastive=RUNS/...``:
a Markdown table of the ``generation`` records of those runs (``name=path[@label]``; the label defaults to
``final``, else ``base``, else the newest record), with deltas against the first and the paper's averages."""

from __future__ import annotations

import sys

from sempa_exp.config.schema import ConfigError
from sempa_exp.evaluation.generation_table import generation_table, load_record


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or any("=" not in a for a in argv):
        print(__doc__)
        return 2
    entries: list[tuple[str, dict | None]] = []
    for arg in argv:
        name, _, spec = arg.partition("=")
        path, _, label = spec.partition("@")
        try:
            record, _ = load_record(path, label or None)
        except (FileNotFoundError, KeyError, ConfigError) as exc:
            print(f"[gen_report] {name}: {exc}", file=sys.stderr)
            record = None
        entries.append((name, record))
    print(generation_table(entries, base_name=entries[0][0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
