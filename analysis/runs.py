"""Runs as the report sees them: one RunRecord per run directory.

A finished run is read from its ``results.json``; an unfinished one (no results.json, or a status other than
"finished") from ``config.json`` + ``metrics.jsonl``, so a killed or still-running run is shown, marked unfinished.
A source path may be a results.json file, a run directory, a sweep directory (``<runs_dir>/<group>``) or a whole
runs directory; Hydra's ``.hydra`` folders, checkpoints and adapters are never mistaken for runs.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sempa_exp.data.sts import SHORT_NAMES
from sempa_exp.records.identity import CONFIG_JSON, MAX_NAME_CHARS
from sempa_exp.records.metrics import METRICS_FILE, read_metrics
from sempa_exp.records.results import (
    RESULTS_FILE,
    ResultsError,
    group_evaluations,
    kind_of_config,
    method_of_config,
    read_results,
)

log = logging.getLogger(__name__)

STS_TASKS: tuple[str, ...] = tuple(SHORT_NAMES.values())  # sts12 .. sickr, the order of the paper's table
STS_AVG = "sts_avg"
RUN_MARKERS = (RESULTS_FILE, METRICS_FILE, CONFIG_JSON)
NOT_RUNS = {"checkpoints", "adapter", "wandb", "report", "reports"}

# Method keys of the report (a results.json's ``method``: conf/method names and objective names), in the paper's row
# order, with their display names.
METHOD_LABELS = {
    "mean": "Mean pooling",
    "echo": "Echo embedding",
    "prompteol": "PromptEOL",
    "pretended_cot": "Pretended CoT",
    "contrastive_prompting": "Contrastive Prompting",
    "token_prepending": "Token Prepending",
    "sempa": "SemPA",
    "listwise": "Listwise SemPA (Plackett-Luce)",
    "autoregembed_align": "AutoRegEmbed",
    "autoregembed_compress": "AutoRegEmbed, stage 1 only",
    "contrastive": "Contrastive fine-tuning (foil)",
    "sbert": "SBERT encoder",
}
EMBED_LABELS = {"prompteol": "PromptEOL", "pretended_cot": "Pretended CoT", "mean": "Mean pooling"}


class SourceError(ValueError):
    """A report source that does not exist or holds no runs."""


def method_label(key: str) -> str:
    return METHOD_LABELS.get(key, key)


def metric_key(name: str) -> str:
    return name if name.startswith("eval/") else f"eval/{name}"


@dataclass
class RunRecord:
    group: str
    name: str
    status: str  # "finished", or why not: "unfinished", "crashed", "running" ...
    method: str  # a METHOD_LABELS key (or the raw name of a method the report does not know)
    # "training", "evaluation" (python -m sempa_exp.evaluate: one evaluation, no training) or "generation"
    # (sempa_exp.gen_eval on an untrained backbone: generation scores only, no STS by design)
    kind: str = "training"
    backbone: str | None = None
    template: str | None = None
    embed: str | None = None
    data_size: int | None = None
    samples_seen: int | None = None
    final_step: int | None = None
    start: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    train_rows: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None
    origin: str = ""  # where it was read from: a local path or a W&B run path
    config: dict[str, Any] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)  # results.json "generation": label -> lm-eval record
    best: dict[str, Any] = field(default_factory=dict)  # results.json best_checkpoint (eval.at_best), if any
    short_name: str | None = None  # set by shorten_names: the name without the overrides its whole group shares

    @property
    def label(self) -> str:
        return f"{self.group}/{self.short_name or self.name}"

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def is_training(self) -> bool:
        return self.kind == "training"

    @property
    def is_sempa_training(self) -> bool:
        return self.kind == "training" and self.method == "sempa"

    def planned(self, when: str, suite: str | None = None) -> bool:
        """Whether the run's config asks for ``suite`` (any suite when None) at ``when`` ('start', 'checkpoint' or
        'end'); True when the config does not say (e.g. an older run), so nothing is hidden by default."""
        suites = (self.config.get("eval") or {}).get(f"at_{when}")
        if not isinstance(suites, list):
            return True
        return bool(suites) if suite is None else suite in suites

    @property
    def sts_planned(self) -> bool:
        """False when the run's config asks for no 7-task STS pass at the end (e.g. a sweep scored on STS-B dev)."""
        return self.planned("end", "sts")

    def value(self, stage: str, name: str) -> float | None:
        """A metric of the run at ``stage`` ('start' = step 0, 'final'); None when that evaluation is missing."""
        value = getattr(self, stage).get(metric_key(name))
        return float(value) if isinstance(value, (int, float)) else None

    def series(self, name: str, *, include_start: bool = True) -> list[tuple[int, float]]:
        """(samples_seen, value) of every evaluation that has the metric, in training order."""
        key = metric_key(name)
        points = [(int(e["samples_seen"]), float(e[key])) for e in self.evaluations
                  if isinstance(e.get(key), (int, float)) and (include_start or e.get("step", 0) > 0)]
        return sorted(points)


def _cfg_name(config: dict, section: str) -> str | None:
    value = config.get(section)
    return value.get("name") if isinstance(value, dict) else None


def train_rows_from(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if any(k.startswith("train/") for k in r)]


