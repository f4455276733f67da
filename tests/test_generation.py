"""Generation capability on the tiny backbone: lm-eval on local two-item files, the perplexity proxy, bookkeeping."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from conftest import TINY_OVERRIDES, compose_config, make_data_root
from sempa_exp.config.schema import BackboneConfig, ConfigError, GenConfig
from sempa_exp.data import nli
from sempa_exp.evaluation import generation, perplexity
from sempa_exp.models.backbones import load_backbone
from sempa_exp.pipelines import generation as gen_eval
from sempa_exp.pipelines import training
from sempa_exp.records.metrics import read_metrics
from sempa_exp.records.results import (
    SUPERSEDED_GENERATION_FILE,
    Results,
    ResultsError,
    RunKind,
    add_generation,
    is_finished,
    read_results,
    write_results,
)

TRUTHFULQA_ITEMS = [
    {"question": "What color is the sky on a clear day?",
     "mc1_targets": {"choices": ["Blue.", "Green with red stripes.", "It is always dark.", "Purple."],
                     "labels": [1, 0, 0, 0]},
     "mc2_targets": {"choices": ["Blue.", "Green."], "labels": [1, 0]}},
    {"question": "How many legs does a spider have?",
     "mc1_targets": {"choices": ["Eight.", "Six.", "Two legs and two wings.", "None at all."],
                     "labels": [1, 0, 0, 0]},
     "mc2_targets": {"choices": ["Eight.", "Six."], "labels": [1, 0]}},
]
GSM8K_ITEMS = [
    {"question": "Tom has 3 apples and buys 2 more. How many apples does he have?", "answer": "3 + 2 = 5\n#### 5"},
    {"question": "A box holds 4 pens. How many pens are in 2 boxes?", "answer": "4 * 2 = 8\n#### 8"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_gen_data(root: Path) -> Path:
    write_jsonl(root / "gen" / "truthfulqa" / "mc_validation.jsonl", TRUTHFULQA_ITEMS)
    write_jsonl(root / "gen" / "gsm8k" / "test.jsonl", GSM8K_ITEMS)
    return root


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(BackboneConfig(name="tiny", source="tiny", dtype="float32"), "unused")


def test_local_tasks_run_end_to_end_through_lm_eval(tiny, tmp_path):
    model, tokenizer = tiny
    write_gen_data(tmp_path)
    gen = GenConfig(tasks=["truthfulqa_mc1", "gsm8k_cot", "hellaswag"], source="local", max_gen_toks=4)
    records = generation.run_benchmarks(model, tokenizer, gen, tmp_path)

    tqa = records["truthfulqa_mc1"]
    assert tqa["status"] == "ok" and tqa["source"] == "local" and tqa["lm_eval_task"] == "sempa_local_truthfulqa_mc1"
    assert (tqa["n"], tqa["n_total"], tqa["num_fewshot"]) == (2, 2, 0)
    # lm-eval's accuracy equals the argmax of our own log-likelihoods of each choice after lm-eval's prompt
    from lm_eval.tasks import TaskManager

    plan = generation.plan_local(generation.BENCHMARKS["truthfulqa_mc1"], tmp_path / "gen", tmp_path)
    task = TaskManager(include_path=str(tmp_path), include_defaults=False).load(plan.lm_eval_task)["tasks"][
        plan.lm_eval_task]
    correct = []
    for doc in task.validation_docs():
        context = tokenizer(task.doc_to_text(doc), add_special_tokens=False)["input_ids"]
        scores = [perplexity.score_continuations(
            model, [(context, tokenizer(" " + choice, add_special_tokens=False)["input_ids"])], 3)[0]
            for choice in task.doc_to_choice(doc)]
        correct.append(float(max(range(len(scores)), key=scores.__getitem__) == 0))
    assert tqa["score"] == pytest.approx(100.0 * sum(correct) / 2)
    # each question's own outcome is kept, so two records can be compared question by question
    assert tqa["per_doc"] == {"sempa_local_truthfulqa_mc1": {"doc_id": [0, 1], "value": correct}}

    gsm = records["gsm8k_cot"]
    assert gsm["status"] == "ok" and (gsm["n"], gsm["num_fewshot"]) == (2, 8)
    assert gsm["metric"] == "exact_match,strict-match" and 0.0 <= gsm["score"] <= 100.0
    gsm_docs = gsm["per_doc"]["sempa_local_gsm8k_cot"]
    assert gsm_docs["doc_id"] == [0, 1] and 100.0 * sum(gsm_docs["value"]) / 2 == pytest.approx(gsm["score"])
    assert records["hellaswag"]["status"] == "unavailable"
    assert "hellaswag/validation.jsonl" in records["hellaswag"]["reason"]
    assert generation.average(records)["tasks"] == ["gsm8k_cot", "truthfulqa_mc1"]
    assert generation.average(records)["complete"] is False


def test_missing_local_files_are_unavailable_not_faked(tmp_path):
    gen_dir = tmp_path / "gen"
    write_jsonl(gen_dir / "mmlu" / "test" / "anatomy.jsonl", [{"question": "q", "subject": "anatomy",
                                                              "choices": ["a", "b", "c", "d"], "answer": 0}])
    write_jsonl(gen_dir / "mmlu" / "dev" / "anatomy.jsonl", [])
    plans = generation.plan_tasks(["mmlu", "drop", "hellaswag"], "local", gen_dir, tmp_path)
    assert {p.source for p in plans.values()} == {"unavailable"}
    assert "abstract_algebra.jsonl" in plans["mmlu"].reason and "more" in plans["mmlu"].reason
    assert "drop/train.jsonl" in plans["drop"].reason  # DROP's 3 shots come from its train split
    assert not list(tmp_path.glob("*.yaml"))  # nothing half-written for a task that cannot run
    auto = generation.plan_tasks(["drop"], "auto", gen_dir, tmp_path)["drop"]
    assert (auto.source, auto.lm_eval_task) == ("hub", "drop") and "no local data" in auto.reason


def test_local_mmlu_is_one_group_over_all_subjects(tmp_path):
    gen_dir = tmp_path / "gen"
    subjects = generation.mmlu_subjects()
    assert len(subjects) == 57
    row = {"question": "q", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": 1}
    for subject in subjects:
        for split in ("test", "dev"):
            write_jsonl(gen_dir / "mmlu" / split / f"{subject}.jsonl", [row])
    out = tmp_path / "tasks"
    out.mkdir()
    plan = generation.plan_local(generation.BENCHMARKS["mmlu"], gen_dir, out)
    assert plan.source == "local" and len(plan.data_files) == 114
    group = generation.yaml.safe_load((out / "sempa_local_mmlu.yaml").read_text())
    assert len(group["task"]) == 57 and group["aggregate_metric_list"][0]["weight_by_size"] is True
    anatomy = generation.yaml.safe_load((out / "sempa_local_mmlu_anatomy.yaml").read_text())
    assert anatomy["include"].endswith("mmlu/default/mmlu_anatomy.yaml") and anatomy["tag"] == []
    assert anatomy["dataset_kwargs"]["data_files"] == {"test": str(gen_dir / "mmlu/test/anatomy.jsonl"),
                                                       "dev": str(gen_dir / "mmlu/dev/anatomy.jsonl")}


@pytest.mark.parametrize("with_train", [False, True])
def test_a_split_the_local_data_lacks_is_switched_off(tmp_path, with_train):
    """The official hellaswag config (read with lm-eval's loader: it has a ``!function``) names a training split; a
    local run without that file switches it off, one with the optional file reads it."""
    gen_dir = tmp_path / "gen"
    write_jsonl(gen_dir / "hellaswag" / "validation.jsonl", [])
    if with_train:
        write_jsonl(gen_dir / "hellaswag" / "train.jsonl", [])
    plan = generation.plan_local(generation.BENCHMARKS["hellaswag"], gen_dir, tmp_path)
    config = generation.yaml.safe_load((tmp_path / f"{plan.lm_eval_task}.yaml").read_text())
    assert set(config["dataset_kwargs"]["data_files"]) == ({"validation", "train"} if with_train else {"validation"})
    if with_train:
        assert "training_split" not in config
    else:
        assert config["training_split"] is None


class UniformLM(torch.nn.Module):
    """Logits of zero everywhere: every token has probability 1/vocab."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def _proxy(n: int = 6) -> perplexity.ProxySet:
    triplets = [nli.Triplet(f"A man is playing guitar number {i}.", f"A man plays music {i}.", f"A cat sleeps {i}.")
                for i in range(20)]
    return perplexity.build_proxy_set(triplets, n, 42, "Paraphrase: {s}", "You are a helpful assistant", 10)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny):
    _, tokenizer = tiny
    metrics = perplexity.proxy_metrics(UniformLM(len(tokenizer)), tokenizer, _proxy(), batch_size=4)
    assert metrics["ppl_nli"] == pytest.approx(len(tokenizer), rel=1e-5)
    assert metrics["logp_chosen"] == pytest.approx(-math.log(len(tokenizer)), rel=1e-5)
    assert metrics["logp_margin"] == pytest.approx(0.0, abs=1e-6)


