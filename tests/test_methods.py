"""Each embedding method on the tiny backbone: what makes it that method, checked against a hand-made forward pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from sempa_exp.config.schema import BackboneConfig, ConfigError, EmbedConfig
from sempa_exp.embedding.base import decoder_of
from sempa_exp.embedding.checkpoint import check_backbone, resolve_adapter, trained_samples
from sempa_exp.embedding.contrastive_prompting import ContrastivePromptingMethod, steer
from sempa_exp.embedding.echo import EchoMethod
from sempa_exp.embedding.encoder import SentenceEncoder
from sempa_exp.embedding.prompt import PromptMethod
from sempa_exp.embedding.token_prepending import TokenPrependingMethod
from sempa_exp.models.backbones import load_backbone
from sempa_exp.records.results import FINISHED, Results, RunKind, write_results

PROMPTEOL = EmbedConfig(name="prompteol", template='This sentence : "{s}" means in one word:"')
MEAN = EmbedConfig(name="mean", template="{s}", pooling="mean", prompteol_preprocess=False)
SENTENCES = ["A man is playing a guitar.", "Dogs run", "The quick brown fox jumps over the lazy dog near the river."]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_backbone(BackboneConfig(name="tiny", source="tiny", dtype="float32"), "/nonexistent")
    final_hidden(model, [10, 11])  # transformers installs its own output-capturing hooks on the first such call
    return model.eval(), tokenizer


def encode(model, tokenizer, method, sentences=SENTENCES, batch_size=2, embed=PROMPTEOL) -> np.ndarray:
    return SentenceEncoder(model, tokenizer, embed, batch_size=batch_size, progress=False, method=method).encode(
        sentences)


def final_hidden(model, ids: list[int]) -> torch.Tensor:
    """(seq, dim) final hidden states (after the norm) of one unpadded sequence."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1][0]


def hook_ids(model) -> list[tuple[str, tuple, tuple]]:
    """Every module's forward (pre-)hooks; transformers installs some of its own, which must stay as they are."""
    return [(name, tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for name, m in model.named_modules()]


def snapshot(model) -> tuple[dict[str, torch.Tensor], list]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, hook_ids(model)


def assert_untouched(model, before: tuple[dict[str, torch.Tensor], list]) -> None:
    weights, hooks = before
    after = model.state_dict()
    assert weights.keys() == after.keys()
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    assert hook_ids(model) == hooks, "a hook was left behind"


def test_prompt_method_is_last_token_of_the_prompt_and_padding_free(tiny):
    model, tokenizer = tiny
    method = PromptMethod(tokenizer, PROMPTEOL)
    vectors = encode(model, tokenizer, method)
    for sentence, vector in zip(SENTENCES, vectors, strict=True):
        ids = tokenizer(method.prompt(sentence))["input_ids"]
        assert method.prompt(sentence).startswith('This sentence : "') and method.prompt(sentence).endswith('word:"')
        np.testing.assert_allclose(vector, final_hidden(model, ids)[-1].numpy(), atol=1e-5)


def test_mean_pooling_averages_every_sentence_token(tiny):
    model, tokenizer = tiny
    vectors = encode(model, tokenizer, PromptMethod(tokenizer, MEAN), embed=MEAN)
    for sentence, vector in zip(SENTENCES, vectors, strict=True):
        ids = tokenizer(sentence)["input_ids"]
        np.testing.assert_allclose(vector, final_hidden(model, ids).mean(dim=0).numpy(), atol=1e-5)


def test_echo_pools_the_second_copy_and_the_eos_with_each_piece_tokenized_alone(tiny):
    """The authors' parser: literal text and brace pieces are tokenized one by one and concatenated; the mean runs over
    the pooled pieces (the second copy and the EOS)."""
    model, tokenizer = tiny
    method = EchoMethod(tokenizer, "<s>Rewrite: {!%%text%%}, again: {%%text%%}{</s>}")
    for sentence, feature, vector in zip(SENTENCES, method.features(SENTENCES), encode(model, tokenizer, method),
                                         strict=True):
        piece = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Rewrite: ", sentence, ", again: ")]
        # the tiny tokenizer adds no BOS, so <s> stands for nothing; </s> is its EOS
        assert feature["input_ids"] == [*piece[0], *piece[1], *piece[2], *piece[1], tokenizer.eos_token_id]
        pooled = [i for i, m in enumerate(feature["pool_mask"]) if m]
        assert pooled == list(range(len(feature["input_ids"]) - len(piece[1]) - 1, len(feature["input_ids"])))
        hidden = final_hidden(model, feature["input_ids"])
        np.testing.assert_allclose(vector, hidden[pooled].mean(dim=0).numpy(), atol=1e-5)


def test_echo_template_reads_then_pools_the_sentence(tiny):
    for template in ("only once: {%%text%%}", "Rewrite: {%%text%%}, again: {%%text%%}", "no braces %%text%%"):
        with pytest.raises(ConfigError, match="sentence twice"):
            EchoMethod(tiny[1], template)


def test_steering_norms():
    v, aux = torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 0.0]])
    assert torch.allclose(steer(v, aux, "scaled", 0.5), torch.tensor([[0.0, 2.0]]))
    assert torch.allclose(steer(v, aux, "preserve", 0.5), torch.tensor([[0.0, 5.0]]))  # |v| = 5 kept


