"""The yardstick: this machine's matmul peak, and how much of it a DPO step and an evaluation pass achieve.

* ``peak``: bf16 and fp32 GEMM throughput measured here (torch.matmul, the threads torch uses), on a large square
  product and on the backbone's own layer shapes at a realistic token count. The best shape is the peak.
* ``dpo``: reads a ``bench/dpo_throughput.py --json`` file and counts the *model FLOPs* of what each side trained: the
  computation TRL's algorithm defines for those pairs (per pair: the chosen and the rejected sequence each through a
  policy forward, a backward to the activations (the base weights are frozen; LoRA's own gradients are < 1 %) and a
  reference forward; the LM head on the completion tokens), from TRL's ``num_tokens`` (real tokens, no padding). The
  same count for every side, so achieved = model FLOPs / train() seconds compares them directly; a side that skips
  work (precomputed reference, shared prompt) shows it as a higher achieved rate, as MFU does.
* ``eval``: a bare PromptEOL pass on ``--sentences`` STS sentences (bf16), its forward FLOPs over its real tokens,
  and, with ``--adapter``, the same pass on the trained adapter unmerged and folded (``eval.merge_adapter``), each
  timed alone; the ratios are what a checkpoint evaluation costs against the bare backbone.

    SEMPA_DATA_DIR=../shared/data python bench/roofline.py [--parts peak,dpo,eval] [--backbone smollm2_135m] \\
        [--dpo-json bench/results_dpo_smollm2.json] [--sentences 2000] [--adapter runs/smoke/default/adapter] \\
        [--json bench/results_roofline.json]

Run it on an otherwise idle machine: every figure is a wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

COMPLETION_SHARE = 0.19  # completion tokens / all tokens of a pair (NLI data, SmolLM2 chat template; sweep_estimate)


def layer_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of every linear layer of one decoder layer."""
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]


