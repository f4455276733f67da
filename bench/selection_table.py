"""The selection table of bench/README.md from the searches in bench/selection/*.json (python -m sempa_exp.select).

    python bench/selection_table.py            # prints the Markdown table
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def describe(best: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in best.items() if k != "stsb_dev")


def main() -> None:
    print("| backbone | method | settings scored | chosen | STS-B dev | best with the final normed layer | "
          "minutes (shared CPU) |")
    print("|---|---|---|---|---|---|---|")
    for path in sorted((HERE / "selection").glob("*.json")):
        record = json.loads(path.read_text())
        final = max((r["stsb_dev"] for r in record["rows"] if r["output_layer"] == -1), default=float("nan"))
        print(f"| {record['backbone']} | {record['method']} | {len(record['rows'])} | {describe(record['best'])} | "
              f"{record['best']['stsb_dev']:.2f} | {final:.2f} | {record['seconds'] / 60:.0f} |")


if __name__ == "__main__":
    main()
