"""LoRA-DPO throughput: a plain TRL ``DPOTrainer`` (TRL's defaults + the recipe) vs this framework's trainer.

Both sides train SmolLM2-135M on the project's NLI pairs (the same subset, in the same order), with the same LoRA
(r 8, alpha 32, dropout 0.05, all linear layers), the recipe's optimiser and schedule, the same batch, seed and data
seed, for ``--steps`` optimizer steps; each side runs in its own process (peak RSS = that process's ru_maxrss).

* ``trl``: ``DPOTrainer(model=<path>, peft_config=...)`` and a ``DPOConfig`` that sets only the recipe (beta 0.1,
  sigmoid, lr 1e-4, 5 % warmup, cosine, weight decay 0.1, Adam betas 0.9/0.95, max_length 256), the batch, the
  seeds and the step count. Everything else is TRL's default: fp32 weights, bf16 autocast, gradient checkpointing,
  the reference log-probs recomputed every step, the LM head over every position. One exception, for the losses to
  be comparable: ``disable_dropout=False``. TRL's default (True) would silently turn the recipe's LoRA dropout off,
  i.e. train a different LoRA; with it on, both sides draw the same dropout masks.
* ``trl_bf16``: the same, with the weights loaded in bf16 (``model_init_kwargs``). Not a competitor: the yardstick
  of numerical noise. Its loss differences to ``trl`` are what bf16 rounding alone does to the trajectory.
* ``ours``: ``SempaObjective.build_trainer`` on the config ``trainer=cpu`` (plus the batch/steps overrides),
  i.e. the framework's defaults: bf16 weights, no gradient checkpointing, reference log-probs precomputed in
  length-sorted batches and cached on disk, completion-only LM head, micro-batches of a step regrouped by length.
  ``cold``: an empty cache; tokenization and the reference log-probs are part of its construction. ``warm``: a later
  run of the same sweep, reading both from disk. By default ``cold`` only builds its trainer (its train() is warm's
  computation, the same numbers: tests/test_perf.py); its end-to-end figure is its construction + warm's train().

Prints pairs/s (end to end from trainer construction, model loading included, and for ``train()`` alone; also per
CPU-second, less sensitive to other jobs on a shared machine), the speed-ups, the per-step losses side by side with
the largest absolute difference, and peak RSS.

    SEMPA_DATA_DIR=/work/shared/data SEMPA_CACHE_DIR=/tmp/cache \\
        python bench/dpo_throughput.py [--steps 40] [--batch 4] [--accum 1] [--sides trl,trl_bf16,cold,warm] \\
        [--variant NAME:OVERRIDE[;OVERRIDE...]] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from sempa_exp.config.location import CONF_DIR
    from sempa_exp.config.registry import register_all

    register_all()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return OmegaConf.to_object(hydra_compose(config_name="config", overrides=overrides))


def config_for(args: argparse.Namespace, cache_dir: str):
    return compose([
        "trainer=cpu", f"trainer.per_device_batch_size={args.batch}", f"trainer.grad_accum_steps={args.accum}",
        f"trainer.max_steps={args.steps}", f"trainer.checkpoint_every_samples={args.batch * args.accum}",
        f"data.size={args.steps * args.batch * args.accum}", "logger=none", f"paths.cache_dir={cache_dir}",
        *args.override])


def pairs(cfg):
    """The run's preference records: the framework's subset of the NLI triplets, in its order."""
    from sempa_exp.config.schema import data_dir
    from sempa_exp.data import nli
    from sempa_exp.objectives.base import build_objective

    triplets, _ = nli.read_triplets(nli.resolve_source(cfg.data, data_dir(cfg)), cfg.data.max_sentence_chars)
    return build_objective(cfg).dataset(cfg, nli.subset(triplets, cfg.data.size, cfg.data.subset_seed))


def run_trl(cfg, out_dir: Path, weights_dtype: str | None = None):
    from trl import DPOConfig, DPOTrainer

    from sempa_exp.models.backbones import model_path
    from sempa_exp.objectives.recipe import peft_config

    t, o = cfg.trainer, cfg.objective
    dataset = pairs(cfg)
    path = model_path(cfg.backbone, Path(cfg.paths.cache_dir).expanduser())  # the converted SmolLM2 folder
    args = DPOConfig(
        output_dir=str(out_dir), beta=o.beta, loss_type=o.loss_type, learning_rate=t.learning_rate,
        warmup_steps=t.warmup_ratio, lr_scheduler_type=t.lr_scheduler, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, max_length=t.max_length,
        per_device_train_batch_size=t.per_device_batch_size, gradient_accumulation_steps=t.grad_accum_steps,
        max_steps=t.max_steps, seed=cfg.seed, data_seed=cfg.seed, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, disable_dropout=False,
        model_init_kwargs={"dtype": weights_dtype} if weights_dtype else None)
    started = time.perf_counter()
    trainer = DPOTrainer(model=path, args=args, train_dataset=dataset, peft_config=peft_config(cfg))
    return trainer, started


def run_ours(cfg, out_dir: Path):
    import torch

    from sempa_exp.models.backbones import load_backbone
    from sempa_exp.objectives.base import build_objective

    dataset = pairs(cfg)
    started = time.perf_counter()  # like the TRL side, which loads the model inside DPOTrainer
    model, tokenizer = load_backbone(cfg.backbone, cfg.paths.cache_dir)
    model.to(torch.device("cpu"))
    trainer = build_objective(cfg).build_trainer(cfg, model, tokenizer, dataset, out_dir, [], world_size=1,
                                                use_cpu=True)
    return trainer, started


def child(args: argparse.Namespace) -> None:
    import torch

    cache_dir = args.cache_dir or os.environ.get("SEMPA_CACHE_DIR", "~/.cache/sempa_exp")
    cfg = config_for(args, cache_dir)
    load_before = os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = [time.process_time()]
    with tempfile.TemporaryDirectory() as tmp:
        if args.side == "ours":
            trainer, started = run_ours(cfg, Path(tmp))
        else:
            trainer, started = run_trl(cfg, Path(tmp), "bfloat16" if args.side == "trl_bf16" else None)
        built = time.perf_counter()
        cpu.append(time.process_time())
        if not args.construct_only:
            trainer.train()
        finished = time.perf_counter()
        cpu.append(time.process_time())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    steps = cfg.trainer.max_steps if args.construct_only else trainer.state.global_step
    samples = steps * cfg.trainer.per_device_batch_size * cfg.trainer.grad_accum_steps
    result = {
        "side": args.side,
        "steps": steps,
        "samples": samples,
        "tokens": logs[-1].get("num_tokens") if logs else None,
        "construct_s": built - started,
        "train_s": None if args.construct_only else finished - built,
        # CPU seconds of this process (all its threads): less sensitive than wall time to other jobs on the machine
        "construct_cpu_s": cpu[1] - cpu[0],
        "train_cpu_s": None if args.construct_only else cpu[2] - cpu[1],
        "losses": [h["loss"] for h in logs],
        "logs": logs,  # TRL's per-step records (logps, rewards, grad norm): where losses differ, these say why
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "threads": torch.get_num_threads(),
        "loadavg_1min": [load_before, os.getloadavg()[0]],  # the machine is shared: context for the timings
        "cache_events": getattr(getattr(trainer, "data_cache", None), "last_event", None),
    }
    Path(args.result).write_text(json.dumps(result))


SIDES = {"trl": "trl", "trl_bf16": "trl_bf16", "cold": "ours", "warm": "ours"}


def parent(args: argparse.Namespace) -> dict:
    cache_root = Path(tempfile.mkdtemp(prefix="dpo-bench-cache-"))
    # The converted backbone is reused from SEMPA_CACHE_DIR; the prepared-data cache starts empty for "cold".
    base_cache = Path(os.environ.get("SEMPA_CACHE_DIR", "~/.cache/sempa_exp")).expanduser()
    if (base_cache / "backbones").exists():
        (cache_root / "backbones").symlink_to(base_cache / "backbones")
    results = {}
    runs = [(name, SIDES[name], args.override) for name in args.sides.split(",") if name]
    if "cold" in args.sides.split(",") and "warm" in args.sides.split(",") and not args.cold_train:
        # cold's train() is warm's computation (same batches, same losses: tests/test_perf.py); time it once
        runs = [(n, side, o + (["--construct-only"] if n == "cold" else [])) for n, side, o in runs]
    for spec in args.variant:  # NAME:OVERRIDE[;OVERRIDE...], an extra "ours" side on the same cache
        name, _, overrides = spec.partition(":")
        runs.append((name, "ours", [*args.override, *[o for o in overrides.split(";") if o]]))
    for name, side, overrides in runs:
        result_file = cache_root / f"{name}.json"
        cmd = [sys.executable, __file__, "--side", side, "--result", str(result_file),
               "--cache-dir", str(cache_root), "--steps", str(args.steps), "--batch", str(args.batch),
               "--accum", str(args.accum), "--threads", str(args.threads or 0),
               *[a for o in overrides if o != "--construct-only" for a in ("--override", o)],
               *(["--construct-only"] if "--construct-only" in overrides else [])]
        print(f"[bench] {name}: {' '.join(cmd[1:])}", flush=True)
        with open(cache_root / f"{name}.log", "w") as child_log:
            out = None if args.verbose else child_log
            subprocess.run(cmd, check=True, cwd=REPO, stdout=out, stderr=out)
        results[name] = json.loads(result_file.read_text())
        r = results[name]
        train = "not run" if r["train_s"] is None else f"{r['train_s']:.1f} s"
        print(f"[bench] {name}: {r['samples']} pairs, construct {r['construct_s']:.1f} s, train {train}, "
              f"peak RSS {r['peak_rss_gb']:.2f} GB, cache {r['cache_events']}, "
              f"load average {r['loadavg_1min'][0]:.1f} -> {r['loadavg_1min'][1]:.1f}", flush=True)
    if results.get("cold", {}).get("train_s", 0) is None:
        warm = results["warm"]
        results["cold"].update(train_s=warm["train_s"], train_cpu_s=warm["train_cpu_s"], losses=warm["losses"],
                               tokens=warm["tokens"], train_from="warm")
    report(results, args)
    return results


def report(results: dict, args: argparse.Namespace) -> None:
    import platform

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {next(iter(results.values()))['threads']}; "
          f"batch {args.batch} x {args.accum} = {args.batch * args.accum} pairs/step, {args.steps} steps")
    print(f"{'side':<9} {'pairs/s end-to-end':>19} {'pairs/s train()':>16} {'pairs/CPU-s e2e':>16} "
          f"{'construct s':>12} {'train s':>9} {'tokens/s':>9} {'peak RSS GB':>12}")
    for name, r in results.items():
        total = r["construct_s"] + r["train_s"]
        tokens = f"{r['tokens'] / r['train_s']:9.0f}" if r["tokens"] else f"{'-':>9}"
        name = name + "*" if r.get("train_from") else name
        print(f"{name:<9} {r['samples'] / total:19.3f} {r['samples'] / r['train_s']:16.3f} "
              f"{r['samples'] / (r['construct_cpu_s'] + r['train_cpu_s']):16.3f} {r['construct_s']:12.1f} "
              f"{r['train_s']:9.1f} {tokens} {r['peak_rss_gb']:12.2f}")
    if any(r.get("train_from") for r in results.values()):
        print("* construction measured on its own (empty cache); train() and losses are warm's (the same batches "
              "and numbers)")
    if "trl" in results:
        base = results["trl"]
        base_rate = base["samples"] / (base["construct_s"] + base["train_s"])
        for name in (n for n in results if n != "trl"):
            r = results[name]
            rate = r["samples"] / (r["construct_s"] + r["train_s"])
            cpu_speedup = ((base["construct_cpu_s"] + base["train_cpu_s"])
                           / (r["construct_cpu_s"] + r["train_cpu_s"]) * r["samples"] / base["samples"])
            print(f"speed-up {name} vs trl: {rate / base_rate:.2f}x end-to-end, "
                  f"{(r['samples'] / r['train_s']) / (base['samples'] / base['train_s']):.2f}x train(), "
                  f"{cpu_speedup:.2f}x in CPU time end-to-end")
        others = [n for n in results if n != "trl" and not results[n].get("train_from")]
        print(f"\n{'step':>4} {'trl':>10} " + " ".join(f"{n:>10}" for n in others)
              + " " + " ".join(f"{'|' + n + '-trl|':>16}" for n in others))
        for i, loss in enumerate(base["losses"]):
            row = [results[n]["losses"][i] for n in others]
            print(f"{i + 1:4d} {loss:10.6f} " + " ".join(f"{x:10.6f}" for x in row)
                  + " " + " ".join(f"{abs(x - loss):16.2e}" for x in row))
        for n in others:
            diffs = [abs(a - b) for a, b in zip(base["losses"], results[n]["losses"], strict=True)]
            print(f"max |{n} - trl| over {len(diffs)} steps: {max(diffs):.2e} (mean {sum(diffs) / len(diffs):.2e})"
                  + ("   <- noise yardstick: TRL itself, only the weights in bf16" if n == "trl_bf16" else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4, help="per-device batch (pairs)")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--sides", default="trl,trl_bf16,cold,warm",
                   help="comma-separated: trl, trl_bf16 (TRL with bf16 weights: the yardstick of numerical noise), "
                        "cold, warm (warm needs cold first)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per side (0: torch's default)")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override for 'ours' (repeatable)")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME:OVERRIDE[;OVERRIDE...]: one more 'ours' side with these overrides, run after the "
                        "others on the same cache (e.g. 'full_head:objective.completion_only_logits=false')")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--verbose", action="store_true", help="show the children's output")
    p.add_argument("--cold-train", action="store_true",
                   help="also train on the cold side (by default it only builds the trainer, filling the cache, and "
                        "its end-to-end figure is its construction + warm's train())")
    p.add_argument("--side", choices=["trl", "trl_bf16", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--construct-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        child(args)
        return
    results = parent(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
