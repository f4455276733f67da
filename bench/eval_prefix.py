"""``eval.share_prompt_prefix`` measured: the prompt template's text before the sentence run once per batch, its
key/value cache reused by the batch, against the full prompts.

* Boundary: for every distinct sentence of the 7 STS test sets and STS-B dev, whether its prompt starts with the
  template prefix's own tokens (a sentence's first characters can merge with the prefix's last token; a batch then
  shares one token less: ``PromptMethod.shared_prefix_length``).
* Speed and agreement: STS-B dev's 2,910 distinct sentences embedded both ways in the evaluation's batching (bf16 by
  default), each pass timed alone after a warm-up batch; the largest difference and the lowest cosine between the
  two vectors of a sentence; STS-B dev Spearman both ways.

    SEMPA_DATA_DIR=../shared/data python bench/eval_prefix.py [--backbone smollm2_135m] [--embed prompteol] \\
        [--dtype bfloat16] [--json bench/results_eval_prefix_smollm2.json]

Run it on an otherwise idle machine: the timings are wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="smollm2_135m")
    parser.add_argument("--embed", default="prompteol")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    import numpy as np
    import torch
    from dpo_throughput import compose

    from sempa_exp.config.schema import data_dir
    from sempa_exp.data.sts import SHORT_NAMES, cosine, load_stsb_dev, load_task, spearman100
    from sempa_exp.embedding.encoder import SentenceEncoder
    from sempa_exp.models.backbones import load_backbone

    cfg = compose([f"backbone={args.backbone}", f"embed={args.embed}"])
    root = data_dir(cfg)
    model, tokenizer = load_backbone(cfg.backbone, cfg.paths.cache_dir, dtype=args.dtype)
    model.eval()
    out: dict = {"backbone": args.backbone, "embed": args.embed, "dtype": args.dtype, "threads":
                 torch.get_num_threads(), "boundary": {}}

    probe = SentenceEncoder(model, tokenizer, cfg.embed, batch_size=cfg.eval.batch_size, progress=False,
                            share_prompt_prefix=True).method
    prefix = probe.prompt_prefix()
    out["prefix_tokens"] = tokenizer.convert_ids_to_tokens(prefix)
    sets = {SHORT_NAMES[t]: [s for split in load_task(root, t) for s in (*split.sentences1, *split.sentences2)]
            for t in SHORT_NAMES}
    dev = load_stsb_dev(root)
    sets["stsb_dev"] = list(dev.sentences)
    for name, sentences in sets.items():
        distinct = list(dict.fromkeys(sentences))
        rows = [f["input_ids"] for f in probe.features(distinct)]
        keep = sum(r[:len(prefix)] == prefix and len(r) > len(prefix) for r in rows)
        tokens = sum(map(len, rows))
        out["boundary"][name] = {"sentences": len(distinct), "keep_prefix": keep, "tokens": tokens,
                                 "prefix_share_of_tokens": len(prefix) * len(rows) / tokens}
        print(f"[boundary] {name}: {keep}/{len(distinct)} prompts start with the {len(prefix)} prefix tokens; "
              f"the prefix is {len(prefix) * len(rows) / tokens:.1%} of the tokens")

    texts = list(dict.fromkeys(dev.sentences))
    vectors, seconds = {}, {}
    for label, share in (("full", False), ("shared", True), ("full again", False), ("shared again", True)):
        encoder = SentenceEncoder(model, tokenizer, cfg.embed, batch_size=cfg.eval.batch_size, progress=False,
                                  share_prompt_prefix=share, groups={"dev": texts})
        encoder.encode(texts[:cfg.eval.batch_size])  # warm-up: the first batch
        encoder = SentenceEncoder(model, tokenizer, cfg.embed, batch_size=cfg.eval.batch_size, progress=False,
                                  share_prompt_prefix=share, groups={"dev": texts})
        started = time.perf_counter()
        vectors[label] = encoder.encode(texts, "dev")
        seconds[label] = time.perf_counter() - started
        print(f"[speed] {label}: {len(texts)} sentences in {seconds[label]:.1f} s "
              f"({len(texts) / seconds[label]:.1f} sentences/s)")
    full, shared = vectors["full"], vectors["shared"]
    lookup = {"full": dict(zip(texts, full, strict=True)), "shared": dict(zip(texts, shared, strict=True))}
    dev_scores = {k: spearman100(cosine(np.stack([v[s] for s in dev.sentences1]),
                                        np.stack([v[s] for s in dev.sentences2])), dev.scores)
                  for k, v in lookup.items()}
    cos = torch.nn.functional.cosine_similarity(torch.as_tensor(full), torch.as_tensor(shared)).min().item()
    best = {k: min(seconds[k], seconds[f"{k} again"]) for k in ("full", "shared")}
    out.update({
        "sentences": len(texts), "seconds": seconds, "best_seconds": best, "speedup": best["full"] / best["shared"],
        "max_abs_diff": float(np.abs(full - shared).max()), "max_abs_value": float(np.abs(full).max()),
        "min_cosine": cos, "stsb_dev": dev_scores,
        "repeat_full_identical": bool(np.array_equal(full, vectors["full again"])),
    })
    print(f"[agreement] max |shared - full| {out['max_abs_diff']:.3g} (of {out['max_abs_value']:.3g}), min cosine "
          f"{cos:.8f}; STS-B dev full {dev_scores['full']:.4f}, shared {dev_scores['shared']:.4f}")
    print(f"[speed] shared prefix: {out['speedup']:.2f}x the full prompts (best of two passes each)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
