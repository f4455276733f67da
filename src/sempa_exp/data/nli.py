"""NLI triplets (premise, entailment, contradiction): loading, cleaning, nested subsets, DPO records."""

from __future__ import annotations

import csv
import gzip
import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sempa_exp.config.schema import ConfigError, DataConfig
from sempa_exp.data.prompts import dpo_prompt_messages

log = logging.getLogger(__name__)

COLUMNS = ("sent0", "sent1", "hard_neg")


@dataclass(frozen=True)
class Triplet:
    premise: str
    entailment: str
    contradiction: str


@dataclass
class CleaningReport:
    source: str
    rows_read: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        return f"{self.source}: {self.rows_read} rows read, {self.kept} kept, skipped: {reasons}"


def _open_text(path: Path) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")  # noqa: SIM115 - the caller closes it
    # surrogateescape keeps undecodable bytes visible so the row can be skipped instead of aborting the file
    return io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")


def _has_bad_bytes(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _parsed_rows(reader: csv.DictReader, report: CleaningReport, path: Path) -> Iterator[dict]:
    """The reader's rows; a row the csv module cannot parse (e.g. a field beyond its size limit) is skipped."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            report.rows_read += 1
            report.skip("malformed CSV row")
            log.warning("%s: skipping a malformed CSV row near line %d (%s)", path, reader.line_num, exc)


def read_triplets(path: Path, max_chars: int, deduplicate: bool = False) -> tuple[list[Triplet], CleaningReport]:
    """Reads a ``sent0,sent1,hard_neg`` CSV (optionally gzip), skipping unusable rows and counting why.

    As the official ``trans_data.py``: the hypotheses are stripped, the premise is kept as written, and duplicate rows
    are kept unless ``deduplicate``."""
    if not path.exists():
        raise ConfigError(f"NLI data file not found: {path}")
    report = CleaningReport(source=str(path))
    triplets: list[Triplet] = []
    seen: set[Triplet] = set()
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"{path}: header lacks column(s) {missing}; expected {list(COLUMNS)}, "
                              f"found {reader.fieldnames}")
        for row in _parsed_rows(reader, report, path):
            report.rows_read += 1
            fields = [row.get(c) for c in COLUMNS]
            if any(v is None or not v.strip() for v in fields):
                report.skip("empty or missing field")
                continue
            if any(_has_bad_bytes(v) for v in fields):
                report.skip("non-UTF-8 bytes")
                continue
            if any(len(v) > max_chars for v in fields):
                report.skip(f"longer than {max_chars} characters")
                continue
            triplet = Triplet(fields[0], fields[1].strip(), fields[2].strip())
            if deduplicate and triplet in seen:
                report.skip("duplicate")
                continue
            seen.add(triplet)
            triplets.append(triplet)
    report.kept = len(triplets)
    return triplets, report


def download_from_hub(cfg: DataConfig) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=cfg.hub_id, filename=cfg.hub_file, repo_type="dataset"))


def resolve_source(cfg: DataConfig, data_dir: Path | None) -> Path:
    local = (data_dir / cfg.local_file) if data_dir is not None else None
    if cfg.source == "local" or (cfg.source == "auto" and local is not None and local.exists()):
        if local is None or not local.exists():
            raise ConfigError(f"NLI data file not found: {local} (data.local_file under paths.data_dir)")
        return local
    log.info("loading NLI triplets from the hub: %s/%s", cfg.hub_id, cfg.hub_file)
    return download_from_hub(cfg)


def load_triplets(cfg: DataConfig, data_dir: Path | None) -> tuple[list[Triplet], CleaningReport]:
    return read_triplets(resolve_source(cfg, data_dir), cfg.max_sentence_chars, cfg.deduplicate)


def subset(triplets: Sequence[Triplet], size: int | None, seed: int) -> list[Triplet]:
    """The first ``size`` triplets of a seeded permutation: subsets of one seed are nested (20K within 40K)."""
    if size is None:
        size = len(triplets)
    if size > len(triplets):
        raise ConfigError(f"data.size={size} is larger than the {len(triplets)} usable triplets")
    order = np.random.default_rng(seed).permutation(len(triplets))
    return [triplets[i] for i in order[:size]]


def dpo_records(triplets: Iterable[Triplet], instruction: str, system_prompt: str) -> list[dict]:
    """Conversational preference records: TRL renders them with the backbone's chat template."""
    return [
        {
            "prompt": dpo_prompt_messages(instruction, t.premise, system_prompt),
            "chosen": [{"role": "assistant", "content": t.entailment}],
            "rejected": [{"role": "assistant", "content": t.contradiction}],
        }
        for t in triplets
    ]
