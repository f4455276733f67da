"""The small-backbone study's report: cells of seeds, best-by-dev scores against the untrained baseline, the paired
bootstrap over the STS pairs, the STS-B dev curves; on real tiny-backbone runs with eval=best_by_dev."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from analysis import report as report_cli
from analysis.runs import STS_TASKS, RunRecord, collect_local, shorten_names
from analysis.study import (
    _spearman_rows,
    benchmark_difference,
    paired_bootstrap,
    paired_difference,
    study_benchmarks_table,
    study_cells,
    study_contrasts_table,
    study_curves_figure,
    study_generation_table,
    study_table,
)
from conftest import TINY_OVERRIDES, compose_config
from sempa_exp.pipelines import training

STUDY = ["eval=best_by_dev", "eval.dtype=float32", "eval.geometry_sample=40", "gen.at_end=true", "gen.tasks=[]",
         "eval.ppl_sample=8"]


@pytest.fixture(scope="module")
def study_runs(tmp_path_factory, data_root):
    """Two settings (learning rate) x two seeds, run as the study's sweeps name them."""
    root = tmp_path_factory.mktemp("study")
    for lr in ("1e-3", "1e-2"):
        for seed in (1, 2):
            overrides = [f"trainer.learning_rate={lr}", f"seed={seed}"]
            cfg = compose_config([*TINY_OVERRIDES, *STUDY, f"paths.runs_dir={root / 'runs'}",
                                  f"paths.cache_dir={root / 'cache'}", "run.group=study",
                                  f"run.name='trainer.learning_rate={lr},seed={seed}'", *overrides], data_root)
            training.run(cfg)
    return root / "runs"


def test_cells_hold_the_seeds_of_one_setting_with_their_best_checkpoints(study_runs):
    runs = collect_local([study_runs])
    shorten_names(runs)
    cells = study_cells(runs)
    assert [c.setting for c in cells] == ["trainer.learning_rate=1e-2", "trainer.learning_rate=1e-3"]
    for cell in cells:
        assert [r.config["seed"] for r in cell.runs] == [1, 2]
        for run in cell.runs:
            trained = [e for e in run.evaluations if e["step"] > 0]
            assert run.best["step"] == max(trained, key=lambda e: e["eval/stsb_dev"])["step"]
            assert "eval/sts_avg" in run.best


def test_the_study_table_is_computed_from_the_runs(study_runs):
    runs = collect_local([study_runs])
    shorten_names(runs)
    table = study_table(runs, samples=200)
    assert len(table.rows) == 2
    for row, cell in zip(table.records(), study_cells(runs), strict=True):
        avgs = [r.best["eval/sts_avg"] for r in cell.runs]
        assert row["seeds"] == "1, 2"
        assert row["PromptEOL avg"] == pytest.approx(cell.runs[0].start["eval/sts_avg"], abs=1e-4)
        assert row["best-by-dev avg"] == pytest.approx(np.mean(avgs))
        assert row["sd (seeds)"] == pytest.approx(np.std(avgs, ddof=1))
        assert row["delta"] == pytest.approx(np.mean(avgs) - row["PromptEOL avg"])
        assert row["start STS-B dev"] == pytest.approx(np.mean([r.start["eval/stsb_dev"] for r in cell.runs]))
        assert row["best STS-B dev"] == pytest.approx(np.mean([r.best["eval/stsb_dev"] for r in cell.runs]))
        low, high = (float(x) for x in row["95% CI (STS pairs)"].strip("[]").split(","))
        assert low <= high
        assert row["ppl_nli final"] is not None and row["baseline source"].startswith("step 0 of")


