"""Run records archived without their weights (sempa_exp.records.archive, ``python -m sempa_exp.archive``): what is
copied, what is never changed or deleted, and the refusals. The round trip through a real sweep (archive, a fresh
runs directory, relaunch: every run skipped) is in test_launcher.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from analysis.runs import collect_local
from sempa_exp import archive as archive_cli
from sempa_exp.records import archive as archive_mod
from sempa_exp.records.archive import ArchiveError, archive, archive_finished_run
from sempa_exp.records.results import Results, RunKind, read_results, write_results


def make_run(runs: Path, group: str, name: str, status: str = "finished", lr: float = 1e-4,
             run_section: dict | None = None) -> Path:
    run = runs / group / name
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"w" * 64)
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "sts_pairs").mkdir()
    np.savez(run / "sts_pairs" / "step-0.npz", stsb_dev=np.arange(4, dtype=np.float32))
    (run / ".lock").write_text("pid 1")
    (run / "stray.pt").write_bytes(b"w" * 64)
    (run / "config.json").write_text(json.dumps({"run": run_section or {"group": group},
                                                 "trainer": {"learning_rate": lr}}))
    (run / "metrics.jsonl").write_text('{"step": 0, "eval/stsb_dev": 70.0}\n')
    write_results(run, Results(kind=RunKind.TRAINING, group=group, name=name, run_dir=str(run), method="sempa",
                               status=status, final={"eval/stsb_dev": 70.0}))
    return run


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_only_the_records_of_finished_runs_are_copied(tmp_path):
    runs = tmp_path / "runs"
    done = make_run(runs, "study", "seed=1")
    make_run(runs, "study", "seed=2", status="unfinished")
    report = archive([runs], tmp_path / "records")
    assert report.copied == ["study/seed=1"] and report.unfinished == ["study/seed=2"]
    assert files(tmp_path / "records") == {f"study/seed=1/{f}" for f in (
        "config.json", "metrics.jsonl", "results.json", "sts_pairs/step-0.npz")}
    kept = tmp_path / "records" / "study" / "seed=1"
    assert read_results(kept).finished and (kept / "results.json").read_bytes() == (done / "results.json").read_bytes()
    # the report reads the archive as it reads the run directory
    (source,), (copy,) = collect_local([done]), collect_local([tmp_path / "records"])
    assert (copy.status, copy.final, copy.evaluations) == (source.status, source.final, source.evaluations)
    # a second archive of the same runs changes nothing
    again = archive([runs / "study"], tmp_path / "records")
    assert again.copied == [] and again.unchanged == ["study/seed=1"]


def test_a_differing_file_is_left_alone_unless_update_and_nothing_is_deleted(tmp_path):
    runs, records = tmp_path / "runs", tmp_path / "records"
    run = make_run(runs, "study", "seed=1")
    archive([run], records)
    (records / "study" / "seed=1" / "notes.txt").write_text("kept")  # only in the archive: never deleted
    record = read_results(run)
    record.generation = {"final": {"tasks": {}}}  # e.g. a later gen_eval of the run
    write_results(run, record)
    report = archive([run], records)
    assert report.differs == ["study/seed=1: results.json"] and report.copied == []
    assert read_results(records / "study" / "seed=1").generation == {}
    report = archive([run], records, update=True)
    assert report.copied == ["study/seed=1"] and not report.differs
    assert read_results(records / "study" / "seed=1").generation == {"final": {"tasks": {}}}
    assert (records / "study" / "seed=1" / "notes.txt").read_text() == "kept"


def test_another_experiment_under_the_same_name_is_refused(tmp_path):
    archive([make_run(tmp_path / "a", "study", "seed=1", lr=1e-4)], tmp_path / "records")
    before = files(tmp_path / "records")
    report = archive([make_run(tmp_path / "b", "study", "seed=1", lr=1e-5)], tmp_path / "records", update=True)
    assert report.copied == [] and len(report.refused) == 1 and "different trainer config" in report.refused[0]
    assert files(tmp_path / "records") == before
    record = json.loads((tmp_path / "records" / "study" / "seed=1" / "config.json").read_text())
    assert record["trainer"]["learning_rate"] == 1e-4


def test_a_config_differing_outside_the_experiment_is_the_same_run(tmp_path):
    """Where a run goes and how it logs (the run section) is not the experiment: such a copy is the same run's."""
    archive([make_run(tmp_path / "a", "study", "seed=1")], tmp_path / "records")
    later = make_run(tmp_path / "b", "study", "seed=1", run_section={"group": "study", "archive_to": "elsewhere"})
    report = archive([later], tmp_path / "records", update=True)
    assert report.copied == ["study/seed=1"] and not report.refused


def test_run_archive_to_copies_a_finished_run_and_never_fails_it(tmp_path, caplog):
    run = make_run(tmp_path / "runs", "study", "seed=1")
    archive_finished_run(run, None)  # unset: nothing
    assert not (tmp_path / "records").exists()
    archive_finished_run(run, str(tmp_path / "records"))
    assert read_results(tmp_path / "records" / "study" / "seed=1").finished
    record = read_results(run)
    record.generation = {"final": {"tasks": {}}}  # gen_eval after the run: its copy follows
    write_results(run, record)
    archive_finished_run(run, str(tmp_path / "records"))
    assert read_results(tmp_path / "records" / "study" / "seed=1").generation == {"final": {"tasks": {}}}
    (tmp_path / "file").write_text("")  # a destination that cannot be a folder: a warning, no exception
    archive_finished_run(run, str(tmp_path / "file"))
    assert "not archived" in caplog.text and "python -m sempa_exp.archive" in caplog.text


def test_a_file_too_large_for_a_record_is_named_and_not_copied(tmp_path, monkeypatch):
    run = make_run(tmp_path / "runs", "study", "seed=1")
    (run / "embeddings.npy").write_bytes(b"x" * 20_000)
    monkeypatch.setattr(archive_mod, "MAX_RECORD_BYTES", 10_000)
    report = archive([run], tmp_path / "records")
    assert report.too_large == [str(run / "embeddings.npy")]
    assert not (tmp_path / "records" / "study" / "seed=1" / "embeddings.npy").exists()


def test_the_command_line(tmp_path, capsys):
    runs = tmp_path / "runs"
    make_run(runs, "study", "seed=1")
    assert archive_cli.main([str(runs), "--to", str(tmp_path / "records")]) == 0
    assert "1 run(s) copied, 0 unchanged" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # a source that is not there: one line naming it
        archive_cli.main([str(tmp_path / "nowhere"), "--to", str(tmp_path / "records")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"[sempa-exp] error: {tmp_path / 'nowhere'} is not a directory"
    broken = make_run(runs, "study", "seed=2")
    (broken / "results.json").write_text("{damaged")  # named; the other runs are still archived
    assert archive_cli.main([str(runs), "--to", str(tmp_path / "records")]) == 1
    out = capsys.readouterr().out
    assert "0 run(s) copied, 1 unchanged" in out and "REFUSED    study/seed=2: " in out and "results.json" in out
    (broken / "results.json").unlink()
    make_run(runs, "study", "seed=3")
    (runs / "study" / "seed=3" / "config.json").write_text("{damaged")  # the same: named, not a traceback
    assert archive_cli.main([str(runs), "--to", str(tmp_path / "records")]) == 1
    assert "REFUSED    study/seed=3: " in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArchiveError, match="no run directory"):
        archive([tmp_path / "empty"], tmp_path / "records")
