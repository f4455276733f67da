"""The paper's full sweep on paper: GPU hours on 4 GPUs, from the per-token costs measured by dpo_throughput.py.

The CPU measurement gives seconds per training token of SmolLM2-135M; a FLOP count per token turns it into the
FLOP rate the CPU sustained, and the same FLOP count for the paper's 7-8B backbones with an assumed GPU FLOP rate
(``--gpu-tflops`` x ``--mfu``: this task had no GPU to measure one) gives GPU hours. Token counts per pair and per
evaluation are measured on the project's data (SmolLM2 tokenizer; ``--tokenizer-factor`` for the Llama ones).

    python bench/sweep_estimate.py --bench RESULTS.json [--mfu 0.35] [--gpu-tflops 989]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

DATA_SIZES = (20_000, 40_000, 80_000, 160_000, 275_601)  # conf/experiment/data_size.yaml
TEMPLATES = 5  # P1..P5 (conf/experiment/template.yaml); the embedding templates change evaluation only
EVAL_EVERY = 20_000  # samples between checkpoint evaluations
EVAL_TOKENS = 580_907  # one 7-task STS evaluation: 26,126 distinct sentences in PromptEOL (SmolLM2 tokens)
COMPLETION_SHARE = 0.19  # completion tokens / all tokens of a pair (NLI data, SmolLM2 chat template)
PADDING = {"trl": 0.29, "ours": 0.09}  # padded share at 8 x 8: random micro-batches vs regrouped within a step


@dataclass(frozen=True)
class Backbone:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tokenizer_factor: float  # tokens per SmolLM2 token on the same text (chat template included), approximate

    @property
    def body(self) -> int:
        """Parameters that every token goes through (the decoder layers; not the embedding lookup or the head)."""
        h, kv = self.hidden, self.hidden * self.kv_heads // self.heads
        return self.layers * (2 * h * h + 2 * h * kv + 3 * h * self.intermediate)

    def flops(self, kind: str, seq_len: float = 70) -> float:
        """FLOPs per token. train: policy forward + backward to the activations (the base weights are frozen; LoRA's
        own gradients are < 1 %); ref: one forward; trl: TRL's defaults (forward, gradient-checkpointing recompute,
        backward, reference forward every step); eval: one forward, last-token hidden state only."""
        forward = 2 * self.body + 4 * self.layers * seq_len * self.hidden  # + attention scores and values
        head = 2 * self.hidden * self.vocab * COMPLETION_SHARE  # log-probs of the completion tokens only
        return {"train": 2 * (forward + head), "ref": forward + head, "trl": 4 * (forward + head),
                "eval": forward}[kind]


SMOLLM2 = Backbone("SmolLM2-135M", 576, 1536, 30, 9, 3, 49_152, 1.0)
PAPER = (Backbone("Llama-2-7B", 4096, 11_008, 32, 32, 32, 32_000, 1.15),
         Backbone("Llama-3-8B", 4096, 14_336, 32, 32, 8, 128_256, 0.95))


def sweep_pairs(design: str) -> tuple[float, float, int]:
    """(training pairs, reference pairs, evaluations) per (backbone, template)."""
    largest = max(DATA_SIZES)
    if design == "one_run":  # one run on the largest subset, evaluated every 20K samples
        return largest, largest, largest // EVAL_EVERY + 2
    # a run per data size; the nested subsets share one reference log-prob cache entry (computed for the largest)
    return sum(DATA_SIZES), largest, sum(n // EVAL_EVERY + 1 for n in DATA_SIZES) + 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True, help="--json output of bench/dpo_throughput.py")
    p.add_argument("--side", default="warm", help="which measured side gives the CPU per-token cost")
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.35, help="assumed fraction of that peak a LoRA-DPO step sustains")
    p.add_argument("--gpus", type=int, default=4)
    args = p.parse_args()

    bench = json.loads(Path(args.bench).read_text())["results"]
    r = bench[args.side]
    tokens_per_pair = r["tokens"] / r["samples"]
    seconds_per_token = r["train_s"] / r["tokens"]
    cpu_flops = SMOLLM2.flops("train") / seconds_per_token
    print(f"measured ({args.side}, SmolLM2-135M, CPU): {tokens_per_pair:.0f} real tokens per pair (TRL's num_tokens), "
          f"{seconds_per_token * 1e3:.2f} ms per real training token (its batches' padding included) = "
          f"{cpu_flops / 1e9:.0f} GFLOP/s sustained "
          f"({SMOLLM2.flops('train') / 1e9:.2f} GFLOP per token)")
    if "trl" in bench:
        t = bench["trl"]
        print(f"measured (trl): {t['train_s'] / t['tokens'] * 1e3:.2f} ms per token, "
              f"{SMOLLM2.flops('trl') / (t['train_s'] / t['tokens']) / 1e9:.0f} GFLOP/s by the same count")
    gpu = args.gpu_tflops * 1e12 * args.mfu
    print(f"\nassumed GPU rate: {args.gpu_tflops:.0f} TFLOP/s x MFU {args.mfu:.2f} = {gpu / 1e12:.0f} TFLOP/s per GPU; "
          f"{len(PAPER)} backbones x {TEMPLATES} templates x data sizes {', '.join(f'{n:,}' for n in DATA_SIZES)}")
    print(f"{'design':<22} {'backbone':<12} {'train pairs':>12} {'GPU-h ours':>11} {'GPU-h TRL':>10} "
          f"{'wall h (4 GPUs)':>16}")
    for design in ("one_run", "run_per_size"):
        design_total = {"ours": 0.0, "trl": 0.0}
        for b in PAPER:
            train_pairs, ref_pairs, evals = sweep_pairs(design)
            pair_tokens = tokens_per_pair * b.tokenizer_factor
            ours = (train_pairs * pair_tokens / (1 - PADDING["ours"]) * b.flops("train")
                    + ref_pairs * pair_tokens / (1 - PADDING["ours"]) * b.flops("ref")
                    + evals * EVAL_TOKENS * b.tokenizer_factor * b.flops("eval"))
            trl = (train_pairs * pair_tokens / (1 - PADDING["trl"]) * b.flops("trl")
                   + evals * EVAL_TOKENS * b.tokenizer_factor * b.flops("eval"))
            hours = {k: TEMPLATES * v / gpu / 3600 for k, v in (("ours", ours), ("trl", trl))}
            for k in hours:
                design_total[k] += hours[k]
            print(f"{design:<22} {b.name:<12} {TEMPLATES * train_pairs:12,.0f} {hours['ours']:11.0f} "
                  f"{hours['trl']:10.0f} {hours['ours'] / args.gpus:16.1f}")
        print(f"{design + ' total':<22} {'':<12} {'':>12} {design_total['ours']:11.0f} {design_total['trl']:10.0f} "
              f"{design_total['ours'] / args.gpus:16.1f}")


if __name__ == "__main__":
    main()