def test_contrastive_prompting_replaces_the_last_tokens_attention_values(tiny):
    """With the auxiliary prompt equal to the normal one, v_nor - v_aux = 0: the method must equal a forward pass whose
    layer-1 attention output (o_proj input) at the last token is zero, and differ from PromptEOL."""
    model, tokenizer = tiny
    before = snapshot(model)
    same = ContrastivePromptingMethod(tokenizer, PROMPTEOL, aux_template=PROMPTEOL.template, layer=1, alpha=0.5)
    vectors = encode(model, tokenizer, same)
    o_proj = decoder_of(model).layers[1].self_attn.o_proj

    def zero_last(_module, args):
        values = args[0].clone()
        values[:, -1, :] = 0
        return (values,)

    prompteol = PromptMethod(tokenizer, PROMPTEOL)
    handle = o_proj.register_forward_pre_hook(zero_last)
    try:
        expected = [final_hidden(model, tokenizer(prompteol.prompt(s))["input_ids"])[-1].numpy() for s in SENTENCES]
    finally:
        handle.remove()
    np.testing.assert_allclose(vectors, np.stack(expected), atol=1e-5)
    assert not np.allclose(vectors, encode(model, tokenizer, prompteol), atol=1e-3)
    steered = encode(model, tokenizer, ContrastivePromptingMethod(tokenizer, PROMPTEOL, layer=1))
    assert not np.allclose(steered, vectors, atol=1e-3)  # the real auxiliary prompt contributes
    assert_untouched(model, before)


def test_contrastive_prompting_stops_the_auxiliary_pass_at_its_layer(tiny):
    model, tokenizer = tiny
    method = ContrastivePromptingMethod(tokenizer, PROMPTEOL, layer=0)
    calls = []
    handle = decoder_of(model).layers[1].register_forward_hook(lambda *_: calls.append(1))
    try:
        values = method.auxiliary_values(model, method.features(SENTENCES[:2]))
    finally:
        handle.remove()
    assert calls == [] and values.shape == (2, model.config.hidden_size)


