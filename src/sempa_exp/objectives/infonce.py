"""The contrastive-learning foil (``objective=contrastive``): the same backbone, LoRA, optimiser, schedule,
checkpoints and evaluation as SemPA, trained with SimCSE's supervised InfoNCE instead of DPO.

Each NLI triplet gives an anchor (premise), a positive (entailment) and a hard negative (contradiction), all embedded
the way evaluation embeds sentences (the ``embed`` prompt, e.g. PromptEOL's last token after the final norm). For a
batch of B triplets the anchor i is scored against the B positives and the B negatives by cosine similarity over a
temperature; the loss is the cross-entropy of picking positive i (Gao et al., 2021, eq. 5). In-batch negatives come
from the per-device batch; gradient accumulation adds steps, not negatives.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

from sempa_exp.config.schema import Config, ContrastiveObjectiveConfig, EmbedConfig
from sempa_exp.data import nli
from sempa_exp.embedding.base import left_pad, left_pad_mask, pool
from sempa_exp.embedding.prompt import PromptMethod
from sempa_exp.objectives.base import Objective
from sempa_exp.objectives.recipe import peft_config, recipe_kwargs, seeded_peft_model

ROLES = ("anchor", "positive", "negative")


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over anchors of -log softmax(cos(a_i, .) / t)[positive i], candidates = all positives + all negatives."""
    a, candidates = F.normalize(anchor, dim=-1), F.normalize(torch.cat([positive, negative]), dim=-1)
    logits = a @ candidates.T / temperature
    return F.cross_entropy(logits.float(), torch.arange(len(a), device=a.device))


def contrastive_records(triplets: list[nli.Triplet]) -> list[dict]:
    return [{"anchor": t.premise, "positive": t.entailment, "negative": t.contradiction} for t in triplets]


class TripletCollator:
    """Embedding inputs of a batch of triplets: anchors, then positives, then negatives, left-padded into one tensor.
    Over-long prompts keep their end (PromptEOL's cue and last token) and lose their start."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, embed: EmbedConfig, max_length: int) -> None:
        self.prompts = PromptMethod(tokenizer, embed)
        self.pad_id = tokenizer.pad_token_id
        self.max_length = max_length

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        features = self.prompts.features([row[role] for role in ROLES for row in rows])
        ids = [f["input_ids"][-self.max_length:] for f in features]
        input_ids, attention, _ = left_pad(ids, self.pad_id)
        batch = {"input_ids": input_ids, "attention_mask": attention}
        if "pool_mask" in features[0]:
            batch["pool_mask"] = left_pad_mask([f["pool_mask"][-self.max_length:] for f in features],
                                               input_ids.shape[1])
        return batch


class InfoNCETrainer(Trainer):
    def __init__(self, *args, temperature: float, pooling: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.temperature = temperature
        self.pooling = pooling

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Through the (possibly DDP-wrapped) model so gradients sync; only the last position's logits are computed.
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                    output_hidden_states=True, logits_to_keep=1)
        embeddings = pool(out.hidden_states[-1], self.pooling, inputs.get("pool_mask"))
        anchor, positive, negative = embeddings.chunk(3)
        loss = info_nce(anchor, positive, negative, self.temperature)
        return (loss, {"embeddings": embeddings}) if return_outputs else loss


class ContrastiveObjective(Objective):
    config_class = ContrastiveObjectiveConfig

    def dataset(self, cfg: Config, triplets: list[nli.Triplet]) -> Dataset:
        """The raw (anchor, positive, negative) sentences."""
        return Dataset.from_list(contrastive_records(triplets))

    def build_trainer(self, cfg: Config, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      dataset: Dataset, output_dir: Path, callbacks: list[TrainerCallback], world_size: int,
                      use_cpu: bool) -> InfoNCETrainer:
        model = seeded_peft_model(model, peft_config(cfg), cfg.seed)
        if cfg.trainer.gradient_checkpointing:
            model.enable_input_require_grads()  # the frozen embeddings must pass gradients on to the LoRA layers
        return InfoNCETrainer(
            model=model,
            args=TrainingArguments(**recipe_kwargs(cfg, output_dir, world_size, use_cpu)),
            train_dataset=dataset,
            data_collator=TripletCollator(tokenizer, cfg.embed, cfg.trainer.max_length),
            processing_class=tokenizer,
            callbacks=callbacks,
            temperature=self.config.temperature,
            pooling=cfg.embed.pooling,
        )