def test_batched_scores_match_single_sequences_and_lm_eval(tiny):
    model, tokenizer = tiny
    texts = [("The cat", " sat."), ("A much longer context sentence here", " and more"), ("Hi", " there, friend")]
    pairs = [(tokenizer(c)["input_ids"], tokenizer(t)["input_ids"]) for c, t in texts]
    batched = perplexity.score_continuations(model, pairs, tokenizer.pad_token_id, batch_size=3)
    singles = [perplexity.score_continuations(model, [p], tokenizer.pad_token_id, 1) for p in pairs]
    assert batched[1] == sum(n for _, n in singles)
    assert batched[0] == pytest.approx(sum(s for s, _ in singles), abs=1e-3)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    requests = [Instance("loglikelihood", {}, (c, t), i) for i, (c, t) in enumerate(texts)]
    harness = [ll for ll, _ in lm.loglikelihood(requests)]
    assert harness == pytest.approx([s for s, _ in singles], abs=1e-3)


def test_heldout_set_is_disjoint_from_the_training_subset(caplog):
    triplets = [nli.Triplet(f"p{i}", f"e{i}", f"c{i}") for i in range(100)]
    held = perplexity.heldout_triplets(triplets, 20, seed=7)
    assert not set(held) & set(nli.subset(triplets, 80, 7))
    assert set(held) <= set(nli.subset(triplets, 100, 7))
    with caplog.at_level("WARNING", logger=perplexity.__name__):
        assert perplexity.build_proxy_set(triplets, 20, 7, "{s}", "", train_size=80).overlap_with_training == 0
        assert not caplog.records
        assert perplexity.build_proxy_set(triplets, 20, 7, "{s}", "", train_size=90).overlap_with_training == 10
    (warning,) = caplog.records  # said when the run starts, not only in its record
    assert "10 of its 20 triplets are also trained on" in warning.getMessage()
    assert "data.size <= 80" in warning.getMessage()
    with pytest.raises(ConfigError, match="ppl_sample"):
        perplexity.heldout_triplets(triplets, 101, 7)


