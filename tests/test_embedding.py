"""SentenceEncoder against direct forward passes of the causal LM on the tiny backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sempa_exp.config.schema import BackboneConfig, EmbedConfig, data_dir
from sempa_exp.data.prompts import embedding_prompt
from sempa_exp.embedding.encoder import SentenceEncoder
from sempa_exp.models.backbones import load_backbone

PROMPTEOL = EmbedConfig(name="prompteol", template='This sentence : "{s}" means in one word:"', pooling="last")
MEAN = EmbedConfig(name="mean", template="{s}", pooling="mean", prompteol_preprocess=False)
SENTENCES = ["A man is playing a guitar", "Dogs run.", "Is the weather nice today, or is it raining again?", "Hi",
             "A man is playing a guitar", "Two children are eating bread in the kitchen."]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_backbone(BackboneConfig(name="tiny", source="tiny", dtype="float32"), cache_dir="unused")
    model.eval()
    return model, tokenizer


def reference_last_token(model, tokenizer, prompts: list[str]) -> np.ndarray:
    """The causal LM's own last-layer hidden state of the final token, batched with left padding."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return out.hidden_states[-1][:, -1].numpy()


def test_last_token_pooling_equals_the_causal_lm_hidden_state(tiny):
    model, tokenizer = tiny
    encoder = SentenceEncoder(model, tokenizer, PROMPTEOL, batch_size=4, progress=False)
    vectors = encoder.encode(SENTENCES)
    prompts = [embedding_prompt(PROMPTEOL.template, s, True) for s in SENTENCES]
    assert prompts[1] == 'This sentence : "Dogs run." means in one word:"'
    assert prompts[0] == 'This sentence : "A man is playing a guitar." means in one word:"'
    np.testing.assert_allclose(vectors, reference_last_token(model, tokenizer, prompts), atol=1e-5, rtol=1e-4)
    # and each prompt alone, without any padding
    for prompt, vector in zip(prompts, vectors, strict=True):
        np.testing.assert_allclose(vector, reference_last_token(model, tokenizer, [prompt])[0], atol=1e-5, rtol=1e-4)


def test_mean_pooling_excludes_special_tokens_and_padding(tiny):
    from tokenizers.processors import TemplateProcessing

    model, base = tiny
    core = base.backend_tokenizer.__class__.from_str(base.backend_tokenizer.to_str())  # a copy: the fixture's stays
    tokenizer = base.__class__(tokenizer_object=core, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                               unk_token="<unk>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(  # a BOS on every prompt, like real backbones
        single="<s> $A", special_tokens=[("<s>", tokenizer.convert_tokens_to_ids("<s>"))])
    ids = tokenizer("Dogs run.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len("Dogs run.") + 1

    encoder = SentenceEncoder(model, tokenizer, MEAN, batch_size=3, progress=False)
    vectors = encoder.encode(SENTENCES)
    for sentence, vector in zip(SENTENCES, vectors, strict=True):
        ids = torch.tensor([tokenizer(sentence)["input_ids"]])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        np.testing.assert_allclose(vector, hidden[1:].mean(dim=0).numpy(), atol=1e-5, rtol=1e-4)  # BOS left out
        assert not np.allclose(vector, hidden.mean(dim=0).numpy(), atol=1e-4)


def test_duplicates_are_embedded_once_and_order_is_kept(tiny, monkeypatch):
    model, tokenizer = tiny
    encoder = SentenceEncoder(model, tokenizer, PROMPTEOL, batch_size=2, progress=False)
    calls = []
    embed = encoder._embed_batches
    monkeypatch.setattr(encoder, "_embed_batches", lambda batches: calls.append(batches) or embed(batches))
    vectors = encoder.encode(SENTENCES)
    assert len(calls) == 1 and sorted(s for b in calls[0] for s in b) == sorted(dict.fromkeys(SENTENCES))
    np.testing.assert_array_equal(vectors[0], vectors[4])
    again = encoder.encode(SENTENCES[::-1])
    assert len(calls) == 1  # memoised
    np.testing.assert_array_equal(again, vectors[::-1])
    one_by_one = SentenceEncoder(model, tokenizer, PROMPTEOL, batch_size=1, progress=False).encode(SENTENCES)
    np.testing.assert_allclose(vectors, one_by_one, atol=1e-5, rtol=1e-4)
    assert encoder.encode([]).shape[0] == 0


def test_lora_layers_are_active_when_embedding(tiny):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_backbone(BackboneConfig(name="tiny", source="tiny", dtype="float32"), cache_dir="unused")
    before = SentenceEncoder(model, tokenizer, PROMPTEOL, progress=False).encode(SENTENCES)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False))  # random B: the adapter changes outputs
    peft_model.train()
    encoder = SentenceEncoder(peft_model, tokenizer, PROMPTEOL, progress=False)
    after = encoder.encode(SENTENCES)
    assert peft_model.training  # the encoder restores the training mode
    assert not np.allclose(before, after, atol=1e-3)
    prompts = [embedding_prompt(PROMPTEOL.template, s, True) for s in SENTENCES]
    peft_model.eval()
    np.testing.assert_allclose(after, reference_last_token(peft_model, tokenizer, prompts), atol=1e-5, rtol=1e-4)


