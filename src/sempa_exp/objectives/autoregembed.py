"""AutoRegEmbed (Deng et al., 2025, arXiv 2502.11401), as the authors' code computes it (TrustedLLM/AutoRegEmbed:
src/modeling/modeling_autoregembed.py, src/*/data.py, src/condition_distribution_alignment/trainer.py).

A text is *compressed* into k new special tokens ``<EMBED0>..<EMBED{k-1}>`` appended right after it: the encoder (the
backbone, trained) reads ``[BOS] text "\\n" instruction "\\n" <EMBED0..k-1>`` and the final-norm hidden states at the k
EMBED positions are the compressed vectors. A frozen *decoder* (the original backbone: here the same weights with the
LoRA adapter off, as SemPA's reference) then reads those k vectors as input embeddings followed by the target text's
token embeddings, and scores the target (every target token and the final EOS; logits over the original vocabulary).

* Stage 1, information compression (``objective=autoregembed_compress``): the mean token cross-entropy of the
  target given the compressed (context, instruction): PwC's answer in the authors' run; here the data source is
  ``objective.compression_data``.
* Stage 2, conditional distribution alignment (``objective=autoregembed_align``), on NLI (query = premise, positive =
  entailment, negative = contradiction, instruction ``This sentence means in one word: “``): with the summed
  log-probs a = log p(pos | C(query)), b = log p(pos | C(pos)), c = log p(neg | C(query)) and the stage-1 model's
  a_ref, c_ref (computed once before training; policy = stage-1 model at step 0),
  s1 = sigmoid(beta |a - b|), s2 = sigmoid(beta ((a - c) + (a_ref - c_ref))), loss = mean softplus((s1 - s2) / tau).
  The ``+`` of the reference margin is the authors' code (DPO would subtract it).
* The embedding (``embed=autoregembed``): ``text "\\n" instruction`` tokenized as one string (the tokenizer's own
  special tokens), the k EMBED tokens appended, the mean of their final hidden states.

Deviations, each an option: LoRA by default (``lora`` applies, the new token rows are trained through PEFT's trainable
tokens; ``full_finetune=true`` trains every weight as the authors do, with a frozen copy of the backbone as the
decoder); the stage-1 data (PwC is not in this project's data root; see ``compression_data``).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

from sempa_exp.config.schema import (
    AutoRegEmbedAlignConfig,
    AutoRegEmbedCompressConfig,
    Config,
    ConfigError,
    data_dir,
)
from sempa_exp.data import nli
from sempa_exp.embedding.base import decoder_of, left_pad
from sempa_exp.embedding.checkpoint import resolve_adapter
from sempa_exp.models.compress_tokens import add_compress_tokens, full_weights_model, original_vocab
from sempa_exp.objectives.base import Objective
from sempa_exp.objectives.recipe import peft_config, recipe_kwargs, seeded_peft_model

log = logging.getLogger(__name__)

ALIGN_INSTRUCTION = "This sentence means in one word: “"  # the authors' fixed stage-2 instruction (ends in U+201C)


def training_encoder_ids(tokenizer: PreTrainedTokenizerBase, text: str, instruction: str) -> list[int]:
    """``[BOS] tok(text + "\\n") tok(instruction + "\\n")``, each piece tokenized on its own (the authors' training
    inputs; data.py). No BOS when the tokenizer has none."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return (bos + tokenizer(text + "\n", add_special_tokens=False)["input_ids"]
            + tokenizer(instruction + "\n", add_special_tokens=False)["input_ids"])


