"""Entry point: ``python -m sempa_exp.evaluate [backbone=NAME] [method=NAME] [overrides] [-m]``.

Evaluates one embedding method (conf/method/: a training-free method, the SBERT encoder baseline, or a trained
adapter with ``method=checkpoint method.path=<run dir>``) with the same suites and code as a training run's
evaluations (``eval.at_end``: the 7 STS tasks, STS-B dev, geometry and GAR by default), writes a 2-D PCA of a fixed
NLI sample (``pca.json``) and the top aligned tokens of a few sentences (``aligned_tokens.json``), logs the metrics to
``metrics.jsonl`` and W&B, and writes ``results.json`` in the shape of a training run's (step 0 only).

The run directory is ``<runs_dir>/<run.group, default eval>/<name from the command-line overrides>``; a finished one
is reported, not redone (``run.skip_finished=false`` redoes it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from sempa_exp.config.schema import Config, ConfigError, data_dir, method_settings, register_configs, validate
from sempa_exp.data import nli
from sempa_exp.data.sts import SHORT_NAMES
from sempa_exp.embedding import loading as methods
from sempa_exp.embedding.base import lm_head_of
from sempa_exp.embedding.encoder import SentenceEncoder
from sempa_exp.evaluation.alignment import GAR_SAMPLE_DOC, aligned_token_examples
from sempa_exp.evaluation.pca import nli_pca
from sempa_exp.evaluation.suites import GEOMETRY_SAMPLE_DOC, EmbeddingCache, EvalData, evaluate, load_eval_data
from sempa_exp.launch.launcher import register_launcher_configs
from sempa_exp.models.backbones import backbone_fingerprint
from sempa_exp.records import rundir
from sempa_exp.records.metrics import RunLogger, rewind_metrics
from sempa_exp.train import CONF_DIR, resolve_run_name

log = logging.getLogger("sempa_exp")

EVALUATE_SUITES = ("sts", "stsb_dev", "geometry", "gar")
# Sections that define an evaluation: a run directory holding a different one is left untouched.
EVALUATION_KEYS = ("backbone", "embed", "method", "eval", "seed")
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


def prepare(cfg: DictConfig) -> PreparedEvaluation:
    """Every check that needs neither a model nor a run directory; raises ConfigError naming the offending key."""
    config: Config = OmegaConf.to_object(cfg)
    if config.method is None:
        raise ConfigError("no method: this entry point composes conf/evaluate.yaml (method=<one of conf/method/>)")
    validate(config)
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
    run_dir = rundir.run_dir_for(config.paths.runs_dir, config.run.group, resolve_run_name(cfg))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return PreparedEvaluation(config, resolved, suites, eval_data, pca_triplets, pca_file, run_dir)


def check_same_evaluation(run_dir: Path, resolved: dict) -> None:
    saved_file = run_dir / "config.json"
    if not saved_file.exists():
        return
    saved = json.loads(saved_file.read_text())
    differing = [k for k in EVALUATION_KEYS if saved.get(k) != resolved.get(k)]
    if differing:
        raise ConfigError(f"{run_dir} holds an evaluation with a different {', '.join(differing)} config; it is left "
                          f"untouched. Pick another run.name or run.group, or move that directory away.")


def device_for(want: str) -> torch.device:
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def uses_embed(config: Config) -> bool:
    return config.method.kind in ("prompt", "checkpoint", "contrastive_prompting")


class Evaluation:
    """One method evaluated inside its run directory."""

    def __init__(self, prep: PreparedEvaluation) -> None:
        self.prep = prep
        self.cfg = prep.config

    def cache_for(self, method) -> EmbeddingCache | None:
        if method.cache_key is None or not self.cfg.eval.cache_embeddings:
            return None
        cfg = self.cfg
        return EmbeddingCache(cfg.paths.cache_dir, {
            "backbone": backbone_fingerprint(cfg.backbone), "dtype": cfg.eval.dtype,
            "embed": self.prep.resolved["embed"], "max_length": cfg.eval.max_length, **method.cache_key})

    def execute(self) -> dict:
        cfg, prep, run_dir = self.cfg, self.prep, self.prep.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_json_atomic(run_dir / "config.json", prep.resolved)
        (run_dir / rundir.CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(prep.resolved)))
        superseded = rewind_metrics(run_dir, -1)  # records of an interrupted attempt
        if superseded:
            log.info("an earlier attempt's %d metric records moved to metrics.superseded.jsonl", superseded)
        run_logger = RunLogger(run_dir, cfg.logger, run_id=rundir.run_id_for(run_dir), group=cfg.run.group,
                               name=run_dir.name, config=prep.resolved)
        exit_code = 1
        try:
            if cfg.run.num_threads:
                torch.set_num_threads(cfg.run.num_threads)
            started = time.time()
            loaded = methods.load(cfg, device_for(cfg.run.device))
            encoder = SentenceEncoder(loaded.model, loaded.tokenizer, cfg.embed, batch_size=cfg.eval.batch_size,
                                      max_length=cfg.eval.max_length, method=loaded.method)
            cache = self.cache_for(loaded.method)
            if cache is not None:
                log.info("%d cached embeddings loaded from %s", cache.load_into(encoder), cache.folder)
            metrics = evaluate(encoder, prep.eval_data, prep.suites)
            artifacts = self.write_artifacts(encoder, loaded)
            if cache is not None:
                cache.save_from(encoder)
            metrics["eval/seconds"] = time.time() - started
            results = self.results(metrics, loaded.info, artifacts)
            run_logger.log(metrics, step=0, samples_seen=results["evaluations"][0]["samples_seen"])
            run_logger.summary(metrics)
            rundir.write_json_atomic(run_dir / rundir.RESULTS_FILE, results)
            exit_code = 0
            return results
        finally:
            run_logger.finish(exit_code)

    def write_artifacts(self, encoder: SentenceEncoder, loaded: methods.LoadedMethod) -> dict[str, str]:
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

    def results(self, metrics: dict, method_info: dict, artifacts: dict) -> dict:
        cfg, prep = self.cfg, self.prep
        # a training-free method saw no training sample; a checkpoint, what its run had seen (None: unknown, and
        # 0 on the logged step axis)
        trained = method_info.get("samples_seen", 0)
        evaluation = {"step": 0, "samples_seen": trained or 0, **metrics}
        e = cfg.eval
        return {
            "status": "finished",
            "kind": "evaluation",
            "run_dir": str(prep.run_dir),
            "group": cfg.run.group,
            "name": prep.run_dir.name,
            "method": cfg.method.name,
            "method_kind": cfg.method.kind,
            "method_info": method_info,
            "method_settings": dataclasses.asdict(method_settings(cfg)),
            "backbone": None if cfg.method.kind == "sbert" else cfg.backbone.name,
            "embed": cfg.embed.name if uses_embed(cfg) else None,
            "data_size": 0,
            "final_step": 0,
            "samples_seen": trained,
            "start": {},
            "final": metrics,
            "best_by_stsb_dev": evaluation if "eval/stsb_dev" in metrics else None,
            "evaluations": [evaluation],
            "suites": prep.suites,
            "artifacts": artifacts,
            "geometry_sample": GEOMETRY_SAMPLE_DOC.replace("N", str(e.geometry_sample)),
            "gar_sample": GAR_SAMPLE_DOC.replace("N", str(len(prep.eval_data.gar_sentences))),
            "gar_top_k": e.gar_top_k,
            "gar_match": e.gar_match,
            "versions": rundir.library_versions(),
            "git_commit": rundir.git_commit(),
            "config": prep.resolved,
        }


def summary_table(results: dict) -> Table:
    table = Table(title=f"{results['group']}/{results['name']}: method={results['method']}, "
                        f"backbone={results['backbone']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    final = results["final"]
    for name in [*SHORT_NAMES.values(), "sts_avg", "stsb_dev", "uniformity", "isotropy", "gar"]:
        value = final.get(f"eval/{name}")
        if value is not None:
            table.add_row(name, f"{value:.4f}" if name in ("uniformity", "isotropy", "gar") else f"{value:.2f}")
    return table


def run(cfg: DictConfig) -> dict:
    prep = prepare(cfg)
    if prep.config.run.skip_finished and rundir.is_finished(prep.run_dir):
        print(f"[sempa-exp] already finished, skipped: {prep.run_dir}")
        return rundir.read_results(prep.run_dir)
    check_same_evaluation(prep.run_dir, prep.resolved)
    results = Evaluation(prep).execute()
    Console().print(summary_table(results))
    return results


register_configs()
register_launcher_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    final = run(cfg).get("final", {})
    return final.get("eval/sts_avg", final.get("eval/stsb_dev"))


if __name__ == "__main__":
    sys.exit(main())
