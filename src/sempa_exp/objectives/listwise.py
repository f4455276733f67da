"""Listwise SemPA (``objective=listwise``): the paper's Plackett-Luce view of DPO with more than one negative.

For a prompt x (the paraphrase instruction around the premise) the implicit reward of a completion y is
r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), the reference being the backbone with the adapter off, as in SemPA.
The entailment y+ is ranked above K negatives y_1..y_K under Plackett-Luce; the loss is minus the log-probability
that y+ comes first: -log( exp r(x, y+) / (exp r(x, y+) + sum_k exp r(x, y_k)) ). With K = 1 and y_1 the
contradiction this is DPO's sigmoid loss, -log sigmoid(r(x, y+) - r(x, y_1)).

The negatives of a premise are its contradiction (``include_contradiction``) and hypotheses of other premises, drawn
once per example with a seed (``other_hypotheses``: their entailments, contradictions or both). Each example enters
TRL's pipeline as K ordinary preference pairs (prompt, entailment, negative k): tokenized, length-filtered,
cached, and scored by the reference exactly like SemPA's pairs; the trainer then regroups the K pairs of an example
into one listwise example (an example one of whose pairs is too long is dropped whole, as a long pair is). A batch is
collated as K + 1 groups of rows, [all chosen; all negative 1; ...; all negative K], so that the shared-prompt head
runs each prompt once for its K + 1 completions.
"""

from __future__ import annotations

import logging
import random
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl.trainer.utils import pad

from sempa_exp.config.schema import Config, ConfigError, ListwiseObjectiveConfig, OtherHypotheses
from sempa_exp.data import nli
from sempa_exp.objectives.dpo import REF_COLUMNS, SOURCE_ROW, SempaDPOTrainer
from sempa_exp.objectives.sempa import SempaObjective

log = logging.getLogger(__name__)


def draw_negatives(triplets: list[nli.Triplet], num_negatives: int, include_contradiction: bool,
                   other: OtherHypotheses | str, seed: int) -> list[list[str]]:
    """The K negatives of every triplet: its contradiction first (if included), then hypotheses of other premises.
    A hypothesis is never taken from a triplet with the same premise text, nor equal to one of the triplet's own
    hypotheses; the draws depend only on the triplets and the seed."""
    rng = random.Random(seed)
    others = num_negatives - int(include_contradiction)
    by_premise = Counter(t.premise for t in triplets)
    if others > 0 and len(by_premise) < 2:
        raise ConfigError("objective=listwise: hypotheses of other premises need at least two distinct premises")
    out = []
    for t in triplets:
        negatives = [t.contradiction] if include_contradiction else []
        own = {t.entailment, t.contradiction}
        tries = 0
        while len(negatives) < num_negatives:
            tries += 1
            if tries > 100 * num_negatives + 1000:
                raise ConfigError(f"objective.num_negatives={num_negatives}: not enough distinct hypotheses of "
                                  f"other premises for the premise {t.premise!r}")
            j = triplets[rng.randrange(len(triplets))]
            kind = str(other) if str(other) != "both" else rng.choice(("entailment", "contradiction"))
            text = j.entailment if kind == "entailment" else j.contradiction
            if j.premise != t.premise and text not in own and text not in negatives:
                negatives.append(text)
        out.append(negatives)
    return out


def listwise_records(triplets: list[nli.Triplet], instruction: str, system_prompt: str,
                     negatives: list[list[str]]) -> list[dict]:
    """K conversational preference records per triplet, in order: the same prompt and chosen (the entailment), the
    rejected being each negative in turn."""
    records = []
    for pair, negs in zip(nli.dpo_records(triplets, instruction, system_prompt), negatives, strict=True):
        for text in negs:
            records.append({**pair, "rejected": [{"role": "assistant", "content": text}]})
    return records


