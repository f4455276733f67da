"""The results.json contract (sempa_exp.records.results): the record round-trips, version-1 files are upgraded on read,
a damaged file is named; samples seen, the best checkpoint and the value handed to Hydra's sweeper are defined once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sempa_exp.config.schema import ConfigError
from sempa_exp.pipelines import training
from sempa_exp.records.metrics import read_metrics
from sempa_exp.records.results import (
    RESULTS_FILE,
    RESULTS_VERSION,
    Results,
    ResultsError,
    RunKind,
    SampleClock,
    best_by,
    group_evaluations,
    is_finished,
    kind_of_config,
    method_of_config,
    read_results,
    sweep_objective,
    write_results,
)

NAN = float("nan")


def full_record(run_dir: Path) -> Results:
    """Every field away from its default."""
    evaluations = [{"step": 0, "samples_seen": 0, "eval/stsb_dev": 60.5},
                   {"step": 2, "samples_seen": 16, "eval/stsb_dev": 64.25, "eval/uniformity": -2.5}]
    return Results(
        kind=RunKind.TRAINING, group="ds", name="data.size=16", run_dir=str(run_dir), method="contrastive",
        status="finished", backbone="tiny", template="p2", embed="pretended_cot", data_size=16, train_pairs=15,
        final_step=2, samples_seen=15, start=evaluations[0], final=evaluations[1], best_by_stsb_dev=evaluations[1],
        evaluations=evaluations, generation={"final": {"tasks": {"mmlu": {"status": "ok", "score": 25.0}}}},
        details={"data": {"file": "nli.csv.gz", "sha256": "ab" * 32}, "train_seconds_this_session": 1.5},
        world_size=2, versions={"trl": "1.16.0"}, git_commit="abc123-dirty",
        config={"objective": {"name": "contrastive", "temperature": 0.05}, "lora": {"r": 8}})


# ----------------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("kind", list(RunKind))
def test_write_then_read_gives_the_same_record(tmp_path, kind):
    record = full_record(tmp_path)
    record.kind = kind
    path = write_results(tmp_path, record)
    assert path == tmp_path / RESULTS_FILE and [p.name for p in tmp_path.iterdir()] == [RESULTS_FILE]  # no .tmp left
    on_disk = json.loads(path.read_text())
    assert on_disk["kind"] == kind.value and on_disk["version"] == RESULTS_VERSION == 2
    assert read_results(tmp_path) == record
    assert Results.from_json(record.to_json()) == record
    assert is_finished(tmp_path)


def test_no_file_is_no_record_and_an_unfinished_one_is_not_finished(tmp_path):
    assert read_results(tmp_path) is None and not is_finished(tmp_path)
    write_results(tmp_path, Results(kind=RunKind.TRAINING, group="g", name="n", run_dir=str(tmp_path),
                                    method="sempa", status="unfinished"))
    assert not is_finished(tmp_path) and not read_results(tmp_path).finished


# --------------------------------------------------------------------------------------------- version 1 upgrade


def write_v1(run_dir: Path, record: dict) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RESULTS_FILE).write_text(json.dumps(record))
    return run_dir


V1_COMMON = {"group": "smoke", "name": "default", "backbone": "tiny", "final_step": 4, "samples_seen": 32,
             "final": {"eval/stsb_dev": 61.0}, "evaluations": [{"step": 4, "samples_seen": 32, "eval/stsb_dev": 61.0}]}


@pytest.mark.parametrize(("method", "upgraded"), [("dpo", "sempa"), ("contrastive", "contrastive")])
def test_a_version_1_training_record_is_upgraded(tmp_path, method, upgraded):
    run_dir = write_v1(tmp_path / "smoke" / "default", {
        **V1_COMMON, "status": "finished", "run_dir": str(tmp_path / "smoke" / "default"), "method": method,
        "data": {"file": "nli.csv.gz", "sha256": "00"}, "geometry_sample": "the first 40 sentences"})
    results = read_results(run_dir)
    assert (results.kind, results.method, results.status, results.version) == (RunKind.TRAINING, upgraded,
                                                                               "finished", RESULTS_VERSION)
    assert results.details == {"data": {"file": "nli.csv.gz", "sha256": "00"},
                               "geometry_sample": "the first 40 sentences"}
    assert (results.final, results.evaluations, results.samples_seen) == (V1_COMMON["final"],
                                                                          V1_COMMON["evaluations"], 32)
    assert is_finished(run_dir)


def test_a_version_1_generation_only_record_is_upgraded(tmp_path):
    run_dir = write_v1(tmp_path / "base" / "tiny", {
        "status": "base", "run_dir": str(tmp_path / "base" / "tiny"), "group": "base", "name": "tiny",
        "method": "base", "backbone": "tiny", "generation": {"base": {"tasks": {}}}})
    results = read_results(run_dir)
    assert (results.kind, results.status, results.method) == (RunKind.GENERATION, "finished", "base")
    assert results.generation == {"base": {"tasks": {}}} and results.finished


def test_a_version_1_evaluation_record_is_upgraded(tmp_path):
    run_dir = write_v1(tmp_path / "eval" / "echo", {
        **V1_COMMON, "status": "finished", "kind": "evaluation", "run_dir": str(tmp_path / "eval" / "echo"),
        "method": "echo", "method_kind": "echo", "method_info": {}, "suites": ["stsb_dev"], "gar_top_k": 10})
    results = read_results(run_dir)
    assert (results.kind, results.method) == (RunKind.EVALUATION, "echo")
    assert results.details == {"method_kind": "echo", "method_info": {}, "suites": ["stsb_dev"], "gar_top_k": 10}


@pytest.mark.parametrize(("trained_with", "upgraded"), [("dpo", "sempa"), ("contrastive", "contrastive")])
def test_a_version_1_evaluation_of_a_checkpoint_is_the_method_it_was_trained_with(tmp_path, trained_with, upgraded):
    """Version 1 named an evaluated adapter ``method: checkpoint`` and its objective in method_info.trained_with
    (SemPA: dpo); version 2's method is the objective. Read through the upgrade, the old record must say the same, or
    the report lists a 'checkpoint' method instead of SemPA."""
    run_dir = write_v1(tmp_path / "eval" / "ckpt", {
        **V1_COMMON, "status": "finished", "kind": "evaluation", "run_dir": str(tmp_path / "eval" / "ckpt"),
        "method": "checkpoint", "method_kind": "checkpoint",
        "method_info": {"adapter": "/runs/smoke/default/adapter", "trained_with": trained_with}})
    results = read_results(run_dir)
    assert results.method == upgraded


# -------------------------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize(("content", "problem"), [
    ("{broken", "is damaged"),
    ("\udcff".encode("utf-8", "surrogateescape"), "is damaged"),  # not UTF-8
    ("[1, 2]", "not a results record"),
    ('{"kind": "training", "group": "g", "name": "n", "run_dir": "/x", "version": 2}', "missing method"),
    ('{"kind": "sweep", "group": "g", "name": "n", "run_dir": "/x", "method": "m", "version": 2}',
     "kind='sweep' is not one of training, evaluation, generation"),
])
def test_a_damaged_file_is_a_results_error_naming_it(tmp_path, content, problem):
    path = tmp_path / RESULTS_FILE
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ResultsError) as err:
        read_results(tmp_path)
    assert str(path) in str(err.value) and problem in str(err.value)
    assert isinstance(err.value, ConfigError)  # the entry points report it like a bad configuration
    with pytest.raises(ResultsError):
        is_finished(tmp_path)  # never taken for "not finished" (which would redo the run over it)


# ---------------------------------------------------------------------------------------- methods of saved configs


def test_method_and_kind_of_a_saved_config():
    assert method_of_config({"method": {"name": "echo"}, "objective": {"name": "sempa"}}) == "echo"
    assert method_of_config({"objective": {"name": "contrastive"}}) == "contrastive"
    assert method_of_config({"trainer": {"method": "dpo"}}) == "sempa"  # before the objective group
    assert method_of_config({"trainer": {"method": "contrastive"}}) == "contrastive"
    assert method_of_config({}) == "unknown"
    assert kind_of_config({"method": {"name": "echo"}}) is RunKind.EVALUATION
    assert kind_of_config({"objective": {"name": "sempa"}}) is RunKind.TRAINING


# ----------------------------------------------------------------------------------------------- samples seen


def simulated_samples(pairs: int, per_device_batch: int, grad_accum: int, world_size: int, steps: int) -> list[int]:
    """Samples seen after steps 1..steps, counted batch by batch: an epoch's pairs cut into global micro-batches of
    per_device_batch x world_size (the last one partial), grouped by grad_accum into optimizer steps (the last one
    short), epoch after epoch."""
    per_micro = per_device_batch * world_size
    epoch = [min(per_micro, pairs - start) for start in range(0, pairs, per_micro)]
    step_sizes = [sum(epoch[i:i + grad_accum]) for i in range(0, len(epoch), grad_accum)]
    out, seen = [], 0
    while len(out) < steps:
        for size in step_sizes:
            seen += size
            out.append(seen)
    return out[:steps]


def test_sample_clock_with_a_partial_last_batch_over_several_epochs():
    # 30 pairs, micro-batches of 4 (the 8th holds 2), 2 per step: steps of 8, 8, 8, 6 samples, then again
    clock = SampleClock(30, per_device_batch=4, grad_accum=2)
    assert clock.per_step == 8 and clock.steps_per_epoch == 4
    assert [clock.at(s) for s in range(9)] == [0, 8, 16, 24, 30, 38, 46, 54, 60]
    # 7 micro-batches of 4 (the last holds 1) in steps of 3: the last step of an epoch has a single micro-batch
    clock = SampleClock(25, per_device_batch=4, grad_accum=3)
    assert clock.steps_per_epoch == 3 and [clock.at(s) for s in range(1, 7)] == [12, 24, 25, 37, 49, 50]
    # two ranks: 2 x 4 per micro-batch
    clock = SampleClock(30, per_device_batch=4, grad_accum=1, world_size=2)
    assert [clock.at(s) for s in range(1, 6)] == [8, 16, 24, 30, 38]
    # fewer pairs than one step holds
    assert [SampleClock(3, 4, 2).at(s) for s in range(1, 4)] == [3, 6, 9]


def test_sample_clock_agrees_with_counting_the_batches():
    for pairs in range(1, 30):
        for per_device_batch in (1, 2, 3, 4):
            for grad_accum in (1, 2, 3):
                for world_size in (1, 2, 3):
                    clock = SampleClock(pairs, per_device_batch, grad_accum, world_size)
                    steps = 3 * clock.steps_per_epoch + 1  # into a fourth epoch
                    counted = simulated_samples(pairs, per_device_batch, grad_accum, world_size, steps)
                    assert [clock.at(s) for s in range(1, steps + 1)] == counted, (pairs, per_device_batch,
                                                                                    grad_accum, world_size)


def test_sample_clock_without_pairs_counts_full_steps():
    assert SampleClock(0, 4, 2, world_size=2).at(3) == 48


# ------------------------------------------------------------------------------------ best checkpoint, NaN-safe


def test_best_by_skips_nan_inf_and_missing_scores():
    evaluations = [
        {"step": 0, "eval/stsb_dev": 55.0},
        {"step": 2, "eval/stsb_dev": NAN},  # a degenerate model
        {"step": 4, "eval/stsb_dev": "nan"},  # NaN as metrics.jsonl (and a grouped W&B history) stores it
        {"step": 6, "eval/stsb_dev": float("inf")},
        {"step": 8, "eval/stsb_dev": 61.5},
        {"step": 10, "eval/uniformity": -2.0},  # not scored on STS-B dev
        {"step": 12, "eval/stsb_dev": True},  # not a score
    ]
    assert best_by(evaluations)["step"] == 8
    assert best_by(evaluations, "eval/uniformity")["step"] == 10
    assert best_by([e for e in evaluations if e["step"] in (2, 4, 6, 10)]) is None
    assert best_by([]) is None
    # equal scores: the earlier checkpoint
    assert best_by([{"step": 2, "eval/stsb_dev": 60.0}, {"step": 4, "eval/stsb_dev": 60.0}])["step"] == 2


def test_group_evaluations_merges_the_rows_of_a_step():
    rows = [
        {"step": 0, "samples_seen": 0, "eval/stsb_dev": 50.0},
        {"step": 1, "samples_seen": 8, "train/loss": 0.69},
        {"step": 0, "samples_seen": 0, "eval/uniformity": -2.0},
        {"step": 2, "samples_seen": 16, "eval/stsb_dev": "nan"},
        {"samples_seen": 16, "eval/stsb_dev": 1.0},  # no step: not an evaluation record
    ]
    assert group_evaluations(reversed(rows[:4])) == group_evaluations(rows) == [
        {"step": 0, "samples_seen": 0, "eval/stsb_dev": 50.0, "eval/uniformity": -2.0},
        {"step": 2, "samples_seen": 16, "eval/stsb_dev": "nan"}]
    assert best_by(group_evaluations(rows))["step"] == 0


# ------------------------------------------------------------------------------------- the sweeper's objective


def test_sweep_objective_is_the_final_sts_average_else_stsb_dev_else_none():
    def record(final: dict) -> Results:
        return Results(kind=RunKind.TRAINING, group="g", name="n", run_dir="/x", method="sempa", final=final)

    assert sweep_objective(record({"eval/sts_avg": 70.5, "eval/stsb_dev": 80.0})) == 70.5
    assert sweep_objective(record({"eval/stsb_dev": 80})) == 80.0 and isinstance(
        sweep_objective(record({"eval/stsb_dev": 80})), float)
    for bad in (NAN, float("inf"), float("-inf"), "nan", None, True):
        assert sweep_objective(record({"eval/sts_avg": bad})) is None, bad
    assert sweep_objective(record({"eval/uniformity": -2.0})) is None
    assert sweep_objective(record({})) is None and sweep_objective(None) is None


def test_a_degenerate_final_model_is_never_best_and_gives_the_sweeper_no_value(tiny_cfg, monkeypatch):
    """The final model's scores are NaN (a diverged model): the best checkpoint is an earlier one, the sweeper gets
    None (not NaN, which sweepers order arbitrarily), and the run skipped as finished gives the same answers."""
    real_evaluate = training.evaluate
    encoders: list = []  # one encoder per step: 0, checkpoint 2, step 4 (its checkpoint and the end of training)

    def degenerate_at_the_end(encoder, data, suites, pairs=None):
        metrics = real_evaluate(encoder, data, suites, pairs)
        if not any(e is encoder for e in encoders):
            encoders.append(encoder)  # kept alive: a new encoder cannot take an old one's id
        index = next(i for i, e in enumerate(encoders) if e is encoder)
        return {k: NAN for k in metrics} if index >= 2 else metrics

    monkeypatch.setattr(training, "evaluate", degenerate_at_the_end)
    cfg = tiny_cfg()
    results = training.run(cfg)
    assert len(encoders) == 3 and results.final_step == 4
    assert math.isnan(results.final["eval/stsb_dev"]) and math.isnan(results.final["eval/sts_avg"])
    finite = [e for e in results.evaluations if e["step"] < 4]
    assert results.best_by_stsb_dev == max(finite, key=lambda e: e["eval/stsb_dev"])
    assert sweep_objective(results) is None
    assert [r["eval/stsb_dev"] for r in read_metrics(Path(results.run_dir)) if r["step"] == 4
            and "eval/stsb_dev" in r] == ["nan"]

    skipped = training.run(cfg)  # finished: read back from results.json, NaN included
    assert skipped.best_by_stsb_dev == results.best_by_stsb_dev and sweep_objective(skipped) is None
    assert math.isnan(skipped.final["eval/stsb_dev"])


def test_the_entry_points_hand_the_sweeper_the_same_value_for_a_skipped_run(tiny_cfg, capsys):
    """``python -m sempa_exp.train``'s main (undecorated: the function Hydra calls) returns the run's sweep objective;
    called again on the finished run it is skipped and returns the value of the run that wrote the record."""
    from sempa_exp import train

    cfg = tiny_cfg("eval.at_start=[]", "eval.at_checkpoint=[]", "eval.at_end=[stsb_dev]")
    value = train.main.__wrapped__(cfg)
    written = read_results(training.prepare(cfg).run_dir)
    assert isinstance(value, float) and value == written.final["eval/stsb_dev"] == sweep_objective(written)
    again = train.main.__wrapped__(cfg)
    assert "already finished, skipped" in capsys.readouterr().out
    assert again == value
