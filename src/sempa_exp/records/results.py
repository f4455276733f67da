"""``results.json``: the one record a run leaves behind, its version, and the only code that reads or writes it.

Three kinds of run write it (:class:`RunKind`): a training run (``python -m sempa_exp.train``: step 0, every
checkpoint, the final adapter), an evaluation (``python -m sempa_exp.evaluate``: one model state, step 0) and a
generation-only record (``python -m sempa_exp.gen_eval`` on an untrained backbone, under ``<runs_dir>/base``). Every
kind has the same fields; ``generation`` holds lm-eval records by label (``base``, ``final``, ``checkpoint-N``) and
``details`` what only one kind has (the training data file, an evaluated method's settings and artifacts, ...).

Version 1 (no ``version`` key, before this module) is read too: its ``status: "base"`` becomes ``kind: generation``
and its training method ``dpo`` becomes ``sempa``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from sempa_exp.config.schema import ConfigError
from sempa_exp.records.rundir import write_json_atomic

RESULTS_FILE = "results.json"
SUPERSEDED_GENERATION_FILE = "generation.superseded.jsonl"
RESULTS_VERSION = 2
FINISHED = "finished"


class RunKind(str, Enum):
    TRAINING = "training"
    EVALUATION = "evaluation"
    GENERATION = "generation"


class ResultsError(ConfigError):
    """A results.json that cannot be read; the message names the file and what is wrong with it."""


@dataclass
class Results:
    kind: RunKind
    group: str
    name: str
    run_dir: str
    method: str  # the report's method key: sempa, contrastive (training); prompteol, echo, ... (evaluation); base
    status: str = FINISHED  # gen_eval's record of an unfinished run's checkpoint: "unfinished"
    backbone: str | None = None  # None: the method has no decoder backbone (sbert)
    template: str | None = None  # paraphrase template (training)
    embed: str | None = None  # embedding prompt, where the method uses one
    data_size: int = 0  # training triplets (0: no training)
    train_pairs: int | None = None  # pairs trained on (data_size minus pairs over trainer.max_length)
    final_step: int = 0
    samples_seen: int | None = 0  # None: an evaluated checkpoint whose run's records cannot tell
    start: dict[str, Any] = field(default_factory=dict)  # metrics at step 0 (training)
    final: dict[str, Any] = field(default_factory=dict)  # metrics of the final model state
    best_by_stsb_dev: dict[str, Any] | None = None  # the evaluation with the highest finite STS-B dev
    # eval.at_best: the trained checkpoint (step > 0) with the highest STS-B dev, with the suites scored on it
    best_checkpoint: dict[str, Any] | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # {step, samples_seen, eval/...} by step
    generation: dict[str, dict[str, Any]] = field(default_factory=dict)  # lm-eval records by label
    details: dict[str, Any] = field(default_factory=dict)  # what only this kind of run records
    world_size: int = 1
    versions: dict[str, str] = field(default_factory=dict)
    git_commit: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config
    version: int = RESULTS_VERSION

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["kind"] = self.kind.value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path | str = "results.json") -> Results:
        if not isinstance(data, dict):
            raise ResultsError(f"{source}: not a results record (a JSON object was expected)")
        data = _upgrade(dict(data))
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("kind", "group", "name", "run_dir", "method") if data.get(k) is None]
        if missing:
            raise ResultsError(f"{source}: missing {', '.join(missing)}")
        try:
            kind = RunKind(data["kind"])
        except ValueError:
            raise ResultsError(f"{source}: kind={data['kind']!r} is not one of "
                               f"{', '.join(k.value for k in RunKind)}") from None
        return cls(**{**{k: v for k, v in data.items() if k in known}, "kind": kind})


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 record (no version key) in the version-2 shape."""
    if data.get("version") is not None:
        return data
    if data.get("status") == "base":
        data.update(kind=RunKind.GENERATION.value, status=FINISHED)
    elif data.get("kind") != RunKind.EVALUATION.value:
        data["kind"] = RunKind.TRAINING.value
    if data["kind"] == RunKind.TRAINING.value:
        data["method"] = {"dpo": "sempa"}.get(data.get("method"), data.get("method"))
        data.setdefault("details", {}).update({k: data.pop(k) for k in ("data", "geometry_sample") if k in data})
    elif data["kind"] == RunKind.EVALUATION.value:
        moved = ("method_kind", "method_info", "method_settings", "suites", "artifacts", "geometry_sample",
                 "gar_sample", "gar_top_k", "gar_match")
        data.setdefault("details", {}).update({k: data.pop(k) for k in moved if k in data})
        if data.get("method") == "checkpoint":  # an evaluated adapter is the method it was trained with
            trained_with = (data["details"].get("method_info") or {}).get("trained_with")
            if trained_with:
                data["method"] = {"dpo": "sempa"}.get(trained_with, trained_with)
    data["version"] = RESULTS_VERSION
    return data