def test_token_prepending_rewrites_the_placeholder_and_changes_early_tokens_only_after_it(tiny):
    model, tokenizer = tiny
    before = snapshot(model)
    vocabulary = len(tokenizer)
    method = TokenPrependingMethod(tokenizer, 'Sentence : {pst} "{s}" means in one word:"', start_layer=1,
                                   exit_layer=2)
    assert len(tokenizer) == vocabulary  # the placeholder is added to a private copy of the tokenizer
    feature = method.features(SENTENCES[:1])[0]
    ids, pst = feature["input_ids"], feature["pst_index"]
    # the whole prompt is tokenized at once: the space before the placeholder stays a token (the authors' layout)
    assert ids[pst] == tokenizer.pad_token_id and tokenizer.decode(ids[:pst]) == "Sentence : "
    assert ids[pst + 1:] == tokenizer(' "A man is playing a guitar." means in one word:"')["input_ids"]

    decoder = decoder_of(model)
    embedded, seen, finals = [], [], []
    hooks = [decoder.layers[0].input_layernorm.register_forward_pre_hook(
                 lambda _m, args: embedded.append(args[0].clone())),
             decoder.layers[1].input_layernorm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone())),
             decoder.norm.register_forward_hook(lambda _m, _a, out: finals.append(out.clone()))]
    try:
        vector = method.embed_batch(model, [feature])[0]
    finally:
        for h in hooks:
            h.remove()
    # layer 0 reads the placeholder's own N(0, I) input embedding, the seeded draw
    expected = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3407))
    assert torch.equal(embedded[0][0, pst], expected)
    # entering layer 1, the placeholder holds the last token's hidden state: the sentence embedding so far
    assert torch.equal(seen[0][0, pst], seen[0][0, -1])
    with_tp, plain = finals[0][0], final_hidden(model, ids)
    assert torch.allclose(with_tp[:pst], plain[:pst], atol=1e-6)  # tokens before the placeholder cannot see it
    first_word = pst + 2  # after the placeholder and ' "': the sentence's first token now sees the whole sentence
    assert not torch.allclose(with_tp[first_word], plain[first_word], atol=1e-4)
    assert torch.allclose(vector, with_tp[-1])
    assert_untouched(model, before)


def test_pretended_cot_is_the_authors_prompt_read_before_the_last_layer(tiny):
    """conf/method/pretended_cot.yaml: the authors' prompt ('step by step , this') and hidden_states[-2]."""
    model, tokenizer = tiny
    cot = EmbedConfig(name="pretended_cot",
                      template='After thinking step by step , this sentence : "{s}" means in one word:"')
    method = PromptMethod(tokenizer, cot, output_layer=-2)
    vectors = encode(model, tokenizer, method, embed=cot)
    for sentence, vector in zip(SENTENCES, vectors, strict=True):
        ids = tokenizer(method.prompt(sentence))["input_ids"]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        assert len(hidden) == model.config.num_hidden_layers + 1
        np.testing.assert_allclose(vector, hidden[-2][0, -1].numpy(), atol=1e-5)
        assert not np.allclose(vector, hidden[-1][0, -1].numpy(), atol=1e-3)


def test_token_prepending_checks_its_layers(tiny):
    model, tokenizer = tiny
    with pytest.raises(ConfigError, match="start_layer"):
        TokenPrependingMethod(tokenizer, start_layer=3, exit_layer=2)
    method = TokenPrependingMethod(tokenizer, exit_layer=9)
    with pytest.raises(ConfigError, match="exceeds"):
        method.embed_batch(model, method.features(SENTENCES[:1]))


