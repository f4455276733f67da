"""Reference check against SemPA's own DPO tool: ms-swift 3.10.1 (``swift rlhf --rlhf_type dpo``, TRL 0.24) and this
framework's trainer, on the same pairs, the same initial LoRA weights and the same data order, in fp32 on CPU.

What it checks, for one backbone (``--backbone smollm2_135m`` or ``gemma3_270m``):

1. Data. The project's pairs (the Hydra config ``conf/config.yaml`` composed with ``backbone=<name>``,
   ``data.size=<pairs>``; ``sempa_exp.data.nli.load_triplets`` / ``subset`` / ``dpo_records``) against the official
   ``trans_data.py`` processing (pandas, ``str(sent0)``, stripped hypotheses) of the same CSV rows. The ms-swift side
   gets the official records, in ``trans_data.py``'s JSONL format, in the project's order. System prompt: SmolLM2
   (``chatml``) gets it as ``--system``, as ``run_dpo.sh`` passes it; ms-swift's ``gemma3_text`` template has no system
   slot (``--system`` raises an AssertionError), so for Gemma 3 it is a data-level ``{"role": "system"}`` message,
   which the template folds into the first user turn (``system + "\\n\\n" + query``).
2. Tokens. Every pair as ms-swift encodes it (its template in ``rlhf`` mode: ``chatml`` with model_type ``llama``
   for SmolLM2, ``gemma3_text`` for Gemma 3; both the template's own ``encode`` and the rows its trainer was given)
   against the rows the project's trainer trains on (``SempaObjective.build_trainer``: TRL tokenization, the
   completion cut after ``backbone.turn_end``, the length filter at ``trainer.max_length``). Equal when the full
   prompt+chosen and prompt+rejected ids are equal and the scored positions (ms-swift's labels != -100; the project's
   completion positions) are equal.
3. Dynamics. Both sides train ``--steps`` optimizer steps in fp32 (weights fp32, no bf16/fp16), dropout off, pairs in
   file order (ms-swift: ``dataset_shuffle=False, train_dataloader_shuffle=False``; the project's trainer gets a
   sequential sampler here, in the bench only), ``--batch`` x ``--accum`` pairs per step, the recipe's settings
   (lr 1e-4 cosine, warmup ratio 0.05, weight decay 0.1, Adam 0.9/0.95, beta 0.1 sigmoid, LoRA r8/alpha32 on every
   linear layer but the LM head), and the same initial LoRA tensors (A uniform(+-1/sqrt(fan_in)) from ``--lora-seed``,
   PEFT's own init rule; B zero as in PEFT unless ``--init-b-std``), copied into both PEFT models, matched by module
   name. Before training, the fp32 logits of the model ms-swift loads (a transformers 4.57 copy of the project's
   backbone folder) are compared with the project model's. Per step: the loss, rewards/chosen|rejected|margins|
   accuracies, and the learning rate each update used (recorded at the optimizer step on both sides; the lr that HF
   *logs* differs by design: transformers 5 logs the lr the step used, ms-swift logs the next one, after the
   scheduler step; both are saved). At the end, the largest difference between the two sides' LoRA tensors.
   The project precomputes its reference log-probs before training (its default); ms-swift computes them on the fly
   with the adapter disabled: the same maths.
4. ``--stsb-dev``: STS-B dev (the project's evaluator, fp32) of the project's final adapter and of ms-swift's final
   LoRA tensors copied into the same PEFT model.

Gemma 3: ms-swift loads it with eager attention (``get_model_tokenizer_gemma3_text``); the project's model is switched
to eager attention inside this bench only (``--project-attn``), and the report says which implementation each side
used.

Runs the project side in this venv and ``bench/swift_side.py`` with the ms-swift virtualenv (``--swift-python``),
one after the other (never both at once: the machine is small). Prints the token comparison and the per-step table
and writes ``bench/results_swift_<backbone short name>.json``.

    SEMPA_DATA_DIR=../shared/data /work/main/.venv/bin/python bench/swift_reference.py --backbone smollm2_135m \\
        [--pairs 64] [--steps 8] [--batch 8] [--accum 1] [--stsb-dev] [--swift-python /work/swiftenv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SWIFT_SIDE = Path(__file__).resolve().parent / "swift_side.py"
SHORT_NAMES = {"smollm2_135m": "smollm2", "gemma3_270m": "gemma3"}
# How ms-swift 3.10.1 is run for each backbone: model_type and template as run_dpo.sh would pick them for such a
# model, where the system prompt goes, and the attention implementation ms-swift's loader forces (None: HF default).
SWIFT_SETUP: dict[str, dict[str, Any]] = {
    "smollm2_135m": {"model_type": "llama", "template": "chatml", "system_in_data": False, "attn": None},
    "gemma3_270m": {"model_type": "gemma3_text", "template": "gemma3_text", "system_in_data": True, "attn": "eager"},
}
# trans_data.py, word for word (the project's template p1)
OFFICIAL_PROMPT = 'Keep the same meaning of this sentence: "{sent0}", while making some changes.'
TIE = 1e-5  # |mean reward margin| below this: a step whose margins are rounding noise (see diffs)
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "grad_norm")


# ------------------------------------------------------------------------------------------------------------ config


def compose(overrides: list[str]):
    """The project's Hydra config (conf/config.yaml) with these overrides, as a typed ``Config``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from sempa_exp.config.location import CONF_DIR
    from sempa_exp.config.registry import register_all

    register_all()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return OmegaConf.to_object(hydra_compose(config_name="config", overrides=overrides))


