"""AutoRegEmbed's two losses on one fixed batch: the project's (sempa_exp.objectives.autoregembed, LoRA adapter, one
model with the adapter off as the decoder, left padding) against a re-implementation of the authors' code
(TrustedLLM/AutoRegEmbed @ 06da589; not vendored, read from a mirror), which is written here from their files
independently of the project's functions:

* encoder = the adapted model merged into plain weights (``merge_and_unload`` of a copy): their full fine-tuned
  ``AutoModel``, with the resized embedding holding the <EMBED*> rows (modeling_autoregembed.py L60-66);
* ``_compress`` (L133-155): right padding with the pad id, the k EMBED ids written right after each row's last real
  token, the final-norm hidden states gathered at those k positions;
* decoder = a separate, unresized copy of the original backbone (L93-99), fed ``cat([compressed, embed_tokens(
  target)])`` with mask ``cat([ones(k), target != pad])`` (L158-190), logits over its own vocabulary;
* stage 1: ``CrossEntropyLoss(ignore_index=-100)`` of ``logits[:, :-1]`` against ``labels[:, 1:]``, labels =
  ``[-100] * k + target`` (L181-190); stage 2: ``_get_batch_logps`` sums (utils.py L4-29) and the trainer's loss
  (condition_distribution_alignment/trainer.py L79-87) with the reference scores given.

    SEMPA_DATA_DIR=../shared/data python bench/autoregembed_reference.py --backbone smollm2_135m [--rows 8]

Prints both sides' stage-1 loss, stage-2 a/b/c log-probs and loss, and their largest difference (fp32).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- the authors' computation


def authors_compress(encoder, input_ids: list[list[int]], embed_ids: list[int], pad_id: int) -> torch.Tensor:
    k = len(embed_ids)
    width = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), width + k), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, x in enumerate(input_ids):
        ids[row, :len(x)] = torch.tensor(x)
        mask[row, :len(x)] = 1
        ids[row, len(x):len(x) + k] = torch.tensor(embed_ids)
        mask[row, len(x):len(x) + k] = 1
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    gather = torch.stack([torch.arange(len(x), len(x) + k) for x in input_ids])
    return hidden[torch.arange(len(input_ids))[:, None], gather]


def authors_decode(decoder, compressed: torch.Tensor, targets: list[list[int]], pad_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits[:, :-1], labels[:, 1:]) as their forward and loss see them."""
    k = compressed.shape[1]
    width = max(len(t) for t in targets)
    tgt = torch.full((len(targets), width), pad_id, dtype=torch.long)
    labels = torch.full((len(targets), k + width), -100, dtype=torch.long)
    for row, t in enumerate(targets):
        tgt[row, :len(t)] = torch.tensor(t)
        labels[row, k:k + len(t)] = torch.tensor(t)
    tgt_mask = (tgt != pad_id).long()  # their collator: the target's final EOS (= pad) is masked as an input
    inputs = torch.cat([compressed, decoder.model.embed_tokens(tgt)], dim=1)
    mask = torch.cat([torch.ones(len(targets), k, dtype=torch.long), tgt_mask], dim=1)
    logits = decoder(inputs_embeds=inputs, attention_mask=mask).logits
    return logits[:, :-1].float(), labels[:, 1:]


def authors_stage1_loss(encoder, decoder, input_ids, targets, embed_ids, pad_id) -> torch.Tensor:
    logits, labels = authors_decode(decoder, authors_compress(encoder, input_ids, embed_ids, pad_id), targets, pad_id)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def authors_logps(encoder, decoder, input_ids, targets, embed_ids, pad_id) -> torch.Tensor:
    logits, labels = authors_decode(decoder, authors_compress(encoder, input_ids, embed_ids, pad_id), targets, pad_id)
    scored = labels != -100
    per_token = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (per_token * scored).sum(-1)


def authors_stage2_loss(a, b, c, ref_a, ref_c, beta: float, tau: float) -> torch.Tensor:
    s2 = torch.sigmoid(beta * ((a - c) + (ref_a - ref_c)))
    s1 = torch.sigmoid(beta * torch.abs(a - b))
    return (-torch.log(torch.exp(-s1 / tau) / (torch.exp(-s1 / tau) + torch.exp(-s2 / tau)))).mean()


# ------------------------------------------------------------------------------------------------ comparison


