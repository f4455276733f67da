"""Listwise SemPA (objective=listwise): with one negative, the contradiction, it is TRL's DPO sigmoid loss on the same
batch; with K negatives, the Plackett-Luce loss of log-probs computed independently (full sequences, adapter on and
off); the negatives are drawn as documented; a run trains end to end (tiny backbone, fp32)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import tiny_trainer
from sempa_exp.config.schema import ConfigError, data_dir, validate
from sempa_exp.data import nli
from sempa_exp.objectives.listwise import ListwiseDPOTrainer, draw_negatives, plackett_luce_loss
from sempa_exp.pipelines import training

OFF = ["objective.cache_prepared_data=false"]


def triplets_of(cfg, size: int) -> list[nli.Triplet]:
    config = OmegaConf.to_object(cfg)
    triplets, _ = nli.read_triplets(nli.resolve_source(config.data, data_dir(config)), config.data.max_sentence_chars)
    return nli.subset(triplets, size, config.data.subset_seed)


def trainer_for(tiny_cfg, tmp_path, *overrides: str, size: int = 16):
    cfg = tiny_cfg(f"data.size={size}", "trainer.max_steps=2", *overrides)
    trainer = tiny_trainer(cfg, triplets_of(cfg, size), tmp_path / "out")
    trainer.model.eval()
    generator = torch.Generator().manual_seed(0)  # the same non-zero adapter in every trainer
    for _name, p in sorted(trainer.model.named_parameters()):
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=generator) * 0.05
    return trainer


def test_negatives_are_the_contradiction_then_other_premises_hypotheses():
    t = [nli.Triplet(f"premise {i % 5}", f"entails {i}", f"contradicts {i}") for i in range(20)]
    drawn = draw_negatives(t, 4, True, "both", seed=3)
    assert drawn == draw_negatives(t, 4, True, "both", seed=3) != draw_negatives(t, 4, True, "both", seed=4)
    for triplet, negatives in zip(t, drawn, strict=True):
        assert len(negatives) == 4 == len(set(negatives)) and negatives[0] == triplet.contradiction
        sources = [next(x for x in t if s in (x.entailment, x.contradiction)) for s in negatives[1:]]
        assert all(x.premise != triplet.premise for x in sources)  # never a hypothesis of the same premise
    only = draw_negatives(t, 2, False, "entailment", seed=0)
    assert all(n.startswith("entails") for negatives in only for n in negatives)
    with pytest.raises(ConfigError, match="two distinct premises"):
        draw_negatives([nli.Triplet("p", "e", "c")] * 3, 2, True, "both", seed=0)


@pytest.mark.parametrize("precompute", [True, False])
def test_one_negative_is_trls_dpo_sigmoid_loss_on_the_same_batch(tiny_cfg, tmp_path, precompute):
    common = [*OFF, f"objective.precompute_ref_logps={str(precompute).lower()}"]
    dpo = trainer_for(tiny_cfg, tmp_path / "dpo", *common)
    listwise = trainer_for(tiny_cfg, tmp_path / "lw", "objective=listwise", "objective.num_negatives=1", *common)
    assert isinstance(listwise, ListwiseDPOTrainer) and len(listwise.train_dataset) == len(dpo.train_dataset) == 16
    rows = range(6)
    pairs = dpo.data_collator([dpo.train_dataset[i] for i in rows])
    lists = listwise.data_collator([listwise.train_dataset[i] for i in rows])
    for key in ("input_ids", "attention_mask", "completion_mask"):  # the same token layout: [chosen; rejected]
        assert torch.equal(lists[key], pairs[key]), key
    expected = dpo.compute_loss(dpo.model, pairs)
    got = listwise.compute_loss(listwise.model, lists)
    assert expected.item() > 0
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert listwise._metrics["eval"][key][-1] == pytest.approx(dpo._metrics["eval"][key][-1], abs=1e-6), key


def test_k_negatives_is_the_plackett_luce_loss_of_independent_log_probs(tiny_cfg, tmp_path, monkeypatch):
    """Shared prompts (K + 1 completions on one prompt cache), precomputed reference: the loss equals -log softmax of
    beta * (log pi - log pi_ref) over (entailment, contradiction, 2 other hypotheses), log-probs of the full
    sequences computed here one by one, the reference with the adapter off."""
    trainer = trainer_for(tiny_cfg, tmp_path, "objective=listwise", "objective.num_negatives=3", *OFF)
    examples = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(examples)
    assert batch["input_ids"].shape[0] == 4 * 3 and batch["ref_rejected_logps"].shape == (3, 3)
    from sempa_exp.objectives import dpo

    groups, shared = [], dpo.prefix_shared_hidden
    monkeypatch.setattr(dpo, "prefix_shared_hidden", lambda *a: groups.append(a[-1]) or shared(*a))
    loss = trainer.compute_loss(trainer.model, batch)
    assert groups == [4]  # each prompt ran once for its 4 completions
    monkeypatch.setattr(dpo, "prefix_shared_hidden", shared)

    model = trainer.model

    def logp(prompt: list[int], completion: list[int]) -> torch.Tensor:
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
        return F.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None]).sum()

    rewards = []
    for e in examples:
        completions = [e["chosen_ids"], *e["rejected_ids"]]
        policy = torch.stack([logp(e["prompt_ids"], c) for c in completions])
        with model.disable_adapter():
            reference = torch.stack([logp(e["prompt_ids"], c) for c in completions])
        torch.testing.assert_close(reference, torch.tensor([e["ref_chosen_logps"], *e["ref_rejected_logps"]]),
                                   atol=1e-4, rtol=1e-5)
        rewards.append(trainer.beta * (policy - reference))
    expected = plackett_luce_loss(torch.stack(rewards, dim=1))
    assert abs(expected.item() - 1.386) > 1e-3  # not log(4): the adapter changed the rewards
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def counted_pieces(counts: list, split, *args) -> list:
    pieces = split(*args)
    counts.append(len(pieces))
    return pieces


def test_a_token_budget_trains_listwise_micro_batches_in_chunks_with_the_same_losses(tiny_cfg, tmp_path):
    from sempa_exp.objectives import dpo

    losses = {}
    for budget in (None, 600):
        trainer = trainer_for(tiny_cfg, tmp_path / str(budget), "objective=listwise", "objective.num_negatives=3",
                              *OFF, *([f"objective.max_tokens_per_micro_batch={budget}"] if budget else []))
        trainer.model.train()
        pieces = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(dpo, "split_pairs", functools.partial(counted_pieces, pieces, dpo.split_pairs))
            trainer.train()
        losses[budget] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert (max(pieces) > 1) == (budget is not None), pieces
    assert losses[600] == pytest.approx(losses[None], rel=1e-6)


def test_listwise_config_is_validated_before_any_model_loads(tiny_cfg, no_model_load):
    for override, key in (("objective.num_negatives=0", "objective.num_negatives"),
                          ("objective.loss_type=hinge", "objective.loss_type"),
                          ("objective.sort_within_step=true", "objective.sort_within_step"),
                          ("objective.group_by_length=true", "objective.group_by_length")):
        with pytest.raises(ConfigError, match=key):
            validate(OmegaConf.to_object(tiny_cfg("objective=listwise", override)))


def test_a_listwise_run_trains_logs_and_evaluates(tiny_cfg):
    cfg = tiny_cfg("objective=listwise", "objective.num_negatives=3", "data.size=16", "eval.at_end=[geometry,stsb_dev]")
    results = training.run(cfg)
    assert results.finished and results.method == "listwise" and results.final_step == 2
    rows = [json.loads(line) for line in (Path(results.run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("train/rewards/chosen", "train/rewards/rejected", "train/rewards/others", "train/rewards/accuracies",
                "train/num_tokens"):
        assert all(key in r for r in train), key
    assert train[0]["train/loss"] == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=0.05)  # 4 equal rewards
    assert any("eval/stsb_dev" in r for r in rows)
