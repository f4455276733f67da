"""Prompt construction: paraphrase instructions for training, raw embedding prompts for evaluation."""

from __future__ import annotations


def fill(template: str, sentence: str) -> str:
    """Puts the sentence where ``{s}`` stands. str.format is not used: sentences and templates contain braces."""
    return template.replace("{s}", sentence)


def prompteol_preprocess(sentence: str) -> str:
    """PromptEOL's sentence clean-up: end with '.', '?', '"' or "'" (else add '.'), '"' -> "'", final '?' -> '.'."""
    if sentence and sentence[-1] not in ".?\"'":
        sentence += "."
    sentence = sentence.replace('"', "'")
    if sentence and sentence[-1] == "?":
        sentence = sentence[:-1] + "."
    return sentence


def embedding_prompt(template: str, sentence: str, preprocess: bool) -> str:
    if preprocess:
        sentence = prompteol_preprocess(sentence)
    return fill(template, sentence).strip()


def dpo_prompt_messages(instruction_template: str, premise: str, system_prompt: str) -> list[dict[str, str]]:
    """The conversational prompt TRL renders with the backbone's chat template."""
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": fill(instruction_template, premise)})
    return messages
