"""Reference check of four training-free baselines: the authors' computation against this project's embeddings.

For Echo embeddings (jakespringer/echo-embeddings), Pretended CoT (ZBWpro/PretCoTandKE), Token Prepending
(fuyuchenIfyw/token_prepending) and Contrastive Prompting (zifengcheng/CP) this script computes, on the same
sentences and the same weights (both sides load them through ``sempa_exp.models.backbones.load_backbone``):

* the REFERENCE embeddings, the way the authors' code computes them. None of the project's method code is used on
  this side; only the backbone loader, the STS reader and the scorer are shared.

  - Echo: the authors' own library. ``echo_embeddings.py`` (EchoParser, EchoPooling, EchoEmbeddingsMistral) is
    imported from a checkout of the mirror (``--echo-repo``) and called as their example.py does. The parser gets the
    model folder, so it loads the tokenizer itself with ``AutoTokenizer.from_pretrained(path, add_bos_token=False,
    add_eos_token=False)`` (their line 11). The template is their zero-shot prompt in their syntax, ``<s>Rewrite the
    sentence: {!%%text%%}, rewritten sentence: {%%text%%}{</s>}``, max_length=300 per piece (example.py) and pooling
    'mean'. ``<s>`` becomes the backbone's BOS string where its tokenizer adds a BOS by default (Gemma: ``<bos>``;
    SmolLM2 adds none, so it is dropped), and ``</s>`` becomes its EOS string. The model wrapper gets the causal LM's
    base model, the ``AutoModel`` class of their ``from_pretrained``. Right padding, as in their parser.
  - Pretended CoT, Token Prepending, Contrastive Prompting: the official scripts pin transformers 4.37/4.46, need CUDA,
    and hard-code Llama ids. They are re-implemented here from the authors' code (file:line in the comments below):
    SentEval's whitespace join; PromptEOL's sentence clean-up; the exact prompt strings, ``.strip()``; the tokenizer
    loaded as ``AutoTokenizer.from_pretrained(path)`` with ``pad_token_id = 0`` and ``padding_side = 'left'``; batches
    of 16 sorted by word count, as SentEval forms them; ``hidden_states[k][:, -1]``. They run the base model: the
    official scripts run the causal LM, but use only its ``hidden_states``, which are the base model's.

    * PretCoT pools ``hidden_states[-2]`` (evaluation.py:266-267).
    * TP adds ``<PST>`` to a copy of the tokenizer (``add_tokens``) and calls ``resize_token_embeddings`` on a copy
      of the model. ``mean_resizing=False`` is used because the new row is overwritten at once. That row becomes
      ``torch.randn(d, generator=torch.Generator().manual_seed(3407))`` in float32. The authors seed 3407 on CUDA,
      and the draw comes after the resize has used the same generator, so their vector cannot be reproduced off
      their GPU; the project uses this seeded CPU draw, and so does this script. Gemma's embedding scales the row by
      sqrt(d) inside its forward, as it does every row. The whole prompt is tokenized in one call. Forward pre-hooks
      (written here) on decoder layers [start, exit) overwrite the placeholder's hidden state with the last token's,
      in place, as the authors' loop does (senllm/modeling_llama.py:565-568). The vector pooled is
      ``hidden_states[output_layer][:, -1]``.
    * CP makes a separate forward pass of the auxiliary prompts. A forward hook on
      ``layers[act_layer].self_attn.o_proj`` keeps its input. The authors stop that pass after layer act_layer; this
      script runs the full pass, which gives the same value. Then comes the normal forward, with a pre-hook on that
      o_proj that sets the last token's input to ``coeff * (x_nor - x_aux)`` (activation_intervention/__init__.py:
      229-233). The vector pooled is ``hidden_states[output_layer][:, -1]``.

    In transformers 5.23, ``hidden_states`` has L+1 entries: 0 = the input of layer 0 (the embedding output, scaled
    by sqrt(d) for Gemma), k = the output of layer k-1 before any norm, and -1 = the output after the final norm.
    This is the authors' 4.x convention; the script asserts it on the first batch.

* the PROJECT's embeddings, through the project's own path. The config comes from Hydra (conf/evaluate.yaml with
  ``backbone=``, ``method=``, ``eval.dtype=`` and any ``method.<key>=`` overrides), then
  ``sempa_exp.embedding.loading.load`` and ``SentenceEncoder(...).encode``.

Compared on the first N distinct sentences of STS-B dev (file order, sentence1 then sentence2 per pair):

* whether the input token ids are the same for every sentence. For TP the project feeds an existing id in the
  placeholder slot and replaces its embedding, so the slot is compared by position. For CP the auxiliary ids are
  compared too. For Echo the pooled-token mask is compared too.
* the per-sentence cosine between the reference and the project vectors (min and mean), and the max |difference|.
* with ``--stsb-dev``: the STS-B dev Spearman x100 of both sides over all 1500 pairs (sempa_exp.data.sts.score_task),
  and its difference.

Pass: identical token ids, min cosine > 0.9999, and, with ``--stsb-dev``, |STS-B dev difference| < 0.1.

Padding: both sides pad on the left (Echo on the right), so padding must not change the states of real tokens
beyond float noise. The reference pads with id 0 (Echo: the parser's pad token) in batches of 16 sorted by word
count; the project pads with its pad_token_id in batches of ``eval.batch_size`` sorted by token count. As a
yardstick for that noise, the first ``--pad-check`` sentences are also embedded one at a time, with no padding, on
the reference side. A sensitivity check runs the reference on the first 16 sentences with the method's own step
switched off (Echo: 'last' pooling; PretCoT: layer -1; TP: no prepending; CP: no steering), to show that a missing
step would be noticed.

Layer settings of TP and CP: these come from ``backbone.methods.<name>`` (``method_settings``). Where
the backbone has none, the script uses the authors' setting for their non-LLaMA-2 backbones: TP [1, 6), output
-2 (the qwen2/gemma2 entries of token_prepending/config.yaml); CP layer 4, alpha 0.5 (LLaMA-2-7B), output -2. It passes
these to the project as ``method.<key>=``. ``--setting key=value`` (or ``--setting token_prepending.exit_layer=5``)
overrides a value on both sides. The settings used are printed and written to the JSON.

Echo's library is taken from a temporary checkout of the mirror, with no work tree needed:

    mkdir -p /tmp/echo_ref && git -C /work/.mirror/jakespringer+echo-embeddings/repo archive HEAD echo_embeddings.py \
        | tar -x -C /tmp/echo_ref

Commands, run in /work/main (SEMPA_DATA_DIR defaults to ../shared/data):

    .venv/bin/python bench/reference_methods.py --backbone smollm2_135m --method all --sentences 20
    .venv/bin/python bench/reference_methods.py --backbone smollm2_135m --method all
    .venv/bin/python bench/reference_methods.py --backbone gemma3_270m --method all
    .venv/bin/python bench/reference_methods.py --backbone smollm2_135m --method all --stsb-dev
    .venv/bin/python bench/reference_methods.py --backbone gemma3_270m --method all --stsb-dev
    .venv/bin/python bench/reference_methods.py --backbone smollm2_135m --method token_prepending \
        --setting exit_layer=5 --setting output_layer=-2

The results go to ``bench/results_reference_<backbone>.json``. Entries are kept per method, so running one method
updates only its entry. Each entry records its command, the package versions, the settings and the dtype.
"""

