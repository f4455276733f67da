"""One method evaluated (``python -m sempa_exp.evaluate``).

Evaluates one embedding method (conf/method/: a training-free method, the SBERT encoder baseline, or a trained adapter
with ``method=checkpoint method.path=<run dir>``) with the same suites and code as a training run's evaluations
(``eval.at_end``: the 7 STS tasks, STS-B dev, geometry and GAR by default), writes a 2-D PCA of a fixed NLI sample
(``pca.json``) and the top aligned tokens of a few sentences (``aligned_tokens.json``), logs the metrics to
``metrics.jsonl`` and W&B, and writes ``results.json`` (kind ``evaluation``, one evaluation at step 0).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sempa_exp.config.schema import (
    Config,
    ConfigError,
    data_dir,
    method_settings,
    refuse_unknown_keys,
    validate,
)
from sempa_exp.data import nli
from sempa_exp.embedding import loading
from sempa_exp.embedding.base import LoadedMethod, lm_head_of
from sempa_exp.embedding.encoder import SentenceEncoder
from sempa_exp.evaluation.alignment import GAR_SAMPLE_DOC, aligned_token_examples
from sempa_exp.evaluation.pca import nli_pca
from sempa_exp.evaluation.suites import (
    GEOMETRY_SAMPLE_DOC,
    EmbeddingCache,
    EvalData,
    eval_data_digest,
    eval_groups,
    evaluate,
    load_eval_data,
    save_pairs,
)
from sempa_exp.launch.distributed import device_for
from sempa_exp.models.backbones import backbone_fingerprint
from sempa_exp.records import identity, rundir
from sempa_exp.records.metrics import RunLogger, rewind_metrics
from sempa_exp.records.results import Results, RunKind, is_finished, read_results, write_results
from sempa_exp.records.summary import print_evaluation_summary

log = logging.getLogger("sempa_exp")

EVALUATE_SUITES = ("sts", "stsb_dev", "geometry", "gar")
PCA_FILE = "pca.json"
ALIGNED_TOKENS_FILE = "aligned_tokens.json"
ALIGNED_TOKEN_EXAMPLES = 20  # the first sentences of the GAR sample


@dataclass
class PreparedEvaluation:
    config: Config
    resolved: dict
    suites: list[str]
    eval_data: EvalData
    pca_triplets: list[nli.Triplet]
    pca_data_file: Path | None
    run_dir: Path
    data_identity: dict[str, str]  # content digests of the evaluation data (records.identity)


def prepare(cfg: DictConfig) -> PreparedEvaluation:
    """Every check that needs neither a model nor a run directory; raises ConfigError naming the offending key."""
    refuse_unknown_keys(cfg)
    config: Config = OmegaConf.to_object(cfg)
    if config.method is None:
        raise ConfigError("no method: this entry point composes conf/evaluate.yaml (method=<one of conf/method/>)")
    validate(config)
    run_dir = identity.run_dir(cfg)
    suites = list(dict.fromkeys(config.eval.at_end))
    unsupported = [s for s in suites if s not in EVALUATE_SUITES]
    if unsupported:
        raise ConfigError(f"eval.at_end has {unsupported}, which the evaluate entry does not run; it runs "
                          f"{', '.join(EVALUATE_SUITES)} (the ppl suite: python -m sempa_exp.gen_eval)")
    root = data_dir(config)
    if not root.is_dir():
        raise ConfigError(f"paths.data_dir does not exist: {root}")
    e = config.eval
    eval_data = load_eval_data(root, suites, e.geometry_sample, e.gar_sample, e.gar_top_k, e.gar_match)
    pca_triplets, pca_file = [], None
    if e.pca_fraction > 0:
        pca_file = nli.resolve_source(config.data, root)
        pca_triplets, _ = nli.read_triplets(pca_file, config.data.max_sentence_chars, config.data.deduplicate)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    data_identity = {"eval_data": eval_data_digest(eval_data)}
    if pca_triplets:
        data_identity["pca_data"] = identity.content_digest(
            [[t.premise, t.entailment, t.contradiction] for t in pca_triplets])
    return PreparedEvaluation(config, resolved, suites, eval_data, pca_triplets, pca_file, run_dir, data_identity)


class Evaluation:
    """One method evaluated inside its run directory."""

    def __init__(self, prep: PreparedEvaluation) -> None:
        self.prep = prep
        self.cfg = prep.config

    def cache_for(self, encoder: SentenceEncoder) -> EmbeddingCache | None:
        method = encoder.method
        if method.cache_key is None or not self.cfg.eval.cache_embeddings:
            return None
        cfg = self.cfg
        return EmbeddingCache(cfg.paths.cache_dir, {
            "backbone": backbone_fingerprint(cfg.backbone), "dtype": cfg.eval.dtype,
            "embed": self.prep.resolved["embed"], "batching": encoder.batching_key(), **method.cache_key})

    def execute(self) -> Results:
        cfg, prep, run_dir = self.cfg, self.prep, self.prep.run_dir
        rundir.start_run_dir(run_dir, prep.resolved)
        identity.write_data_identity(run_dir, prep.data_identity)
        superseded = rewind_metrics(run_dir, -1)  # records of an interrupted attempt
        if superseded:
            log.info("an earlier attempt's %d metric records moved to metrics.superseded.jsonl", superseded)
        run_logger = RunLogger(run_dir, cfg.logger, run_id=identity.wandb_run_id(run_dir), group=cfg.run.group,
                               name=run_dir.name, config=prep.resolved)
        exit_code = 1
        try:
            if cfg.run.num_threads:
                torch.set_num_threads(cfg.run.num_threads)
            started = time.time()
            loaded = loading.load(cfg, device_for(cfg.run.device))
            encoder = SentenceEncoder(loaded.model, loaded.tokenizer, cfg.embed, batch_size=cfg.eval.batch_size,
                                      max_length=cfg.eval.max_length, method=loaded.method,
                                      groups=eval_groups(prep.eval_data))
            cache = self.cache_for(encoder)
            if cache is not None:
                log.info("%d cached embeddings loaded from %s", cache.load_into(encoder), cache.folder)
            pairs: dict = {}
            metrics = evaluate(encoder, prep.eval_data, prep.suites, pairs)
            save_pairs(run_dir, 0, pairs)
            artifacts = self.write_artifacts(encoder, loaded)
            if cache is not None:
                cache.save_from(encoder)
            metrics["eval/seconds"] = time.time() - started
            results = self.results(metrics, loaded, artifacts)
            run_logger.log(metrics, step=0, samples_seen=results.evaluations[0]["samples_seen"])
            run_logger.summary(metrics)
            write_results(run_dir, results)
            exit_code = 0
            return results
        finally:
            run_logger.finish(exit_code)

    def write_artifacts(self, encoder: SentenceEncoder, loaded: LoadedMethod) -> dict[str, str]:
        prep, run_dir, out = self.prep, self.prep.run_dir, {}
        if prep.pca_triplets:
            pca = nli_pca(prep.pca_triplets, encoder.encode, self.cfg.eval.pca_fraction, str(prep.pca_data_file))
            rundir.write_json_atomic(run_dir / PCA_FILE, pca)
            out["pca"] = PCA_FILE
        lm_head = lm_head_of(loaded.model) if loaded.method.has_lm_head else None
        if "gar" in prep.suites and lm_head is not None:
            sentences = prep.eval_data.gar_sentences[:ALIGNED_TOKEN_EXAMPLES]
            examples = aligned_token_examples(encoder.encode(sentences), sentences, lm_head, encoder.tokenizer,
                                              self.cfg.eval.gar_top_k)
            rundir.write_json_atomic(run_dir / ALIGNED_TOKENS_FILE, examples)
            out["aligned_tokens"] = ALIGNED_TOKENS_FILE
        return out

    def results(self, metrics: dict, loaded: LoadedMethod, artifacts: dict) -> Results:
        cfg, prep, method = self.cfg, self.prep, loaded.method
        # a training-free method saw no training sample; a checkpoint, what its run had seen (None: unknown, and
        # 0 on the logged step axis)
        trained = loaded.info.get("samples_seen", 0)
        evaluation = {"step": 0, "samples_seen": trained or 0, **metrics}
        e = cfg.eval
        return Results(
            kind=RunKind.EVALUATION,
            group=cfg.run.group,
            name=prep.run_dir.name,
            run_dir=str(prep.run_dir),
            # an evaluated checkpoint is the method it was trained with (sempa, contrastive)
            method=loaded.info.get("trained_with") or cfg.method.name,
            backbone=cfg.backbone.name if method.uses_backbone else None,
            embed=cfg.embed.name if method.uses_embed else None,
            samples_seen=trained,
            final=metrics,
            best_by_stsb_dev=evaluation if "eval/stsb_dev" in metrics else None,
            evaluations=[evaluation],
            details={
                "method_config": cfg.method.name,
                "method_info": loaded.info,
                "method_settings": dataclasses.asdict(method_settings(cfg)),
                "suites": prep.suites,
                "artifacts": artifacts,
                "geometry_sample": GEOMETRY_SAMPLE_DOC.replace("N", str(e.geometry_sample)),
                "gar_sample": GAR_SAMPLE_DOC.replace("N", str(len(prep.eval_data.gar_sentences))),
                "gar_top_k": e.gar_top_k,
                "gar_match": e.gar_match,
            },
            versions=rundir.library_versions(),
            git_commit=rundir.git_commit(),
            config=prep.resolved,
        )


def run(cfg: DictConfig) -> Results:
    prep = prepare(cfg)
    # before the skip: a finished evaluation of another config is no answer
    identity.check_same_experiment(prep.run_dir, prep.resolved, RunKind.EVALUATION)
    identity.check_same_data(prep.run_dir, prep.data_identity)
    if prep.config.run.skip_finished and is_finished(prep.run_dir):
        print(f"[sempa-exp] already finished, skipped: {prep.run_dir}")
        return read_results(prep.run_dir)
    with rundir.exclusive(prep.run_dir):
        results = Evaluation(prep).execute()
    print_evaluation_summary(results)
    return results
