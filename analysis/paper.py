"""The paper's own numbers, from ``analysis/data/*.csv`` (each row names its source; empty cells = not sourced)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from analysis.runs import STS_AVG, STS_TASKS

DATA_DIR = Path(__file__).resolve().parent / "data"
PAPER_STS_FILE = DATA_DIR / "paper_sts.csv"
PAPER_BACKBONE_LABELS = {"llama2_7b": "LLaMA2-7B", "llama3_8b": "LLaMA3-8B"}


@dataclass(frozen=True)
class PaperRow:
    backbone: str
    method: str
    scores: dict[str, float | None]  # sts12 .. sickr, sts_avg
    source: str


def _number(text: str) -> float | None:
    text = (text or "").strip()
    return float(text) if text else None


def load_paper_sts(path: Path = PAPER_STS_FILE) -> list[PaperRow]:
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        needed = {"backbone", "method", "avg", "source", *STS_TASKS}
        missing = needed - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        rows = []
        for line, row in enumerate(reader, start=2):
            if not row["source"].strip():
                raise ValueError(f"{path}:{line}: every paper value needs a source")
            scores = {task: _number(row[task]) for task in STS_TASKS}
            scores[STS_AVG] = _number(row["avg"])
            rows.append(PaperRow(row["backbone"], row["method"], scores, row["source"].strip()))
    return rows


def paper_value(rows: list[PaperRow], backbone: str, method: str, metric: str = STS_AVG) -> float | None:
    return next((r.scores.get(metric) for r in rows if r.backbone == backbone and r.method == method), None)