def overrides_for(args: argparse.Namespace, cache_dir: Path) -> list[str]:
    return [
        f"backbone={args.backbone}", f"data.size={args.pairs}", "logger=none", f"paths.cache_dir={cache_dir}",
        "backbone.dtype=float32", "trainer.bf16=false",
        f"trainer.per_device_batch_size={args.batch}", f"trainer.grad_accum_steps={args.accum}",
        f"trainer.max_steps={args.steps}", f"trainer.checkpoint_every_samples={args.batch * args.accum}",
        *args.override]


# -------------------------------------------------------------------------------------------------------------- data


def official_records(csv_path: Path) -> list[dict | None]:
    """trans_data.py over the CSV: one JSONL record per row, None where it skips the row."""
    import pandas as pd

    out: list[dict | None] = []
    for _, row in pd.read_csv(csv_path).iterrows():
        sent0 = str(row.get("sent0", ""))
        sent1 = str(row.get("sent1", "")).strip()
        hard_neg = str(row.get("hard_neg", "")).strip()
        if not (sent0 and sent1):
            out.append(None)
            continue
        out.append({"messages": [{"role": "user", "content": OFFICIAL_PROMPT.format(sent0=sent0)},
                                 {"role": "assistant", "content": sent1}],
                    "rejected_response": hard_neg})
    return out


def project_pairs(cfg) -> tuple[list, list, list[int] | None, Any, Path]:
    """All the project's usable triplets, the run's subset, the CSV rows the subset comes from (None when rows were
    skipped, so that the i-th usable triplet is no longer the i-th row), the cleaning report, the data file."""
    import numpy as np

    from sempa_exp.config.schema import data_dir
    from sempa_exp.data import nli

    source = nli.resolve_source(cfg.data, data_dir(cfg))
    triplets, report = nli.load_triplets(cfg.data, data_dir(cfg))
    chosen = nli.subset(triplets, cfg.data.size, cfg.data.subset_seed)
    rows = None
    if report.kept == report.rows_read:
        order = np.random.default_rng(cfg.data.subset_seed).permutation(len(triplets))[:cfg.data.size]
        if [triplets[i] for i in order] == chosen:  # nli.subset's rule, checked rather than assumed
            rows = [int(i) for i in order]
    return triplets, chosen, rows, report, source


def as_official(cfg, t) -> tuple[str, str, str]:
    from sempa_exp.data.prompts import fill

    return fill(cfg.template.text, t.premise), t.entailment, t.contradiction