def method_of_config(config: dict[str, Any]) -> str:
    """The method key of a run that has no results.json to say it (unfinished, or read from W&B), from its resolved
    config: the evaluated method, else the training objective (runs before the objective group: trainer.method)."""
    evaluated = config.get("method")
    if isinstance(evaluated, dict) and evaluated.get("name"):
        return evaluated["name"]
    objective = config.get("objective")
    if isinstance(objective, dict) and objective.get("name"):
        return objective["name"]
    legacy = (config.get("trainer") or {}).get("method")
    return {"dpo": "sempa"}.get(legacy, legacy or "unknown")


def kind_of_config(config: dict[str, Any]) -> RunKind:
    return RunKind.EVALUATION if isinstance(config.get("method"), dict) else RunKind.TRAINING


def read_results(run_dir: Path | str) -> Results | None:
    """The run's record; None when it has none yet. A damaged file raises ResultsError naming it."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{path} is damaged ({exc}); move it away to redo the run, or restore it") from None
    return Results.from_json(data, path)


def write_results(run_dir: Path | str, results: Results) -> Path:
    """Writes the record atomically (a kill leaves the previous file or the new one, never a mix)."""
    path = Path(run_dir) / RESULTS_FILE
    write_json_atomic(path, results.to_json())
    return path


def is_finished(run_dir: Path | str) -> bool:
    results = read_results(run_dir)
    return results is not None and results.finished


def add_generation(run_dir: Path | str, label: str, record: dict[str, Any], new: Results | None) -> Path:
    """Stores an lm-eval record under ``generation.<label>``, the rest of an existing record left as it is; a record it
    replaces is appended to generation.superseded.jsonl. ``new`` seeds a run that has no results.json yet (the
    untrained backbone's folder, an unfinished run's checkpoint)."""
    run_dir = Path(run_dir)
    results = read_results(run_dir) or new
    if results is None:
        raise ResultsError(f"{run_dir} has no {RESULTS_FILE} to add the generation record {label!r} to")
    if label in results.generation:
        with (run_dir / SUPERSEDED_GENERATION_FILE).open("a") as f:
            f.write(json.dumps({"label": label, **results.generation[label]}, default=str) + "\n")
    results.generation[label] = record
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_results(run_dir, results)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def group_evaluations(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """metrics.jsonl rows (or W&B history rows) -> one evaluation per step: {step, samples_seen, eval/...}; the final
    step also holds eval.at_best's best/... scores."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:
        scores = {k: v for k, v in row.items() if k.startswith(("eval/", "best/"))}
        if scores and "step" in row:
            entry = by_step.setdefault(row["step"], {"step": row["step"], "samples_seen": row.get("samples_seen", 0)})
            entry.update(scores)
    return [by_step[s] for s in sorted(by_step)]


def best_by(evaluations: Iterable[dict[str, Any]], key: str = "eval/stsb_dev") -> dict[str, Any] | None:
    """The evaluation with the highest finite ``key``; NaN (a degenerate model, stored as "nan") is never best."""
    return max((e for e in evaluations if _finite_number(e.get(key))), key=lambda e: e[key], default=None)


def sweep_objective(results: Results | None) -> float | None:
    """What a run returns to Hydra's sweeper: the final 7-task STS average, else STS-B dev; None if neither."""
    final = results.final if results is not None else {}
    value = final.get("eval/sts_avg", final.get("eval/stsb_dev"))
    return float(value) if _finite_number(value) else None


@dataclass(frozen=True)
class SampleClock:
    """Training samples seen after ``step`` optimizer steps: the one definition, used for the logged x axis, the
    records and the evaluation of a checkpoint. An epoch is ceil(pairs / (per-device batch x world)) micro-batches,
    the last one partial, grouped by ``grad_accum`` into optimizer steps (the last one may be short)."""

    pairs: int
    per_device_batch: int
    grad_accum: int
    world_size: int = 1

    @property
    def per_step(self) -> int:
        return self.per_device_batch * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        micro_batches = math.ceil(self.pairs / (self.per_device_batch * self.world_size))
        return max(1, math.ceil(micro_batches / self.grad_accum))

    def at(self, step: int) -> int:
        if self.pairs <= 0:
            return step * self.per_step
        epochs_done, into_epoch = divmod(step, self.steps_per_epoch)
        return epochs_done * self.pairs + min(into_epoch * self.per_step, self.pairs)
