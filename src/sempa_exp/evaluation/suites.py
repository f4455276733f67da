"""Evaluation suites of one model state: the 7 STS tasks, STS-B dev, and the geometry of the embedding space.

Metric names (also the W&B keys): ``eval/<task>`` is a task's headline score (pooled 'all' for STS12-16, test split
for STS-B and SICK-R), ``eval/<task>/<subset>`` the per-sub-dataset scores, ``eval/sts_avg`` the 7-task average,
``eval/stsb_dev`` the model-selection score, ``eval/uniformity`` and ``eval/isotropy`` the geometry, and the ``ppl``
suite's generative proxy ``eval/ppl_nli``, ``eval/logp_chosen``, ``eval/logp_rejected``, ``eval/logp_margin``
(sempa_exp.evaluation.perplexity, on held-out NLI triplets that ``EvalData.proxy`` holds), and the ``gar`` suite's
global alignment rate ``eval/gar`` of the embeddings' LM-head aligned tokens (sempa_exp.evaluation.alignment;
skipped for encoders without an LM head)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sempa_exp.data import sts
from sempa_exp.embedding.base import lm_head_of
from sempa_exp.embedding.encoder import SentenceEncoder
from sempa_exp.evaluation import alignment as token_alignment
from sempa_exp.evaluation import geometry
from sempa_exp.evaluation.perplexity import ProxySet, proxy_metrics

log = logging.getLogger(__name__)

GEOMETRY_SAMPLE_DOC = "the first N distinct sentences of STS-B dev, in file order (sentence1 then sentence2 per pair)"


@dataclass
class EvalData:
    tasks: dict[str, list[sts.StsSplit]] = field(default_factory=dict)
    stsb_dev: sts.StsSplit | None = None
    geometry_sentences: list[str] = field(default_factory=list)
    proxy: ProxySet | None = None  # the ppl suite's held-out NLI triplets (set by the caller, which has them)
    gar_sentences: list[str] = field(default_factory=list)  # token_alignment.GAR_SAMPLE_DOC
    gar_top_k: int = 10
    gar_match: str = "text"


def eval_data_digest(data: EvalData) -> str:
    """A hash of the evaluation data's content (sentences and gold scores of every split read, the geometry and GAR
    samples), independent of where the files lie: part of a run's identity."""
    import hashlib
    import json

    splits = [s for task in sorted(data.tasks) for s in data.tasks[task]]
    if data.stsb_dev is not None:
        splits.append(data.stsb_dev)
    content = [[s.task, s.name, s.sentences1, s.sentences2, [float(x) for x in s.scores]] for s in splits]
    content += [data.geometry_sentences, data.gar_sentences]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def load_eval_data(data_dir: Path, suites: Iterable[str], geometry_sample: int = 2000, gar_sample: int = 10000,
                   gar_top_k: int = 10, gar_match: str = "text") -> EvalData:
    """Reads what the suites need; a missing or malformed file fails here, before any model is loaded."""
    suites = set(suites)
    data = EvalData(gar_top_k=gar_top_k, gar_match=gar_match)
    if suites & {"sts", "gar"}:
        data.tasks = {task: sts.load_task(data_dir, task) for task in sts.STS_TASKS}
    if "gar" in suites:
        data.gar_sentences = token_alignment.gar_sentences(data.tasks, gar_sample)
    if suites & {"stsb_dev", "geometry"}:
        data.stsb_dev = sts.load_stsb_dev(data_dir)
    if "geometry" in suites:
        pairs = zip(data.stsb_dev.sentences1, data.stsb_dev.sentences2)
        ordered = dict.fromkeys(s for pair in pairs for s in pair)
        data.geometry_sentences = list(ordered)[:geometry_sample]
    return data


STS_GROUP, DEV_GROUP = "sts", "stsb_dev"  # the encoder's sentence groups (SentenceEncoder's ``groups``)


def eval_groups(data: EvalData) -> dict[str, list[str]]:
    """The sentence groups an evaluation embeds in fixed batches: every sentence of the 7 STS tasks (the sts and gar
    suites), every sentence of STS-B dev (the stsb_dev and geometry suites). 2,238 STS-B dev sentences are in the 7
    tasks too; each group embeds them in its own batches, so a suite's scores never depend on which ran first."""
    groups = {}
    if data.tasks:
        groups[STS_GROUP] = list(dict.fromkeys(s for splits in data.tasks.values() for split in splits
                                               for s in split.sentences))
    if data.stsb_dev is not None:
        groups[DEV_GROUP] = list(dict.fromkeys(data.stsb_dev.sentences))
    return groups


def sentences_needed(data: EvalData, suites: Iterable[str]) -> dict[str, list[str]]:
    """Per sentence group, the distinct sentences the suites score."""
    suites = set(suites)
    out: dict[str, list[str]] = {STS_GROUP: [], DEV_GROUP: []}
    if "sts" in suites:
        out[STS_GROUP] += [s for splits in data.tasks.values() for split in splits for s in split.sentences]
    if "gar" in suites:
        out[STS_GROUP] += data.gar_sentences
    if "stsb_dev" in suites and data.stsb_dev is not None:
        out[DEV_GROUP] += data.stsb_dev.sentences
    if "geometry" in suites:
        out[DEV_GROUP] += data.geometry_sentences
    return {group: list(dict.fromkeys(sentences)) for group, sentences in out.items() if sentences}


