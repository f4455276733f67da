"""TRL's DPOTrainer with opt-in speed-ups; with every flag off it is TRL's trainer, unchanged.

* ``completion_only_logits``: the LM head and the log-softmax run only on the completion tokens. TRL's fused head
  already does this on CUDA/XPU; on other devices (CPU) it scores every position of the prompt too. Same kernel
  (TRL's ``ChunkedLogProbFunction``), fewer rows: the per-token log-probs are the same numbers.
* A :class:`PreparedDataCache`: the tokenized preference pairs and the reference log-probs are stored on disk, keyed
  by what determines them (:func:`cache_key`), and shared by every run of a sweep with that key. Because the data
  subsets of one ``data.subset_seed`` are nested (the first N rows of one permutation), one entry is a *prefix*:
  a run with more rows extends it, a run with fewer reads its first rows. Each source row's content hash is stored
  with it, so a stale or foreign entry is detected row by row and recomputed, never silently used.
* Reference log-probs are computed once, before training (TRL's ``precompute_ref_log_probs``), in length-sorted
  batches so little of the forward is spent on padding.
* ``sort_within_step``: the micro-batches of one optimizer step (gradient accumulation) are regrouped by length; every
  step sees the same pairs as with TRL, so its gradient is TRL's up to the order of a float sum.

* ``share_prompt``: a preference batch's prompts run once for both completions, their key/value cache reused
  (:func:`prefix_shared_hidden`); the per-token log-probs are the two full sequences'.
* ``max_tokens_per_micro_batch``: a memory budget; each micro-batch is trained in equal chunks that fit it, with the
  unchunked loss (:func:`chunks_for_budget`, ``SempaDPOTrainer.training_step``).

* ``turn_end_ids``: each completion ends at the chat template's turn end (``<|im_end|>``), as ms-swift encodes it;
  TRL's completion is everything the template renders after the prompt, the line break after the turn end included.
  This one is not a speed-up: it changes the scored tokens to the paper's (``objective.score_template_tail``).

Under DDP the main process fills the cache first and the others then read it (TRL's own main-process-first order).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trl
from accelerate.utils import broadcast_object_list
from datasets import Dataset, concatenate_datasets, load_from_disk
from filelock import FileLock
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase
from trl import DPOTrainer
from trl.kernels.chunked_logprob import ChunkedLogProbFunction
from trl.trainer import dpo_trainer as trl_dpo_module
from trl.trainer.utils import FusedCausalLMOutput, global_then_local_main_first

from sempa_exp.config.schema import Config, ConfigError, ListwiseObjectiveConfig
from sempa_exp.models.backbones import backbone_fingerprint

log = logging.getLogger(__name__)

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
SOURCE_ROW = "source_row"  # index of the row in the (nested) data stream, kept through TRL's filtering
LENGTH = "length"  # prompt + longer completion, for train_sampling_strategy=group_by_length
VOCAB_CHUNK = 32768  # TRL's own vocabulary tile width

# The TRL version that SempaDPOTrainer's overrides of TRL internals were written against and checked with;
# pyproject.toml pins trl to it, and tests/test_trl_pin.py fails when either changes alone or when TRL stops
# calling an override.
# SempaDPOTrainer overrides these private DPOTrainer methods:
#   _prepare_dataset(dataset, processing_class, args, dataset_name): called by DPOTrainer.__init__ (and evaluate) for
#       each dataset. Ours routes the train set through the PreparedDataCache, cuts completions at the turn end, drops
#       pairs longer than max_length (instead of truncating them) and adds the length column.
#   _precompute_ref_logps(dataset, name, batch_size): called by DPOTrainer.__init__ (and evaluate) when
#       precompute_ref_log_probs is on. Ours scores in length-sorted batches and reads/writes the cache's reference
#       log-probs (and, with the cache, is called by our __init__ instead, sparing TRL's hash of every weight).
# Also overridden, from transformers' Trainer (not TRL): get_batch_samples, for sort_within_step; training_step, for
# max_tokens_per_micro_batch (it sets the Trainer's current_gradient_accumulation_steps around each chunk).
# TRL internals used without being overridden: the precompute_ref_logps attribute (read by DPOTrainer._compute_loss),
# DPOTrainer.compute_ref_log_probs, trl.trainer.dpo_trainer's module global global_then_local_main_first (swapped
# out around TRL's tokenization, see _swapped), and the fused LM head TRL installs (forward(fused_lm_head=True)
# -> FusedCausalLMOutput, ChunkedLogProbFunction's arguments) that install_completion_only_head replaces.
TRL_VERSION_OVERRIDDEN = "1.16.0"


def check_trl_version() -> bool:
    """Warns (and returns False) when the installed TRL is not the one the overrides above were checked with."""
    if trl.__version__ == TRL_VERSION_OVERRIDDEN:
        return True
    log.warning("TRL %s is installed, but SempaDPOTrainer overrides TRL internals (_prepare_dataset, "
                "_precompute_ref_logps) checked with TRL %s only: run tests/test_trl_pin.py", trl.__version__,
                TRL_VERSION_OVERRIDDEN)
    return False


@contextlib.contextmanager
def _swapped(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name`` is ``value`` inside the block and its previous value again afterwards, exception or not."""
    saved = getattr(owner, name)  # AttributeError when there is nothing to swap: never adds an attribute
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


