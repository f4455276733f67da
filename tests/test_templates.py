"""Prompt filling and PromptEOL's sentence preprocessing."""

from __future__ import annotations

import pytest

from sempa_exp.data.prompts import dpo_prompt_messages, embedding_prompt, fill, prompteol_preprocess

PROMPTEOL = 'This sentence : "{s}" means in one word:"'


def test_fill_puts_the_sentence_at_the_placeholder():
    assert fill('Paraphrase: "{s}".', "A man eats") == 'Paraphrase: "A man eats".'


def test_fill_leaves_braces_in_sentence_and_template_alone():
    # str.format would raise on these or substitute the sentence's own "{s}"
    assert fill("{x} {s} {0}", "f(x) = {y}") == "{x} f(x) = {y} {0}"
    assert fill("<{s}>", "a {s} b") == "<a {s} b>"


@pytest.mark.parametrize(("raw", "expected"), [
    ("A man is eating", "A man is eating."),  # no final punctuation: '.' added
    ("A man is eating.", "A man is eating."),
    ("Is a man eating?", "Is a man eating."),  # final '?' becomes '.'
    ('He said "hi"', "He said 'hi'"),  # '"' becomes "'"; a final quote counts as punctuation
    ("It's the man'", "It's the man'"),
    ("Wait! what", "Wait! what."),
    ("Really?!", "Really?!."),
    ("", ""),
])
def test_prompteol_preprocess(raw, expected):
    assert prompteol_preprocess(raw) == expected


def test_embedding_prompt_with_and_without_preprocessing():
    assert embedding_prompt(PROMPTEOL, 'Is it "good"?', True) == 'This sentence : "Is it \'good\'." means in one word:"'
    assert embedding_prompt(PROMPTEOL, 'Is it "good"?', False) == 'This sentence : "Is it "good"?" means in one word:"'
    assert embedding_prompt("{s}", "  padded  ", False) == "padded"  # mean pooling: the bare sentence, stripped


def test_dpo_prompt_messages():
    instruction = 'Keep the same meaning of this sentence: "{s}", while making some changes.'
    messages = dpo_prompt_messages(instruction, "A dog runs.", "You are a helpful assistant")
    user = 'Keep the same meaning of this sentence: "A dog runs.", while making some changes.'
    assert messages == [{"role": "system", "content": "You are a helpful assistant"}, {"role": "user", "content": user}]
    assert dpo_prompt_messages("{s}", "x", "") == [{"role": "user", "content": "x"}]