from __future__ import annotations

import argparse
import ast
import copy
import gc
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
MIRRORS = Path("/work/.mirror")
METHODS = ("echo", "pretended_cot", "token_prepending", "contrastive_prompting")
OFFICIAL_BATCH = 16  # PretCoT evaluation.py:214, TP config.yaml batch_size, CP run_intervention_eval.sh --batch_size
OFFICIAL_PAD_ID = 0  # PretCoT evaluation.py:193, TP evaluate.py:210, CP evaluate_intervention.py:132
MIN_COSINE = 0.9999
MAX_STS_DIFF = 0.1

# --- the authors' strings (each is checked against the mirror at start-up when it is there) ---
# PretCoTandKE settings.py:11; evaluation.py:236 turns '*sent_0*' into '*sent 0*'.
PRETCOT_TEMPLATE = 'After thinking step by step , this sentence : "*sent_0*" means in one word:"'
# token_prepending evaluate.py:285 (prompt_method prompteol, plan tp)
TP_PROMPT = 'This sentence : <PST> "*sent 0*" means in one word:"'
TP_PLACEHOLDER = "<PST>"  # evaluate.py:214
TP_SEED = 3407  # evaluate.py:27 (torch.cuda.manual_seed(3407): not reproducible off their GPU)
# CP evaluate_intervention.py:194 (prompteol) and :201 (the auxiliary, "negative" prompt)
CP_PROMPT = 'This sentence : "*sent 0*" means in one word:"'
CP_NEGATIVE = 'The irrelevant information of this sentence : "*sent 0*" means in one word:"'
# Echo: the zero-shot prompt in the authors' template syntax (echo_embeddings.py:20-65); <s>/</s> are substituted
ECHO_TEMPLATE = "<s>Rewrite the sentence: {!%%text%%}, rewritten sentence: {%%text%%}{</s>}"
ECHO_MAX_LENGTH = 300  # example.py:30

# The authors' settings for backbones other than LLaMA-2-7B, used when backbone.methods.<name> has none.
FALLBACK_SETTINGS: dict[str, dict[str, Any]] = {
    "token_prepending": {"start_layer": 1, "exit_layer": 6, "output_layer": -2},  # TP config.yaml qwen2/gemma2
    "contrastive_prompting": {"layer": 4, "alpha": 0.5, "output_layer": -2},  # CP run_intervention_eval.sh:44
}
# What the sensitivity check switches off: the reference's own step, to show the comparison would notice it missing.
CONTROLS = {"echo": "'last' pooling instead of 'mean'", "pretended_cot": "hidden_states[-1] instead of [-2]",
            "token_prepending": "no prepending hooks", "contrastive_prompting": "no steering"}
SETTING_KEYS = {"token_prepending": ("start_layer", "exit_layer", "output_layer"),
                "contrastive_prompting": ("layer", "alpha", "output_layer")}


# ----------------------------------------------------------------------------------------------------------------
# The authors' sentence handling
# ----------------------------------------------------------------------------------------------------------------

def senteval_join(sentence: str) -> str:
    """SentEval hands the batcher word lists; the batchers ``' '.join`` them (evaluation.py:228)."""
    return " ".join(sentence.split())