def test_embedding_cache_round_trips_sentences_with_their_vectors(tmp_path):
    from types import SimpleNamespace

    from sempa_exp.evaluation.suites import EmbeddingCache

    key = {"backbone": "tiny", "embed": "prompteol"}
    vectors = {"a \"quoted\" one": np.array([1.0, 2.0], dtype=np.float32),
               "é unicode": np.array([3.0, 4.0], dtype=np.float32), "": np.zeros(2, np.float32)}
    written = SimpleNamespace(memo={"ad hoc": np.array([5.0, 6.0], dtype=np.float32)},
                              group_memo={"sts": vectors, "stsb_dev": {"é unicode": np.ones(2, np.float32)}})
    EmbeddingCache(tmp_path, key).save_from(written)
    assert [p.name for p in (tmp_path / "embeddings").rglob("*.tmp*")] == []  # nothing half-written left behind

    read = SimpleNamespace(memo={}, group_memo={"sts": {}, "stsb_dev": {}})
    assert EmbeddingCache(tmp_path, key).load_into(read) == 5
    assert read.memo.keys() == written.memo.keys()
    for name, memo in written.group_memo.items():
        assert read.group_memo[name].keys() == memo.keys()
        for sentence, vector in memo.items():
            np.testing.assert_array_equal(read.group_memo[name][sentence], vector)
    np.testing.assert_array_equal(read.memo["ad hoc"], written.memo["ad hoc"])
    other = SimpleNamespace(memo={}, group_memo={})
    assert EmbeddingCache(tmp_path, {**key, "embed": "mean"}).load_into(other) == 0  # other key


def test_a_damaged_embedding_cache_is_ignored_not_fatal(tmp_path):
    from types import SimpleNamespace

    from sempa_exp.evaluation.suites import EmbeddingCache

    cache = EmbeddingCache(tmp_path, {"backbone": "tiny"})
    cache.save_from(SimpleNamespace(memo={"a": np.ones(2, np.float32)}, group_memo={}))
    stored = cache.folder / "embeddings.npz"
    stored.write_bytes(stored.read_bytes()[:40])  # truncated, e.g. a full disk
    read = SimpleNamespace(memo={}, group_memo={})
    assert cache.load_into(read) == 0 and read.memo == {}


def test_a_grouped_sentence_gets_the_same_vector_whatever_was_embedded_before(tiny_cfg):
    """The encoder's groups fix each sentence's batch: STS vectors after STS-B dev was embedded (a checkpoint's
    evaluation, then the final one) equal a fresh encoder's bit for bit (a run resumed between the two scores as
    the uninterrupted run). Without groups the batch-mates, and so the last bits, depend on the history."""
    from omegaconf import OmegaConf

    from sempa_exp.evaluation.suites import eval_groups, evaluate, load_eval_data, sentences_needed

    cfg = OmegaConf.to_object(tiny_cfg())
    model, tokenizer = load_backbone(cfg.backbone, cfg.paths.cache_dir)
    model = model.to(torch.bfloat16)  # bf16: batch-mates show in the last bits
    data = load_eval_data(data_dir(cfg), ["sts", "stsb_dev", "geometry"])
    sts = sentences_needed(data, ["sts"])["sts"]
    dev = sentences_needed(data, ["stsb_dev"])["stsb_dev"]
    assert set(sts) & set(dev)  # the synthetic data shares sentences between the groups, as the real data does

    def encoder(**kwargs):
        return SentenceEncoder(model, tokenizer, cfg.embed, batch_size=5, progress=False, **kwargs)

    fresh = encoder(groups=eval_groups(data))
    after_dev = encoder(groups=eval_groups(data))
    after_dev.encode(dev, "stsb_dev")
    after_dev.encode(sts[::3], "sts")  # part of the group first: its batches are computed whole all the same
    np.testing.assert_array_equal(after_dev.encode(sts, "sts"), fresh.encode(sts, "sts"))
    assert evaluate(encoder(groups=eval_groups(data)), data, ["stsb_dev", "sts"]) == evaluate(
        encoder(groups=eval_groups(data)), data, ["sts", "stsb_dev"])

    plain_fresh, plain_after = encoder(), encoder()
    plain_after.encode(dev)
    assert not np.array_equal(plain_after.encode(sts), plain_fresh.encode(sts))  # what the groups prevent
    with pytest.raises(ValueError, match="not in the encoder's group 'stsb_dev'"):
        fresh.encode(["a sentence of no group"], "stsb_dev")