def forward_flops_per_token(config, context: float) -> float:
    """Matmul FLOPs of one token through the decoder stack (no LM head), attending to ``context`` earlier tokens."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    linear = sum(2 * i * o for i, o in layer_shapes(config))
    attention = 2 * 2 * context * q  # scores and the weighted sum of values
    return config.num_hidden_layers * (linear + attention)


def measure_peak(config, seconds: float = 2.0) -> dict:
    import torch

    out = {"threads": torch.get_num_threads()}
    shapes = {"square 2048": (2048, 2048, 2048)}
    for i, (k, n) in enumerate(dict.fromkeys(layer_shapes(config))):
        shapes[f"layer {i}: 1024 tokens x {k} -> {n}"] = (1024, k, n)
    for dtype in (torch.bfloat16, torch.float32):
        rates = {}
        for name, (m, k, n) in shapes.items():
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            torch.matmul(a, b)
            reps, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                torch.matmul(a, b)
                reps += 1
            rates[name] = 2 * m * k * n * reps / (time.perf_counter() - started) / 1e9
        out[str(dtype).removeprefix("torch.")] = {"best_gflops": max(rates.values()), "shapes": rates}
    return out


def dpo_rates(config, bench_json: Path, peak: float | None) -> dict:
    results = json.loads(bench_json.read_text())["results"]
    context = 70 / 2  # mean causal context of a ~70-token sequence
    body = forward_flops_per_token(config, context)
    head = 2 * config.hidden_size * config.vocab_size * COMPLETION_SHARE
    per_token = 2 * (body + head) + (body + head)  # policy forward + backward to the activations, reference forward
    out = {}
    for side, r in results.items():
        if not r.get("train_s") or not r.get("tokens"):
            continue
        flops = r["tokens"] * per_token
        out[side] = {"train_s": r["train_s"], "tokens": r["tokens"], "model_gflop": flops / 1e9,
                     "achieved_gflops": flops / r["train_s"] / 1e9,
                     "of_peak": None if peak is None else flops / r["train_s"] / 1e9 / peak,
                     "pairs_per_s": r["samples"] / r["train_s"]}
    return out


def eval_rates(backbone: str, sentences: int, adapter: str | None, peak: float | None) -> dict:
    import torch
    from dpo_throughput import compose

    from sempa_exp.config.schema import data_dir
    from sempa_exp.data.sts import load_stsb_dev
    from sempa_exp.embedding.checkpoint import attach_adapter
    from sempa_exp.embedding.encoder import SentenceEncoder
    from sempa_exp.models.backbones import load_backbone
    from sempa_exp.models.lora import lora_folded

    cfg = compose([f"backbone={backbone}", "embed=prompteol"])
    model, tokenizer = load_backbone(cfg.backbone, cfg.paths.cache_dir)
    texts = list(dict.fromkeys(load_stsb_dev(data_dir(cfg)).sentences))[:sentences]

    def timed(label: str, model) -> dict:
        encoder = SentenceEncoder(model, tokenizer, cfg.embed, batch_size=cfg.eval.batch_size, progress=False)
        tokens = sum(len(f["input_ids"]) for f in encoder.method.features(texts))
        started = time.perf_counter()
        vectors = encoder.encode(texts)
        seconds = time.perf_counter() - started
        flops = tokens * forward_flops_per_token(model.config, tokens / len(texts) / 2)
        rate = flops / seconds / 1e9
        row = {"seconds": seconds, "sentences_per_s": len(texts) / seconds, "tokens": tokens,
               "achieved_gflops": rate, "of_peak": None if peak is None else rate / peak}
        print(f"[eval] {label}: {len(texts)} sentences, {tokens} tokens, {seconds:.1f} s, "
              f"{row['sentences_per_s']:.1f} sentences/s, {rate:.0f} GFLOP/s"
              + ("" if peak is None else f" ({rate / peak:.0%} of peak)"))
        return row, vectors

    out = {"sentences": len(texts)}
    out["bare"], _ = timed("bare backbone", model)
    if adapter:
        model = attach_adapter(model, Path(adapter))
        out["unmerged"], unmerged = timed("adapter unmerged", model)
        with lora_folded(model):
            out["merged"], merged = timed("adapter folded", model)
        cos = (torch.nn.functional.cosine_similarity(torch.as_tensor(unmerged), torch.as_tensor(merged))).min().item()
        out["merged_vs_unmerged_min_cos"] = cos
        bare = out["bare"]["seconds"]
        print(f"[eval] unmerged / bare time: {out['unmerged']['seconds'] / bare:.2f}x; merged / bare: "
              f"{out['merged']['seconds'] / bare:.2f}x; min cosine merged vs unmerged {cos:.6f}")
    return out


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))  # dpo_throughput's compose
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="peak,dpo,eval")
    p.add_argument("--backbone", default="smollm2_135m")
    p.add_argument("--dpo-json", default=str(Path(__file__).parent / "results_dpo_smollm2.json"))
    p.add_argument("--sentences", type=int, default=2000)
    p.add_argument("--adapter", help="a trained LoRA adapter folder for the checkpoint-evaluation timings")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    from dpo_throughput import compose

    from sempa_exp.models.backbones import load_backbone

    cfg = compose([f"backbone={args.backbone}"])
    config = load_backbone(cfg.backbone, cfg.paths.cache_dir)[0].config  # the tiny backbone has no config file
    out: dict = {"backbone": args.backbone, "loadavg_1min_before": os.getloadavg()[0]}
    peak = None
    if "peak" in parts:
        out["peak"] = measure_peak(config)
        peak = out["peak"]["bfloat16"]["best_gflops"]
        for dtype in ("bfloat16", "float32"):
            print(f"[peak] {dtype}: {out['peak'][dtype]['best_gflops']:.0f} GFLOP/s "
                  f"({out['peak']['threads']} threads; per shape: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in out["peak"][dtype]["shapes"].items()) + ")")
    if "dpo" in parts:
        out["dpo"] = dpo_rates(config, Path(args.dpo_json), peak)
        for side, r in out["dpo"].items():
            print(f"[dpo] {side}: {r['pairs_per_s']:.2f} pairs/s, {r['model_gflop']:.0f} model GFLOP in "
                  f"{r['train_s']:.0f} s = {r['achieved_gflops']:.0f} GFLOP/s"
                  + ("" if peak is None else f" ({r['of_peak']:.0%} of the bf16 peak)"))
    if "eval" in parts:
        out["eval"] = eval_rates(args.backbone, args.sentences, args.adapter, peak)
    out["loadavg_1min_after"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
