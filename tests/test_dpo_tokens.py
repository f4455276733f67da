"""The DPO pairs' token layout is ms-swift's (the paper's tool), pinned on the tiny backbone's chat template
(bench/swift_reference.py checks the same on the real backbones against ms-swift itself)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import tiny_trainer
from sempa_exp.config.schema import data_dir
from sempa_exp.data import nli
from sempa_exp.objectives.dpo import end_at_turn_end


def prepared(tiny_cfg, tmp_path: Path, *overrides: str, size: int = 4):
    composed = tiny_cfg(f"data.size={size}", *overrides)
    cfg = OmegaConf.to_object(composed)
    triplets, _ = nli.load_triplets(cfg.data, data_dir(cfg))
    chosen = nli.subset(triplets, size, cfg.data.subset_seed)
    trainer = tiny_trainer(composed, chosen, tmp_path / "out")
    return cfg, trainer.processing_class, chosen, trainer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("cached", [True, False])
def test_a_pair_is_the_swift_layout_prompt_then_each_answer_closed_by_the_turn_end(tiny_cfg, tmp_path, cached):
    cfg, tokenizer, triplets, trainer = prepared(tiny_cfg, tmp_path, f"objective.cache_prepared_data={cached}")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, t in zip(trainer.train_dataset, triplets, strict=True):
        instruction = cfg.template.text.replace("{s}", t.premise)
        prompt = (f"<|im_start|>system\n{cfg.data.system_prompt}<|im_end|>\n<|im_start|>user\n{instruction}"
                  f"<|im_end|>\n<|im_start|>assistant\n")
        assert tokenizer.decode(row["prompt_ids"]) == prompt
        # scored: the answer and <|im_end|>, not the line break the template writes after it
        assert row["chosen_ids"] == [*ids(tokenizer, t.entailment), end]
        assert row["rejected_ids"] == [*ids(tokenizer, t.contradiction), end]


def test_trl_completion_with_the_template_tail_is_an_option(tiny_cfg, tmp_path):
    _, tokenizer, triplets, trainer = prepared(tiny_cfg, tmp_path, "objective.score_template_tail=true")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    row, t = trainer.train_dataset[0], triplets[0]
    assert row["chosen_ids"] == [*ids(tokenizer, t.entailment), end, *ids(tokenizer, "\n")]


def test_pairs_longer_than_max_length_are_dropped_whole_not_truncated(tiny_cfg, tmp_path):
    *_, full = prepared(tiny_cfg, tmp_path, "trainer.max_length=512", "objective.cache_prepared_data=false")
    lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in full.train_dataset]
    limit = sorted(lengths)[1]  # keeps the shortest pair(s) only
    *_, cut = prepared(tiny_cfg, tmp_path, f"trainer.max_length={limit}", "objective.cache_prepared_data=false")
    kept = [r for r in full.train_dataset
            if len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= limit]
    assert 0 < len(cut.train_dataset) == len(kept) < len(full.train_dataset)
    assert [r["chosen_ids"] for r in cut.train_dataset] == [r["chosen_ids"] for r in kept]


def test_dropout_is_off_in_training_as_in_the_official_run(tiny_cfg, tmp_path):
    *_, trainer = prepared(tiny_cfg, tmp_path)
    rates = {m.p for m in trainer.model.modules() if type(m).__name__ == "Dropout"}
    assert rates == {0.0}
    *_, kept = prepared(tiny_cfg, tmp_path, "objective.disable_dropout=false")
    assert 0.05 in {m.p for m in kept.model.modules() if type(m).__name__ == "Dropout"}


def test_end_at_turn_end_keeps_the_last_turn_end():
    assert end_at_turn_end([7, 5, 9, 5, 3], [5]) == [7, 5, 9, 5]
    assert end_at_turn_end([7, 8, 9, 3], [8, 9]) == [7, 8, 9]
    with pytest.raises(ValueError, match="does not occur"):
        end_at_turn_end([1, 2], [5])
