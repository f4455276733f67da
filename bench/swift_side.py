"""The ms-swift side of ``bench/swift_reference.py``: SemPA's own DPO tool (ms-swift 3.10.1, ``swift rlhf --rlhf_type
dpo`` on TRL 0.24) run programmatically on CPU in fp32 on pairs written by the reference script.

Runs in the ms-swift virtualenv, never in the project's: it imports nothing from ``sempa_exp``, and the project
imports nothing from it. Started by ``bench/swift_reference.py`` as

    /work/swiftenv/bin/python bench/swift_side.py --spec SPEC.json --result RESULT.json

``SPEC.json`` (written by the reference script) names the project's de-quantized backbone folder, the pairs (JSONL in
the official ``trans_data.py`` format), the hyper-parameters, the initial LoRA tensors (safetensors, canonical names
``layers.<i>.<module path>.lora_A|lora_B``) and one token sequence with the project model's logits on it. This script

1. makes a copy of the backbone folder that transformers 4.57 reads as the project's transformers 5 reads the original
   (tokenizer class, top-level RoPE settings), and checks the logits of the model ms-swift loads against the project's;
2. builds ``SwiftRLHF`` (model, template in ``rlhf`` mode) and encodes every pair with ms-swift's template;
3. trains: the initial LoRA tensors are copied into ms-swift's PEFT model at ``on_train_begin`` (after the optimizer
   exists, before the first forward), and every step's loss, rewards and learning rate are recorded;
4. writes what it saw (token ids and labels, the trainer's effective settings, the log, the final LoRA tensors).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("USE_HF", "1")  # model ids are local folders; never reach ModelScope

LORA_KEY = re.compile(r"(layers\.\d+\..+)\.(lora_[AB])\.default\.weight$")


def canonical_lora_name(parameter_name: str) -> str | None:
    """``base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight`` ->
    ``layers.3.self_attn.q_proj.lora_A``
    (the same rule as the reference script's, so the two PEFT models are matched module by module)."""
    m = LORA_KEY.search(parameter_name)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def patch_model_dir(source: Path, target: Path) -> dict[str, Any]:
    """A folder with the same weights that transformers 4.57 loads as transformers 5 loads ``source``.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` (or ``GemmaTokenizer`` backed by tokenizer.json) and
    the RoPE settings under ``rope_parameters``; 4.57 knows neither and would silently fall back to its default RoPE
    bases. Returns what was changed."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    (target / "model.safetensors").symlink_to(source / "model.safetensors")
    for name in ("tokenizer.json", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, target / name)
    changes: dict[str, Any] = {}

    tok = json.loads((source / "tokenizer_config.json").read_text())
    old_class = tok.get("tokenizer_class")
    tok["tokenizer_class"] = {"TokenizersBackend": "PreTrainedTokenizerFast",
                              "GemmaTokenizer": "GemmaTokenizerFast"}.get(old_class, old_class)
    for key in ("backend", "is_local", "local_files_only"):
        tok.pop(key, None)
    if tok["tokenizer_class"] == "GemmaTokenizerFast":
        tok.update(add_bos_token=True, add_eos_token=False)  # Gemma's own defaults; the templates add <bos> themselves
    changes["tokenizer_class"] = [old_class, tok["tokenizer_class"]]
    (target / "tokenizer_config.json").write_text(json.dumps(tok, indent=1))

    config = json.loads((source / "config.json").read_text())
    rope = config.pop("rope_parameters", None)
    if rope is not None:
        if "rope_theta" in rope:  # one RoPE for every layer (Llama)
            if rope.get("rope_type", "default") != "default":
                raise SystemExit(f"unsupported RoPE {rope}")
            config["rope_theta"] = rope["rope_theta"]
        else:  # per layer type (Gemma 3): 4.57 names the sliding layers' base rope_local_base_freq
            for kind, params in rope.items():
                if params.get("rope_type", "default") != "default":
                    raise SystemExit(f"unsupported RoPE for {kind}: {params}")
            config["rope_theta"] = rope["full_attention"]["rope_theta"]
            config["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
            config["rope_scaling"] = None
        changes["rope"] = {k: config[k] for k in ("rope_theta", "rope_local_base_freq") if k in config}
    if "_sliding_window_pattern" in config:
        config["sliding_window_pattern"] = config.pop("_sliding_window_pattern")
        changes["sliding_window_pattern"] = config["sliding_window_pattern"]
    config["torch_dtype"] = config.pop("dtype", "float32")
    (target / "config.json").write_text(json.dumps(config, indent=1))
    return changes


def build_arguments(spec: dict, model_dir: Path):
    from swift.llm import RLHFArguments

    h = spec["hyper"]
    return RLHFArguments(
        rlhf_type="dpo", model=str(model_dir), model_type=spec["model_type"], template=spec["template"],
        dataset=[spec["jsonl"]], system=spec["system"],  # None for gemma3_text (the system is in the data)
        train_type="lora", lora_rank=h["lora_r"], lora_alpha=h["lora_alpha"], lora_dropout=h["lora_dropout"],
        target_modules=["all-linear"],
        torch_dtype="float32", fp16=False, bf16=False, use_cpu=True,  # float32 alone would turn fp16 on
        per_device_train_batch_size=h["batch"], gradient_accumulation_steps=h["accum"], max_steps=h["steps"],
        num_train_epochs=1, learning_rate=h["learning_rate"], warmup_ratio=h["warmup_ratio"],
        lr_scheduler_type=h["lr_scheduler"], weight_decay=h["weight_decay"], adam_beta1=h["adam_beta1"],
        adam_beta2=h["adam_beta2"], beta=h["beta"], loss_type="sigmoid", rpo_alpha=0.0,
        max_length=h["max_length"], seed=h["seed"], data_seed=h["seed"],
        dataset_shuffle=False, train_dataloader_shuffle=False,  # file order, as the project's sequential sampler
        split_dataset_ratio=0.0, load_from_cache_file=False, gradient_checkpointing=False,
        save_strategy="no", logging_steps=1, report_to=["none"], check_model=False, add_version=False,
        dataloader_num_workers=0, dataset_num_proc=1, output_dir=spec["output_dir"])


def logits_check(model, spec: dict) -> dict[str, Any]:
    """The base model's fp32 logits on the project's sequence, against the project model's."""
    import numpy as np
    import torch

    ids = torch.tensor([spec["check_ids"]])
    expected = np.load(spec["check_logits"])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float().numpy()
    model.train(was_training)
    diff = np.abs(logits - expected)
    return {"tokens": len(spec["check_ids"]), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "max_abs_logit": float(np.abs(expected).max()),
            "argmax_equal": bool((logits.argmax(-1) == expected.argmax(-1)).all())}


def encode_rows(template, rows: list[dict]) -> list[dict]:
    """ms-swift's encoding of each raw row (``rlhf`` mode): chosen/rejected ids and labels, or why it was dropped."""
    from swift.llm.template import MaxLengthError

    out = []
    for row in rows:
        try:
            enc = template.encode(json.loads(json.dumps(row)))  # a copy: the template edits messages in place
        except MaxLengthError as exc:
            out.append({"dropped": str(exc)})
            continue
        out.append({k: list(map(int, enc[k])) for k in
                    ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")})
    return out


class Recorder:
    """HF callback: loads the initial LoRA tensors at train begin, records the lr of every optimizer step and the
    logs. Built lazily so the module imports without transformers."""

    @staticmethod
    def make(init_lora: dict, record: dict):
        from transformers import TrainerCallback

        class _Recorder(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                import torch

                loaded = set()
                with torch.no_grad():
                    for name, param in model.named_parameters():
                        key = canonical_lora_name(name)
                        if key is None:
                            continue
                        if key not in init_lora:
                            raise SystemExit(f"ms-swift LoRA parameter {name} ({key}) has no initial tensor")
                        if tuple(param.shape) != tuple(init_lora[key].shape):
                            raise SystemExit(f"{key}: shape {tuple(param.shape)} vs {tuple(init_lora[key].shape)}")
                        param.copy_(init_lora[key].to(param.dtype))
                        loaded.add(key)
                missing = sorted(set(init_lora) - loaded)
                if missing:
                    raise SystemExit(f"initial LoRA tensors without an ms-swift parameter: {missing[:5]}...")
                record["lora_tensors_loaded"] = len(loaded)
                record["dropout_p"] = sorted({m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)})
                record["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

            def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
                # the lr this update used: the scheduler steps after this event
                record["lr_used"].append(optimizer.param_groups[0]["lr"])

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    record["logs"].append({"step": state.global_step, **logs})

        return _Recorder()


def effective_settings(trainer) -> dict[str, Any]:
    a = trainer.args
    return {
        "trainer_class": f"{type(trainer).__module__}.{type(trainer).__name__}",
        "beta": a.beta, "loss_type": a.loss_type, "rpo_alpha": a.rpo_alpha, "label_smoothing": a.label_smoothing,
        "disable_dropout": a.disable_dropout, "precompute_ref_log_probs": a.precompute_ref_log_probs,
        "learning_rate": a.learning_rate, "lr_scheduler_type": str(a.lr_scheduler_type),
        "warmup_ratio": a.warmup_ratio, "warmup_steps": a.get_warmup_steps(a.max_steps),
        "weight_decay": a.weight_decay, "adam_beta1": a.adam_beta1, "adam_beta2": a.adam_beta2,
        "adam_epsilon": a.adam_epsilon, "optim": str(a.optim), "max_grad_norm": a.max_grad_norm,
        "per_device_train_batch_size": a.per_device_train_batch_size,
        "gradient_accumulation_steps": a.gradient_accumulation_steps, "max_steps": a.max_steps,
        "bf16": a.bf16, "fp16": a.fp16, "gradient_checkpointing": a.gradient_checkpointing,
        "train_dataloader_shuffle": getattr(a, "train_dataloader_shuffle", None),
        "ref_model": None if trainer.ref_model is None else type(trainer.ref_model).__name__,
        "model_dtype": str(next(trainer.model.parameters()).dtype),
        "attn_implementation": trainer.model.config._attn_implementation,
        "lora_targets": sorted(trainer.model.peft_config["default"].target_modules),
        "lora_dropout_config": trainer.model.peft_config["default"].lora_dropout,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", required=True)
    p.add_argument("--result", required=True)
    args = p.parse_args()
    spec = json.loads(Path(args.spec).read_text())

    import swift
    import torch
    import transformers
    import trl
    from safetensors.torch import load_file, save_file
    from swift.llm.train.rlhf import SwiftRLHF

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    work = Path(spec["output_dir"])
    model_dir = work / "swift_model"
    result: dict[str, Any] = {
        "versions": {"ms-swift": swift.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "peft": __import__("peft").__version__, "torch": torch.__version__},
        "model_dir_changes": patch_model_dir(Path(spec["source_model"]), model_dir),
    }
    rows = [json.loads(line) for line in Path(spec["jsonl"]).read_text().splitlines() if line.strip()]

    started = time.perf_counter()
    pipe = SwiftRLHF(build_arguments(spec, model_dir))
    result["logits_check"] = logits_check(pipe.model, spec)
    result["attn_implementation_loaded"] = pipe.model.config._attn_implementation
    result["rope"] = {k: getattr(pipe.model.config, k, None) for k in ("rope_theta", "rope_local_base_freq")}
    result["encoded"] = encode_rows(pipe.template, rows)
    result["template"] = {"name": spec["template"], "mode": pipe.template.mode,
                          "default_system": pipe.template.template_meta.default_system}

    record: dict[str, Any] = {"lr_used": [], "logs": []}
    init_lora = load_file(spec["init_lora"])
    pipe.callbacks.append(Recorder.make(init_lora, record))
    captured: dict[str, Any] = {}
    train = pipe.train

    def train_and_capture(trainer):
        captured["trainer"] = trainer
        captured["settings"] = effective_settings(trainer)
        dataset = trainer.train_dataset
        captured["train_rows"] = [
            {k: list(map(int, dataset[i][k])) for k in
             ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}
            for i in range(len(dataset))]
        return train(trainer)

    pipe.train = train_and_capture
    pipe.main()
    train_s = time.perf_counter() - started
    trainer = captured["trainer"]
    final = {canonical_lora_name(n): p.detach().float().contiguous().clone()
             for n, p in trainer.model.named_parameters() if canonical_lora_name(n)}
    save_file(final, str(work / "swift_final_lora.safetensors"))
    result.update(
        settings=captured["settings"], train_rows=captured["train_rows"], record=record, seconds=train_s,
        final_lora=str(work / "swift_final_lora.safetensors"), threads=torch.get_num_threads(),
        loss_is_finite=all(math.isfinite(r["loss"]) for r in record["logs"]))
    Path(args.result).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