def test_completion_is_what_follows_the_prompt_in_the_chat_template(tiny):
    _, tokenizer = tiny
    prompt = [{"role": "system", "content": "sys"}, {"role": "user", "content": "Paraphrase: x"}]
    context, completion = perplexity.completion_split(tokenizer, prompt, "A man plays.")
    assert tokenizer.decode(context).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(completion) == "A man plays.<|im_end|>\n"


def test_add_generation_keeps_the_results_file_and_the_replaced_record(tmp_path):
    results = Results(kind=RunKind.TRAINING, group="g", name="r", run_dir=str(tmp_path), method="sempa",
                      final={"eval/stsb_dev": 70.0}, final_step=4, samples_seen=32)
    write_results(tmp_path, results)
    add_generation(tmp_path, "final", {"tasks": {}, "n": 1}, new=None)
    add_generation(tmp_path, "final", {"tasks": {}, "n": 2}, new=None)
    add_generation(tmp_path, "checkpoint-2", {"tasks": {}, "n": 3}, new=None)
    saved = read_results(tmp_path)
    assert saved.generation == {"final": {"tasks": {}, "n": 2}, "checkpoint-2": {"tasks": {}, "n": 3}}
    saved.generation = {}
    assert saved == results  # nothing else in the record touched
    superseded = [json.loads(line) for line in (tmp_path / SUPERSEDED_GENERATION_FILE).read_text().splitlines()]
    assert superseded == [{"label": "final", "tasks": {}, "n": 1}]

    # no record yet: ``new`` seeds it; without one, nothing is invented
    fresh = tmp_path / "base" / "tiny"
    seed = Results(kind=RunKind.GENERATION, group="base", name="tiny", run_dir=str(fresh), method="base")
    add_generation(fresh, "base", {"tasks": {}}, new=seed)
    assert read_results(fresh).generation == {"base": {"tasks": {}}} and read_results(fresh).kind is RunKind.GENERATION
    with pytest.raises(ResultsError, match="has no results.json"):
        add_generation(tmp_path / "nothing", "base", {"tasks": {}}, new=None)

    # a damaged results.json is named and left as it is
    (tmp_path / "results.json").write_text("{broken")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'results.json'} is damaged"):
        add_generation(tmp_path, "final", {"tasks": {}}, new=None)
    assert (tmp_path / "results.json").read_text() == "{broken"