def evaluate(encoder: SentenceEncoder, data: EvalData, suites: Iterable[str],
             pairs: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """The suites' metrics; ``pairs``, when given and the sts suite runs, receives each task's predicted and gold
    similarities (``<task>/pred``, ``<task>/gold``, the task's splits concatenated): what a paired bootstrap over
    the STS pairs needs (``save_pairs``)."""
    suites = list(dict.fromkeys(suites))
    for group, sentences in sentences_needed(data, suites).items():
        encoder.encode(sentences, group)  # one pass over the group's batches that hold a needed sentence
    in_sts, in_dev = functools.partial(encoder.encode, group=STS_GROUP), functools.partial(encoder.encode,
                                                                                          group=DEV_GROUP)
    metrics: dict[str, float] = {}
    if "sts" in suites:
        headline = []
        for task, splits in data.tasks.items():
            sims: list[np.ndarray] = []
            scores = sts.score_task(splits, in_sts, sims)
            short = sts.SHORT_NAMES[task]
            if pairs is not None:
                pairs[f"{short}/pred"] = np.concatenate(sims).astype(np.float32)
                pairs[f"{short}/gold"] = np.concatenate([s.scores for s in splits]).astype(np.float32)
            metrics[f"eval/{short}"] = scores["all"]
            if len(splits) > 1:
                metrics.update({f"eval/{short}/{name}": v for name, v in scores.items() if name != "all"})
            headline.append(scores["all"])
        metrics["eval/sts_avg"] = float(np.mean(headline))
    if "stsb_dev" in suites:
        metrics["eval/stsb_dev"] = sts.score_task([data.stsb_dev], in_dev)["all"]
    if "geometry" in suites:
        emb = in_dev(data.geometry_sentences)
        metrics["eval/uniformity"] = geometry.uniformity(emb)
        metrics["eval/isotropy"] = geometry.isotropy(emb)
    if "ppl" in suites:
        if data.proxy is None:
            raise ValueError("the ppl suite needs EvalData.proxy: the held-out NLI triplets")
        scores = proxy_metrics(encoder.model, encoder.tokenizer, data.proxy, encoder.batch_size)
        metrics.update({f"eval/{k}": v for k, v in scores.items()})
    if "gar" in suites:
        lm_head = lm_head_of(encoder.model) if encoder.method.has_lm_head else None
        if lm_head is None:
            log.info("gar skipped: the embeddings of %s are not in an LM's hidden space", type(encoder.method).__name__)
        else:
            metrics["eval/gar"] = token_alignment.gar_score(
                in_sts(data.gar_sentences), data.gar_sentences, lm_head, encoder.tokenizer,
                data.gar_top_k, data.gar_match)
    return metrics


STS_PAIRS_DIR = "sts_pairs"  # <run dir>/sts_pairs/step-N.npz: the 7 tasks' pair similarities at step N


def save_pairs(run_dir: Path, step: int, pairs: dict[str, np.ndarray]) -> Path | None:
    """Writes the pair similarities of one sts evaluation (atomically: a kill leaves none or all of them)."""
    if not pairs:
        return None
    folder = Path(run_dir) / STS_PAIRS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step}.npz"
    tmp = folder / f".step-{step}.{os.getpid()}.tmp.npz"
    with open(tmp, "wb") as f:
        np.savez(f, **pairs)
    os.replace(tmp, path)
    return path


def load_pairs(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """task -> (predicted, gold) similarities from ``save_pairs``."""
    with np.load(path, allow_pickle=False) as stored:
        tasks = dict.fromkeys(k.rsplit("/", 1)[0] for k in stored.files)
        return {t: (stored[f"{t}/pred"], stored[f"{t}/gold"]) for t in tasks}


UNGROUPED = ""  # the cache's name for the encoder's vectors outside any group (the NLI PCA sample, say)


class EmbeddingCache:
    """Embeddings of an untrained backbone on disk, keyed by everything that determines them."""

    def __init__(self, root: Path, key_parts: dict) -> None:
        key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
        self.folder = Path(root).expanduser() / "embeddings" / key
        self.key_parts = key_parts

    def load_into(self, encoder: SentenceEncoder) -> int:
        """The stored vectors of the encoder's groups (a group's batching is part of the key: see ``for_groups``)."""
        cache_file = self.folder / "embeddings.npz"
        if not cache_file.exists():
            return 0
        try:
            with np.load(cache_file, allow_pickle=False) as stored:
                groups = json.loads(stored["groups_json"].tobytes())
                vectors = {name: stored[f"vectors_{i}"] for i, name in enumerate(groups)}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # a damaged file is recomputed, not fatal
            log.warning("ignoring unreadable embedding cache %s (%s)", cache_file, exc)
            return 0
        if any(len(sentences) != len(vectors[name]) for name, sentences in groups.items()):
            log.warning("ignoring inconsistent embedding cache %s", self.folder)
            return 0
        loaded = 0
        for name, sentences in groups.items():
            memo = encoder.memo if name == UNGROUPED else encoder.group_memo.get(name)
            if memo is not None:
                memo.update(zip(sentences, vectors[name]))
                loaded += len(sentences)
        return loaded

    def save_from(self, encoder: SentenceEncoder) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        memos = {UNGROUPED: encoder.memo, **encoder.group_memo}
        groups = {name: list(memo) for name, memo in memos.items() if memo}
        arrays = {f"vectors_{i}": np.stack([memos[name][s] for s in sentences])
                  for i, (name, sentences) in enumerate(groups.items())}
        # Sentences and vectors in one file replaced atomically: the runs of a sweep (on several nodes) share this
        # cache and may save it at once; per-process temporary names keep their writes apart.
        tmp = self.folder / f"embeddings.{os.uname().nodename}.{os.getpid()}.tmp.npz"
        with open(tmp, "wb") as f:
            np.savez(f, groups_json=np.frombuffer(json.dumps(groups).encode(), dtype=np.uint8), **arrays)
        (self.folder / "key.json").write_text(json.dumps(self.key_parts, indent=1, sort_keys=True))
        os.replace(tmp, self.folder / "embeddings.npz")