def test_the_report_has_the_study_section(study_runs, tmp_path):
    report = report_cli.run([str(study_runs), "--out", str(tmp_path / "report")])
    assert not report.tables["study"].empty
    figure = report.figures["study_curves"]
    assert figure.figure is not None
    run = next(r for r in report.runs if r.best)
    first = figure.points("tiny", next(p["series"] for p in figure.series))[0]
    assert first == (0, pytest.approx(run.start["eval/stsb_dev"]))  # the untrained start, the same for every seed
    (ax,) = figure.figure.axes
    from matplotlib.colors import to_rgb

    lines = {line.get_label(): to_rgb(line.get_color()) for line in ax.get_lines()}
    assert all("backbone=" not in name and "2 seeds" in name for name in lines)  # the panel names the backbone
    bands = [tuple(band.get_facecolor()[0][:3]) for band in ax.collections]
    assert len(bands) == len(lines) and set(bands) == set(lines.values())  # each seeds' band in its line's colour
    one_seed_first = [r for r in report.runs if r.best and not (r.config["seed"] == 2 and "1e-2" in r.name)]
    (ax,) = study_curves_figure(one_seed_first).figure.axes
    (band,) = ax.collections  # only the 2-seed setting has one: the second line's colour, not the first's
    assert tuple(band.get_facecolor()[0][:3]) == to_rgb(ax.get_lines()[1].get_color())
    assert "Small-backbone study" in (tmp_path / "report" / "index.md").read_text()


def test_rowwise_spearman_is_scipys():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 6, size=(3, 50)).astype(float)  # ties, as STS gold scores have
    pred = rng.normal(size=(3, 50))
    from scipy.stats import rankdata

    ours = _spearman_rows(pred, rankdata(gold, axis=1))
    assert ours == pytest.approx([100 * spearmanr(p, g).statistic for p, g in zip(pred, gold, strict=True)])


def _pairs(pred_by_task: dict[str, np.ndarray], gold: np.ndarray) -> dict:
    return {t: (pred_by_task[t], gold) for t in STS_TASKS}


def test_the_paired_bootstrap_interval_is_zero_for_the_same_model_and_excludes_zero_for_a_better_one():
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 6, size=400).astype(float)
    noisy = {t: gold + rng.normal(scale=3.0, size=gold.size) for t in STS_TASKS}
    better = {t: gold + rng.normal(scale=0.5, size=gold.size) for t in STS_TASKS}
    assert paired_bootstrap(_pairs(noisy, gold), [_pairs(noisy, gold)], samples=200) == (0.0, 0.0)
    low, high = paired_bootstrap(_pairs(noisy, gold), [_pairs(better, gold)], samples=200)
    assert 0 < low < high
    # the same data in another order gives the same kind of interval: nothing depends on the pairs' order
    order = rng.permutation(gold.size)
    shuffled = paired_bootstrap(_pairs({t: v[order] for t, v in noisy.items()}, gold[order]),
                                [_pairs({t: v[order] for t, v in better.items()}, gold[order])], samples=200)
    assert shuffled[0] == pytest.approx(low, abs=2.0) and shuffled[1] == pytest.approx(high, abs=2.0)


def test_runs_without_a_best_checkpoint_are_not_study_cells(tmp_path, data_root):
    cfg = compose_config([*TINY_OVERRIDES, f"paths.runs_dir={tmp_path}", "run.group=plain"], data_root)
    training.run(cfg)
    runs = collect_local([Path(tmp_path)])
    assert study_cells(runs) == []
    assert study_table(runs).empty


def test_a_damaged_pairs_file_leaves_that_interval_missing_not_the_report(study_runs, tmp_path):
    import shutil

    copy = tmp_path / "runs"
    shutil.copytree(study_runs, copy)
    runs = collect_local([copy])
    shorten_names(runs)
    victim = study_cells(runs)[0].runs[0]
    (victim.run_dir / "sts_pairs" / f"step-{victim.best['step']}.npz").write_bytes(b"not a zip")
    rows = study_table(runs, samples=50).records()
    assert rows[0]["95% CI (STS pairs)"] is None and rows[1]["95% CI (STS pairs)"] is not None
    assert rows[0]["best-by-dev avg"] is not None  # the scores come from results.json, untouched


def _as_default_sempa(runs, learning_rate: str) -> None:
    """Relabel one setting's runs as the default-recipe SemPA cell the contrasts compare with."""
    for run in runs:
        if f"trainer.learning_rate={learning_rate}" in run.name:
            run.short_name = f"objective=sempa,seed={run.config['seed']}"