def compare(backbone: str, rows: int, data_dir: Path, cache_dir: Path, seed: int = 0) -> dict:
    from omegaconf import OmegaConf

    from sempa_exp.config.schema import Config
    from sempa_exp.data import nli
    from sempa_exp.models.backbones import load_backbone
    from sempa_exp.objectives import autoregembed as project

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import compose_config

    cfg: Config = OmegaConf.to_object(compose_config([
        f"backbone={backbone}", "objective=autoregembed_compress", "objective.compression_data=nli_reconstruct",
        "backbone.dtype=float32", "lora.dropout=0", f"paths.cache_dir={cache_dir}"], data_dir))
    triplets, _ = nli.read_triplets(nli.resolve_source(cfg.data, data_dir), cfg.data.max_sentence_chars)
    triplets = nli.subset(triplets, rows, cfg.data.subset_seed)
    k = cfg.objective.compress_tokens

    base, tokenizer = load_backbone(cfg.backbone, cache_dir, dtype="float32")
    decoder = copy.deepcopy(base).eval()  # the authors' frozen, unresized decoder
    objective = project.CompressionObjective(**OmegaConf.to_container(OmegaConf.structured(cfg.objective)))
    model, embed_ids, vocab, _ = objective.prepared_model(cfg, base, tokenizer)
    generator = torch.Generator().manual_seed(seed)  # a non-zero adapter: LoRA and the EMBED rows
    for _name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            p.data += torch.randn(p.shape, generator=generator) * 0.02
    model.eval()
    encoder = copy.deepcopy(model).merge_and_unload().get_decoder().eval()  # their full fine-tuned AutoModel
    pad = tokenizer.pad_token_id

    def log_probs(encoder_ids, targets, reduce_sum=True):  # the project's passes
        vectors = project.compressed(model, encoder_ids, embed_ids, pad)
        with model.disable_adapter():
            per_token, mask = project.target_log_probs(model, vectors, targets, vocab, pad)
        return (per_token.sum(-1), mask) if reduce_sum else (per_token, mask)

    out = {"backbone": backbone, "rows": rows, "compress_tokens": k}
    with torch.no_grad():
        stage1 = [{"context": t.premise, "instruction": cfg.objective.reconstruct_instruction, "output": t.premise}
                  for t in triplets]
        enc = [project.training_encoder_ids(tokenizer, r["context"], r["instruction"]) for r in stage1]
        tgt = [project.target_ids(tokenizer, r["output"]) for r in stage1]
        ours1 = project.compression_loss(*log_probs(enc, tgt, reduce_sum=False))
        theirs1 = authors_stage1_loss(encoder, decoder, enc, tgt, embed_ids, pad)
        out["stage1"] = {"project": ours1.item(), "reference": theirs1.item(), "abs_diff": abs(ours1 - theirs1).item()}

        instr = project.ALIGN_INSTRUCTION
        q = [project.training_encoder_ids(tokenizer, t.premise, instr) for t in triplets]
        p = [project.training_encoder_ids(tokenizer, t.entailment, instr) for t in triplets]
        pos = [project.target_ids(tokenizer, t.entailment) for t in triplets]
        neg = [project.target_ids(tokenizer, t.contradiction) for t in triplets]
        ours = [log_probs(q, pos)[0], log_probs(p, pos)[0], log_probs(q, neg)[0]]
        theirs = [authors_logps(encoder, decoder, q, pos, embed_ids, pad),
                  authors_logps(encoder, decoder, p, pos, embed_ids, pad),
                  authors_logps(encoder, decoder, q, neg, embed_ids, pad)]
        ref_a, ref_c = theirs[0] - 1.5, theirs[2] + 0.5  # given reference scores (a stage-1 model's), the same on both
        loss_ours = project.alignment_loss(*ours, ref_a, ref_c, 0.1, 0.1)
        loss_theirs = authors_stage2_loss(*theirs, ref_a, ref_c, 0.1, 0.1)
        out["stage2"] = {
            "logps_max_abs_diff": max((x - y).abs().max().item() for x, y in zip(ours, theirs, strict=True)),
            "logps_max_abs_value": max(y.abs().max().item() for y in theirs),
            "project": loss_ours.item(), "reference": loss_theirs.item(),
            "abs_diff": abs(loss_ours - loss_theirs).item()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="smollm2_135m")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("SEMPA_DATA_DIR", "../shared/data")))
    p.add_argument("--cache-dir", type=Path,
                   default=Path(os.environ.get("SEMPA_CACHE_DIR", "~/.cache/sempa_exp")).expanduser())
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    out = compare(args.backbone, args.rows, args.data_dir.resolve(), args.cache_dir)
    s1, s2 = out["stage1"], out["stage2"]
    print(f"AutoRegEmbed on {args.backbone}, {args.rows} NLI rows, fp32, a random non-zero adapter:")
    print(f"  stage 1 loss: project {s1['project']:.6f}  reference {s1['reference']:.6f}  |diff| {s1['abs_diff']:.2e}")
    print(f"  stage 2 log-probs a, b, c: max |diff| {s2['logps_max_abs_diff']:.2e} "
          f"(of {s2['logps_max_abs_value']:.1f})")
    print(f"  stage 2 loss: project {s2['project']:.6f}  reference {s2['reference']:.6f}  |diff| {s2['abs_diff']:.2e}")
    ok = s1["abs_diff"] < 1e-4 and s2["abs_diff"] < 1e-4
    print("agreement to 1e-4:", "yes" if ok else "NO")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