def data_check(cfg, everything: list, triplets: list, rows: list[int] | None, source: Path
               ) -> tuple[list[dict], dict]:
    """The ms-swift JSONL records (trans_data.py's, for the rows the project selected) and how they compare with the
    project's triplets (the run's, and every row of the file)."""
    official = official_records(source)
    result: dict[str, Any] = {"source": str(source), "official_rows": len(official),
                              "official_skipped": sum(r is None for r in official)}
    if rows is not None and len(everything) == len(official):
        result["whole_file_rows_differing"] = sum(
            rec is None or as_official(cfg, t) != (rec["messages"][0]["content"], rec["messages"][1]["content"],
                                                   rec["rejected_response"])
            for t, rec in zip(everything, official, strict=True))
    if rows is None:
        result["mapping"] = "the project skipped rows: its triplets cannot be matched to CSV rows by index"
        records = [{"messages": [{"role": "user", "content": as_official(cfg, t)[0]},
                                 {"role": "assistant", "content": t.entailment}],
                    "rejected_response": t.contradiction} for t in triplets]
        result["records_from"] = "project triplets in trans_data.py's format"
        return records, result
    records, differing = [], []
    for k, (row, t) in enumerate(zip(rows, triplets, strict=True)):
        rec = official[row]
        if rec is None:
            differing.append({"pair": k, "row": row, "official": "skipped", "project": vars(t)})
            continue
        ours = as_official(cfg, t)
        theirs = (rec["messages"][0]["content"], rec["messages"][1]["content"], rec["rejected_response"])
        if ours != theirs:
            differing.append({"pair": k, "row": row, "official": theirs, "project": ours})
        records.append(rec)
    result.update(mapping="the i-th kept triplet is CSV row i (nothing skipped)", records_from="trans_data.py",
                  pairs_equal=len(triplets) - len(differing), pairs_differing=differing[:5],
                  n_differing=len(differing))
    return records, result


def swift_jsonl(records: list[dict], system: str, system_in_data: bool) -> list[dict]:
    if not system_in_data:
        return records
    return [{**r, "messages": [{"role": "system", "content": system}, *r["messages"]]} for r in records]


# ------------------------------------------------------------------------------------------------------------- LoRA


def canonical_lora_name(parameter_name: str) -> str | None:
    """``base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight`` ->
    ``layers.3.self_attn.q_proj.lora_A``
    (the rule of bench/swift_side.py, which matches ms-swift's PEFT model to the project's)."""
    import re

    m = re.search(r"(layers\.\d+\..+)\.(lora_[AB])\.default\.weight$", parameter_name)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def lora_tensors(model) -> dict:
    return {key: p.detach().float().clone().contiguous() for n, p in model.named_parameters()
            if (key := canonical_lora_name(n))}


def initial_lora(model, seed: int, b_std: float) -> dict:
    """PEFT's default LoRA init rule (A ~ kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), B = 0), from one seeded
    generator in name order, so both sides start from the same tensors. ``b_std`` > 0: B ~ N(0, b_std) instead."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in sorted(lora_tensors(model).items()):
        if key.endswith("lora_A"):
            bound = 1.0 / math.sqrt(t.shape[1])
            out[key] = (torch.rand(t.shape, generator=gen) * 2 - 1) * bound
        else:
            out[key] = torch.randn(t.shape, generator=gen) * b_std if b_std > 0 else torch.zeros(t.shape)
    return out


def load_lora(model, tensors: dict) -> int:
    import torch

    loaded = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = canonical_lora_name(name)
            if key is None:
                continue
            p.copy_(tensors[key].to(p.dtype))
            loaded += 1
    if loaded != len(tensors):
        raise SystemExit(f"loaded {loaded} LoRA tensors, expected {len(tensors)}")
    return loaded


# ------------------------------------------------------------------------------------------------------------ tokens


def project_rows(trainer) -> dict[int, dict]:
    """What the project's trainer trains on, per source pair: full ids and the scored-position mask."""
    from sempa_exp.objectives.dpo import SOURCE_ROW

    ds = trainer.train_dataset
    sources = ds[SOURCE_ROW] if SOURCE_ROW in ds.column_names else list(range(len(ds)))
    out = {}
    for src, p, c, r in zip(sources, ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True):
        out[int(src)] = {"chosen_ids": p + c, "chosen_mask": [0] * len(p) + [1] * len(c),
                         "rejected_ids": p + r, "rejected_mask": [0] * len(p) + [1] * len(r)}
    return out