def target_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """``tok(text) + [EOS]``: what the decoder is scored on."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


# --------------------------------------------------------------------------------------------- the two passes


def compressed(model: torch.nn.Module, encoder_ids: Sequence[Sequence[int]], compress_ids: Sequence[int],
               pad_id: int) -> torch.Tensor:
    """(batch, k, hidden): the final-norm hidden states at the k EMBED tokens appended to each input. Left padding
    puts them at the last k positions (rotary positions are relative: the same states as the authors' right
    padding)."""
    ids, attention, _ = left_pad([list(x) + list(compress_ids) for x in encoder_ids], pad_id)
    device = next(model.parameters()).device
    hidden = decoder_of(model)(input_ids=ids.to(device), attention_mask=attention.to(device),
                               use_cache=False).last_hidden_state
    return hidden[:, -len(compress_ids):]


def target_log_probs(causal_lm: torch.nn.Module, vectors: torch.Tensor, targets: Sequence[Sequence[int]],
                     vocab: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (batch, T) of each target given its k compressed vectors, and the mask of scored tokens:
    the decoder reads [vectors; target embeddings] (right padded), the position before each target token predicts
    it, over the first ``vocab`` rows of the LM head."""
    k = vectors.shape[1]
    width = max(len(t) for t in targets)
    device = vectors.device
    ids = torch.full((len(targets), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(targets), width), dtype=torch.long)
    for row, t in enumerate(targets):
        ids[row, :len(t)] = torch.as_tensor(list(t))
        mask[row, :len(t)] = 1
    ids, mask = ids.to(device), mask.to(device)
    embeddings = causal_lm.get_input_embeddings()(ids)
    inputs = torch.cat([vectors.to(embeddings.dtype), embeddings], dim=1)
    attention = torch.cat([torch.ones((len(targets), k), dtype=torch.long, device=device), mask], dim=1)
    hidden = causal_lm.get_decoder()(inputs_embeds=inputs, attention_mask=attention, use_cache=False).last_hidden_state
    scoring = hidden[:, k - 1:k - 1 + width]  # position k-1+t predicts target token t
    head = causal_lm.get_output_embeddings()
    logits = F.linear(scoring, head.weight[:vocab], None if head.bias is None else head.bias[:vocab]).float()
    per_token = torch.log_softmax(logits, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    return per_token * mask, mask


def compression_loss(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Stage 1: the mean cross-entropy over every scored token of the batch."""
    return -per_token.sum() / mask.sum().clamp(min=1)


def alignment_loss(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, ref_a: torch.Tensor, ref_c: torch.Tensor,
                   beta: float, temperature: float) -> torch.Tensor:
    """Stage 2 (trainer.py): mean softplus((s1 - s2) / tau), s1 = sigmoid(beta |a - b|), s2 = sigmoid(beta ((a - c)
    + (ref_a - ref_c))), all log-probs summed over their target's tokens."""
    s1 = torch.sigmoid(beta * (a - b).abs())
    s2 = torch.sigmoid(beta * ((a - c) + (ref_a - ref_c)))
    return F.softplus((s1 - s2) / temperature).mean()


# ------------------------------------------------------------------------------------------------------ records


def compression_records(cfg: Config, triplets: list[nli.Triplet]) -> list[dict]:
    """Stage-1 rows (context, instruction, output): PwC's (the authors' data), or the NLI premises reconstructed."""
    o = cfg.objective
    if str(o.compression_data) == "nli_reconstruct":
        return [{"context": t.premise, "instruction": o.reconstruct_instruction, "output": t.premise}
                for t in triplets]
    path = Path(o.compression_file)
    path = path if path.is_absolute() else data_dir(cfg) / path
    if not path.exists():
        raise ConfigError(
            f"objective.compression_file: {path} does not exist. AutoRegEmbed's stage 1 trains on PwC "
            f"(pwc_train_unique.jsonl of the hub dataset DJCheng/autoregembed-data: rows with context, instruction, "
            f"output); put it there, or set objective.compression_data=nli_reconstruct to compress and reconstruct "
            f"the NLI premises instead (a deviation from the authors' run)")
    rows = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append({k: str(row[k]) for k in ("context", "instruction", "output")})
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConfigError(f"{path}:{number}: not a PwC row with context, instruction and output "
                                  f"({exc})") from None
    size = cfg.data.size
    return rows if size is None else rows[:size]


def alignment_records(triplets: list[nli.Triplet]) -> list[dict]:
    return [{"query": t.premise, "positive": t.entailment, "negative": t.contradiction} for t in triplets]


# ------------------------------------------------------------------------------------------------------ training


class PassThroughCollator:
    """Rows as they are (token-id lists); the trainer pads them per pass."""

    def __call__(self, rows: list[dict]) -> dict[str, list]:
        return {key: [row[key] for row in rows] for key in rows[0]}


class AutoRegEmbedTrainer(Trainer):
    """HF Trainer whose loss is one of the two stages. The decoder is the model with the adapter off."""

    def __init__(self, *args, stage: str, compress_ids: list[int], vocab: int, pad_id: int, beta: float = 0.1,
                 temperature: float = 0.1, decoder: torch.nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stage, self.compress_ids, self.vocab, self.pad_id = stage, compress_ids, vocab, pad_id
        self.beta, self.temperature = beta, temperature
        self.decoder = decoder  # full fine-tuning: the frozen copy of the backbone

    def _prepare_inputs(self, inputs):  # lists of token ids: padded per pass, not moved here
        return inputs

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter without the resized embedding matrix (PEFT would add all of it: 335 MB on Gemma-3): the
        <EMBED*> rows are in the adapter's trainable tokens, and loading adds the tokens to the backbone again."""
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, PeftModel):  # full fine-tuning: the whole model, as the authors save it
            return super()._save(output_dir, state_dict)
        model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_embedding_layers=False)
        try:
            super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained

    @contextmanager
    def frozen_decoder(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        if self.decoder is not None:
            yield self.decoder
            return
        unwrapped = self.accelerator.unwrap_model(model)
        with unwrapped.disable_adapter():
            yield unwrapped

    def log_probs(self, model, encoder_ids, targets, reduce_sum: bool = True):
        vectors = compressed(model, encoder_ids, self.compress_ids, self.pad_id)
        with self.frozen_decoder(model) as decoder:
            per_token, mask = target_log_probs(decoder, vectors, targets, self.vocab, self.pad_id)
        return (per_token.sum(-1), mask) if reduce_sum else (per_token, mask)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.stage == "compress":
            per_token, mask = self.log_probs(model, inputs["encoder_ids"], inputs["target_ids"], reduce_sum=False)
            loss = compression_loss(per_token, mask)
        else:
            a, _ = self.log_probs(model, inputs["query_ids"], inputs["positive_ids"])
            b, _ = self.log_probs(model, inputs["positive_in_ids"], inputs["positive_ids"])
            c, _ = self.log_probs(model, inputs["query_ids"], inputs["negative_ids"])
            ref_a = torch.tensor(inputs["ref_positive_logps"], device=a.device, dtype=a.dtype)
            ref_c = torch.tensor(inputs["ref_negative_logps"], device=a.device, dtype=a.dtype)
            loss = alignment_loss(a, b, c, ref_a, ref_c, self.beta, self.temperature)
        return (loss, {}) if return_outputs else loss


def _tokenized_compression(tokenizer, rows: list[dict], max_length: int) -> Dataset:
    records, dropped = [], 0
    for row in rows:
        enc, tgt = training_encoder_ids(tokenizer, row["context"], row["instruction"]), target_ids(tokenizer,
                                                                                                   row["output"])
        if len(enc) > max_length or len(tgt) > max_length:
            dropped += 1
            continue
        records.append({"encoder_ids": enc, "target_ids": tgt})
    if dropped:
        log.warning("autoregembed: %d of %d rows longer than trainer.max_length left out", dropped, len(rows))
    return Dataset.from_list(records)


def _tokenized_alignment(tokenizer, rows: list[dict], max_length: int) -> Dataset:
    records = [{
        "query_ids": training_encoder_ids(tokenizer, r["query"], ALIGN_INSTRUCTION),
        "positive_in_ids": training_encoder_ids(tokenizer, r["positive"], ALIGN_INSTRUCTION),
        "positive_ids": target_ids(tokenizer, r["positive"]),
        "negative_ids": target_ids(tokenizer, r["negative"]),
    } for r in rows]
    kept = [r for r in records if max(len(ids) for ids in r.values()) <= max_length]  # as stage 1 drops them
    if len(kept) < len(records):
        log.warning("autoregembed: %d of %d rows longer than trainer.max_length left out", len(records) - len(kept),
                    len(records))
    return Dataset.from_list(kept)


class _AutoRegEmbedObjective(Objective):
    stage: str
    starts_from_backbone = False  # new <EMBED*> rows (and in stage 2 the stage-1 adapter): never the cached step 0

    def prepared_model(self, cfg: Config, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
                       ) -> tuple[torch.nn.Module, list[int], int, torch.nn.Module | None]:
        """(the model to train, the EMBED ids, the original vocabulary size, the frozen decoder: None with LoRA,
        whose decoder is the model with the adapter off; with full fine-tuning, a frozen copy of the backbone)."""
        o = self.config
        init = getattr(o, "init_from", None)
        if o.full_finetune:  # the authors' setting: every weight trains, the decoder is a separate frozen copy
            if init:  # the backbone as loaded is the decoder; the stage-1 model (EMBED rows included) trains
                decoder = model.eval().requires_grad_(False)
                model = full_weights_model(init, model)
            else:
                decoder = copy.deepcopy(model).eval().requires_grad_(False)
            ids = add_compress_tokens(model, tokenizer, o.compress_tokens, cfg.seed)
            return model.requires_grad_(True), ids, original_vocab(model, tokenizer, o.compress_tokens), decoder
        ids = add_compress_tokens(model, tokenizer, o.compress_tokens, cfg.seed)
        vocab = original_vocab(model, tokenizer, o.compress_tokens)
        if init:
            peft = PeftModel.from_pretrained(model, str(resolve_adapter(init)), is_trainable=True)
        else:
            lora = peft_config(cfg)
            lora = replace(lora, trainable_token_indices={"embed_tokens": ids})
            peft = seeded_peft_model(model, lora, cfg.seed)
        return peft, ids, vocab, None

    def build_trainer(self, cfg: Config, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      dataset: Dataset, output_dir: Path, callbacks: list[TrainerCallback], world_size: int,
                      use_cpu: bool) -> AutoRegEmbedTrainer:
        trained, ids, vocab, decoder = self.prepared_model(cfg, model, tokenizer)
        args = TrainingArguments(**recipe_kwargs(cfg, output_dir, world_size, use_cpu))
        extra = {"beta": self.config.beta, "temperature": self.config.temperature} if self.stage == "align" else {}
        trainer = AutoRegEmbedTrainer(model=trained, args=args, train_dataset=self.tokenized(cfg, tokenizer, dataset),
                                      data_collator=PassThroughCollator(), processing_class=tokenizer,
                                      callbacks=callbacks, stage=self.stage, compress_ids=ids, vocab=vocab,
                                      pad_id=tokenizer.pad_token_id, decoder=decoder, **extra)
        if self.stage == "align":
            trainer.train_dataset = self.with_reference(trainer, trainer.train_dataset)
        return trainer

    def tokenized(self, cfg: Config, tokenizer, dataset: Dataset) -> Dataset:
        raise NotImplementedError


class CompressionObjective(_AutoRegEmbedObjective):
    config_class = AutoRegEmbedCompressConfig
    stage = "compress"

    def dataset(self, cfg: Config, triplets: list[nli.Triplet]) -> Dataset:
        return Dataset.from_list(compression_records(cfg, triplets))

    def tokenized(self, cfg: Config, tokenizer, dataset: Dataset) -> Dataset:
        return _tokenized_compression(tokenizer, dataset.to_list(), cfg.trainer.max_length)


class AlignmentObjective(_AutoRegEmbedObjective):
    config_class = AutoRegEmbedAlignConfig
    stage = "align"

    def dataset(self, cfg: Config, triplets: list[nli.Triplet]) -> Dataset:
        return Dataset.from_list(alignment_records(triplets))

    def tokenized(self, cfg: Config, tokenizer, dataset: Dataset) -> Dataset:
        return _tokenized_alignment(tokenizer, dataset.to_list(), cfg.trainer.max_length)

    @staticmethod
    def with_reference(trainer: AutoRegEmbedTrainer, rows: Dataset, batch_size: int = 16) -> Dataset:
        """a_ref and c_ref of every row from the model as it starts (the stage-1 model), once before training."""
        model = trainer.model
        was_training = model.training
        model.eval()
        pos, neg = [], []
        try:
            with torch.no_grad():
                for start in range(0, len(rows), batch_size):
                    batch = rows[start:start + batch_size]
                    pos += trainer.log_probs(model, batch["query_ids"], batch["positive_ids"])[0].float().tolist()
                    neg += trainer.log_probs(model, batch["query_ids"], batch["negative_ids"])[0].float().tolist()
        finally:
            model.train(was_training)
        return rows.add_column("ref_positive_logps", pos).add_column("ref_negative_logps", neg)
