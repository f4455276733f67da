"""Run records kept apart from the machine that made them: a copy of finished run directories without their weights.

A run directory holds two kinds of files: the records (config, results, metrics, the per-pair similarities of each
evaluation, the attempt log) that the report reads, and the weights (checkpoints, adapters) that only resuming and
re-scoring need. The records are small (tens of KB per run) and are what a study's conclusions rest on, so a study
keeps them where they outlive the machine, e.g. in the repository (``study/records/``), and a sweep relaunched on a
fresh machine skips what they hold after they are copied back into the runs directory: the copy has the layout
``<dest>/<run.group>/<run name>`` of ``<runs_dir>``, so the same command goes both ways.

A file already in the destination is never changed unless ``update`` is asked for, and never deleted; a destination
run that is another experiment under the same name (identity.check_same_experiment) is refused. ``run.archive_to``
makes a run archive itself when it finishes (and gen_eval after it adds to the run's record).
"""

from __future__ import annotations

import filecmp
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sempa_exp.config.schema import ConfigError
from sempa_exp.records import identity
from sempa_exp.records.identity import CONFIG_JSON
from sempa_exp.records.results import RESULTS_FILE, is_finished, kind_of_config

log = logging.getLogger(__name__)

WEIGHT_DIRS = frozenset({"checkpoints", "adapter", "wandb"})
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf"})
MAX_RECORD_BYTES = 5 * 2**20  # a larger file is not a record (a stray weight or cache); skipped and named


class ArchiveError(ConfigError):
    """A source that does not exist or holds no run directory."""


@dataclass
class ArchiveReport:
    copied: list[str] = field(default_factory=list)  # runs with at least one file added or replaced
    unchanged: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)  # not archived: their records are not final
    differs: list[str] = field(default_factory=list)  # "run: file, ..." left alone (update not asked for)
    refused: list[str] = field(default_factory=list)  # "run: why"
    too_large: list[str] = field(default_factory=list)  # files over MAX_RECORD_BYTES, not copied

    def lines(self) -> list[str]:
        out = [f"{len(self.copied)} run(s) copied, {len(self.unchanged)} unchanged"]
        out += [f"  copied     {r}" for r in self.copied]
        out += [f"  unfinished {r} (not archived)" for r in self.unfinished]
        out += [f"  differs    {r} (left as it is; --update replaces it)" for r in self.differs]
        out += [f"  REFUSED    {r}" for r in self.refused]
        out += [f"  too large  {f} (not copied)" for f in self.too_large]
        return out


def is_run_dir(path: Path) -> bool:
    """A run's folder: its saved config, or only a results.json (gen_eval's record of an untrained backbone)."""
    return path.is_dir() and ((path / CONFIG_JSON).is_file() or (path / RESULTS_FILE).is_file())


def find_runs(source: Path) -> list[Path]:
    """Run directories at or below ``source``: a run directory, a sweep directory or a whole runs directory."""
    if not source.is_dir():
        raise ArchiveError(f"{source} is not a directory")
    if is_run_dir(source):
        return [source]
    found: list[Path] = []
    for child in sorted(source.iterdir()):
        if child.is_dir() and not child.name.startswith(".") and child.name not in WEIGHT_DIRS:
            found += [child] if is_run_dir(child) else find_runs(child)
    return found


def record_files(run_dir: Path) -> Iterable[Path]:
    """The run's record files, relative to it: everything but weights, hidden files (the lock) and weight folders."""
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if any(part in WEIGHT_DIRS or part.startswith(".") for part in rel.parts):
            continue
        if path.is_file() and not path.is_symlink() and path.suffix not in WEIGHT_SUFFIXES:
            yield rel


def archive(sources: Iterable[Path | str], dest: Path | str, update: bool = False) -> ArchiveReport:
    """Copies the records of every finished run under ``sources`` to ``dest/<group>/<name>`` (see the module doc)."""
    dest, sources = Path(dest), [Path(source).expanduser() for source in sources]
    report = ArchiveReport()
    runs = [run for source in sources for run in find_runs(source)]
    if not runs:
        raise ArchiveError(f"no run directory (a folder with {CONFIG_JSON} or {RESULTS_FILE}) under "
                           f"{', '.join(map(str, sources))}")
    for run in runs:
        label = f"{run.parent.name}/{run.name}"
        try:
            finished = is_finished(run)
        except ConfigError as exc:  # a damaged results.json: named, the other runs still archived
            report.refused.append(f"{label}: {exc}")
            continue
        if not finished:
            report.unfinished.append(label)
            continue
        target = dest / run.parent.name / run.name
        try:  # a damaged config.json on either side is named (identity.saved_config), the other runs still archived
            config = identity.saved_config(run)
            if config is not None:
                identity.check_same_experiment(target, config, kind_of_config(config))
        except ConfigError as exc:
            report.refused.append(f"{label}: {exc}")
            continue
        added, differing = [], []
        for rel in record_files(run):
            src, dst = run / rel, target / rel
            if src.stat().st_size > MAX_RECORD_BYTES:
                report.too_large.append(str(src))
            elif not dst.exists():
                added.append(rel)
            elif not filecmp.cmp(src, dst, shallow=False):
                differing.append(rel)
        if differing and not update:
            report.differs.append(f"{label}: {', '.join(map(str, differing))}")
            differing = []
        for rel in added + differing:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            tmp = (target / rel).with_name(f".{rel.name}.tmp")
            shutil.copy2(run / rel, tmp)
            tmp.replace(target / rel)  # a kill leaves the old file or the new one, never half of one
        (report.copied if added or differing else report.unchanged).append(label)
    return report


def archive_finished_run(run_dir: Path | str, dest: str | None) -> None:
    """``run.archive_to``: the finished run's records copied to ``dest`` (replacing its earlier copy there: this run
    is their source). A failure is a warning, never the run's failure: ``python -m sempa_exp.archive`` can redo it."""
    if not dest:
        return
    run_dir = Path(run_dir)
    try:
        report = archive([run_dir], Path(dest).expanduser(), update=True)
    except (OSError, ConfigError) as exc:
        log.warning("run.archive_to: %s not archived (%s); python -m sempa_exp.archive %s --to %s does it",
                    run_dir, exc, run_dir, dest)
        return
    if report.unfinished:  # gen_eval of an unfinished run's checkpoint: archived once the run finishes
        log.info("run.archive_to: %s is not finished; archived when it is", run_dir)
    for problem in report.differs + report.refused + report.too_large:
        log.warning("run.archive_to: %s", problem)
    if report.copied:
        log.info("run.archive_to: records of %s copied to %s", run_dir, Path(dest) / run_dir.parent.name / run_dir.name)