def test_gen_eval_on_a_tiny_run_base_and_at_end(tmp_path):
    root = write_gen_data(make_data_root(tmp_path / "data"))
    common = [*TINY_OVERRIDES, f"paths.runs_dir={tmp_path / 'runs'}", "eval=stsb_dev", "eval.ppl_sample=16",
              "gen.source=local", "gen.tasks=[truthfulqa_mc1]"]
    results = training.run(compose_config(
        [*common, "eval.at_start=[stsb_dev,ppl]", "eval.at_end=[stsb_dev,ppl]", "gen.at_end=true"], root))
    run_dir = Path(results.run_dir)
    start, final = results.start, results.final
    assert {"eval/ppl_nli", "eval/logp_chosen", "eval/logp_margin"} <= set(start) & set(final)
    assert final["eval/logp_chosen"] != start["eval/logp_chosen"]  # DPO moved the policy
    at_end = read_results(run_dir).generation["final"]
    assert at_end["tasks"]["truthfulqa_mc1"]["n"] == 2 and at_end["model"]["merged"] is True
    assert at_end["proxy"]["logp_chosen"] == pytest.approx(final["eval/logp_chosen"], abs=1e-4)
    assert any("gen/truthfulqa_mc1" in row for row in read_metrics(run_dir))

    # the standalone entry on the finished run: the same computation, nothing else in results.json lost
    record = gen_eval.run(compose_config([*common, f"gen.target={run_dir}"], root))
    assert record["proxy"] == at_end["proxy"]
    def scores(tasks: dict) -> dict:  # (the record in memory keys by GenTask)
        return {str(t): {k: v for k, v in r.items() if k != "seconds"} for t, r in tasks.items()}

    assert scores(record["tasks"]) == scores(at_end["tasks"])
    saved = read_results(run_dir)
    assert saved.final == results.final and saved.finished and saved.generation["final"] == record
    superseded = [json.loads(line) for line in (run_dir / SUPERSEDED_GENERATION_FILE).read_text().splitlines()]
    assert superseded == [{"label": "final", **at_end}]

    # the untrained backbone: its proxy is the run's step-0 evaluation
    base = gen_eval.run(compose_config(common, root))
    assert base["model"]["label"] == "base" and base["proxy"]["overlap_with_training"] == 0
    assert base["proxy"]["ppl_nli"] == pytest.approx(start["eval/ppl_nli"], rel=1e-4)
    base_results = read_results(tmp_path / "runs" / "base" / "tiny")
    assert base_results.kind is RunKind.GENERATION and base_results.method == "base" and base_results.finished
    assert base_results.generation == {"base": base}

    # a checkpoint: its own record, next to the final one
    ckpt = gen_eval.run(compose_config([*common, f"gen.target={run_dir / 'checkpoints' / 'checkpoint-2'}"], root))
    assert ckpt["model"]["step"] == 2
    assert set(read_results(run_dir).generation) == {"final", "checkpoint-2"}

    with pytest.raises(ConfigError, match="no trained adapter"):
        gen_eval.run(compose_config([*common, f"gen.target={tmp_path / 'data'}"], root))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished, ignore=shutil.ignore_patterns("results.json"))
    with pytest.raises(ConfigError, match="not a finished run"):
        gen_eval.run(compose_config([*common, f"gen.target={unfinished}"], root))
    assert not (unfinished / "results.json").exists()
    # a checkpoint of an unfinished run: its record seeds an unfinished results.json (never taken for finished), and
    # its metrics row sits at the samples seen the run logged at that step
    gen_eval.run(compose_config([*common, f"gen.target={unfinished / 'checkpoints' / 'checkpoint-2'}"], root))
    seeded = read_results(unfinished)
    assert (seeded.kind, seeded.status, seeded.method) == (RunKind.TRAINING, "unfinished", "sempa")
    assert set(seeded.generation) == {"checkpoint-2"} and not is_finished(unfinished)
    logged = [r for r in read_metrics(unfinished) if "gen/truthfulqa_mc1" in r][-1]  # (the copy has the run's own)
    trained = next(r for r in read_metrics(run_dir) if r["step"] == 2 and "train/loss" in r)
    assert (logged["step"], logged["samples_seen"]) == (2, trained["samples_seen"]) == (2, 16)