def test_checkpoint_adapter_is_found_and_changes_the_embeddings(tiny, tmp_path):
    model, tokenizer = tiny
    peft_model = get_peft_model(load_backbone(BackboneConfig(name="tiny", source="tiny", dtype="float32"), "/x")[0],
                                LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    run_dir = tmp_path / "run"
    peft_model.save_pretrained(str(run_dir / "adapter"))
    (run_dir / "config.json").write_text(json.dumps({"backbone": {"name": "tiny"}, "embed": {"name": "prompteol"}}))
    adapter = resolve_adapter(run_dir)
    assert adapter == run_dir / "adapter" and resolve_adapter(adapter) == adapter
    assert trained_samples(adapter) is None  # no finished results.json: unknown, not 0
    record = Results(kind=RunKind.TRAINING, group="g", name="run", run_dir=str(run_dir), method="sempa",
                     status="unfinished", samples_seen=96)  # gen_eval's record of an unfinished run
    write_results(run_dir, record)
    assert trained_samples(adapter) is None
    record.status = FINISHED
    write_results(run_dir, record)
    assert trained_samples(adapter) == 96
    step_dir = run_dir / "checkpoints" / "checkpoint-2"
    peft_model.save_pretrained(str(step_dir))
    (step_dir / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 1, "samples_seen": 16, "train/loss": 0.7}, {"step": 2, "samples_seen": 32, "eval/stsb_dev": 50.0})))
    assert resolve_adapter(step_dir) == step_dir and trained_samples(step_dir) == 32
    (step_dir / "trainer_state.json").write_text("{")  # damaged: unknown, and the evaluation goes on
    assert trained_samples(step_dir) is None
    assert check_backbone(adapter, "tiny", "prompteol")["backbone"]["name"] == "tiny"
    with pytest.raises(ConfigError, match="trained on backbone=tiny"):
        check_backbone(adapter, "smollm2_135m", "prompteol")
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        resolve_adapter(tmp_path)
    method = PromptMethod(tokenizer, PROMPTEOL)
    tuned = encode(peft_model.eval(), tokenizer, method)
    assert not np.allclose(tuned, encode(model, tokenizer, method), atol=1e-3)


@pytest.fixture(scope="module")
def tiny_gemma(tiny):
    """A random 4-layer Gemma 3 (its own module classes, scaled embeddings, sliding-window layers) on the tiny
    tokenizer: every method must run on it through the architecture map, without a Llama module name."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = tiny[1]
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=64,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=1, eos_token_id=5)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    final_hidden(model, [10, 11])  # transformers' own output-capturing hooks, installed on the first such call
    return model, tokenizer


def test_every_decoder_method_runs_on_gemma3_through_the_architecture_map(tiny_gemma):
    from sempa_exp.models.architecture import decoder_parts

    model, tokenizer = tiny_gemma
    parts = decoder_parts(model)
    assert parts.model_type == "gemma3_text" and parts.num_layers == 4
    before = snapshot(model)
    prompteol = encode(model, tokenizer, PromptMethod(tokenizer, PROMPTEOL))
    for method in (EchoMethod(tokenizer), TokenPrependingMethod(tokenizer, start_layer=1, exit_layer=3),
                   ContrastivePromptingMethod(tokenizer, PROMPTEOL, layer=1, alpha=0.5, output_layer=-2)):
        vectors = encode(model, tokenizer, method)
        assert vectors.shape == prompteol.shape and np.isfinite(vectors).all()
        assert not np.allclose(vectors, prompteol, atol=1e-4), type(method).__name__
    assert_untouched(model, before)


def test_token_prepending_scales_the_placeholder_like_a_row_of_a_scaled_embedding(tiny_gemma):
    model, tokenizer = tiny_gemma
    method = TokenPrependingMethod(tokenizer, start_layer=1, exit_layer=2)
    feature = method.features(SENTENCES[:1])[0]
    seen = []
    probe = decoder_of(model).layers[0].register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True)
    try:
        method.embed_batch(model, [feature])
    finally:
        probe.remove()
    row = torch.randn(32, generator=torch.Generator().manual_seed(3407))
    assert torch.allclose(seen[0][0, feature["pst_index"]], row * 32 ** 0.5, atol=1e-5)  # Gemma scales by sqrt(d)


def test_an_unsupported_architecture_is_refused_by_name():
    from transformers import GPT2Config, GPT2LMHeadModel

    from sempa_exp.models.architecture import decoder_parts

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=16))
    with pytest.raises(ConfigError, match="'gpt2' is not supported.*gemma3_text.*llama"):
        decoder_parts(model)


def test_an_autoregembed_run_is_scored_only_with_its_own_read_out(tmp_path):
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps({
        "backbone": {"name": "tiny"}, "embed": {"name": "autoregembed"}, "objective": {"compress_tokens": 5}}))
    with pytest.raises(ConfigError, match="pass embed=autoregembed"):
        check_backbone(adapter, "tiny", "prompteol")
    assert check_backbone(adapter, "tiny", "autoregembed")["embed"]["name"] == "autoregembed"
