"""The seven STS benchmarks in the normalized layout, scored with the SentEval/SimCSE protocol.

Layout: ``<data_dir>/sts/<Task>/<split>.tsv`` with header ``sentence1 TAB sentence2 TAB score`` and no quoting.
Protocol: cosine similarity of the two embeddings, Spearman x 100. STS12-16 report the Spearman of all their
sub-datasets pooled ("all", as SimCSE reads SentEval's ``['all']['spearman']['all']``); STS-B and SICK-R their test
split. STS-B dev is the model-selection score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from sempa_exp.config.schema import ConfigError

POOLED_TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16")
SPLIT_TASKS = {"STSBenchmark": "test", "SICKRelatedness": "test"}
STS_TASKS = POOLED_TASKS + tuple(SPLIT_TASKS)
SHORT_NAMES = {"STS12": "sts12", "STS13": "sts13", "STS14": "sts14", "STS15": "sts15", "STS16": "sts16",
               "STSBenchmark": "stsb", "SICKRelatedness": "sickr"}


@dataclass
class StsSplit:
    task: str
    name: str
    sentences1: list[str]
    sentences2: list[str]
    scores: np.ndarray

    @property
    def sentences(self) -> list[str]:
        return self.sentences1 + self.sentences2


class StsFormatError(ConfigError):
    pass


def read_split(path: Path, task: str) -> StsSplit:
    if not path.exists():
        raise ConfigError(f"STS file not found: {path}")
    s1, s2, scores = [], [], []
    # surrogateescape: an undecodable byte becomes an error naming its line instead of a bare UnicodeDecodeError
    with path.open(encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        header = f.readline().rstrip("\n")
        if header.split("\t") != ["sentence1", "sentence2", "score"]:
            raise StsFormatError(f"{path}:1: expected header 'sentence1<TAB>sentence2<TAB>score', got {header!r}")
        for lineno, line in enumerate(f, start=2):
            if any("\udc80" <= ch <= "\udcff" for ch in line):
                raise StsFormatError(f"{path}:{lineno}: not valid UTF-8")
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3:
                raise StsFormatError(f"{path}:{lineno}: expected 3 tab-separated fields, got {len(parts)}")
            try:
                score = float(parts[2])
            except ValueError:
                raise StsFormatError(f"{path}:{lineno}: score {parts[2]!r} is not a number") from None
            if not math.isfinite(score):
                raise StsFormatError(f"{path}:{lineno}: score {parts[2]!r} is not a finite number")
            if not parts[0] or not parts[1]:
                raise StsFormatError(f"{path}:{lineno}: empty sentence")
            s1.append(parts[0])
            s2.append(parts[1])
            scores.append(score)
    if not scores:
        raise StsFormatError(f"{path}: no pairs")
    return StsSplit(task=task, name=path.stem, sentences1=s1, sentences2=s2, scores=np.asarray(scores))


def load_task(data_dir: Path, task: str) -> list[StsSplit]:
    """The evaluation splits of a task: every sub-dataset for STS12-16, the test split for STS-B and SICK-R."""
    folder = Path(data_dir) / "sts" / task
    if task in SPLIT_TASKS:
        return [read_split(folder / f"{SPLIT_TASKS[task]}.tsv", task)]
    if task not in POOLED_TASKS:
        raise ConfigError(f"unknown STS task {task!r}; choose from {', '.join(STS_TASKS)}")
    files = sorted(folder.glob("*.tsv"))
    if not files:
        raise ConfigError(f"no STS files in {folder}")
    return [read_split(p, task) for p in files]


def load_stsb_dev(data_dir: Path) -> StsSplit:
    return read_split(Path(data_dir) / "sts" / "STSBenchmark" / "dev.tsv", "STSBenchmark")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(min=1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(min=1e-12)
    return (a * b).sum(axis=1)


def spearman100(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(spearmanr(pred, gold).statistic * 100.0)


Embed = Callable[[Sequence[str]], np.ndarray]


def split_similarities(split: StsSplit, lookup: Callable[[Sequence[str]], np.ndarray]) -> np.ndarray:
    return cosine(lookup(split.sentences1), lookup(split.sentences2))


def score_task(splits: Sequence[StsSplit], lookup: Embed, similarities: list[np.ndarray] | None = None
               ) -> dict[str, float]:
    """Per-split Spearman and, for multi-split tasks, the pooled ('all') Spearman, which is the task's score.
    ``similarities``, when given, receives each split's cosine similarities (in file order)."""
    sims = [split_similarities(s, lookup) for s in splits]
    if similarities is not None:
        similarities.extend(sims)
    result = {s.name: spearman100(p, s.scores) for s, p in zip(splits, sims, strict=True)}
    result["all"] = spearman100(np.concatenate(sims), np.concatenate([s.scores for s in splits]))
    return result