def load_run(run_dir: Path) -> RunRecord:
    """A finished run from its results.json; an unfinished one (or one whose results.json is damaged, with a warning)
    from its config.json and metrics.jsonl."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    try:
        results = read_results(run_dir)
    except ResultsError as exc:
        log.warning("%s; the run is read from its metrics instead", exc)
        results = None
    if results is not None and (results.finished or results.evaluations):
        return RunRecord(
            group=results.group, name=results.name, status=results.status, method=results.method,
            kind=results.kind.value, backbone=results.backbone, template=results.template, embed=results.embed,
            data_size=results.data_size, samples_seen=results.samples_seen, final_step=results.final_step,
            start=results.start, final=results.final if results.finished else {},
            evaluations=results.evaluations or group_evaluations(rows), train_rows=train_rows_from(rows),
            run_dir=run_dir, origin=str(run_dir), config=results.config, generation=results.generation,
            best=results.best_checkpoint or {})
    config = _read_json(run_dir / CONFIG_JSON) or (results.config if results is not None else {})
    evaluations = group_evaluations(rows)
    last = max((r for r in rows if "step" in r), key=lambda r: r["step"], default=None)
    return RunRecord(
        group=(config.get("run") or {}).get("group") or run_dir.parent.name, name=run_dir.name, status="unfinished",
        method=method_of_config(config), kind=kind_of_config(config).value,
        backbone=_cfg_name(config, "backbone"), template=_cfg_name(config, "template"),
        embed=_cfg_name(config, "embed"), data_size=(config.get("data") or {}).get("size"),
        samples_seen=last.get("samples_seen") if last else None, final_step=last.get("step") if last else None,
        start=next((e for e in evaluations if e["step"] == 0), {}), final={}, evaluations=evaluations,
        train_rows=train_rows_from(rows), run_dir=run_dir, origin=str(run_dir), config=config,
        generation=results.generation if results is not None else {})


_SEGMENT_START = re.compile(r",(?=[\w.+~/-]+=)")  # a comma that starts the next key=value of a run name
_CUT_NAME = re.compile(r"_[0-9a-f]{12}$")  # identity.name_from_overrides' hash suffix of a cut long name


def _is_cut(name: str) -> bool:
    return len(name) == MAX_NAME_CHARS and bool(_CUT_NAME.search(name))


def _name_segments(name: str) -> list[str]:
    segments = _SEGMENT_START.split(name)
    return segments[:-1] if _is_cut(name) else segments  # a cut tail is neither a whole override nor shared


def _distinguishing_names(names: list[str]) -> list[str]:
    """Each name without the key=value parts that every name shows with the same value (a cut name may have lost
    a part, so it never counts against one)."""
    segments = [_name_segments(n) for n in names]
    cut = sum(map(_is_cut, names))
    values: dict[str, set[str]] = defaultdict(set)
    shown: dict[str, int] = defaultdict(int)
    for part in (p for s in segments for p in s if "=" in p):
        key, _, value = part.partition("=")
        values[key].add(value)
        shown[key] += 1
    shared = {k for k in values if len(values[k]) == 1 and shown[k] + cut >= len(names)}
    return [",".join(p for p in s if "=" not in p or p.partition("=")[0] not in shared) or "default"
            for s in segments]


def shorten_names(runs: list[RunRecord]) -> None:
    """Label runs by the overrides that tell them apart: sweep run names repeat every fixed command-line override
    (and long ones are cut). Within a run group, the key=value parts every run shows with one value are dropped;
    where that would make two labels equal, the group keeps its full names."""
    by_group: dict[str, list[RunRecord]] = defaultdict(list)
    for run in runs:
        by_group[run.group].append(run)
    for members in (m for m in by_group.values() if len(m) > 1):
        short = _distinguishing_names([r.name for r in members])
        if len(set(short)) == len(members):
            for run, name in zip(members, short, strict=True):
                run.short_name = None if name == run.name else name


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        log.warning("%s is not valid JSON (%s); the run is read from its metrics instead", path, exc)
        return None


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in RUN_MARKERS)


def find_run_dirs(path: Path, depth: int = 2) -> list[Path]:
    """Run directories at or below ``path`` (a run dir, a sweep dir, or a runs dir: up to two levels down)."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.name != RESULTS_FILE:
            raise SourceError(f"{path}: a file source must be a {RESULTS_FILE}")
        return [path.parent]
    if not path.is_dir():
        raise SourceError(f"{path} does not exist")
    if is_run_dir(path):
        return [path]
    if depth == 0:
        return []
    found = []
    for child in sorted(path.iterdir()):
        if child.is_dir() and not child.name.startswith(".") and child.name not in NOT_RUNS:
            found += find_run_dirs(child, depth - 1)
    return found


def collect_local(sources: Iterable[str | Path]) -> list[RunRecord]:
    """Every run under the given paths, each once; a path without any run is an error naming it."""
    seen: dict[Path, RunRecord] = {}
    for source in sources:
        dirs = find_run_dirs(Path(source))
        if not dirs:
            raise SourceError(f"{source}: no run directories found (looked for {', '.join(RUN_MARKERS)} up to two "
                              f"levels down)")
        for run_dir in dirs:
            resolved = run_dir.resolve()
            if resolved not in seen:
                seen[resolved] = load_run(run_dir)
    return list(seen.values())