# ---------------------------------------------------------------------------------------------- cache keys + storage


def cache_key(ingredients: dict) -> str:
    """A stable hash of everything that determines a cache entry (nested dicts allowed, key order irrelevant)."""
    blob = json.dumps(ingredients, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def row_hashes(dataset: Dataset) -> np.ndarray:
    """One 64-bit content hash per row (over the columns TRL reads), in row order."""
    columns = [c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names]
    out = np.empty(len(dataset), dtype=np.uint64)
    i = 0
    for batch in dataset.select_columns(columns).iter(batch_size=4096):
        for row in zip(*(batch[c] for c in columns), strict=True):
            digest = hashlib.blake2b(json.dumps(row, sort_keys=True).encode(), digest_size=8).digest()
            out[i] = int.from_bytes(digest, "little")
            i += 1
    return out


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differs = np.flatnonzero(a[:n] != b[:n])
    return int(differs[0]) if len(differs) else n


def _rows_before(pairs: Dataset, n: int) -> Dataset:
    """The prepared pairs whose source row is < n (source rows are ascending; TRL's filter leaves gaps)."""
    return pairs.select(range(int(np.searchsorted(np.asarray(pairs[SOURCE_ROW], dtype=np.int64), n))))


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


class PreparedDataCache:
    """Tokenized pairs and reference log-probs of one data stream, under ``root/<key>``.

    ``tokenize_key`` must change whenever the tokenization of a row can (tokenizer, chat template, max_length, TRL);
    ``ref_key`` additionally whenever the reference log-probs can (weights, dtype, precision).
    """

    def __init__(self, root: Path | str, tokenize_key: str, ref_key: str) -> None:
        self.root = Path(root).expanduser()
        self.tokenized_dir = self.root / f"tok-{tokenize_key}"
        self.ref_file = self.root / f"ref-{ref_key}.npz"
        self.lock = FileLock(str(self.root / f"tok-{tokenize_key}.lock"))
        self.last_event: dict[str, str] = {}  # "tokenized"/"ref_logps" -> "hit" | "extended" | "built" (for tests/logs)

    # Tokenized pairs ---------------------------------------------------------------------------------------------

    def _read_tokenized(self) -> tuple[np.ndarray, Dataset] | None:
        hashes_file = self.tokenized_dir / "row_hashes.npy"
        if not hashes_file.exists():
            return None
        try:
            return np.load(hashes_file), load_from_disk(str(self.tokenized_dir / "pairs"))
        except Exception as exc:  # a cache is recomputable: whatever is wrong with it, it is rebuilt
            log.warning("prepared-data cache %s is damaged (%s); tokenizing again", self.tokenized_dir, exc)
            return None

    def tokenized(self, dataset: Dataset, tokenize: Callable[[Dataset], Dataset]) -> tuple[Dataset, np.ndarray]:
        """TRL-prepared pairs of ``dataset`` (its rows in order), from the cache where it has them.

        Returns the prepared pairs (with a ``source_row`` column) and the source rows' hashes.
        """
        hashes = row_hashes(dataset)
        n = len(dataset)
        self.root.mkdir(parents=True, exist_ok=True)
        with self.lock:
            stored = self._read_tokenized()
            valid = 0 if stored is None else common_prefix(stored[0], hashes)
            if stored is not None and valid == n:
                self.last_event["tokenized"] = "hit"
                return _rows_before(stored[1], n), hashes
            kept = None
            if stored is not None and valid > 0:
                kept = _rows_before(stored[1], valid)
            new_rows = dataset.select(range(valid, n)).add_column(SOURCE_ROW, list(range(valid, n)))
            new_pairs = tokenize(new_rows).select_columns([*TOKEN_COLUMNS, SOURCE_ROW])
            pairs = new_pairs if kept is None or len(kept) == 0 else concatenate_datasets([kept, new_pairs])
            tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tok-"))
            pairs.save_to_disk(str(tmp / "pairs"))
            np.save(tmp / "row_hashes.npy", hashes)
            _replace_dir(tmp, self.tokenized_dir)
            self.last_event["tokenized"] = "extended" if valid > 0 else "built"
            log.info("prepared-data cache: tokenized rows %d..%d (%s)", valid, n, self.tokenized_dir)
            return load_from_disk(str(self.tokenized_dir / "pairs")), hashes

    # Reference log-probs ----------------------------------------------------------------------------------------

    def read_ref(self) -> dict[str, np.ndarray] | None:
        if not self.ref_file.exists():
            return None
        try:
            with np.load(self.ref_file) as f:
                stored = {k: f[k] for k in f.files}
        except Exception as exc:  # a cache is recomputable: whatever is wrong with it, it is recomputed
            log.warning("reference log-prob cache %s is damaged (%s); computing them again", self.ref_file, exc)
            return None
        if not {"row_hash", "chosen", "rejected"} <= set(stored) or not (
                len(stored["row_hash"]) == len(stored["chosen"]) == len(stored["rejected"])):
            log.warning("reference log-prob cache %s is damaged (missing or unequal arrays); computing them again",
                        self.ref_file)
            return None
        return stored

    def write_ref(self, pair_hashes: np.ndarray, chosen: np.ndarray, rejected: np.ndarray) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".ref-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, row_hash=pair_hashes, chosen=chosen, rejected=rejected)
        os.replace(tmp, self.ref_file)


def cache_ingredients(cfg: Config, tokenizer: PreTrainedTokenizerBase, use_cpu: bool) -> tuple[dict, dict]:
    """What determines (the tokenization of a row, the reference log-probs of a pair) beyond the rows themselves.

    The data stream is named by its source and ``subset_seed``; ``data.size`` is not an ingredient (an entry is a
    prefix of the stream), and the rows' own hashes catch any change of content.
    """
    import transformers
    import trl

    d = cfg.data
    tokenize = {
        "backbone": backbone_fingerprint(cfg.backbone),
        "tokenizer": [type(tokenizer).__name__, len(tokenizer), tokenizer.eos_token, tokenizer.pad_token],
        "chat_template": tokenizer.chat_template,
        "data": [d.source, d.local_file, d.hub_id, d.hub_file, d.subset_seed, d.max_sentence_chars],
        "system_prompt": d.system_prompt,
        "template": cfg.template.text,
        "max_length": cfg.trainer.max_length,
        "turn_end": None if cfg.objective.score_template_tail else (cfg.backbone.turn_end or tokenizer.eos_token),
        "versions": [trl.__version__, transformers.__version__],
    }
    if isinstance(cfg.objective, ListwiseObjectiveConfig):  # another stream of pairs: K per triplet
        o = cfg.objective
        tokenize["listwise"] = [o.num_negatives, o.include_contradiction, str(o.other_hypotheses),
                                cfg.seed if o.negatives_seed is None else o.negatives_seed]
    reference = {
        **tokenize,
        "dtype": cfg.backbone.dtype,
        "bf16": cfg.trainer.bf16,
        "device": "cpu" if use_cpu else "accelerator",
        "torch": torch.__version__,
    }
    return tokenize, reference


def prepared_data_cache(cfg: Config, tokenizer: PreTrainedTokenizerBase, use_cpu: bool) -> PreparedDataCache:
    tokenize, reference = cache_ingredients(cfg, tokenizer, use_cpu)
    return PreparedDataCache(Path(cfg.paths.cache_dir).expanduser() / "dpo_data", cache_key(tokenize),
                             cache_key(reference))


# ------------------------------------------------------------------------------------------- completion-only logits


def shared_prompt_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(prompt length, completion length) per row and the number of groups g when the batch is a preference batch
    whose prompts can be shared: rows ``[group 0: rows 0..n-1, group 1: rows n..2n-1, ...]`` (a DPO batch: chosen,
    rejected; a listwise one: chosen, then each negative), each the prompt, then the labelled completion, then
    padding, and rows ``i``, ``n + i``, ``2n + i``, ... with the same prompt. The largest such g is taken (rows with
    token-identical prompts give the same hidden states whichever group holds them). None when the batch is anything
    else."""
    rows, length = labels.shape
    if rows < 2 or length < 2:
        return None
    labelled = labels != -100
    completion = labelled.sum(1)
    prompt = labelled.int().argmax(1)
    if (completion == 0).any() or (prompt == 0).any():
        return None
    positions = torch.arange(length, device=labels.device)
    real = positions < (prompt + completion)[:, None]
    if not torch.equal((positions >= prompt[:, None]) & real, labelled):
        return None
    if attention_mask is not None and not torch.equal(attention_mask.bool(), real):
        return None
    for groups in range(rows, 1, -1):
        if rows % groups:
            continue
        n = rows // groups
        in_prompt = positions < prompt[:n, None]
        if all(torch.equal(prompt[:n], prompt[g * n:(g + 1) * n]) and
               torch.equal(input_ids[:n] * in_prompt, input_ids[g * n:(g + 1) * n] * in_prompt)
               for g in range(1, groups)):
            return prompt, completion, groups
    return None


def prefix_shared_hidden(decoder: torch.nn.Module, input_ids: torch.Tensor, prompt: torch.Tensor,
                         completion: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """The decoder's last hidden states at the positions that predict the labelled tokens, in the row-major order of
    ``hidden[:, :-1][labels[:, 1:] != -100]``, computed with each prompt run once for its ``groups`` completions.

    The n prompts run first (right padded) and keep their key/value cache; the completions then run on a copy of
    their prompt's cache, with their true positions (prompt length onwards) and the prompts' padding masked out. The
    first completion token is predicted by the prompt's last position; the completion's own last token predicts
    nothing and is not fed. Per-token log-probs equal the full sequences' (tests/test_perf.py) except that a prompt
    token's dropout mask, where dropout is on, is shared by its completions.
    """
    rows = input_ids.shape[0]
    n = rows // groups
    device = input_ids.device
    width = int(prompt.max())
    positions = torch.arange(width, device=device)
    prompt_mask = (positions < prompt[:n, None]).long()
    prompt_ids = input_ids[:n, :width] * prompt_mask
    first = decoder(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True)
    # the hidden state that predicts completion token 0: the prompt's last position
    last = first.last_hidden_state[torch.arange(n, device=device), prompt[:n] - 1]
    hidden = last.repeat(groups, 1)[:, None]
    steps = int(completion.max()) - 1
    if steps > 0:
        offsets = torch.arange(steps, device=device)
        fed = offsets < (completion - 1)[:, None]
        gather = (prompt[:, None] + offsets).clamp(max=input_ids.shape[1] - 1)
        completion_ids = torch.gather(input_ids, 1, gather) * fed
        cache = first.past_key_values
        cache.reorder_cache(torch.arange(n, device=device).repeat(groups))
        attention = torch.cat([prompt_mask.repeat(groups, 1), fed.long()], dim=1)
        rest = decoder(input_ids=completion_ids, attention_mask=attention, past_key_values=cache,
                       position_ids=prompt[:, None] + offsets, use_cache=True).last_hidden_state
        hidden = torch.cat([hidden, rest], dim=1)
    scored = torch.arange(hidden.shape[1], device=device) < completion[:, None]
    return hidden[scored]


def install_completion_only_head(model: torch.nn.Module, outputs: tuple[str, ...], share_prompt: bool = False) -> None:
    """Patches the fused LM head TRL added to ``model`` so that, off CUDA too, it scores only the labelled positions;
    with ``share_prompt``, a preference batch's prompts also run once for both completions (prefix_shared_hidden).

    Calls without ``fused_lm_head=True`` (generation, evaluation) and cases this does not cover (pre-shifted labels,
    MoE router logits, logit soft-capping or scaling) go to TRL's forward unchanged; batches that are not preference
    batches with shared prompts, and models training with gradient checkpointing (no cache), to the full sequences.
    """
    if getattr(model, "_completion_only_head", False):
        return
    text_config = model.config.get_text_config()
    unsupported = any(getattr(text_config, k, None) is not None for k in
                      ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                       "logits_scaling"))
    if unsupported or getattr(text_config, "output_router_logits", False):
        log.warning("completion_only_logits: %s is not covered; TRL's full-sequence head is kept",
                    type(model).__name__)
        return
    trl_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head or labels is None or kwargs.get("shift_labels") is not None:
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        targets = labels[:, 1:]
        mask = targets != -100
        layout = None
        given = {k for k, v in kwargs.items() if v is not None}  # PEFT passes inputs_embeds=None and the like
        if share_prompt and not args and given <= {"input_ids", "attention_mask", "use_cache"} and not (
                self.is_activation_checkpointing and self.training):
            layout = shared_prompt_layout(kwargs["input_ids"], kwargs.get("attention_mask"), labels)
        if share_prompt and layout is None and not getattr(self, "_told_full_sequences", False):
            self._told_full_sequences = True  # the same numbers, only slower: said once, not per batch
            log.info("share_prompt_prefix: a batch whose prompts cannot be shared (or gradient checkpointing) is "
                     "scored as full sequences")
        if layout is not None:
            hidden = prefix_shared_hidden(self.base_model, kwargs["input_ids"], *layout)  # (prompt, completion, groups)
        else:
            hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1][mask]
        head = self.get_output_embeddings()
        per_token = ChunkedLogProbFunction.apply(
            hidden, head.weight, head.bias, targets[mask], 1.0, VOCAB_CHUNK, None, 1.0, outputs)
        # masked_scatter keeps the result connected to the graph even when no position is labelled
        log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
            None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token)
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / mask.sum().clamp(min=1), log_probs=log_probs, entropy=entropy,
            log_sum_sq_probs=log_sum_sq_probs, mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    model._completion_only_head = True


# ------------------------------------------------------------------------------------------------------- the trainer
# ------------------------------------------------------------------------------------------------------- the trainer


def end_at_turn_end(completion: list[int], turn_end: list[int]) -> list[int]:
    """The completion up to and including the last occurrence of ``turn_end`` (a token-id sequence)."""
    n = len(turn_end)
    for start in range(len(completion) - n, -1, -1):
        if completion[start:start + n] == turn_end:
            return completion[:start + n]
    raise ValueError(f"the turn end {turn_end} does not occur in the completion {completion}")


def turn_end_ids(tokenizer: PreTrainedTokenizerBase, turn_end: str | None) -> list[int]:
    """The token ids of the text that closes an assistant turn (the EOS token when None)."""
    text = turn_end if turn_end is not None else tokenizer.eos_token
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"backbone.turn_end={text!r} tokenizes to nothing")
    return ids


def _uncollate(batch: dict) -> list[dict]:
    """The preference examples back out of a DataCollatorForPreference batch ([chosen rows; rejected rows])."""
    ids, attention, completion = batch["input_ids"].cpu(), batch["attention_mask"].cpu(), batch["completion_mask"].cpu()
    n = ids.shape[0] // 2
    examples = []
    for i in range(n):
        prompt = ids[i][(attention[i] == 1) & (completion[i] == 0)]
        example = {"prompt_ids": prompt.tolist(), "chosen_ids": ids[i][completion[i] == 1].tolist(),
                   "rejected_ids": ids[n + i][completion[n + i] == 1].tolist()}
        for key in REF_COLUMNS:
            if key in batch:
                example[key] = batch[key][i].item()
        examples.append(example)
    return examples


def chunks_for_budget(pairs: Dataset, batch_size: int, max_tokens: int, sequences: int = 2) -> int:
    """The smallest divisor k of ``batch_size`` for which ``batch_size / k`` of the longest examples, laid out as they
    are collated (``sequences`` per example: 2 for a DPO pair, padded to the longest), fit ``max_tokens``;
    ``batch_size`` when not even one example does (with a warning)."""
    longest = max((len(p) + max(len(c), len(r)) for p, c, r in
                   zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"], strict=True)), default=0)
    for k in range(1, batch_size + 1):
        if batch_size % k == 0 and batch_size // k * sequences * longest <= max_tokens:
            if k > 1:
                log.info("objective.max_tokens_per_micro_batch=%d: each micro-batch of %d examples trains in %d "
                         "chunks of %d (longest sequence: %d tokens)", max_tokens, batch_size, k, batch_size // k,
                         longest)
            return k
    log.warning("objective.max_tokens_per_micro_batch=%d is below one example (%d x %d tokens): training one at a "
                "time", max_tokens, sequences, longest)
    return batch_size


def split_pairs(batch: dict, chunks: int, groups: int = 2) -> list[dict]:
    """A collated preference batch (rows in ``groups`` groups of n: [chosen..., rejected...] for DPO; per-example
    columns of n rows) as ``chunks`` batches of consecutive examples, each cut to its own longest sequence. Fewer
    pieces when the batch has fewer examples."""
    n = batch["input_ids"].shape[0] // groups
    if chunks <= 1 or n <= 1:
        return [batch]
    size = -(-n // chunks)
    pieces = []
    for start in range(0, n, size):
        stop = min(start + size, n)
        rows = torch.cat([torch.arange(g * n + start, g * n + stop) for g in range(groups)]).to(
            batch["input_ids"].device)
        width = int(batch["attention_mask"][rows].sum(1).max())
        piece = {}
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                piece[key] = value
            elif value.shape[0] == groups * n:
                piece[key] = value[rows][:, :width] if value.dim() == 2 else value[rows]
            elif value.shape[0] == n:
                piece[key] = value[start:stop]
            else:
                raise ValueError(f"cannot split the batch column {key!r} of shape {tuple(value.shape)} by examples")
        pieces.append(piece)
    return pieces


class SempaDPOTrainer(DPOTrainer):
    """DPOTrainer + the flags above. ``data_cache`` is used only together with TRL's ``precompute_ref_log_probs``
    for the reference log-probs; the tokenized pairs are cached whenever it is given."""

    sequences_per_example = 2  # collated rows per training example: chosen and rejected

    def __init__(self, *positional, completion_only_logits: bool = False,
                 data_cache: PreparedDataCache | None = None, add_length_column: bool = False,
                 sort_within_step: bool = False, turn_end: list[int] | None = None, share_prompt: bool = False,
                 max_tokens_per_micro_batch: int | None = None, **kwargs) -> None:
        # Read by _prepare_dataset / _precompute_ref_logps, which DPOTrainer.__init__ calls
        self.completion_only_logits = completion_only_logits
        self.share_prompt = share_prompt
        self.sort_within_step = sort_within_step
        self.data_cache = data_cache
        self.add_length_column = add_length_column
        self.turn_end = turn_end
        self._pair_hashes: np.ndarray | None = None
        check_trl_version()
        args = kwargs.get("args")  # the DPOConfig (by keyword, as build_trainer passes it)
        # With the cache, the reference log-probs are ours to compute (below): TRL would first hash every weight of
        # the model for its own cache key (a minute on a 7B model, every run).
        precompute_here = data_cache is not None and args is not None and args.precompute_ref_log_probs
        if precompute_here:
            args.precompute_ref_log_probs = False
        try:
            super().__init__(*positional, **kwargs)
        finally:
            if precompute_here:
                args.precompute_ref_log_probs = True
        if completion_only_logits:
            self._install_head()
        if precompute_here:
            self.precompute_ref_logps = True  # what DPOTrainer._compute_loss reads
            self.train_dataset = self._precompute_ref_logps(
                self.train_dataset, "train", args.precompute_ref_batch_size or args.per_device_train_batch_size)
        self.chunks = 1
        if max_tokens_per_micro_batch is not None and self.train_dataset is not None:
            self.chunks = chunks_for_budget(self.train_dataset, self.args.per_device_train_batch_size,
                                            max_tokens_per_micro_batch, self.sequences_per_example)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """With a token budget, the micro-batch is trained in ``self.chunks`` chunks of pairs. The Trainer divides a
        loss (a mean over its pairs) by ``current_gradient_accumulation_steps`` before the backward; set per chunk to
        weigh it by its share of the micro-batch's pairs, the micro-batch's gradient and logged loss are the unchunked
        ones. Under DDP only the last chunk's backward synchronises."""
        pieces = split_pairs(inputs, self.chunks, self.sequences_per_example)
        if len(pieces) == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        accumulation = self.current_gradient_accumulation_steps
        per = self.sequences_per_example
        examples = inputs["input_ids"].shape[0] // per
        try:
            total = None
            for i, piece in enumerate(pieces):
                in_piece = piece["input_ids"].shape[0] // per
                self.current_gradient_accumulation_steps = accumulation * examples / in_piece
                last = i == len(pieces) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    loss = super().training_step(model, piece, num_items_in_batch)
                total = loss if total is None else total + loss
            return total
        finally:
            self.current_gradient_accumulation_steps = accumulation

    def _install_head(self) -> None:
        outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
        if self.use_weighting:
            outputs += ("log_sum_sq_probs",)
        model = self.accelerator.unwrap_model(self.model)
        install_completion_only_head(model.get_base_model() if hasattr(model, "get_base_model") else model, outputs,
                                     share_prompt=self.share_prompt)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """With ``sort_within_step``, the pairs of one optimizer step are regrouped into micro-batches of similar
        length: the same pairs per step (the data order at step level and the step's gradient are TRL's), less
        padding. Needs gradient accumulation (more than one micro-batch per step) to do anything."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.sort_within_step and len(batches) > 1:
            batches = self._regroup_by_length(batches)
        return batches, num_items

    def _regroup_by_length(self, batches: list[dict]) -> list[dict]:
        sizes = [b["input_ids"].shape[0] // 2 for b in batches]  # pairs per micro-batch
        examples = [ex for b in batches for ex in _uncollate(b)]
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]["prompt_ids"]) + max(
            len(examples[i]["chosen_ids"]), len(examples[i]["rejected_ids"])))
        device = batches[0]["input_ids"].device
        regrouped, start = [], 0
        for size in sizes:
            collated = self.data_collator([examples[i] for i in order[start:start + size]])
            regrouped.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collated.items()})
            start += size
        return regrouped

    def _tokenize_pairs(self, dataset, processing_class, args, dataset_name):
        """TRL's tokenization; each completion cut after the turn end when ``turn_end`` is set; then, as ms-swift does,
        a pair whose chosen or rejected sequence is longer than ``max_length`` is dropped whole, never truncated."""
        prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if self.turn_end is not None:
            prepared = self._end_completions(prepared)
        if args.max_length is None:
            return prepared
        limit = args.max_length
        before = len(prepared)
        prepared = prepared.filter(
            lambda ex: len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) <= limit,
            desc="Dropping pairs longer than max_length")
        if len(prepared) < before:
            log.warning("%d of %d pairs are longer than trainer.max_length=%d tokens and are left out (ms-swift "
                        "drops them too)", before - len(prepared), before, limit)
        return prepared

    def _end_completions(self, prepared: Dataset) -> Dataset:
        turn_end = self.turn_end

        def cut(example: dict) -> dict:
            try:
                return {k: end_at_turn_end(example[k], turn_end) for k in ("chosen_ids", "rejected_ids")}
            except ValueError as exc:
                raise ConfigError(f"backbone.turn_end: {exc}; the chat template does not close the assistant turn "
                                  f"with it (set backbone.turn_end, or objective.score_template_tail=true)") from exc

        return prepared.map(cut, desc="Completions end at the turn end")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if self.data_cache is None or dataset_name != "train" or not isinstance(dataset, Dataset):
            prepared = self._tokenize_pairs(dataset, processing_class, args, dataset_name)
        else:
            def tokenize(rows: Dataset) -> Dataset:
                # TRL orders the processes (main first) with barriers; here that ordering is ours (below), and a
                # barrier inside the cache's file lock would deadlock a multi-process run.
                with _swapped(trl_dpo_module, "global_then_local_main_first", contextlib.nullcontext):
                    return self._tokenize_pairs(rows, processing_class, args, dataset_name)

            # The main process builds or extends the entry; the others then read it (a cache hit).
            with global_then_local_main_first():
                prepared, source_hashes = self.data_cache.tokenized(dataset, tokenize)
            self._pair_hashes = source_hashes[np.asarray(prepared[SOURCE_ROW], dtype=np.int64)]
        if self.add_length_column and dataset_name == "train" and LENGTH not in prepared.column_names:
            prepared = prepared.map(
                lambda ex: {LENGTH: len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))},
                desc="Pair lengths")
        return prepared

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        if self.completion_only_logits:
            self._install_head()  # DPOTrainer.__init__ precomputes before our __init__ resumes
        if name != "train" or self.data_cache is None or self._pair_hashes is None:
            return self._add_ref_columns(dataset, *self._compute_ref_logps(dataset, batch_size))
        cache = self.data_cache
        hashes = self._pair_hashes
        single_process = self.accelerator.num_processes == 1
        # One process computing at a time: the runs of a sweep queued on one machine wait and then read the cache.
        with cache.lock if single_process else contextlib.nullcontext():
            stored = cache.read_ref()
            valid = 0 if stored is None else common_prefix(stored["row_hash"], hashes)
            if not single_process:  # every process must take the same branch: the computation below is collective
                valid = broadcast_object_list([valid])[0]
            if valid == len(hashes):
                cache.last_event["ref_logps"] = "hit"
                return self._add_ref_columns(dataset, stored["chosen"][:valid], stored["rejected"][:valid])
            chosen, rejected = self._compute_ref_logps(dataset.select(range(valid, len(dataset))), batch_size)
            if valid:
                chosen = np.concatenate([stored["chosen"][:valid], chosen])
                rejected = np.concatenate([stored["rejected"][:valid], rejected])
            if self.accelerator.is_main_process:
                cache.write_ref(hashes, chosen, rejected)
            cache.last_event["ref_logps"] = "extended" if valid else "built"
            log.info("prepared-data cache: reference log-probs of pairs %d..%d (%s)", valid, len(hashes),
                     cache.ref_file)
        self.accelerator.wait_for_everyone()
        return self._add_ref_columns(dataset, chosen, rejected)

    @staticmethod
    def _add_ref_columns(dataset: Dataset, chosen: np.ndarray, rejected: np.ndarray) -> Dataset:
        dataset = dataset.remove_columns([c for c in REF_COLUMNS if c in dataset.column_names])
        return dataset.add_column(REF_COLUMNS[0], chosen.tolist()).add_column(REF_COLUMNS[1], rejected.tolist())

    def _compute_ref_logps(self, dataset: Dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """TRL's per-batch reference forward over ``dataset``, in length-sorted batches, returned in row order."""
        if len(dataset) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        lengths = [len(p) + max(len(c), len(r)) for p, c, r in
                   zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)]
        order = np.argsort(lengths, kind="stable")
        rows = dataset.select_columns(list(TOKEN_COLUMNS)).select(order)
        loader = self.accelerator.prepare(DataLoader(rows, batch_size=batch_size, collate_fn=self.data_collator,
                                                     shuffle=False, num_workers=self.args.dataloader_num_workers))
        was_training = self.model.training
        self.model.eval()
        chosen, rejected = [], []
        device = self.accelerator.device
        # Iterating a DataLoader draws from the global RNG, which later seeds the training sampler and the dropout
        # masks: without the fork, precomputing would change the data order and the masks of the run.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            try:
                for batch in loader:
                    c, r = self.compute_ref_log_probs(self.model, batch)
                    c, r = self.accelerator.gather_for_metrics((c, r))
                    chosen.append(c.float().cpu())
                    rejected.append(r.float().cpu())
            finally:
                self.model.train(was_training)
        sorted_chosen, sorted_rejected = torch.cat(chosen).numpy(), torch.cat(rejected).numpy()
        out_chosen, out_rejected = np.empty_like(sorted_chosen), np.empty_like(sorted_rejected)
        out_chosen[order], out_rejected[order] = sorted_chosen, sorted_rejected
        return out_chosen, out_rejected