def test_the_contrasts_compare_each_setting_with_default_sempa(study_runs):
    runs = collect_local([study_runs])
    shorten_names(runs)
    assert study_contrasts_table(runs, samples=50).empty  # no default-recipe SemPA cell: nothing to compare with
    _as_default_sempa(runs, "1e-3")
    table = study_contrasts_table(runs, samples=200)
    (row,) = table.records()
    cells = {c.setting: c for c in study_cells(runs)}
    mine, ref = cells["trainer.learning_rate=1e-2"], cells["objective=sempa"]
    mean = np.mean([r.best["eval/sts_avg"] for r in mine.runs])
    ref_mean = np.mean([r.best["eval/sts_avg"] for r in ref.runs])
    assert row["SemPA setting"] == ref.label and row["seeds"] == row["SemPA seeds"] == "1, 2"
    assert row["difference"] == pytest.approx(mean - ref_mean)
    low, high = (float(x) for x in row["95% CI (STS pairs)"].strip("[]").split(","))
    assert low <= high


def test_the_paired_difference_of_a_setting_with_itself_is_zero():
    rng = np.random.default_rng(1)
    pairs = {t: (rng.normal(size=30), rng.integers(0, 6, size=30).astype(float)) for t in STS_TASKS}
    other = {t: (p + rng.normal(scale=0.5, size=30), g) for t, (p, g) in pairs.items()}
    assert paired_difference([pairs], [pairs], samples=50) == (0.0, 0.0)
    low, high = paired_difference([other], [pairs], samples=200)
    assert low < high
    assert paired_bootstrap(pairs, [other], samples=200) == (low, high)  # the baseline interval is the same computation


def test_the_generation_table_holds_the_final_adapters_against_the_base(study_runs):
    runs = collect_local([study_runs])
    shorten_names(runs)
    table = study_generation_table(runs)
    assert [r["method"] for r in table.records()] == ["SemPA", "SemPA"]  # no base record among the sources
    assert any("No untrained-backbone generation record" in n for n in table.notes)
    base = RunRecord(group="base", name="tiny", status="finished", method="base", kind="generation", backbone="tiny",
                     generation={"base": {"proxy": {"ppl_nli": 50.0, "logp_margin": 0.25},
                                          "model": {"dtype": "float32"}}})
    records = study_generation_table([*runs, base]).records()
    assert records[0]["method"] == "untrained" and records[0]["ppl_nli"] == 50.0
    for row, cell in zip(records[1:], study_cells(runs), strict=True):
        ppl = [r.generation["final"]["proxy"]["ppl_nli"] for r in cell.runs]
        assert row["ppl_nli"] == pytest.approx(np.mean(ppl))
        assert row["ppl vs base"] == pytest.approx(100 * (np.mean(ppl) / 50.0 - 1))
    other = RunRecord(group="base", name="tiny", status="finished", method="base", kind="generation",
                      backbone="tiny", generation={"base": {"proxy": {"ppl_nli": 50.0, "fingerprint": "another"}}})
    records = study_generation_table([*runs, other]).records()
    assert [r["ppl vs base"] for r in records[1:]] == [None, None]  # not the same held-out triplets: no ratio
    # the runs' final adapters were scored in float32 (gen_eval's precision on a CPU), a bf16 base is not comparable
    assert {r.generation["final"]["model"]["dtype"] for r in runs} == {"float32"}
    bf16 = RunRecord(group="base", name="tiny", status="finished", method="base", kind="generation", backbone="tiny",
                     generation={"base": {**base.generation["base"], "model": {"dtype": "bfloat16"}}})
    assert [r["ppl vs base"] for r in study_generation_table([*runs, bf16]).records()[1:]] == [None, None]


