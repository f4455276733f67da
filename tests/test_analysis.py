"""analysis.report on a fixture sweep of real tiny-backbone runs (training runs and method evaluations): files,
plotted series and table values are checked against the runs' own results.json / metrics.jsonl / pca.json /
aligned_tokens.json."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from analysis import report as report_cli
from analysis.artifacts import aligned_tokens, pca_panels
from analysis.figures import pca_figure
from analysis.paper import load_paper_sts
from analysis.runs import STS_AVG, STS_TASKS, collect_local, load_run
from analysis.tables import aligned_tokens_table
from analysis.wandb_source import record_from_wandb
from conftest import TINY_OVERRIDES, compose_config
from sempa_exp.config.location import CONF_DIR
from sempa_exp.config.registry import register_all
from sempa_exp.pipelines import evaluation, training
from sempa_exp.records import wandb_sync
from sempa_exp.records.identity import name_from_overrides
from sempa_exp.records.metrics import read_metrics
from sempa_exp.records.results import Results, RunKind, write_results

DATA_GROUP, TEMPLATE_GROUP, EVAL_GROUP = "ds", "tpl", "ev"
TINY_EVAL = ["backbone=tiny", "eval.dtype=float32", "eval.geometry_sample=40", "eval.gar_sample=60",
             "eval.pca_fraction=0.05", "logger=none"]
COLUMN = {"stsb": "STS-B", "sickr": "SICK-R", STS_AVG: "Avg"}


def _train(runs_dir: Path, cache: Path, data_root: Path, group: str, name: str, *overrides: str) -> Results:
    cfg = compose_config([*TINY_OVERRIDES, f"paths.runs_dir={runs_dir}", f"paths.cache_dir={cache}",
                          f"run.group={group}", f"run.name={name}", *overrides], data_root)
    return training.run(cfg)


def _evaluate(runs_dir: Path, cache: Path, data_root: Path, name: str, *overrides: str) -> Results:
    register_all()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            *TINY_EVAL, f"paths.runs_dir={runs_dir}", f"paths.cache_dir={cache}", f"paths.data_dir={data_root}",
            f"run.group={EVAL_GROUP}", f"run.name={name}", *overrides])
    return evaluation.run(cfg)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_root):
    """Data-size sweep: 32 and 48 triplets, and 40 without checkpoint evaluations and without final STS (missing
    evaluations); a killed copy (no results.json); template sweep: p1/PromptEOL and p2/Pretended CoT; method
    evaluations (python -m sempa_exp.evaluate): PromptEOL, and the 48-triplet run's adapter (SemPA, trained)."""
    root = tmp_path_factory.mktemp("sweep")
    runs_dir, cache = root / "runs", root / "cache"
    results = {
        "size32": _train(runs_dir, cache, data_root, DATA_GROUP, "size32", "data.size=32"),
        "size48": _train(runs_dir, cache, data_root, DATA_GROUP, "size48", "data.size=48"),
        "size40": _train(runs_dir, cache, data_root, DATA_GROUP, "size40", "data.size=40", "eval.at_checkpoint=[]",
                         "eval.at_end=[stsb_dev]"),
        "p1": _train(runs_dir, cache, data_root, TEMPLATE_GROUP, "p1", "data.size=16", "eval.at_checkpoint=[]"),
        "p2": _train(runs_dir, cache, data_root, TEMPLATE_GROUP, "p2", "data.size=16", "eval.at_checkpoint=[]",
                     "template=p2", "embed=pretended_cot"),
    }
    results["eval_prompteol"] = _evaluate(runs_dir, cache, data_root, "prompteol", "method=prompteol")
    results["eval_sempa"] = _evaluate(runs_dir, cache, data_root, "sempa", "method=checkpoint",
                                      f"method.path={runs_dir / DATA_GROUP / 'size48'}")
    killed = runs_dir / DATA_GROUP / "killed"
    shutil.copytree(runs_dir / DATA_GROUP / "size32", killed, ignore=shutil.ignore_patterns("checkpoints", "adapter"))
    (killed / "results.json").unlink()
    sources = [str(runs_dir / g) for g in (DATA_GROUP, TEMPLATE_GROUP, EVAL_GROUP)]
    full = report_cli.run([*sources, "--out", str(root / "report")])
    # without the method evaluations every table falls back on the training runs
    training_only = report_cli.build_report(collect_local(sources[:2]), root / "report_training_only")
    return SimpleNamespace(runs_dir=runs_dir, results=results, full=full, training_only=training_only)


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def num(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


def same_points(actual, expected) -> bool:
    actual, expected = np.asarray(list(actual), dtype=float), np.asarray(list(expected), dtype=float)
    return actual.shape == expected.shape and bool(np.allclose(actual, expected))


def quoted(tokens: list[str]) -> str:
    return " ".join(json.dumps(t, ensure_ascii=False) for t in tokens)


def label(results: Results) -> str:
    return f"{results.group}/{results.name}"


def test_report_folder_has_page_tables_and_figures(sweep):
    out = sweep.full.out
    for name in ("index.html", "index.md", "dashboard.md"):
        assert (out / name).stat().st_size > 0
    for table in ("runs", "main_sts", "gain", "templates", "templates_stsb_dev", "geometry", "gar", "aligned_tokens"):
        assert (out / "tables" / f"{table}.csv").exists() and (out / "tables" / f"{table}.md").exists()
    for figure in ("data_size", "training_curves", "pca"):
        for ext in ("png", "pdf", "csv"):
            assert (out / "figures" / f"{figure}.{ext}").stat().st_size > 0
    page = (out / "index.md").read_text()
    assert "figures/data_size.png" in page and "no PCA data for Mean pooling" in page
    html = (out / "index.html").read_text()
    assert '<img src="figures/training_curves.png"' in html and 'class="missing"' in html
    # no PCA data without the method evaluations: shown as missing, nothing drawn
    other = sweep.training_only.out
    assert not (other / "figures" / "pca.png").exists() and "**missing**" in (other / "index.md").read_text()


def test_main_table_values_come_from_results_files(sweep):
    rows = read_csv(sweep.full.out / "tables" / "main_sts.csv")
    by_source = {r["source"]: r for r in rows}
    for key, results in sweep.results.items():
        if key == "size40":  # configured without the 7-task pass: named in a note, not a row of missing cells
            assert f"run {label(results)}" not in by_source
            assert "eval.at_end has no 'sts'" in (sweep.full.out / "tables" / "main_sts.md").read_text()
            continue
        row = by_source[f"run {label(results)}"]
        for task in (*STS_TASKS, STS_AVG):
            assert num(row[COLUMN.get(task, task.upper())]) == pytest.approx(results.final[f"eval/{task}"],
                                                                           abs=1e-9)
    assert by_source[f"run {label(sweep.results['eval_sempa'])}"]["method"] == "SemPA"  # the evaluated adapter
    assert num(by_source[f"run {label(sweep.results['eval_sempa'])}"]["samples_seen"]) == \
        sweep.results["size48"].samples_seen  # what the adapter was trained on
    assert by_source[f"run {label(sweep.results['eval_prompteol'])}"]["method"] == "PromptEOL"
    # an untrained baseline without an evaluation run of its own is step 0 of a training run
    untrained = [r for r in rows if r["method"].endswith("(untrained)")]
    assert [r["method"] for r in untrained] == ["Pretended CoT (untrained)"]
    assert untrained[0]["source"] == f"step 0 of run {label(sweep.results['p2'])}"
    assert num(untrained[0]["Avg"]) == pytest.approx(sweep.results["p2"].start["eval/sts_avg"])
    assert by_source[f"run {DATA_GROUP}/killed (unfinished)"]["Avg"] == ""
    paper = {(r["backbone"], r["method"]): r for r in rows if r["source"] == "paper, Table 3"}
    assert num(paper[("llama2_7b", "SemPA")]["Avg"]) == 77.69 and num(paper[("llama3_8b", "PromptEOL")]["Avg"]) == 71.9
    assert "| missing |" in (sweep.full.out / "tables" / "main_sts.md").read_text()
    # without the PromptEOL evaluation, its row is step 0 of the first finished PromptEOL training run
    rows = read_csv(sweep.training_only.out / "tables" / "main_sts.csv")
    row = next(r for r in rows if r["method"] == "PromptEOL (untrained)")
    assert row["source"] == f"step 0 of run {DATA_GROUP}/size32"
    assert num(row["Avg"]) == pytest.approx(sweep.results["size32"].start["eval/sts_avg"])


def test_gain_table_is_trained_minus_step_0(sweep):
    rows = {r["run"]: r for r in read_csv(sweep.full.out / "tables" / "gain.csv")}
    r48 = sweep.results["size48"]
    row = rows[label(r48)]
    assert num(row["gain"]) == pytest.approx(r48.final["eval/sts_avg"] - r48.start["eval/sts_avg"])
    assert num(row["paper gain LLaMA2-7B"]) == pytest.approx(77.69 - 70.03)
    assert row["paper SemPA avg (same backbone)"] == "not sourced" and row["untrained source"] == "step 0"
    assert label(sweep.results["eval_sempa"]) not in rows  # evaluation runs have no step 0 of their own
    assert label(sweep.results["size40"]) not in rows  # configured without the 7-task pass


def test_data_size_figure_plots_the_runs_final_values(sweep):
    fig_result = sweep.full.figures["data_size"]
    finished = [sweep.results[k] for k in ("size32", "size48", "size40")]
    for panel, ax in zip(("stsb_dev", STS_AVG), fig_result.figure.axes, strict=True):
        expected = sorted((r.samples_seen, r.final[f"eval/{panel}"]) for r in finished
                          if f"eval/{panel}" in r.final)
        line = next(line for line in ax.get_lines() if line.get_label() == "tiny")
        assert same_points(zip(line.get_xdata(), line.get_ydata(), strict=True), expected)
        assert same_points(fig_result.points(panel, "tiny"), expected)
        baselines = [line for line in ax.get_lines() if line.get_linestyle() == "--" and len(line.get_ydata()) == 2]
        assert baselines[0].get_ydata()[0] == pytest.approx(finished[0].start[f"eval/{panel}"])
    assert len(fig_result.points("stsb_dev", "tiny")) == 3
    assert len(fig_result.points(STS_AVG, "tiny")) == 2  # size40 has no final STS
    assert any("size40" in m for m in fig_result.missing)
    # dotted: the checkpoints of the largest run (48 triplets), from its results.json evaluations
    largest = sweep.results["size48"]
    ckpt = [(e["samples_seen"], e["eval/stsb_dev"]) for e in largest.evaluations if e["step"] > 0]
    assert len(ckpt) == 3 and same_points(fig_result.points("stsb_dev", "tiny checkpoints of size48"), ckpt)
    sidecar = read_csv(sweep.full.out / "figures" / "data_size.csv")
    plotted = [(num(r["x"]), num(r["y"])) for r in sidecar if r["panel"] == "stsb_dev" and r["series"] == "tiny"]
    assert same_points(plotted, sorted((r.samples_seen, r.final["eval/stsb_dev"]) for r in finished))
    assert "separate runs" in fig_result.caption


def test_training_curves_follow_metrics_jsonl(sweep):
    result = sweep.full.figures["training_curves"]
    run_dir = sweep.runs_dir / DATA_GROUP / "size48"
    rows = [r for r in read_metrics(run_dir) if "train/loss" in r]
    keys = ("train/loss", "train/rewards/margins", "train/rewards/accuracies")
    for ax, key in zip(result.figure.axes[:3], keys, strict=True):
        line = next(line for line in ax.get_lines() if line.get_label() == f"{DATA_GROUP}/size48")
        assert list(line.get_ydata()) == pytest.approx([r[key] for r in rows])
        assert list(line.get_xdata()) == [r["samples_seen"] for r in rows]
    labels = {line.get_label() for line in result.figure.axes[0].get_lines()}
    assert f"{DATA_GROUP}/killed (unfinished)" in labels  # an unfinished run still shows its curves
    assert not any(EVAL_GROUP in name for name in labels)  # evaluation runs do not train


def test_template_and_runs_tables(sweep):
    templates = read_csv(sweep.full.out / "tables" / "templates.csv")
    p1, p2 = sweep.results["p1"], sweep.results["p2"]
    row_p1 = next(r for r in templates if r["template"] == "P1")
    row_p2 = next(r for r in templates if r["template"] == "P2")
    assert num(row_p1["PromptEOL avg"]) == pytest.approx(p1.final["eval/sts_avg"])
    assert num(row_p1["PromptEOL delta"]) == pytest.approx(p1.final["eval/sts_avg"] - p1.start["eval/sts_avg"])
    assert num(row_p2["Pretended CoT avg"]) == pytest.approx(p2.final["eval/sts_avg"])
    assert row_p1["Pretended CoT avg"] == "" and row_p2["PromptEOL avg"] == ""  # not run: missing, not invented
    assert {r["sweep"] for r in templates} == {TEMPLATE_GROUP}  # the data-size sweep does not vary templates
    by_dev = {r["template"]: r for r in read_csv(sweep.full.out / "tables" / "templates_stsb_dev.csv")}
    assert num(by_dev["P1"]["PromptEOL avg"]) == pytest.approx(p1.final["eval/stsb_dev"])
    assert num(by_dev["P2"]["Pretended CoT delta"]) == pytest.approx(
        p2.final["eval/stsb_dev"] - p2.start["eval/stsb_dev"])
    assert num(by_dev["untrained (step 0)"]["PromptEOL avg"]) == pytest.approx(p1.start["eval/stsb_dev"])
    assert by_dev["untrained (step 0)"]["PromptEOL delta"] == "-"  # the baseline has no delta to itself

    runs = {r["run"]: r for r in read_csv(sweep.full.out / "tables" / "runs.csv")}
    assert runs[f"{DATA_GROUP}/killed"]["status"] == "unfinished"
    assert runs[f"{DATA_GROUP}/killed"]["missing"] == "unfinished: no final results"
    # size40's config asked for no checkpoint evaluations and no final 7-task pass: nothing it asked for is missing
    assert runs[f"{DATA_GROUP}/size40"]["missing"] == "-"
    assert runs[f"{DATA_GROUP}/size48"]["missing"] == "-"
    assert runs[label(sweep.results["eval_sempa"])]["method"] == "SemPA (evaluation)"


def test_geometry_and_gar_tables_use_the_best_source(sweep):
    ev_p, ev_s, r32, r48 = (sweep.results[k] for k in ("eval_prompteol", "eval_sempa", "size32", "size48"))
    full = read_csv(sweep.full.out / "tables" / "geometry.csv")[0]
    assert num(full["PromptEOL uniformity"]) == pytest.approx(ev_p.final["eval/uniformity"])
    assert num(full["SemPA isotropy"]) == pytest.approx(ev_s.final["eval/isotropy"])
    assert full["Mean pooling uniformity"] == ""  # no mean-pooling evaluation in these runs
    fallback = read_csv(sweep.training_only.out / "tables" / "geometry.csv")[0]
    assert num(fallback["PromptEOL uniformity"]) == pytest.approx(r32.start["eval/uniformity"])
    assert num(fallback["SemPA uniformity"]) == pytest.approx(r48.final["eval/uniformity"])
    assert f"{DATA_GROUP}/size32 step 0" in fallback["sources"]

    gar = read_csv(sweep.full.out / "tables" / "gar.csv")[0]
    assert num(gar["GAR before training (PromptEOL)"]) == pytest.approx(ev_p.final["eval/gar"])
    assert num(gar["GAR after training (SemPA)"]) == pytest.approx(ev_s.final["eval/gar"])
    assert num(gar["delta"]) == pytest.approx(ev_s.final["eval/gar"] - ev_p.final["eval/gar"])
    missing = read_csv(sweep.training_only.out / "tables" / "gar.csv")[0]
    assert missing["GAR before training (PromptEOL)"] == "" and missing["GAR after training (SemPA)"] == ""


def test_pca_figure_and_aligned_tokens_come_from_the_evaluations(sweep):
    result = sweep.full.figures["pca"]
    titles = [ax.get_title() for ax in result.figure.axes]
    assert titles == ["PromptEOL", "SemPA"]
    for ax, key in zip(result.figure.axes, ("eval_prompteol", "eval_sempa"), strict=True):
        pca = json.loads((Path(sweep.results[key].run_dir) / "pca.json").read_text())
        for collection in ax.collections:
            role = collection.get_label().removesuffix("s")
            expected = [(p["x"], p["y"]) for p in pca["points"] if p["role"] == role]
            assert expected and same_points(collection.get_offsets(), expected)
    assert any("Mean pooling" in m for m in result.missing)

    rows = read_csv(sweep.full.out / "tables" / "aligned_tokens.csv")
    before = json.loads((Path(sweep.results["eval_prompteol"].run_dir) / "aligned_tokens.json").read_text())
    after = json.loads((Path(sweep.results["eval_sempa"].run_dir) / "aligned_tokens.json").read_text())
    assert len(rows) == 3
    for row, b, a in zip(rows, before, after, strict=False):
        assert row["sentence"] == b["sentence"] == a["sentence"]
        assert row["before training (PromptEOL)"] == quoted(b["aligned_tokens"])
        assert row["after training (SemPA)"] == quoted(a["aligned_tokens"])


def test_bad_source_is_a_clear_error(tmp_path, capsys):
    assert report_cli.main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report_cli.main([str(tmp_path / "empty")]) == 2
    assert "no run directories" in capsys.readouterr().err


@pytest.fixture
def wandb_copy(sweep, fake_wandb) -> SimpleNamespace:
    """What W&B holds of the size48 run: everything sempa_exp.sync_wandb sent it (config, logged records, summary),
    captured by a fake wandb.init and served back the way the W&B API serves a run (history rows with ``_step``)."""
    run_dir = sweep.runs_dir / DATA_GROUP / "size48"
    made = fake_wandb()
    wandb_sync.sync(run_dir, mode="offline")
    (kwargs, sent), = made
    history = [{"_step": step, **metrics} for step, metrics in sent.logged]
    return SimpleNamespace(config=kwargs["config"], summary=dict(sent.summary),
                           state="finished" if sent.finished == [0] else "crashed", group=kwargs["group"],
                           name=kwargs["name"], id=kwargs["id"], path=["me", kwargs["project"], kwargs["id"]],
                           scan_history=lambda: iter(history))


def test_wandb_run_becomes_the_same_record(sweep, wandb_copy):
    local = load_run(sweep.runs_dir / DATA_GROUP / "size48")
    remote = record_from_wandb(wandb_copy)
    assert (remote.group, remote.name, remote.status, remote.method, remote.kind, remote.backbone, remote.template,
            remote.embed, remote.data_size, remote.samples_seen, remote.final_step) == (
        local.group, local.name, local.status, local.method, local.kind, local.backbone, local.template,
        local.embed, local.data_size, local.samples_seen, local.final_step)
    assert (local.method, local.kind, local.data_size) == ("sempa", "training", 48)
    assert remote.evaluations == local.evaluations
    assert remote.start == local.start

    def scores(values: dict) -> dict:
        return {k: v for k, v in values.items() if k.startswith("eval/")}

    assert scores(remote.final) == scores(local.final) and scores(local.final)
    assert remote.series("stsb_dev") == local.series("stsb_dev")
    assert [r.get("train/loss") for r in remote.train_rows] == [r.get("train/loss") for r in local.train_rows]
    assert sum("train/loss" in r for r in remote.train_rows) == 6  # 48 triplets / 8 per step
    assert remote.value("final", STS_AVG) == local.value("final", STS_AVG) == sweep.results["size48"].final[
        f"eval/{STS_AVG}"]


def test_other_pca_and_aligned_token_formats(tmp_path, sweep):
    run_dir = tmp_path / "grp" / "copy"
    shutil.copytree(sweep.runs_dir / DATA_GROUP / "size32", run_dir,
                    ignore=shutil.ignore_patterns("checkpoints", "adapter"))
    rng = np.random.default_rng(0)
    np.savez(run_dir / "pca_embeddings.npz", **{"mean/anchors": rng.normal(size=(6, 16)),
                                                "mean/positives": rng.normal(size=(6, 16)),
                                                "mean/negatives": rng.normal(size=(5, 16))})
    (run_dir / "aligned_tokens.json").write_text(json.dumps({
        "before": [{"sentence": "A man plays.", "tokens": ["man", "plays"]}],
        "after": [{"sentence": "A man plays.", "tokens": [["guitar", 0.3], ["music", 0.2]]}]}))
    runs = collect_local([run_dir])
    panels, problems = pca_panels(runs)
    assert not problems and [p.method for p in panels] == ["mean"]
    result = pca_figure(panels, problems)
    sizes = {c.get_label(): len(c.get_offsets()) for c in result.figure.axes[0].collections}
    assert sizes == {"anchors": 6, "positives": 6, "negatives": 5}
    assert sum(panels[0].explained) <= 1.0
    entries, problems = aligned_tokens(runs)
    table = aligned_tokens_table(entries, problems)
    assert [row[1:4] for row in table.rows] == [["A man plays.", '"man" "plays"', '"guitar" "music"']]
    (run_dir / "pca.json").write_text("{not json")
    panels, problems = pca_panels(collect_local([run_dir]))
    assert any("pca.json" in p for p in problems)  # unreadable: reported, not dropped silently


def test_paper_rows_are_consistent_and_sourced():
    rows = load_paper_sts()
    assert {(r.backbone, r.method) for r in rows} >= {("llama2_7b", "sempa"), ("llama3_8b", "prompteol")}
    for row in rows:
        assert row.source
        tasks = [row.scores[t] for t in STS_TASKS]
        assert np.mean(tasks) == pytest.approx(row.scores[STS_AVG], abs=0.006)  # transcription check


def test_generation_table_takes_base_sempa_and_foil_records_with_deltas():
    from analysis.runs import RunRecord
    from analysis.tables import generation_table

    def record(mmlu: float, tqa: float | None, ppl: float) -> dict:
        tasks = {"mmlu": {"status": "ok", "score": mmlu, "n": 57, "n_total": 14042},
                 "hellaswag": {"status": "unavailable", "reason": "no local data"}}
        if tqa is not None:
            tasks["truthfulqa_mc1"] = {"status": "ok", "score": tqa, "n": 5, "n_total": 817}
        return {"tasks": tasks, "proxy": {"ppl_nli": ppl, "logp_margin": 0.5}}

    runs = [RunRecord("base", "tiny", "finished", "base", backbone="tiny", generation={"base": record(25, 40, 100)}),
            RunRecord("smoke", "a", "finished", "sempa", backbone="tiny", generation={"final": record(27, 20, 110)}),
            RunRecord("cl", "b", "finished", "contrastive", backbone="tiny",
                      generation={"final": record(21, None, 300)}),
            RunRecord("smoke", "no_gen", "finished", "sempa", backbone="tiny")]
    rows = {r["model"]: r for r in generation_table(runs).records() if r["backbone"] == "tiny"}
    base, sempa, foil = rows["untrained backbone"], rows["SemPA"], rows["Contrastive fine-tuning (foil)"]
    assert sempa["source"] == "smoke/a" and foil["source"] == "cl/b"
    assert base["HellaSwag 0-shot"] is None  # unavailable: never scored
    # the average covers only the tasks every row has (the foil has no TruthfulQA): MMLU alone
    assert base["avg"] == 25 and sempa["avg"] == 27 and foil["avg"] == 21
    assert sempa["avg delta"] == 2 and foil["avg delta"] == -4 and base["avg delta"] is None
    assert sempa["TruthfulQA MC1 0-shot"] == 20 and foil["TruthfulQA MC1 0-shot"] is None
    assert foil["ppl_nli"] == 300


def test_generation_only_record_stays_out_of_the_sts_tables(tmp_path, sweep):
    from analysis.tables import main_sts_table, runs_overview

    run_dir = tmp_path / "base" / "tiny"
    generation = {"base": {"tasks": {"mmlu": {"status": "ok", "score": 25.0, "n": 57}}}}
    run_dir.mkdir(parents=True)
    write_results(run_dir, Results(kind=RunKind.GENERATION, group="base", name="tiny", run_dir=str(run_dir),
                                   method="base", backbone="tiny", generation=generation))
    base = load_run(run_dir)
    assert base.kind == "generation" and base.generation == generation
    runs = [base, load_run(Path(sweep.results["eval_sempa"].run_dir))]
    assert [r["source"] for r in main_sts_table(runs, []).records()] == [f"run {label(sweep.results['eval_sempa'])}"]
    rows = {r["run"]: r for r in runs_overview(runs).records()}
    assert rows["base/tiny"]["missing"] == "-" and rows["base/tiny"]["data_size"] == "-"
    evaluation = rows[label(sweep.results["eval_sempa"])]
    assert evaluation["missing"] == "-" and evaluation["samples_seen"] == "-" and evaluation["template"] == "-"


def test_sweep_runs_are_labelled_by_the_overrides_that_differ():
    from analysis.runs import RunRecord, shorten_names

    fixed = "backbone=smollm2_135m,eval.at_end=_sts,stsb_dev_,trainer.checkpoint_every_samples=64"
    long_fixed = fixed + ",trainer.max_length=128" + ",x" * 60  # cut by name_from_overrides, hash suffix
    sizes = [RunRecord("ds", name_from_overrides(f"data.size={n},{long_fixed}"), "finished", "sempa")
             for n in (128, 512)]
    templates = [RunRecord("tpl", f"embed={e},{fixed},template={t}", "finished", "sempa")
                 for e in ("prompteol", "pretended_cot") for t in ("p1", "p2")]
    alone = RunRecord("smoke", "default", "finished", "sempa")
    named = [RunRecord("ev", "method=prompteol", "finished", "prompteol"),
             RunRecord("ev", "checkpoint_of_smoke", "finished", "sempa")]  # a run.name, not an override: kept
    clash = [RunRecord("c", name_from_overrides(f"{long_fixed},seed={n}"), "finished", "sempa") for n in (1, 2)]
    shorten_names([*sizes, *templates, alone, *clash, *named])
    assert [r.label for r in named] == ["ev/method=prompteol", "ev/checkpoint_of_smoke"]
    assert len(sizes[0].name) == 200 and [r.label for r in sizes] == ["ds/data.size=128", "ds/data.size=512"]
    assert [r.label for r in templates] == [f"tpl/embed={e},template={t}" for e in ("prompteol", "pretended_cot")
                                            for t in ("p1", "p2")]
    assert alone.label == "smoke/default"
    assert [r.label for r in clash] == [f"c/{r.name}" for r in clash]  # what differs was cut off: full names


def test_gain_without_step_0_takes_a_matching_evaluation_run():
    from analysis.runs import RunRecord
    from analysis.tables import gain_table

    backbone, embed = {"name": "tiny", "dtype": "float32"}, {"name": "prompteol", "template": "T"}

    def evaluation(name: str, dtype: str, avg: float) -> RunRecord:
        return RunRecord("eval", name, "finished", "prompteol", kind="evaluation", backbone="tiny", embed="prompteol",
                         final={"eval/sts_avg": avg},
                         config={"backbone": backbone, "embed": embed, "eval": {"dtype": dtype, "max_length": None}})

    trained = RunRecord("smoke", "default", "finished", "sempa", backbone="tiny", embed="prompteol",
                        final={"eval/sts_avg": 61.0}, config={"backbone": backbone, "embed": embed, "eval": {
                            "max_length": None, "at_start": ["stsb_dev"], "at_end": ["sts"]}})
    other_dtype = evaluation("a_bf16", "bfloat16", 50.0)  # embeds differently: never the baseline
    rows = gain_table([trained, other_dtype], []).records()
    assert rows[0]["untrained avg"] is None and rows[0]["gain"] is None and rows[0]["untrained source"] == "missing"
    rows = gain_table([trained, other_dtype, evaluation("b_fp32", "float32", 58.5)], []).records()
    assert rows[0]["untrained avg"] == 58.5 and rows[0]["gain"] == 2.5
    assert rows[0]["untrained source"] == "run eval/b_fp32"