def official_clean(s: str) -> str:
    """PromptEOL's clean-up as the three batchers write it (PretCoT evaluation.py:239-242, TP evaluate.py:314-316,
    CP evaluate_intervention.py:234-236)."""
    if len(s) > 0 and s[-1] not in ".?\"'":
        s += "."
    s = s.replace('"', "'")
    if len(s) > 0 and s[-1] == "?":
        s = s[:-1] + "."
    return s


def official_prompt(template: str, sentence: str) -> str:
    return template.replace("*sent 0*", official_clean(senteval_join(sentence))).strip()


def pretcot_template() -> str:
    # evaluation.py:236: template.replace('_', ' ').replace('*sep+*', '').replace('*cls*', '')
    return PRETCOT_TEMPLATE.replace("_", " ").replace("*sep+*", "").replace("*cls*", "")


def verify_official_strings(mirror_root: Path) -> list[str]:
    """Checks the constants above against the string literals in the mirrors' files; returns what was checked."""
    checks = [
        ("ZBWpro+PretCoTandKE", "settings.py", PRETCOT_TEMPLATE),
        ("fuyuchenIfyw+token_prepending", "evaluate.py", TP_PROMPT),
        ("fuyuchenIfyw+token_prepending", "evaluate.py", TP_PLACEHOLDER),
        ("zifengcheng+CP", "evaluate_intervention.py", CP_PROMPT),
        ("zifengcheng+CP", "evaluate_intervention.py", CP_NEGATIVE),
    ]
    done = []
    for repo, path, literal in checks:
        source = git_show(mirror_root / repo / "repo", path)
        if source is None:
            done.append(f"{repo}:{path} not available (skipped)")
            continue
        literals = {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant)
                    and isinstance(n.value, str)}
        if literal not in literals:
            raise SystemExit(f"the string {literal!r} is not a literal of {repo}:{path}: the mirror changed?")
        done.append(f"{repo}:{path} has {literal!r}")
    source = git_show(mirror_root / "fuyuchenIfyw+token_prepending" / "repo", "evaluate.py")
    if source is not None and f"torch.cuda.manual_seed({TP_SEED})" not in source:
        raise SystemExit(f"token_prepending evaluate.py does not seed {TP_SEED}")
    return done