def swift_row(enc: dict) -> dict:
    out = {}
    for side in ("chosen", "rejected"):
        ids, labels = enc[f"{side}_input_ids"], enc[f"{side}_labels"]
        bad = [t for t, (i, lab) in enumerate(zip(ids, labels, strict=True)) if lab != -100 and lab != i]
        if bad:
            raise SystemExit(f"ms-swift label differs from its input id at {bad[:3]}")
        out[f"{side}_ids"] = ids
        out[f"{side}_mask"] = [int(lab != -100) for lab in labels]
    return out


def first_difference(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def compare_tokens(project: dict[int, dict], swift: list[dict], tokenizer) -> dict:
    identical, first = 0, None
    dropped = {"project": sorted(set(range(len(swift))) - set(project)),
               "swift": [i for i, e in enumerate(swift) if "dropped" in e]}
    for k, enc in enumerate(swift):
        if "dropped" in enc or k not in project:
            continue
        s, p = swift_row(enc), project[k]
        problem = None
        for side in ("chosen", "rejected"):
            if s[f"{side}_ids"] != p[f"{side}_ids"]:
                at = first_difference(s[f"{side}_ids"], p[f"{side}_ids"])
                problem = {"what": f"{side} ids", "at": at, "swift": tokenizer.decode(s[f"{side}_ids"][at:at + 8]),
                           "project": tokenizer.decode(p[f"{side}_ids"][at:at + 8])}
                break
            if s[f"{side}_mask"] != p[f"{side}_mask"]:
                at = first_difference(s[f"{side}_mask"], p[f"{side}_mask"])
                ids = s[f"{side}_ids"]
                problem = {"what": f"{side} scored positions", "at": at,
                           "swift_scored": tokenizer.decode([i for i, m in zip(ids, s[f"{side}_mask"]) if m]),
                           "project_scored": tokenizer.decode([i for i, m in zip(ids, p[f"{side}_mask"]) if m])}
                break
        if problem is None:
            identical += 1
        elif first is None:
            first = {"pair": k, **problem}
    compared = len(swift) - len(set(dropped["project"]) | set(dropped["swift"]))
    example = next((swift_row(e) for e in swift if "dropped" not in e), None)
    shown = None
    if example:
        ids, mask = example["chosen_ids"], example["chosen_mask"]
        shown = {"text": tokenizer.decode(ids), "scored": tokenizer.decode([i for i, m in zip(ids, mask) if m]),
                 "scored_ids": [i for i, m in zip(ids, mask) if m]}
    return {"pairs": len(swift), "compared": compared, "identical": identical, "first_difference": first,
            "dropped": dropped, "example_pair0_chosen": shown}


# ------------------------------------------------------------------------------------------------------ both sides


def project_logits(model, tokenizer, record: dict) -> tuple[list[int], Any]:
    import torch

    text = tokenizer.apply_chat_template(record["prompt"] + record["chosen"], tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
    return ids, logits


def make_recorder(record: dict):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            record["lr_used"].append(optimizer.param_groups[0]["lr"])  # the scheduler steps after this event

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record["logs"].append({"step": state.global_step, **logs})

    return Recorder()


def project_settings(trainer) -> dict[str, Any]:
    import torch

    a = trainer.args
    model = trainer.model
    return {
        "trainer_class": f"{type(trainer).__module__}.{type(trainer).__name__}",
        "beta": a.beta, "loss_type": a.loss_type, "disable_dropout": a.disable_dropout,
        "precompute_ref_log_probs": a.precompute_ref_log_probs, "learning_rate": a.learning_rate,
        "lr_scheduler_type": str(a.lr_scheduler_type), "warmup_steps": a.get_warmup_steps(a.max_steps),
        "weight_decay": a.weight_decay, "adam_beta1": a.adam_beta1, "adam_beta2": a.adam_beta2,
        "adam_epsilon": a.adam_epsilon, "optim": str(a.optim), "max_grad_norm": a.max_grad_norm,
        "per_device_train_batch_size": a.per_device_train_batch_size,
        "gradient_accumulation_steps": a.gradient_accumulation_steps, "max_steps": a.max_steps,
        "max_length": a.max_length, "bf16": a.bf16, "fp16": a.fp16, "gradient_checkpointing": a.gradient_checkpointing,
        "model_dtype": str(next(model.parameters()).dtype),
        "attn_implementation": model.config._attn_implementation,
        "lora_targets": sorted(model.peft_config["default"].target_modules),
        "lora_dropout_config": model.peft_config["default"].lora_dropout,
        "dropout_p": sorted({m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "turn_end_ids": trainer.turn_end,
    }


def run_swift(python: str, spec: dict, work: Path, verbose: bool) -> dict:
    spec_file, result_file = work / "swift_spec.json", work / "swift_result.json"
    spec_file.write_text(json.dumps(spec))
    cmd = [python, str(SWIFT_SIDE), "--spec", str(spec_file), "--result", str(result_file)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    print(f"[swift] {' '.join(cmd)} (log: {work / 'swift.log'})", flush=True)
    with open(work / "swift.log", "w") as log:
        out = None if verbose else log
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=out)
    if done.returncode != 0:
        tail = (work / "swift.log").read_text()[-4000:] if not verbose else ""
        raise SystemExit(f"the ms-swift side failed (exit {done.returncode}):\n{tail}")
    return json.loads(result_file.read_text())


def stsb_dev(cfg, model, tokenizer) -> float:
    from sempa_exp.config.schema import data_dir
    from sempa_exp.embedding.encoder import SentenceEncoder
    from sempa_exp.evaluation.suites import evaluate, load_eval_data

    data = load_eval_data(data_dir(cfg), ["stsb_dev"])
    encoder = SentenceEncoder(model, tokenizer, cfg.embed, batch_size=cfg.eval.batch_size,
                              max_length=cfg.eval.max_length, progress=False)
    was_training = model.training
    model.eval()
    try:
        return evaluate(encoder, data, ["stsb_dev"])["eval/stsb_dev"]
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------- report


def per_step(record: dict) -> list[dict]:
    rows = []
    for i, log in enumerate(record["logs"]):
        row = {k: log.get(k) for k in METRICS}
        row.update(step=log["step"], lr_logged=log.get("learning_rate"),
                   lr_used=record["lr_used"][i] if i < len(record["lr_used"]) else None)
        rows.append(row)
    return rows


def diffs(swift: list[dict], project: list[dict]) -> dict[str, float]:
    out = {}
    for key in (*METRICS, "lr_used"):
        pairs = [(s[key], p[key]) for s, p in zip(swift, project, strict=False)
                 if s.get(key) is not None and p.get(key) is not None]
        if pairs:
            out[key] = max(abs(a - b) for a, b in pairs)
    # A pair's accuracy is (chosen reward > rejected reward), strictly: where the margins are ties (B = 0 before the
    # first update, lr 0 in the warmup step) ms-swift's rewards are exactly 0 and the project's, with reference
    # log-probs from another batch, are +-1e-7 of rounding, so the count there is noise on one side.
    decided = [(s["rewards/accuracies"], p["rewards/accuracies"]) for s, p in zip(swift, project, strict=False)
               if abs(s["rewards/margins"]) > TIE]
    if decided:
        out["rewards/accuracies (steps without ties)"] = max(abs(a - b) for a, b in decided)
    return out


def print_table(swift: list[dict], project: list[dict]) -> None:
    head = (f"{'step':>4} | {'swift loss':>10} | {'project loss':>12} | {'|diff|':>8} | {'swift margin':>12} | "
            f"{'project margin':>14} | {'|diff|':>8} | {'lr swift':>9} | {'lr project':>10}")
    print(head)
    print("-" * len(head))
    for s, p in zip(swift, project, strict=False):
        print(f"{s['step']:4d} | {s['loss']:10.7f} | {p['loss']:12.7f} | {abs(s['loss'] - p['loss']):8.1e} | "
              f"{s['rewards/margins']:12.7f} | {p['rewards/margins']:14.7f} | "
              f"{abs(s['rewards/margins'] - p['rewards/margins']):8.1e} | {s['lr_used']:9.3e} | {p['lr_used']:10.3e}")


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    return {"transformers": transformers.__version__, "trl": trl.__version__, "peft": peft.__version__,
            "torch": torch.__version__}


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src", "conf"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + (" + uncommitted changes in src/ or conf/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers.trainer_utils import SaveStrategy

    from sempa_exp.config.schema import validate
    from sempa_exp.models.backbones import load_backbone, model_path
    from sempa_exp.objectives.base import build_objective

    if args.threads:
        torch.set_num_threads(args.threads)
    setup = SWIFT_SETUP[args.backbone]
    work = Path(tempfile.mkdtemp(prefix=f"swift-ref-{SHORT_NAMES[args.backbone]}-", dir=args.workdir))
    # The converted backbones (and assembled GGUF files) are shared; the prepared-data cache starts empty, so the
    # project's tokenization runs here, not read from an earlier run.
    base_cache = Path(os.environ.get("SEMPA_CACHE_DIR", "~/.cache/sempa_exp")).expanduser()
    cache = work / "cache"
    cache.mkdir()
    for sub in ("backbones", "gguf"):
        if (base_cache / sub).exists():
            (cache / sub).symlink_to(base_cache / sub)
    cfg = compose(overrides_for(args, cache))
    validate(cfg)
    if cfg.template.name != "p1":
        raise SystemExit("trans_data.py writes the P1 instruction: keep template=p1")
    started = time.perf_counter()

    # 1. data -------------------------------------------------------------------------------------------------
    everything, triplets, rows, report, source = project_pairs(cfg)
    records, data = data_check(cfg, everything, triplets, rows, source)
    data["cleaning"] = report.summary()
    jsonl = work / "pairs.jsonl"
    swift_records = swift_jsonl(records, cfg.data.system_prompt, setup["system_in_data"])
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in swift_records))
    objective = build_objective(cfg)
    dataset = objective.dataset(cfg, triplets)
    print(f"[data] ms-swift gets {len(swift_records)} records in trans_data.py's format ({data['records_from']}); "
          f"system prompt {cfg.data.system_prompt!r} passed as "
          + ("a data-level system message: ms-swift's gemma3_text template has no system slot (--system asserts) "
             "and folds it into the first user turn" if setup["system_in_data"] else "--system, as run_dpo.sh does"))
    print(f"[data] {report.summary()}; {len(triplets)} pairs; project triplets vs trans_data.py rows: "
          f"{data.get('pairs_equal', '-')} equal, {data.get('n_differing', '-')} differ (whole file: "
          f"{data.get('whole_file_rows_differing', '-')} of {len(everything)} rows differ)", flush=True)

    # 2. project model, logits, trainer (tokenization, turn-end cut, length filter, reference log-probs) -------------
    import numpy as np

    model, tokenizer = load_backbone(cfg.backbone, cfg.paths.cache_dir)
    attention: dict[str, Any] = {"project_default": model.config._attn_implementation}
    wanted = setup["attn"] if args.project_attn == "match" else None if args.project_attn == "default" \
        else args.project_attn
    if wanted and wanted != attention["project_default"]:
        _, default_logits = project_logits(model, tokenizer, dataset[0])
        model.set_attn_implementation(wanted)
    check_ids, check_logits = project_logits(model, tokenizer, dataset[0])
    if wanted and wanted != attention["project_default"]:
        # what the switch itself changes, on the project's side: the size of the attention kernels' rounding
        attention[f"project_logits_max_abs_diff_{attention['project_default']}_vs_{wanted}"] = float(
            np.abs(default_logits - check_logits).max())
    np.save(work / "project_logits.npy", check_logits)
    model.train()
    record: dict[str, Any] = {"lr_used": [], "logs": []}
    trainer = objective.build_trainer(cfg, model, tokenizer, dataset, work / "project_out", [make_recorder(record)],
                                      world_size=1, use_cpu=True)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    trainer.args.save_strategy = SaveStrategy.NO  # nothing to resume here
    init = initial_lora(trainer.model, args.lora_seed, args.init_b_std)
    load_lora(trainer.model, init)
    save_file(init, str(work / "init_lora.safetensors"))
    project = project_rows(trainer)
    built_s = time.perf_counter() - started

    # 3. ms-swift: logits, encoding, training -------------------------------------------------------------------
    t = cfg.trainer
    spec = {
        "source_model": model_path(cfg.backbone, Path(cfg.paths.cache_dir).expanduser()),
        "model_type": setup["model_type"], "template": setup["template"],
        "system": None if setup["system_in_data"] else cfg.data.system_prompt,
        "jsonl": str(jsonl), "output_dir": str(work / "swift_out"), "init_lora": str(work / "init_lora.safetensors"),
        "check_ids": check_ids, "check_logits": str(work / "project_logits.npy"), "threads": args.threads,
        "steps": args.steps,
        "hyper": {"batch": args.batch, "accum": args.accum, "steps": args.steps, "learning_rate": t.learning_rate,
                  "warmup_ratio": t.warmup_ratio, "lr_scheduler": t.lr_scheduler, "weight_decay": t.weight_decay,
                  "adam_beta1": t.adam_beta1, "adam_beta2": t.adam_beta2, "beta": cfg.objective.beta,
                  "max_length": t.max_length, "seed": cfg.seed, "lora_r": cfg.lora.r, "lora_alpha": cfg.lora.alpha,
                  "lora_dropout": cfg.lora.dropout},
    }
    (work / "swift_out").mkdir()
    swift = run_swift(args.swift_python, spec, work, args.verbose)
    print(f"[swift] done in {swift['seconds']:.0f} s; logits max |swift - project| = "
          f"{swift['logits_check']['max_abs_diff']:.2e} over {swift['logits_check']['tokens']} tokens "
          f"(attention: swift {swift['attn_implementation_loaded']}, project {model.config._attn_implementation})",
          flush=True)

    # 4. tokens -----------------------------------------------------------------------------------------------------
    tokens = compare_tokens(project, swift["encoded"], tokenizer)
    trained_rows = [swift_row(r) for r in swift["train_rows"]]
    encoded_rows = [swift_row(e) for e in swift["encoded"] if "dropped" not in e]
    tokens["swift_trainer_rows_equal_template_encode"] = trained_rows == encoded_rows
    print(f"\n[tokens] {tokens['identical']} of {tokens['compared']} pairs identical (full prompt+chosen and "
          f"prompt+rejected ids, and the scored positions); dropped by length: project {tokens['dropped']['project']}, "
          f"swift {tokens['dropped']['swift']}; ms-swift's trainer rows == its template's encode: "
          f"{tokens['swift_trainer_rows_equal_template_encode']}")
    if tokens["first_difference"]:
        print(f"[tokens] first difference: {json.dumps(tokens['first_difference'], ensure_ascii=False)}")
    if tokens["example_pair0_chosen"]:
        ex = tokens["example_pair0_chosen"]
        print(f"[tokens] pair 0, chosen, as both encode it: {ex['text']!r}\n[tokens] scored: {ex['scored']!r} "
              f"{ex['scored_ids']}")

    # 5. project training ---------------------------------------------------------------------------------------------
    train_started = time.perf_counter()
    trainer.train()
    project_train_s = time.perf_counter() - train_started
    final_project = lora_tensors(trainer.model)
    final_swift = load_file(swift["final_lora"])
    lora_diff = max(float((final_project[k] - final_swift[k]).abs().max()) for k in final_project)
    lora_scale = max(float(v.abs().max()) for v in final_project.values())

    swift_steps, project_steps = per_step(swift["record"]), per_step(record)
    max_diffs = diffs(swift_steps, project_steps)
    b_init = f"N(0, {args.init_b_std:g})" if args.init_b_std else "= 0"
    print(f"\n{args.backbone}: {len(triplets)} pairs, {args.steps} steps of {args.batch} x {args.accum} pairs, fp32, "
          f"dropout off, same initial LoRA (B {b_init}); "
          "lr = the lr each update used (recorded at the optimizer step on both sides)")
    print_table(swift_steps, project_steps)
    print("rewards/accuracies per step: swift " + " ".join(f"{s['rewards/accuracies']:.3f}" for s in swift_steps)
          + "; project " + " ".join(f"{p['rewards/accuracies']:.3f}" for p in project_steps))
    print("max |swift - project|: " + ", ".join(f"{k} {v:.2e}" for k, v in max_diffs.items()))
    print(f"final LoRA tensors: max |swift - project| = {lora_diff:.2e} (largest |value| {lora_scale:.3f})")
    print("logged learning_rate (HF): swift " + " ".join(f"{s['lr_logged']:.3e}" for s in swift_steps)
          + " (after the scheduler step); project " + " ".join(f"{p['lr_logged']:.3e}" for p in project_steps)
          + " (the lr the step used)")

    settings = {"swift": swift["settings"], "project": project_settings(trainer)}
    same = ("beta", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
            "warmup_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
            "model_dtype", "attn_implementation", "lora_targets")
    settings["differing"] = {k: [settings["swift"].get(k), settings["project"].get(k)] for k in same
                             if settings["swift"].get(k) != settings["project"].get(k)}
    settings["swift_dropout_p_at_train_begin"] = swift["record"].get("dropout_p")
    print(f"settings that differ between the trainers: {settings['differing'] or 'none'}; dropout p at train time: "
          f"swift {swift['record'].get('dropout_p')}, project {settings['project']['dropout_p']}")

    result = {
        "command": " ".join([f"SEMPA_DATA_DIR={os.environ.get('SEMPA_DATA_DIR', '')}", sys.executable, *sys.argv]),
        "backbone": args.backbone, "pairs": len(triplets), "steps": args.steps, "batch": args.batch,
        "accum": args.accum, "lora_seed": args.lora_seed, "init_b_std": args.init_b_std,
        "git": git_state(),
        "versions": {"project": versions(), "swift": swift["versions"]},
        "swift_setup": {**setup, "system_passed_as": "data-level system message (folded into the first user turn)"
                        if setup["system_in_data"] else "--system",
                        "model_dir_changes": swift["model_dir_changes"], "rope_loaded": swift["rope"],
                        "template": swift["template"]},
        "attention": {"swift": swift["attn_implementation_loaded"], "project": model.config._attn_implementation,
                      "project_switched_in_bench": model.config._attn_implementation != attention["project_default"],
                      **attention},
        "data": data, "logits_check": swift["logits_check"], "tokens": tokens, "settings": settings,
        "steps_swift": swift_steps, "steps_project": project_steps, "max_abs_diff": max_diffs,
        "final_lora_max_abs_diff": lora_diff, "final_lora_max_abs_value": lora_scale,
        "seconds": {"project_build": built_s, "swift_total": swift["seconds"], "project_train": project_train_s},
        "threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
    }

    write_result(result, args)  # before the (slow) optional evaluation, which rewrites it
    # 6. STS-B dev (optional) ---------------------------------------------------------------------------------------
    if args.stsb_dev:
        eval_started = time.perf_counter()
        scores = {"project": stsb_dev(cfg, trainer.model, tokenizer)}
        load_lora(trainer.model, final_swift)
        scores["swift"] = stsb_dev(cfg, trainer.model, tokenizer)
        result["stsb_dev"] = scores
        result["seconds"]["stsb_dev_both"] = time.perf_counter() - eval_started
        print(f"STS-B dev (fp32, project evaluator): project adapter {scores['project']:.4f}, ms-swift adapter "
              f"{scores['swift']:.4f}")
    if args.keep_workdir:
        result["workdir"] = str(work)
    else:
        shutil.rmtree(work)
    write_result(result, args)
    return result


def result_path(args: argparse.Namespace) -> Path:
    return Path(args.out or Path(__file__).resolve().parent / f"results_swift_{SHORT_NAMES[args.backbone]}.json")


def write_result(result: dict, args: argparse.Namespace) -> None:
    result_path(args).write_text(json.dumps(result, indent=1, ensure_ascii=False))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=sorted(SWIFT_SETUP), default="smollm2_135m")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="pairs per device batch")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--lora-seed", type=int, default=0, help="seed of the shared initial LoRA A tensors")
    p.add_argument("--init-b-std", type=float, default=0.0,
                   help="start LoRA B from N(0, std) instead of PEFT's zeros (a stronger check of the forward)")
    p.add_argument("--project-attn", default="match", choices=["match", "default", "eager", "sdpa"],
                   help="the project model's attention: 'match' = what ms-swift forces (eager for Gemma 3)")
    p.add_argument("--stsb-dev", action="store_true", help="also score both final adapters on STS-B dev")
    p.add_argument("--swift-python", default="/work/swiftenv/bin/python")
    p.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0: torch's default)")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument("--workdir", default=None, help="where the temporary folder goes (default: the system's)")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the temporary folder (pairs JSONL, ms-swift log and result, LoRA tensors)")
    p.add_argument("--out", help="results JSON (default bench/results_swift_<backbone>.json)")
    p.add_argument("--verbose", action="store_true", help="show the ms-swift side's output")
    args = p.parse_args()
    run(args)
    print(f"\nwrote {result_path(args)}")


if __name__ == "__main__":
    main()