def group_examples(pairs: Dataset, num_negatives: int) -> Dataset:
    """The prepared pairs (consecutive runs of K per example, ``source_row`` = example * K + k, reference columns
    where computed) as one row per example: ``rejected_ids`` and ``ref_rejected_logps`` become lists of K. An example
    that lost a pair to the length filter is left out."""
    k = num_negatives
    rows = np.asarray(pairs[SOURCE_ROW], dtype=np.int64)
    counts = Counter((rows // k).tolist())
    has_ref = all(c in pairs.column_names for c in REF_COLUMNS)
    columns = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    if has_ref:
        columns.update({c: [] for c in REF_COLUMNS})
    data = pairs.select_columns(["prompt_ids", "chosen_ids", "rejected_ids", *(REF_COLUMNS if has_ref else [])])
    start = 0
    incomplete = 0
    while start < len(rows):
        example = rows[start] // k
        if counts[example] != k:
            start += counts[example]
            incomplete += 1
            continue
        block = data[start:start + k]
        columns["prompt_ids"].append(block["prompt_ids"][0])
        columns["chosen_ids"].append(block["chosen_ids"][0])
        columns["rejected_ids"].append(block["rejected_ids"])
        if has_ref:
            columns["ref_chosen_logps"].append(block["ref_chosen_logps"][0])
            columns["ref_rejected_logps"].append(block["ref_rejected_logps"])
        start += k
    if incomplete:
        log.warning("listwise: %d examples have a pair longer than trainer.max_length and are left out", incomplete)
    return Dataset.from_dict(columns)


class ListwiseCollator:
    """Rows [prompt + chosen for every example; prompt + negative 1 for every example; ...], right padded, with the
    attention and completion masks TRL's preference collator gives; the reference log-probs as (n,) and (n, K)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        k = len(examples[0]["rejected_ids"])
        completions = [[e["chosen_ids"] for e in examples]] + [[e["rejected_ids"][i] for e in examples]
                                                               for i in range(k)]
        ids, masks = [], []
        for group in completions:
            for e, completion in zip(examples, group, strict=True):
                ids.append(torch.tensor(e["prompt_ids"] + completion))
                masks.append(torch.tensor([0] * len(e["prompt_ids"]) + [1] * len(completion)))
        batch = {
            "input_ids": pad(ids, padding_value=self.pad_token_id, padding_side="right"),
            "attention_mask": pad([torch.ones_like(i) for i in ids], padding_value=0, padding_side="right"),
            "completion_mask": pad(masks, padding_value=0, padding_side="right"),
        }
        if "ref_chosen_logps" in examples[0]:
            batch["ref_chosen_logps"] = torch.tensor([e["ref_chosen_logps"] for e in examples])
            batch["ref_rejected_logps"] = torch.tensor([e["ref_rejected_logps"] for e in examples])
        return batch


def plackett_luce_loss(rewards: torch.Tensor) -> torch.Tensor:
    """Mean over examples of -log P(row 0 ranked first) for rewards of shape (1 + K, n)."""
    return -F.log_softmax(rewards.float(), dim=0)[0].mean()


class ListwiseDPOTrainer(SempaDPOTrainer):
    """SemPA's trainer on K preference pairs per example, regrouped into listwise examples once they are tokenized
    and their reference log-probs computed; the loss is :func:`plackett_luce_loss` of the implicit rewards."""

    def __init__(self, *args, num_negatives: int, include_contradiction: bool = True, **kwargs) -> None:
        self.num_negatives = num_negatives
        self.include_contradiction = include_contradiction
        self.sequences_per_example = num_negatives + 1
        super().__init__(*args, **kwargs)
        self.train_dataset = group_examples(self.train_dataset, num_negatives)
        if len(self.train_dataset) == 0:
            raise ConfigError("objective=listwise: no example has all its pairs within trainer.max_length")
        self.data_collator = ListwiseCollator(self.data_collator.pad_token_id)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # the expanded row of each pair, to regroup them later (the prepared-data cache adds it itself)
        if (self.data_cache is None or dataset_name != "train") and SOURCE_ROW not in dataset.column_names:
            dataset = dataset.add_column(SOURCE_ROW, list(range(len(dataset))))
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _reference_logps(self, model, inputs) -> torch.Tensor:
        """Reference log-probs of every row of a listwise batch (adapter off), when they were not precomputed."""
        rows = {k: v for k, v in inputs.items() if k not in REF_COLUMNS}
        first, second = self.compute_ref_log_probs(model, rows)  # TRL's: the rows in two halves
        return torch.cat([first, second])

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        groups = self.sequences_per_example
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                        labels=labels, fused_lm_head=True)
        seq_len = completion_mask.shape[1] - 1
        logps = outputs.log_probs[:, -seq_len:].sum(dim=1).view(groups, -1)  # (1 + K, n)
        if self.precompute_ref_logps:
            ref = torch.cat([inputs["ref_chosen_logps"][None], inputs["ref_rejected_logps"].T]).to(logps)
        else:
            ref = self._reference_logps(model, inputs).view(groups, -1).to(logps)
        rewards = self.beta * (logps - ref)
        loss = plackett_luce_loss(rewards)
        self._log_listwise(mode, inputs, outputs, logps.detach(), rewards.detach(), completion_mask)
        return (loss, outputs) if return_outputs else loss

    def _log_listwise(self, mode: str, inputs: dict, outputs, logps: torch.Tensor, rewards: torch.Tensor,
                      completion_mask: torch.Tensor) -> None:
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        mask = completion_mask[:, 1:]
        entropy = gather((outputs.entropy[:, -mask.shape[1]:] * mask).sum()).sum()
        tokens = gather(mask.sum()).sum()
        metrics["entropy"].append((entropy / tokens).item() if tokens > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        chosen, negatives = rewards[0], rewards[1:]
        metrics["rewards/chosen"].append(gather(chosen).mean().item())
        if self.include_contradiction:
            metrics["rewards/rejected"].append(gather(negatives[0]).mean().item())  # the premise's contradiction
        others = negatives[int(self.include_contradiction):]
        if len(others):
            metrics["rewards/others"].append(gather(others.mean(0)).mean().item())  # other premises' hypotheses
        metrics["rewards/accuracies"].append(gather((chosen > negatives.max(0).values).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen - negatives.max(0).values).mean().item())
        metrics["logps/chosen"].append(gather(logps[0]).mean().item())
        metrics["logps/rejected"].append(gather(logps[1:].mean(0)).mean().item())


class ListwiseObjective(SempaObjective):
    config_class = ListwiseObjectiveConfig

    def dataset(self, cfg: Config, triplets: list[nli.Triplet]) -> Dataset:
        """K preference records per triplet (see the module docstring), the negatives drawn with the seed."""
        o = self.config
        seed = cfg.seed if o.negatives_seed is None else o.negatives_seed
        negatives = draw_negatives(triplets, o.num_negatives, o.include_contradiction, o.other_hypotheses, seed)
        return Dataset.from_list(listwise_records(triplets, cfg.template.text, cfg.data.system_prompt, negatives))

    def examples_in(self, dataset: Dataset) -> int:
        return len(dataset) // self.config.num_negatives

    def trainer(self, **kwargs) -> ListwiseDPOTrainer:
        return ListwiseDPOTrainer(num_negatives=self.config.num_negatives,
                                  include_contradiction=self.config.include_contradiction, **kwargs)
