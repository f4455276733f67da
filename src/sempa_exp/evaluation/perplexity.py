"""A cheap generative-ability proxy that needs no benchmark data, computed on held-out NLI triplets.

- ``ppl_nli``: token-level perplexity of the hypotheses (the entailment sentences) as plain text, every token scored
  (a BOS, or EOS when the tokenizer has none, is put in front as the context of the first token).
- ``logp_chosen`` / ``logp_rejected``: mean log-probability per token of the reference completions (entailment /
  contradiction) after the training prompt (paraphrase instruction in the chat template), tokenized the way TRL's DPO
  tokenizes them: the completion is what follows the common prefix of prompt and prompt+completion.
- ``logp_margin``: ``logp_chosen - logp_rejected``.

The held-out triplets are the last ``n`` of the seeded permutation whose first ``data.size`` triplets are the training
subset (``nli.subset``): they are never trained on while ``data.size + n`` does not exceed the usable triplets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from sempa_exp.config.schema import ConfigError
from sempa_exp.data.nli import Triplet
from sempa_exp.data.prompts import dpo_prompt_messages

log = logging.getLogger(__name__)

PROXY_KEYS = ("ppl_nli", "logp_chosen", "logp_rejected", "logp_margin")


@dataclass(frozen=True)
class ProxySet:
    hypotheses: list[str]
    prompts: list[list[dict[str, str]]]
    chosen: list[str]
    rejected: list[str]
    overlap_with_training: int  # held-out triplets that are also in the training subset (0 unless data.size is large)

    @property
    def fingerprint(self) -> str:
        """Identifies the set, so two evaluations can be checked to have scored the same sentences."""
        payload = json.dumps([self.prompts, self.chosen, self.rejected], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return {"n": len(self.chosen), "fingerprint": self.fingerprint,
                "overlap_with_training": self.overlap_with_training}


def heldout_triplets(triplets: Sequence[Triplet], n: int, seed: int) -> list[Triplet]:
    """The last ``n`` triplets of the permutation ``nli.subset`` takes its training prefix from."""
    if n <= 0:
        raise ConfigError(f"eval.ppl_sample: the held-out set needs n > 0, got {n}")
    if n > len(triplets):
        raise ConfigError(f"eval.ppl_sample={n} held-out triplets asked for, the data has {len(triplets)}")
    order = np.random.default_rng(seed).permutation(len(triplets))
    return [triplets[i] for i in order[len(triplets) - n:]]


def build_proxy_set(triplets: Sequence[Triplet], n: int, seed: int, instruction: str, system_prompt: str,
                    train_size: int | None = None) -> ProxySet:
    held = heldout_triplets(triplets, n, seed)
    train_size = len(triplets) if train_size is None else train_size
    overlap = max(0, train_size + n - len(triplets))
    if overlap:
        log.warning("perplexity proxy: %d of its %d triplets are also trained on (data.size %d + eval.ppl_sample %d > "
                    "%d usable triplets): it is not a held-out measure; data.size <= %d keeps it held out",
                    overlap, n, train_size, n, len(triplets), len(triplets) - n)
    return ProxySet(
        hypotheses=[t.entailment for t in held],
        prompts=[dpo_prompt_messages(instruction, t.premise, system_prompt) for t in held],
        chosen=[t.entailment for t in held],
        rejected=[t.contradiction for t in held],
        overlap_with_training=overlap,
    )


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def completion_split(tokenizer: PreTrainedTokenizerBase, prompt: list[dict[str, str]], completion: str
                     ) -> tuple[list[int], list[int]]:
    """(context ids, completion ids) of one chat completion, split where prompt and prompt+completion diverge."""
    prompt_ids = _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
    full_ids = _ids(tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": completion}], tokenize=True))
    common = 0
    for a, b in zip(prompt_ids, full_ids, strict=False):
        if a != b:
            break
        common += 1
    return full_ids[:common], full_ids[common:]


def text_split(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[int]]:
    """(one-token context, text ids) so that every token of the text is scored."""
    ids = _ids(tokenizer(text, add_special_tokens=False))
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [prefix], ids


@torch.inference_mode()
def score_continuations(model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int,
                        batch_size: int = 16) -> tuple[float, int]:
    """(sum of log-probabilities, number of tokens) of every continuation given its context."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        for start in range(0, len(order), batch_size):
            batch = [pairs[i] for i in order[start:start + batch_size]]
            width = max(len(c) + len(t) for c, t in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            target_mask = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, (context, target) in enumerate(batch):  # right padding; positions are those of the row
                seq = context + target
                input_ids[row, :len(seq)] = torch.tensor(seq)
                attention[row, :len(seq)] = 1
                target_mask[row, len(context):len(seq)] = True
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            next_ids = input_ids[:, 1:].to(device)
            token_logprobs = logprobs.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)
            mask = target_mask[:, 1:].to(device)
            total += float(token_logprobs[mask].sum())
            count += int(mask.sum())
    finally:
        model.train(was_training)
    return total, count


def proxy_metrics(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, proxy: ProxySet,
                  batch_size: int = 16) -> dict[str, float]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def mean_logprob(pairs: list[tuple[list[int], list[int]]]) -> float:
        total, count = score_continuations(model, pairs, pad_id, batch_size)
        return total / count

    logp_text = mean_logprob([text_split(tokenizer, h) for h in proxy.hypotheses])
    logp_chosen = mean_logprob(
        [completion_split(tokenizer, p, c) for p, c in zip(proxy.prompts, proxy.chosen, strict=True)])
    logp_rejected = mean_logprob(
        [completion_split(tokenizer, p, r) for p, r in zip(proxy.prompts, proxy.rejected, strict=True)])
    return {
        "ppl_nli": math.exp(-logp_text),
        "logp_chosen": logp_chosen,
        "logp_rejected": logp_rejected,
        "logp_margin": logp_chosen - logp_rejected,
    }
