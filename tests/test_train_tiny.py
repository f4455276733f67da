"""A full LoRA-DPO run + evaluation on the tiny backbone."""

from __future__ import annotations

import json

from sempa_exp import train
from sempa_exp.records.metrics import read_metrics


def test_tiny_run_trains_checkpoints_and_evaluates(tiny_cfg):
    results = train.run(tiny_cfg())
    run_dir = train.rundir.Path(results["run_dir"])
    assert results["status"] == "finished"
    # 32 pairs / (4 x 2) = 4 optimizer steps; a checkpoint every 16 samples = every 2 steps
    assert results["final_step"] == 4
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    steps = [e["step"] for e in results["evaluations"]]
    assert steps == [0, 2, 4]
    assert {"eval/sts_avg", "eval/stsb_dev", "eval/uniformity", "eval/isotropy"} <= set(results["start"])
    assert "eval/sts12/MSRpar" in results["final"]
    assert "eval/sts_avg" not in results["evaluations"][1]  # checkpoints: STS-B dev + geometry only
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all("train/rewards/margins" in r and "samples_seen" in r for r in train_rows)
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["final"] == results["final"]
    assert saved["versions"]["trl"] and saved["data"]["sha256"]


def test_end_of_training_evaluation_reuses_the_last_checkpoints_embeddings(tiny_cfg, monkeypatch):
    """The final step is also a checkpoint: its STS-B dev sentences (which hold the geometry sample) are embedded once
    for both evaluations of that step, with the same weights."""
    embedded: list[list[str]] = []
    original = train.SentenceEncoder._embed

    def counting(self, sentences):
        embedded.append(list(sentences))
        return original(self, sentences)

    monkeypatch.setattr(train.SentenceEncoder, "_embed", counting)
    results = train.run(tiny_cfg("eval.at_start=[]", "eval.at_checkpoint=[stsb_dev]", "eval.at_end=[geometry]"))
    assert results["final_step"] == 4
    final = results["final"]
    assert {"eval/stsb_dev", "eval/uniformity"} <= set(final)
    assert len(embedded) == 2  # the stsb_dev evaluations of steps 2 and 4; geometry at step 4 embedded nothing new