def git_show(repo: Path, path: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{path}"], check=True, capture_output=True,
                              text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def git_head(repo: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# Reference side
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Reference:
    vectors: np.ndarray  # (n, d) float32
    ids: list[list[int]]  # unpadded input ids per sentence
    extra: dict[str, list[list[int]]] = field(default_factory=dict)  # aux ids (CP), pool mask (Echo)
    notes: list[str] = field(default_factory=list)
    pst_index: list[int] | None = None  # TP: where the placeholder sits in each unpadded row


def base_model(causal_lm: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack the authors' ``AutoModel`` would load (LlamaModel / Gemma3TextModel)."""
    return causal_lm.model


def official_tokenizer(path: str):
    """``AutoTokenizer.from_pretrained(path)``, pad id 0, left padding (TP evaluate.py:209-211, CP :131-133,
    PretCoT evaluation.py:191-194)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token_id = OFFICIAL_PAD_ID
    tok.padding_side = "left"
    return tok


def batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def check_hidden_states(out, num_layers: int) -> None:
    hs = out.hidden_states
    if len(hs) != num_layers + 1 or not torch.equal(hs[-1], out.last_hidden_state):
        raise SystemExit(f"unexpected hidden_states convention: {len(hs)} entries for {num_layers} layers")


def forward_states(decoder: torch.nn.Module, enc: dict) -> Any:
    return decoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True,
                   use_cache=False)


def unpadded(enc: dict) -> list[list[int]]:
    return [[int(t) for t, m in zip(ids, mask) if m] for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]


@torch.inference_mode()
def reference_pretended_cot(causal_lm: torch.nn.Module, path: str, sentences: Sequence[str],
                            batch_size: int = OFFICIAL_BATCH, control: bool = False) -> Reference:
    """PretCoTandKE evaluation.py:223-275 (direct_inference, prompt Pretended_CoT): hidden_states[-2][:, -1].
    ``control``: hidden_states[-1] instead (PromptEOL's layer)."""
    tok = official_tokenizer(path)
    template = pretcot_template()
    decoder = base_model(causal_lm)
    vectors, ids = [], []
    for k, rows in enumerate(batches(len(sentences), batch_size)):
        texts = [official_prompt(template, sentences[i]) for i in rows]
        enc = tok(texts, return_tensors="pt", padding=True)
        out = forward_states(decoder, enc)
        if k == 0:
            check_hidden_states(out, len(decoder.layers))
        vectors.append(out.hidden_states[-1 if control else -2][:, -1, :].float().numpy())
        ids += unpadded(enc)
    return Reference(np.concatenate(vectors), ids)


_TP_PREPARED: dict[int, tuple] = {}


def prepared_tp_model(causal_lm: torch.nn.Module, path: str) -> tuple:
    """(tokenizer with <PST>, resized copy of the model with the drawn row, <PST> id), once per loaded model
    (evaluate.py:213-228)."""
    key = id(causal_lm)
    if key not in _TP_PREPARED:
        tok = official_tokenizer(path)
        tok.add_tokens([TP_PLACEHOLDER])
        pst_id = tok.convert_tokens_to_ids(TP_PLACEHOLDER)
        model = copy.deepcopy(causal_lm)
        model.resize_token_embeddings(len(tok), mean_resizing=False)  # the new row is overwritten next
        embedding = model.get_input_embeddings()
        dim = embedding.weight.shape[1]
        with torch.no_grad():
            embedding.weight[pst_id] = torch.randn(dim, generator=torch.Generator().manual_seed(TP_SEED),
                                                   dtype=torch.float32)
        _TP_PREPARED.clear()
        _TP_PREPARED[key] = (tok, model, pst_id)
    return _TP_PREPARED[key]


@torch.inference_mode()
def reference_token_prepending(causal_lm: torch.nn.Module, path: str, sentences: Sequence[str], start: int,
                               exit_: int, output_layer: int, batch_size: int = OFFICIAL_BATCH,
                               control: bool = False) -> Reference:
    """token_prepending evaluate.py:209-228 (placeholder), :301-336 (batcher), senllm/modeling_llama.py:478-568.
    ``control``: the same prompts and placeholder without the prepending (no layer hooks)."""
    tok, model, pst_id = prepared_tp_model(causal_lm, path)
    embedding = model.get_input_embeddings()
    decoder = base_model(model)
    notes = [f"<PST> id {pst_id}; embedding rows {embedding.weight.shape[0]}; embedding class "
             f"{type(embedding).__name__} (scale {getattr(embedding, 'scalar_embed_scale', 1.0)})"]
    state: dict[str, torch.Tensor] = {}

    def prepend(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        b = hidden.shape[0]
        previous = hidden[:, -1, :].clone()  # modeling_llama.py:567
        hidden[torch.arange(b), state["pst"], :] = previous  # :568, in place
        return None

    vectors, ids, pst_rows = [], [], []
    handles = [] if control else [layer.register_forward_pre_hook(prepend, with_kwargs=True)
                                  for layer in decoder.layers[start:exit_]]
    try:
        for k, rows in enumerate(batches(len(sentences), batch_size)):
            texts = [official_prompt(TP_PROMPT, sentences[i]) for i in rows]
            enc = tok(texts, return_tensors="pt", padding=True)
            hits = enc["input_ids"] == pst_id
            if not bool((hits.sum(dim=1) == 1).all()):
                raise SystemExit("token prepending: <PST> is not exactly one token in every prompt")
            state["pst"] = hits.float().argmax(dim=1)  # find_token_indices, modeling_llama.py:50-58
            out = forward_states(decoder, enc)
            if k == 0:
                check_hidden_states(out, len(decoder.layers))
                emb0 = out.hidden_states[0] if start > 0 else None
                if emb0 is not None:  # the placeholder's layer-0 input is the drawn row (x sqrt(d) for Gemma)
                    scale = float(getattr(embedding, "scalar_embed_scale", 1.0))
                    got = emb0[0, int(state["pst"][0])].float()
                    want = embedding.weight[pst_id].float() * scale
                    notes.append(f"placeholder input at layer 0 = drawn row x {scale:.4g}: max |diff| "
                                 f"{(got - want).abs().max().item():.2e}")
            vectors.append(out.hidden_states[output_layer][:, -1, :].float().numpy())
            widths = enc["attention_mask"].sum(dim=1)
            pad = enc["input_ids"].shape[1] - widths
            pst_rows += [int(p - q) for p, q in zip(state["pst"], pad)]
            ids += unpadded(enc)
    finally:
        for h in handles:
            h.remove()
    return Reference(np.concatenate(vectors), ids, notes=notes, pst_index=pst_rows,
                     extra={"pst_id": [[pst_id]]})


@torch.inference_mode()
def reference_contrastive_prompting(causal_lm: torch.nn.Module, path: str, sentences: Sequence[str], act_layer: int,
                                    coeff: float, output_layer: int, batch_size: int = OFFICIAL_BATCH,
                                    control: bool = False) -> Reference:
    """CP evaluate_intervention.py:220-283 with --intervention_plan scaled --intervention_location att_head;
    activation_intervention/__init__.py:219-234 (scaled hook), :354-435 (get_o_proj_input).
    ``control``: the normal prompts without the steering."""
    tok = official_tokenizer(path)
    decoder = base_model(causal_lm)
    o_proj = decoder.layers[act_layer].self_attn.o_proj  # evaluate_intervention.py:213
    vectors, ids, aux_ids = [], [], []
    for k, rows in enumerate(batches(len(sentences), batch_size)):
        negative = [official_prompt(CP_NEGATIVE, sentences[i]) for i in rows]
        normal = [official_prompt(CP_PROMPT, sentences[i]) for i in rows]
        captured: list[torch.Tensor] = []

        def keep_input(_module, inputs, _output, captured=captured):
            captured.append(inputs[0])

        aux_enc = tok(negative, return_tensors="pt", padding=True)  # __init__.py:425
        handle = o_proj.register_forward_hook(keep_input)
        try:
            decoder(input_ids=aux_enc["input_ids"], attention_mask=aux_enc["attention_mask"], use_cache=False)
        finally:
            handle.remove()
        aux = captured[0]

        def scaled(_module, inputs, aux=aux):
            residual_input, = inputs
            activation_diff = residual_input[:, -1:, :] - aux[:, -1:, :]
            residual_input[:, -1:, :] = coeff * activation_diff
            return residual_input

        enc = tok(normal, return_tensors="pt", padding=True)
        handle = o_proj.register_forward_pre_hook(scaled) if not control else None
        try:
            out = forward_states(decoder, enc)
        finally:
            if handle is not None:
                handle.remove()
        if k == 0:
            check_hidden_states(out, len(decoder.layers))
        vectors.append(out.hidden_states[output_layer][:, -1, :].float().numpy())
        ids += unpadded(enc)
        aux_ids += unpadded(aux_enc)
    return Reference(np.concatenate(vectors), ids, extra={"aux_ids": aux_ids})


def load_echo_library(echo_repo: Path):
    if not (echo_repo / "echo_embeddings.py").exists():
        raise SystemExit(f"{echo_repo}/echo_embeddings.py not found. Make it with:\n  mkdir -p {echo_repo} && git -C "
                         f"{MIRRORS}/jakespringer+echo-embeddings/repo archive HEAD echo_embeddings.py | tar -x -C "
                         f"{echo_repo}")
    sys.path.insert(0, str(echo_repo))
    try:
        return importlib.import_module("echo_embeddings")
    finally:
        sys.path.pop(0)


def echo_template_for(tokenizer) -> str:
    """<s>: the BOS string where the tokenizer adds one by default (the authors' Llama/Mistral do), else nothing;
    </s>: the EOS string."""
    plain = tokenizer("a")["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and plain[:1] == [tokenizer.bos_token_id]
    return ECHO_TEMPLATE.replace("<s>", tokenizer.bos_token if adds_bos else "").replace("</s>", tokenizer.eos_token)


@torch.inference_mode()
def reference_echo(causal_lm: torch.nn.Module, path: str, sentences: Sequence[str], echo_repo: Path,
                   batch_size: int = OFFICIAL_BATCH, control: bool = False) -> Reference:
    """The authors' echo_embeddings.py, called as their example.py does (template name -> template, 'mean').
    ``control``: their other pooling, 'last' (the EOS token)."""
    from transformers import AutoTokenizer

    echo = load_echo_library(echo_repo)
    default_tok = AutoTokenizer.from_pretrained(path)
    template = echo_template_for(default_tok)
    parser = echo.EchoParser(path, {"echo": template}, max_length=ECHO_MAX_LENGTH)  # their line 11 loads it
    pooling = echo.EchoPooling(strategy="last" if control else "mean")
    model = echo.EchoEmbeddingsMistral(base_model(causal_lm))
    ptok = parser.get_tokenizer()
    probe = "A man is playing a guitar."
    with_flag, without = ptok(probe)["input_ids"], default_tok(probe, add_special_tokens=False)["input_ids"]
    default_ids = default_tok(probe)["input_ids"]
    notes = [f"template {template!r}",
             f"add_bos_token=False/add_eos_token=False: default tokenizer gives {default_ids[:3]}..., the parser's "
             f"{with_flag[:3]}...; {'no' if with_flag == without else 'SOME'} special tokens added per piece"]
    if with_flag != without:
        raise SystemExit(f"the parser's tokenizer still adds special tokens per piece: {with_flag} vs {without}")
    vectors, ids, masks = [], [], []
    for rows in batches(len(sentences), batch_size):
        xs = [("echo", {"text": sentences[i]}) for i in rows]
        batch = parser(xs)
        out = pooling(model(batch))
        vectors.append(out["sentence_embedding"].float().numpy())
        for row in range(len(rows)):
            keep = batch["attention_mask"][row].bool()
            ids.append(batch["input_ids"][row][keep].tolist())
            masks.append(batch["embed_mask"][row][keep].tolist())
    return Reference(np.concatenate(vectors), ids, extra={"pool_mask": masks}, notes=notes)


def reference_embed(method: str, causal_lm: torch.nn.Module, path: str, sentences: Sequence[str],
                    settings: dict[str, Any], echo_repo: Path, batch_size: int = OFFICIAL_BATCH,
                    control: bool = False) -> Reference:
    """The authors' vectors; ``control``: the same with the method's own step switched off (a sensitivity check).
    Batches are formed as SentEval forms them: sentences sorted by their number of words (stable), 16 at a time."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i].split()))
    ref = _reference_embed(method, causal_lm, path, [sentences[i] for i in order], settings, echo_repo, batch_size,
                           control)
    back = np.argsort(order)

    def unsort(rows: list) -> list:
        return [rows[i] for i in back]

    return Reference(ref.vectors[back], unsort(ref.ids), notes=ref.notes,
                     extra={k: (unsort(v) if len(v) == len(order) else v) for k, v in ref.extra.items()},
                     pst_index=unsort(ref.pst_index) if ref.pst_index is not None else None)


def _reference_embed(method: str, causal_lm: torch.nn.Module, path: str, sentences: Sequence[str],
                     settings: dict[str, Any], echo_repo: Path, batch_size: int, control: bool) -> Reference:
    if method == "echo":
        return reference_echo(causal_lm, path, sentences, echo_repo, batch_size, control)
    if method == "pretended_cot":
        return reference_pretended_cot(causal_lm, path, sentences, batch_size, control)
    # output_layer None (the project's "final layer after the norm") is the authors' -1
    output_layer = settings.get("output_layer")
    output_layer = -1 if output_layer is None else output_layer
    if method == "token_prepending":
        return reference_token_prepending(causal_lm, path, sentences, settings["start_layer"], settings["exit_layer"],
                                          output_layer, batch_size, control)
    if method == "contrastive_prompting":
        return reference_contrastive_prompting(causal_lm, path, sentences, settings["layer"], settings["alpha"],
                                               output_layer, batch_size, control)
    raise ValueError(method)


# ----------------------------------------------------------------------------------------------------------------
# Project side
# ----------------------------------------------------------------------------------------------------------------

def compose_project(backbone: str, method: str, dtype: str, data_dir: Path, overrides: Sequence[str],
                    check: bool = True):
    """The project's config, composed and validated as ``python -m sempa_exp.evaluate`` would."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sempa_exp.config.registry import register_all
    from sempa_exp.config.schema import validate

    register_all()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"backbone={backbone}", f"method={method}", f"eval.dtype={dtype}",
                                             f"paths.data_dir={data_dir}", "logger=none", *overrides])
    config = OmegaConf.to_object(cfg)
    if check:
        validate(config)
    return config


@dataclass
class ProjectSide:
    vectors: np.ndarray
    features: list[dict]
    settings: dict[str, Any]
    method_config: dict
    embed_config: dict
    pad_token_id: int | None
    seconds: float


def project_embed(config, sentences: Sequence[str]) -> ProjectSide:
    from omegaconf import OmegaConf

    from sempa_exp.config.schema import LAYER_SETTINGS, method_settings
    from sempa_exp.embedding import loading as methods
    from sempa_exp.embedding.encoder import SentenceEncoder

    t0 = time.time()
    loaded = methods.load(config, torch.device("cpu"))
    encoder = SentenceEncoder(loaded.model, loaded.tokenizer, config.embed, batch_size=config.eval.batch_size,
                              method=loaded.method, progress=False)
    vectors = encoder.encode(list(sentences))
    seconds = time.time() - t0
    features = loaded.method.features(list(sentences))
    settings = method_settings(config)
    side = ProjectSide(vectors=vectors, features=features,
                       settings={k: getattr(settings, k) for k in LAYER_SETTINGS} | {"source": settings.source},
                       method_config=OmegaConf.to_container(OmegaConf.structured(config.method)),
                       embed_config=OmegaConf.to_container(OmegaConf.structured(config.embed)),
                       pad_token_id=loaded.tokenizer.pad_token_id, seconds=seconds)
    del loaded, encoder
    gc.collect()
    return side


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------

def parse_value(text: str) -> Any:
    if text in ("null", "None"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def resolve_settings(method: str, backbone_methods: dict, cli: Sequence[str]) -> tuple[dict[str, Any], list[str],
                                                                                      dict[str, str]]:
    """(values used on both sides, project overrides, where each value comes from)."""
    keys = SETTING_KEYS.get(method, ())
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    backbone = backbone_methods.get(method)
    for key in keys:  # the backbone's entry as it is (output_layer None = final layer after the norm), if it has one
        if backbone is not None:
            values[key], origin[key] = getattr(backbone, key), f"backbone.methods.{method}"
        else:
            values[key], origin[key] = FALLBACK_SETTINGS[method][key], "bench default (authors' non-LLaMA-2)"
    for item in cli:
        name, _, text = item.partition("=")
        if not _:
            raise SystemExit(f"--setting {item!r}: expected key=value or method.key=value")
        target, _, key = name.rpartition(".")
        if target and target not in METHODS:
            raise SystemExit(f"--setting {item!r}: unknown method {target!r}")
        if target and target != method:
            continue
        if key not in keys:
            if target:
                raise SystemExit(f"--setting {item!r}: {method} has no setting {key!r} (it has {list(keys)})")
            continue  # an unqualified key of another method
        values[key], origin[key] = parse_value(text), "--setting"
    overrides = [f"method.{k}={'null' if v is None else v}" for k, v in values.items()
                 if origin[k] != f"backbone.methods.{method}"]
    return values, overrides, origin


# ----------------------------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------------------------

def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(min=1e-30)


def compare_ids(method: str, ref: Reference, project: ProjectSide, tokenizer) -> tuple[int, list[str]]:
    """(number of sentences whose inputs are identical, descriptions of the first differences)."""
    equal, problems = 0, []
    for i, feat in enumerate(project.features):
        mine = list(feat["input_ids"])
        theirs = list(ref.ids[i])
        diffs = []
        if method == "token_prepending":
            index = feat["pst_index"]
            if index != ref.pst_index[i]:
                diffs.append(f"placeholder at {index} (project) vs {ref.pst_index[i]} (reference)")
            elif index < len(mine):
                mine[index] = ref.extra["pst_id"][0][0]  # the project feeds another id there, by design
        if mine != theirs:
            diffs.append("input ids differ")
        if method == "contrastive_prompting" and list(feat["aux_ids"]) != ref.extra["aux_ids"][i]:
            diffs.append("auxiliary ids differ")
            mine_aux, theirs_aux = list(feat["aux_ids"]), ref.extra["aux_ids"][i]
            problems.append(f"  aux project:   {tokenizer.convert_ids_to_tokens(mine_aux)}")
            problems.append(f"  aux reference: {tokenizer.convert_ids_to_tokens(theirs_aux)}")
        if method == "echo" and list(feat["pool_mask"]) != ref.extra["pool_mask"][i]:
            diffs.append(f"pooled-token mask differs: project {feat['pool_mask']} vs reference "
                         f"{ref.extra['pool_mask'][i]}")
        if not diffs:
            equal += 1
        elif len(problems) < 12:
            problems.append(f"sentence {i}: {'; '.join(diffs)}")
            problems.append(f"  project:   {tokenizer.convert_ids_to_tokens(list(feat['input_ids']))}")
            problems.append(f"  reference: {tokenizer.convert_ids_to_tokens(theirs)}")
    return equal, problems


def stsb_scores(dev, lookup: dict[str, np.ndarray]) -> float:
    from sempa_exp.data.sts import score_task

    def embed(sentences: Sequence[str]) -> np.ndarray:
        return np.stack([lookup[s] for s in sentences])

    return score_task([dev], embed)["all"]


def versions() -> dict[str, str]:
    import numpy
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "numpy": numpy.__version__, "project_commit": git_head(ROOT) or "?"}
    try:
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src", "conf"], check=True,
                               capture_output=True, text=True).stdout.strip()
        out["project_src_conf_uncommitted"] = str(bool(dirty))
    except (OSError, subprocess.CalledProcessError):
        pass
    for repo in ("jakespringer+echo-embeddings", "ZBWpro+PretCoTandKE", "fuyuchenIfyw+token_prepending",
                 "zifengcheng+CP"):
        out[repo] = git_head(MIRRORS / repo / "repo") or "?"
    return out


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------

def run_method(method: str, args: argparse.Namespace, dev, sentences: list[str], log: Callable[[str], None]) -> dict:
    from sempa_exp.models.backbones import load_backbone, model_path

    backbone_methods: dict = {}
    if method in SETTING_KEYS:  # what the backbone config holds, before any override
        backbone_methods = dict(compose_project(args.backbone, method, args.dtype, args.data_dir, [],
                                                        check=False).backbone.methods)
    values, overrides, origin = resolve_settings(method, backbone_methods, args.setting)
    config = compose_project(args.backbone, method, args.dtype, args.data_dir, overrides)
    log(f"\n=== {method} on {args.backbone} ({args.dtype}) ===")
    if values:
        log("settings used on both sides: " + ", ".join(f"{k}={v} [{origin[k]}]" for k, v in values.items()))
    log(f"project overrides: {overrides or 'none'}")

    project = project_embed(config, sentences)
    log(f"project: {len(sentences)} sentences in {project.seconds:.1f}s; settings {project.settings}")
    mismatched = {k: (v, project.settings.get(k)) for k, v in values.items() if project.settings.get(k) != v}
    if mismatched:
        log(f"!! the project resolved other settings than the reference uses: {mismatched}")

    path = model_path(config.backbone, Path(config.paths.cache_dir).expanduser())
    causal_lm, tokenizer = load_backbone(config.backbone, config.paths.cache_dir, dtype=args.dtype)
    causal_lm.eval()
    t0 = time.time()
    ref = reference_embed(method, causal_lm, path, sentences, values, args.echo_repo)
    ref_seconds = time.time() - t0
    log(f"reference: {len(sentences)} sentences in {ref_seconds:.1f}s")
    for note in ref.notes:
        log(f"  {note}")

    pad_noise = None
    if args.pad_check > 0:
        k = min(args.pad_check, len(sentences))
        single = np.concatenate([reference_embed(method, causal_lm, path, [s], values, args.echo_repo, 1).vectors
                                 for s in sentences[:k]])
        pad_noise = float(1.0 - cosines(single, ref.vectors[:k]).min())
        log(f"padding yardstick (reference, first {k} sentences alone vs batched): 1 - min cos = {pad_noise:.2e}")
    k = min(OFFICIAL_BATCH, len(sentences))
    control = reference_embed(method, causal_lm, path, sentences[:k], values, args.echo_repo, control=True).vectors
    control_gap = float(1.0 - cosines(control, ref.vectors[:k]).min())
    log(f"sensitivity (reference with {CONTROLS[method]}, first {k} sentences): 1 - min cos = {control_gap:.3e}")
    del causal_lm
    _TP_PREPARED.clear()
    gc.collect()

    n = args.sentences if args.sentences else len(sentences)
    n = min(n, len(sentences))
    equal, problems = compare_ids(method, ref, project, tokenizer)
    cos = cosines(ref.vectors[:n], project.vectors[:n])
    max_abs = float(np.abs(ref.vectors[:n] - project.vectors[:n]).max())
    scale = float(np.abs(ref.vectors[:n]).max())
    worst = int(cos.argmin())
    log(f"token ids equal: {equal}/{len(sentences)}" + (" (all checked sentences)" if n != len(sentences) else ""))
    for line in problems:
        log(line)
    log(f"first {n}: cosine min {cos.min():.10f} = 1 - {1 - cos.min():.2e} (sentence {worst}: {sentences[worst]!r}), "
        f"mean {cos.mean():.10f}; "
        f"max |diff| {max_abs:.3e} (max |value| {scale:.3e})")

    result: dict[str, Any] = {
        "method": method, "backbone": args.backbone, "dtype": args.dtype, "sentences_compared": n,
        "sentences_embedded": len(sentences), "token_ids_equal": equal, "token_ids_checked": len(sentences),
        "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "max_abs_diff": max_abs,
        "max_abs_value": scale, "worst_sentence": sentences[worst], "pad_noise_1_minus_cos": pad_noise,
        "control": CONTROLS[method], "control_1_minus_min_cos": control_gap,
        "settings": values, "settings_origin": origin, "project_overrides": overrides,
        "project_settings": project.settings, "project_method_config": project.method_config,
        "project_embed_config": project.embed_config, "project_pad_token_id": project.pad_token_id,
        "project_batch_size": config.eval.batch_size, "reference_batch_size": OFFICIAL_BATCH,
        "reference_pad_id": OFFICIAL_PAD_ID if method != "echo" else "tokenizer pad, right padding",
        "reference_notes": ref.notes, "id_problems": problems[:12],
        "seconds": {"project": round(project.seconds, 1), "reference": round(ref_seconds, 1)},
    }
    ok = equal == len(sentences) and cos.min() > MIN_COSINE and not mismatched
    if args.stsb_dev:
        ref_lookup = dict(zip(sentences, ref.vectors))
        proj_lookup = dict(zip(sentences, project.vectors))
        ref_sts, proj_sts = stsb_scores(dev, ref_lookup), stsb_scores(dev, proj_lookup)
        result |= {"ref_stsb_dev": ref_sts, "project_stsb_dev": proj_sts, "stsb_dev_diff": proj_sts - ref_sts}
        all_cos = cosines(ref.vectors, project.vectors)
        result["min_cosine_all_dev"] = float(all_cos.min())
        log(f"STS-B dev Spearman x100: reference {ref_sts:.3f}, project {proj_sts:.3f}, diff {proj_sts - ref_sts:+.3f}"
            f"; min cosine over all {len(sentences)} dev sentences {all_cos.min():.8f}")
        ok = ok and abs(proj_sts - ref_sts) < MAX_STS_DIFF and all_cos.min() > MIN_COSINE
    result["pass"] = bool(ok)
    log(f"{method}: {'PASS' if ok else 'FAIL'} (criteria: identical ids, min cos > {MIN_COSINE}"
        + (f", |STS-B dev diff| < {MAX_STS_DIFF})" if args.stsb_dev else ")"))
    return result


def summary_table(results: Sequence[dict]) -> str:
    head = ("| method | backbone | token ids equal | min cos | 1 - min cos | max abs diff | control 1 - min cos "
            "| ref STS-B dev | project STS-B dev | diff | pass |")
    lines = [head, "|" + "---|" * 11]
    for r in results:
        def fmt(key: str, spec: str = ".3f", r: dict = r) -> str:
            return format(r[key], spec) if r.get(key) is not None else "-"
        lines.append(f"| {r['method']} | {r['backbone']} | {r['token_ids_equal']}/{r['token_ids_checked']} "
                     f"| {r['min_cosine']:.7f} | {1 - r['min_cosine']:.1e} | {r['max_abs_diff']:.2e} "
                     f"| {r['control_1_minus_min_cos']:.1e} "
                     f"| {fmt('ref_stsb_dev')} | {fmt('project_stsb_dev')} | {fmt('stsb_dev_diff', '+.3f')} "
                     f"| {'PASS' if r['pass'] else 'FAIL'} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", required=True, choices=["smollm2_135m", "gemma3_270m"])
    p.add_argument("--method", default="all", choices=[*METHODS, "all"])
    p.add_argument("--sentences", type=int, default=300, help="first N distinct STS-B dev sentences compared")
    p.add_argument("--stsb-dev", action="store_true", help="also score both sides on the full STS-B dev set")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--setting", action="append", default=[],
                   help="key=value or method.key=value: a TP/CP layer setting, used on both sides")
    p.add_argument("--echo-repo", type=Path, default=Path("/tmp/echo_ref"),
                   help="folder holding the authors' echo_embeddings.py (see the module docstring)")
    p.add_argument("--pad-check", type=int, default=4, help="reference sentences also embedded alone (0 = none)")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("SEMPA_DATA_DIR", "../shared/data")))
    p.add_argument("--json", type=Path, default=None, help="default: bench/results_reference_<backbone>.json")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.data_dir = args.data_dir.resolve()
    from sempa_exp.data.sts import load_stsb_dev

    checked = verify_official_strings(MIRRORS)
    for line in checked:
        print(f"official string: {line}")
    dev = load_stsb_dev(args.data_dir)
    distinct = list(dict.fromkeys(s for pair in zip(dev.sentences1, dev.sentences2) for s in pair))
    sentences = distinct if args.stsb_dev else distinct[:args.sentences]
    print(f"STS-B dev: {len(dev.scores)} pairs, {len(distinct)} distinct sentences; embedding {len(sentences)}, "
          f"comparing the first {min(args.sentences, len(sentences))}")
    torch.manual_seed(0)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    out_path = args.json or ROOT / "bench" / f"results_reference_{args.backbone}.json"
    stored = json.loads(out_path.read_text()) if out_path.exists() else {}
    results = []
    for method in (METHODS if args.method == "all" else (args.method,)):
        result = run_method(method, args, dev, sentences, print)
        result["command"] = command
        result["versions"] = versions()
        result["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
        results.append(result)
        stored.setdefault("methods", {})[method] = result
        stored["backbone"] = args.backbone
        out_path.write_text(json.dumps(stored, indent=2, default=str) + "\n")
    print("\n" + summary_table(results))
    print(f"\nwritten: {out_path}")
    return 0 if all(r["pass"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