def test_at_end_of_a_bf16_run_is_gen_evals_computation(tmp_path):
    """A bf16 run's final adapter is scored as gen_eval (and so the untrained base record) scores it: loaded on the
    backbone in float32 on a CPU. Scoring the training's model instead (its weights in bf16, or cast from bf16 to
    float32) is not that computation (SmolLM2: proxy margin 0.682 against 0.723)."""
    root = make_data_root(tmp_path / "data")
    common = [*TINY_OVERRIDES, f"paths.runs_dir={tmp_path / 'runs'}", "eval=stsb_dev", "eval.ppl_sample=16",
              "gen.tasks=[]", "backbone.dtype=bfloat16"]
    run_dir = Path(training.run(compose_config([*common, "gen.at_end=true"], root)).run_dir)
    at_end = read_results(run_dir).generation["final"]
    record = gen_eval.run(compose_config([*common, f"gen.target={run_dir}"], root))
    assert at_end["model"]["dtype"] == record["model"]["dtype"] == "float32"
    assert at_end["proxy"] == record["proxy"]


@pytest.mark.parametrize("override, key", [("gen.limits.mmlu=0", "gen.limits.mmlu"), ("gen.limit=0", "gen.limit"),
                                           ("gen.batch_size=0", "gen.batch_size")])
def test_bad_generation_settings_are_rejected_before_any_model(override, key, tmp_path):
    from omegaconf import OmegaConf

    from sempa_exp.config.schema import validate

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(OmegaConf.to_object(compose_config([*TINY_OVERRIDES, override], tmp_path)))


@pytest.mark.parametrize("override, key", [("gen.tasks=[gsm8k]", "gen.tasks[0]"), ("gen.source=web", "gen.source"),
                                           ("gen.limits.nope=2", "gen.limits.nope")])
def test_unknown_generation_tasks_and_sources_are_rejected_when_composed(override, key, tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([*TINY_OVERRIDES, override], tmp_path)
    assert f"full_key: {key}" in str(err.value.__cause__)
    assert "gsm8k_cot, mmlu, hellaswag, drop, truthfulqa_mc1" in str(err.value.__cause__) or key == "gen.source"


def test_generation_table_gives_deltas_against_base_over_common_tasks():
    from sempa_exp.evaluation.generation_table import generation_table

    def rec(gsm, tqa, ppl):
        tasks = {"gsm8k_cot": {"status": "ok", "score": gsm, "n": 20, "n_total": 1319, "limit": 20},
                 "truthfulqa_mc1": {"status": "ok", "score": tqa, "n": 20, "n_total": 817, "limit": 20},
                 "drop": {"status": "unavailable", "reason": "no local data"}}
        return {"tasks": tasks, "settings": {}, "proxy": {"ppl_nli": ppl, "fingerprint": "f"}}

    table = generation_table([("base", rec(10.0, 30.0, 20.0)), ("sempa", rec(15.0, 25.0, 21.0)),
                              ("contrastive", None)])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "avg (2 common tasks)" in rows["model"]
    assert "15.00 (+5.00)" in rows["sempa"] and "25.00 (-5.00)" in rows["sempa"]
    assert "20.00 (+0.00)" in rows["sempa"]  # the average of the two tasks every row has
    assert "21.000 (+1.000)" in rows["sempa"] and "unavailable" in rows["sempa"]
    assert rows["contrastive"].count("missing") == 5
    assert "57.25" in table and "39.54" in table