def test_the_generation_table_gives_no_ratio_for_a_proxy_on_trained_triplets(study_runs):
    runs = collect_local([study_runs])
    shorten_names(runs)
    base = RunRecord(group="base", name="tiny", status="finished", method="base", kind="generation", backbone="tiny",
                     generation={"base": {"proxy": {"ppl_nli": 50.0}, "model": {"dtype": "float32"}}})
    trained_on = study_cells(runs)[0]
    trained_on.runs[0].generation["final"]["proxy"]["overlap_with_training"] = 3
    records = study_generation_table([*runs, base]).records()
    assert [r["ppl vs base"] is None for r in records[1:]] == [True, False]
    assert any("trained on" in n and trained_on.label in n for n in study_generation_table([*runs, base]).notes)


def test_the_generation_table_leaves_out_settings_without_a_scored_adapter(study_runs):
    runs = collect_local([study_runs])
    shorten_names(runs)
    unscored = study_cells(runs)[0]
    for run in unscored.runs:
        run.generation = {k: v for k, v in run.generation.items() if k != "final"}
    table = study_generation_table(runs)
    assert [r["setting"] for r in table.records()] == [c.label for c in study_cells(runs)[1:]]
    assert any("Left out" in n and unscored.label in n for n in table.notes)


def _tqa(values: dict[int, float], digest: str = "d1") -> dict:
    """A generation record with TruthfulQA MC1's per-question outcomes (doc_id -> 0/1), as run_benchmarks writes it."""
    ids = sorted(values)
    return {"tasks": {"truthfulqa_mc1": {"status": "ok", "score": 100.0 * np.mean([values[i] for i in ids]),
                                         "data_sha256": digest,
                                         "per_doc": {"sempa_local_truthfulqa_mc1": {
                                             "doc_id": ids, "value": [values[i] for i in ids]}}}}}


def test_the_benchmarks_table_pairs_each_setting_with_the_base_question_by_question(study_runs):
    import dataclasses

    rng = np.random.default_rng(3)
    base_values = {i: float(v) for i, v in enumerate(rng.integers(0, 2, 200))}
    runs = collect_local([study_runs])
    shorten_names(runs)
    cells = study_cells(runs)
    runs = []
    for k, cell in enumerate(cells):
        for j, run in enumerate(cell.runs):
            # the first setting answers 30 more questions right than the base; the second as the base, and its
            # second seed scored only the first 150 questions: the table compares those 150
            values = {i: (1.0 if i < 60 + j else v) for i, v in base_values.items()} if k == 0 else \
                {i: v for i, v in base_values.items() if j == 0 or i < 150}
            runs.append(dataclasses.replace(run, generation={**run.generation, "final": _tqa(values)}))
    base = RunRecord(group="base", name="tiny", status="finished", method="base", kind="generation", backbone="tiny",
                     generation={"base": _tqa(base_values)})
    records = study_benchmarks_table([*runs, base]).records()
    assert [(r["setting"], r["benchmark"], r["documents"]) for r in records] == [
        (cells[0].label, "truthfulqa_mc1", 200), (cells[1].label, "truthfulqa_mc1", 150)]
    first = records[0]
    gains = [sum(1.0 - base_values[i] for i in range(60 + j)) for j in (0, 1)]  # questions newly right, per seed
    assert first["untrained"] == pytest.approx(100 * np.mean(list(base_values.values())))
    assert first["trained"] - first["untrained"] == pytest.approx(first["difference"])
    assert first["difference"] == pytest.approx(100 * np.mean(gains) / 200)
    low, high = (float(x) for x in first["95% CI (documents)"].strip("[]").split(","))
    assert 0 < low < first["difference"] < high
    assert records[1]["difference"] == 0 and records[1]["95% CI (documents)"] == "[+0.00, +0.00]"

    other = dataclasses.replace(base, generation={"base": _tqa(base_values, digest="d2")})
    table = study_benchmarks_table([*runs, other])
    assert table.rows == [] and sum("other documents" in n for n in table.notes) == 2


def test_the_benchmark_difference_of_a_model_with_itself_is_zero_and_needs_common_documents():
    values = {("t", i): float(i % 3 == 0) for i in range(90)}
    same = benchmark_difference(values, [values, values])
    assert (same["n"], same["difference"], same["low"], same["high"]) == (90, 0, 0, 0)
    assert benchmark_difference(values, [{("t", 1000): 1.0}]) is None
