"""A full LoRA run + evaluation on the tiny backbone, once per training objective (SemPA's DPO, the contrastive foil):
the same recipe, checkpoints, evaluations, records and samples-seen clock."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from transformers import Trainer, TrainerCallback

from sempa_exp.embedding.encoder import SentenceEncoder
from sempa_exp.pipelines import training
from sempa_exp.records.metrics import read_metrics
from sempa_exp.records.results import RunKind, SampleClock, best_by, read_results, sweep_objective

# 30 pairs in micro-batches of 4 (the 8th holds 2) x 2 accumulation: 4 optimizer steps, the last one short (6 pairs);
# a checkpoint every 16 samples = every 2 steps
OBJECTIVES = {
    "sempa": [],
    "contrastive": ["objective=contrastive", "trainer.learning_rate=1e-3"],
}
SEQUENCES_PER_PAIR = {"sempa": 2, "contrastive": 3}  # DPO: chosen + rejected; InfoNCE: anchor, positive, negative


def count_fed_pairs(monkeypatch, objective: str) -> list[int]:
    """Pairs per optimizer step, as the trainer's data loader hands them over (filled while the run trains)."""
    fed: list[int] = []
    original = Trainer.get_batch_samples

    def counting(self, *args, **kwargs):
        batches, num_items = original(self, *args, **kwargs)
        fed.append(sum(b["input_ids"].shape[0] for b in batches) // SEQUENCES_PER_PAIR[objective])
        return batches, num_items

    monkeypatch.setattr(Trainer, "get_batch_samples", counting)
    return fed


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_tiny_run_trains_checkpoints_and_evaluates(tiny_cfg, objective, monkeypatch):
    fed = count_fed_pairs(monkeypatch, objective)
    results = training.run(tiny_cfg("data.size=30", *OBJECTIVES[objective]))

    run_dir = Path(results.run_dir)
    assert results.finished and results.kind is RunKind.TRAINING and results.method == objective
    assert results.final_step == 4 and results.data_size == results.train_pairs == 30
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (run_dir / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    assert [e["step"] for e in results.evaluations] == [0, 2, 4]
    assert {"eval/sts_avg", "eval/stsb_dev", "eval/uniformity", "eval/isotropy"} <= set(results.start)
    assert "eval/sts12/MSRpar" in results.final
    assert "eval/sts_avg" not in results.evaluations[1]  # checkpoints: STS-B dev + geometry only
    assert results.final["eval/sts_avg"] != results.start["eval/sts_avg"]  # it trained
    assert results.best_by_stsb_dev == best_by(results.evaluations, "eval/stsb_dev")
    assert sweep_objective(results) == results.final["eval/sts_avg"]

    train_rows = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["train/loss"]) for r in train_rows)
    if objective == "sempa":
        assert all("train/rewards/margins" in r for r in train_rows)
    else:  # 4 triplets per device batch: 8 candidates, chance level is log 8
        assert abs(train_rows[0]["train/loss"] - math.log(8)) < 1.5

    # samples seen: what the trainer was fed (8, 8, 8, then the short last step's 6), the clock, the logged x axis and
    # the records agree, exactly
    clock = SampleClock(30, per_device_batch=4, grad_accum=2)
    assert fed == [8, 8, 8, 6]
    seen = [sum(fed[:step]) for step in range(1, 5)]
    assert seen == [clock.at(step) for step in range(1, 5)] == [r["samples_seen"] for r in train_rows]
    assert results.samples_seen == clock.at(results.final_step) == train_rows[-1]["samples_seen"] == 30
    assert [e["samples_seen"] for e in results.evaluations] == [0, clock.at(2), 30]

    saved = read_results(run_dir)
    assert saved == results  # the record on disk is the one returned
    assert saved.versions["trl"] and saved.details["data"]["sha256"]
    assert saved.config["objective"]["name"] == objective
    if objective == "contrastive":
        assert saved.config["objective"]["temperature"] == 0.05


def test_samples_seen_over_two_epochs_with_a_short_last_step(tiny_cfg, monkeypatch):
    """14 pairs: micro-batches of 4, 4, 4, 2 in steps of 8 and 6 samples, twice."""
    fed = count_fed_pairs(monkeypatch, "contrastive")
    results = training.run(tiny_cfg("data.size=14", "trainer.epochs=2", "eval.at_start=[]", "eval.at_checkpoint=[]",
                                    "eval.at_end=[stsb_dev]", *OBJECTIVES["contrastive"]))
    clock = SampleClock(14, per_device_batch=4, grad_accum=2)
    assert fed == [8, 6, 8, 6] and results.final_step == 4
    logged = [r["samples_seen"] for r in read_metrics(Path(results.run_dir)) if "train/loss" in r]
    assert logged == [clock.at(step) for step in range(1, 5)] == [8, 14, 22, 28]
    assert results.samples_seen == clock.at(4) == logged[-1] == 2 * 14


def test_end_of_training_evaluation_reuses_the_last_checkpoints_embeddings(tiny_cfg, monkeypatch):
    """The final step is also a checkpoint: its STS-B dev sentences (which hold the geometry sample) are embedded once
    for both evaluations of that step, with the same weights."""
    embedded: list[list[str]] = []
    original = SentenceEncoder._embed_batches

    def counting(self, batches):
        embedded.append([s for b in batches for s in b])
        return original(self, batches)

    monkeypatch.setattr(SentenceEncoder, "_embed_batches", counting)
    results = training.run(tiny_cfg("eval.at_start=[]", "eval.at_checkpoint=[stsb_dev]", "eval.at_end=[geometry]"))
    assert results.final_step == 4
    assert {"eval/stsb_dev", "eval/uniformity"} <= set(results.final)
    assert len(embedded) == 2  # the stsb_dev evaluations of steps 2 and 4; geometry at step 4 embedded nothing new


class StepRecorder(TrainerCallback):
    """Built by the run from ``trainer.callbacks`` (this module, by name); records the steps it sees."""

    seen: list[tuple[str, int]] = []

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def on_step_end(self, args, state, control, **kwargs):
        StepRecorder.seen.append((self.tag, state.global_step))


def test_configured_trainer_callback_sees_every_step(tiny_cfg, monkeypatch):
    monkeypatch.setattr(StepRecorder, "seen", [])
    results = training.run(tiny_cfg("eval.at_start=[]", "eval.at_checkpoint=[]", "eval.at_end=[]",
                                    f"+trainer.callbacks.steps._target_={__name__}.StepRecorder",
                                    "+trainer.callbacks.steps.tag=recorded"))
    assert results.final_step == 4
    assert StepRecorder.seen == [("recorded", step) for step in range(1, 5)]
