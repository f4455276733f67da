"""The report's tables, built from RunRecords and the paper's numbers. A cell the runs do not have is None (shown as
"missing"); a paper cell that is not sourced is the string NOT_SOURCED. Nothing is filled in or interpolated."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from statistics import mean
from typing import Any

from analysis.artifacts import AlignedTokens
from analysis.paper import PAPER_BACKBONE_LABELS, PaperRow, paper_value
from analysis.runs import EMBED_LABELS, METHOD_LABELS, STS_AVG, STS_TASKS, RunRecord, method_label

NOT_SOURCED = "not sourced"
NOT_APPLICABLE = "-"
NO_BACKBONE = "(no LLM backbone)"
STS_COLUMNS = {"sts12": "STS12", "sts13": "STS13", "sts14": "STS14", "sts15": "STS15", "sts16": "STS16",
               "stsb": "STS-B", "sickr": "SICK-R", STS_AVG: "Avg"}
EMBED_METHOD = {"prompteol": "prompteol", "pretended_cot": "pretended_cot", "mean": "mean"}
METHOD_ORDER = list(METHOD_LABELS)


@dataclass
class Table:
    key: str  # file stem
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    decimals: dict[str, int] = field(default_factory=dict)  # per column; floats default to 2

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    @property
    def empty(self) -> bool:
        return not self.rows


def pick(runs: Iterable[RunRecord]) -> RunRecord | None:
    """The run that stands for a cell: finished before unfinished, then the most samples seen, then by name."""
    return max(runs, key=lambda r: (r.finished, r.samples_seen or 0, r.label), default=None)


def _order(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def run_scores(run: RunRecord) -> dict[str, float | None]:
    """The STS scores that represent a run: its final evaluation (an evaluation-only run may only have 'start')."""
    stage = "final" if run.final or run.is_training else "start"
    return {task: run.value(stage, task) for task in (*STS_TASKS, STS_AVG)}


def _missing_in(run: RunRecord) -> list[str]:
    if run.kind == "generation":
        return []  # a generation-only record has no STS evaluation to miss
    steps = [e["step"] for e in run.evaluations]
    missing = [] if run.finished else [f"{run.status}: no final results"]
    # what the run's config did not ask for is not missing
    if run.is_training and run.planned("start", "sts") and run.value("start", STS_AVG) is None:
        missing.append("step-0 STS")
    if run.finished and run.sts_planned and run.value("final", STS_AVG) is None:
        missing.append("final STS")
    if (run.is_training and run.finished and run.planned("checkpoint")
            and not [s for s in steps if 0 < s < (run.final_step or 0)]):
        missing.append("checkpoint evaluations")
    return missing


def runs_overview(runs: list[RunRecord]) -> Table:
    table = Table("runs", "Runs in this report", ["run", "status", "method", "backbone", "template", "embed",
                                                   "data_size", "samples_seen", "evaluated_steps", "missing",
                                                   "directory"])
    for run in sorted(runs, key=lambda r: r.label):
        training_only = {"template": run.template, "data_size": run.data_size, "samples_seen": run.samples_seen,
                         "evaluated_steps": ", ".join(str(e["step"]) for e in run.evaluations) or None}
        if not run.is_training:  # these columns describe training; '-' rather than 'missing' for other records
            training_only = dict.fromkeys(training_only, NOT_APPLICABLE)
        table.rows.append([run.label, run.status, f"{method_label(run.method)} ({run.kind})",
                           run.backbone or (NOT_APPLICABLE if run.kind == "evaluation" else None),
                           training_only["template"], run.embed or (None if run.is_training else NOT_APPLICABLE),
                           training_only["data_size"], training_only["samples_seen"], training_only["evaluated_steps"],
                           "; ".join(_missing_in(run)) or "-", run.origin])
    if any(r.short_name for r in runs):
        table.notes.append("run: group/the overrides that tell the runs of its group apart (those every run of the "
                           "group shares are left out; directory: the full name).")
    return table


def _baseline_rows(runs: list[RunRecord]) -> list[tuple[str, str, RunRecord]]:
    """Untrained baselines that come with training runs: step 0 of a run is its embedding method, untrained."""
    evaluated = {(r.backbone, r.method) for r in runs if not r.is_training}
    out = []
    by_key: dict[tuple[str | None, str], list[RunRecord]] = defaultdict(list)
    for run in runs:
        if run.is_training and run.value("start", STS_AVG) is not None:
            by_key[(run.backbone, EMBED_METHOD.get(run.embed or "", run.embed or "unknown"))].append(run)
    for (backbone, method), group in sorted(by_key.items(), key=lambda kv: (str(kv[0][0]), _order(kv[0][1]))):
        if (backbone, method) not in evaluated:
            source = sorted(group, key=lambda r: (not r.finished, r.label))[0]
            out.append((backbone or "unknown", method, source))
    return out


def main_sts_table(runs: list[RunRecord], paper: list[PaperRow]) -> Table:
    columns = ["backbone", "method", "source", "samples_seen", *STS_COLUMNS.values()]
    table = Table("main_sts", "Main STS table (Spearman x 100)", columns)
    rows: dict[str, list[tuple[int, int, list]]] = defaultdict(list)  # backbone -> (method order, 0 repro/1 paper, row)
    without_sts = sorted(r.label for r in runs if r.kind != "generation" and not r.sts_planned)
    for run in runs:
        if run.kind == "generation" or not run.sts_planned:
            continue
        scores = run_scores(run)
        status = "" if run.finished else f" ({run.status})"
        backbone = run.backbone or NO_BACKBONE
        rows[backbone].append((_order(run.method), 0, [
            backbone, method_label(run.method), f"run {run.label}{status}", run.samples_seen, *scores.values()]))
    for backbone, method, source in _baseline_rows(runs):
        scores = {task: source.value("start", task) for task in (*STS_TASKS, STS_AVG)}
        rows[backbone].append((_order(method), 0, [
            backbone, f"{method_label(method)} (untrained)", f"step 0 of run {source.label}", 0, *scores.values()]))
    for prow in paper:
        rows[prow.backbone].append((_order(prow.method), 1, [
            prow.backbone, method_label(prow.method), "paper, Table 3", NOT_APPLICABLE,
            *(NOT_SOURCED if prow.scores.get(t) is None else prow.scores[t] for t in (*STS_TASKS, STS_AVG))]))
    paper_backbones = {p.backbone for p in paper}
    reproduced = sorted(b for b in rows if b not in paper_backbones or any(k == 0 for _, k, _ in rows[b]))
    for backbone in [*reproduced, *sorted(paper_backbones - set(reproduced))]:
        table.rows += [row for _, _, row in sorted(rows[backbone], key=lambda t: (t[0], t[1], str(t[2][2])))]
    table.notes += [
        "Reproduced rows: each run's final evaluation (after training for SemPA runs). '(untrained)' rows are step 0 "
        "of a training run: the same backbone and embedding template before any update, i.e. the PromptEOL baseline.",
        "Paper rows: SemPA paper Table 3 (analysis/data/paper_sts.csv, with its source). The paper has only "
        f"{', '.join(PAPER_BACKBONE_LABELS.values())}; a CPU-scale backbone is compared through the gain table below.",
    ]
    if any(not r.finished for r in runs if r.kind != "generation"):
        table.notes.append("Unfinished runs have no final evaluation: their cells are missing.")
    if without_sts:
        table.notes.append(f"Not in this table: {len(without_sts)} run(s) configured without the 7-task pass "
                           f"(eval.at_end has no 'sts'), e.g. {without_sts[0]}; see the STS-B dev tables.")
    return table


def _embeds_like_step_0(training: RunRecord, evaluation: RunRecord) -> bool:
    """Whether an evaluation run embedded exactly as the training run's step 0 would: the same backbone and embed
    config, the backbone's dtype as the evaluation dtype, and the same max_length."""
    t, e = training.config, evaluation.config
    t_eval, e_eval = t.get("eval") or {}, e.get("eval") or {}
    return bool(t.get("backbone")) and t.get("backbone") == e.get("backbone") and t.get("embed") == e.get("embed") \
        and (t.get("backbone") or {}).get("dtype") == e_eval.get("dtype") \
        and t_eval.get("max_length") == e_eval.get("max_length")


def untrained_baseline(run: RunRecord, runs: list[RunRecord]) -> tuple[float | None, str]:
    """The untrained 7-task average a training run started from: its own step 0, else a finished evaluation run of
    its embedding method that embeds the same way (a run configured without the 7-task pass at step 0)."""
    own = run.value("start", STS_AVG)
    if own is not None:
        return own, "step 0"
    method = EMBED_METHOD.get(run.embed or "")
    for other in sorted(runs, key=lambda r: r.label):
        if other.kind == "evaluation" and other.finished and other.method == method \
                and _embeds_like_step_0(run, other) and (value := other.value("final", STS_AVG)) is not None:
            return value, f"run {other.label}"
    return None, "missing"


def gain_table(runs: list[RunRecord], paper: list[PaperRow]) -> Table:
    """SemPA's gain over its untrained start, per run, beside the paper's SemPA - PromptEOL gain per backbone."""
    paper_backbones = sorted({p.backbone for p in paper})
    paper_gains = {}
    for b in paper_backbones:
        sempa, base = paper_value(paper, b, "sempa"), paper_value(paper, b, "prompteol")
        paper_gains[b] = None if sempa is None or base is None else sempa - base
    columns = ["run", "backbone", "embed", "samples_seen", "untrained avg", "untrained source", "trained avg", "gain",
               *(f"paper gain {PAPER_BACKBONE_LABELS.get(b, b)}" for b in paper_backbones),
               "paper SemPA avg (same backbone)", "trained - paper"]
    table = Table("gain", "SemPA gain over the untrained baseline (7-task STS avg)", columns)
    for run in sorted((r for r in runs if r.is_sempa_training and r.sts_planned),
                      key=lambda r: (str(r.backbone), r.label)):
        (start, start_source), final = untrained_baseline(run, runs), run.value("final", STS_AVG)
        same = paper_value(paper, run.backbone or "", "sempa")
        table.rows.append([
            run.label, run.backbone, run.embed, run.samples_seen, start, start_source, final,
            None if start is None or final is None else final - start,
            *(paper_gains[b] for b in paper_backbones),
            same if same is not None else NOT_SOURCED,
            None if same is None or final is None else final - same])
    table.notes.append("paper gain = SemPA avg - PromptEOL avg of the paper's Table 3 (its PromptEOL is the untrained "
                       "baseline SemPA starts from). The paper trains on 275,601 triplets; CPU-scale runs see far "
                       "fewer samples (samples_seen).")
    table.notes.append("untrained source: the run's own step 0, else an evaluation run of its embedding method with "
                       "the same backbone, embed config, dtype and max_length (the same embeddings as that step 0).")
    return table


TEMPLATE_METRICS = {STS_AVG: ("templates", "7-task STS avg"), "stsb_dev": ("templates_stsb_dev", "STS-B dev")}


def template_table(runs: list[RunRecord], metric: str = STS_AVG) -> Table:
    """Paraphrase template x embedding template, per sweep (run group) that varies them. ``metric``: the 7-task
    average (the paper's table) or STS-B dev (what a CPU-scale sweep that skips the 7-task pass has)."""
    table_name, metric_label = TEMPLATE_METRICS[metric]
    training = [r for r in runs if r.is_sempa_training]
    groups: dict[tuple[str, str | None], list[RunRecord]] = defaultdict(list)
    for run in training:
        groups[(run.group, run.backbone)].append(run)
    sweeps = {k: v for k, v in groups.items() if len({(r.template, r.embed) for r in v}) > 1}
    embeds = sorted({r.embed or "unknown" for v in sweeps.values() for r in v},
                    key=lambda e: (e not in EMBED_LABELS, list(EMBED_LABELS).index(e) if e in EMBED_LABELS else 0, e))
    columns = ["sweep", "backbone", "template"]
    for embed in embeds:
        columns += [f"{EMBED_LABELS.get(embed, embed)} avg", f"{EMBED_LABELS.get(embed, embed)} delta"]
    table = Table(table_name, f"Paraphrase template x embedding template ({metric_label}, delta = trained - "
                              "untrained)", columns)
    for (group, backbone), members in sorted(sweeps.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        untrained = [group, backbone, "untrained (step 0)"]
        for embed in embeds:
            starts = [v for r in members if r.embed == embed and (v := r.value("start", metric)) is not None]
            untrained += [mean(starts) if starts else None, NOT_APPLICABLE]
        table.rows.append(untrained)
        for template in sorted({r.template or "unknown" for r in members}):
            row = [group, backbone, template.upper()]
            for embed in embeds:
                cell = [r for r in members if r.template == template and r.embed == embed]
                finals = [v for r in cell if (v := r.value("final", metric)) is not None]
                deltas = [f - s for r in cell if (f := r.value("final", metric)) is not None
                          and (s := r.value("start", metric)) is not None]
                row += [mean(finals) if finals else None, mean(deltas) if deltas else None]
                if len(cell) > 1:
                    table.notes.append(f"{group} {template}/{embed}: mean of {len(cell)} runs")
            table.rows.append(row)
    if not sweeps:
        table.notes.append("No run group varies the paraphrase or embedding template (run the template sweep: "
                           "python -m sempa_exp.train +experiment=template -m).")
    table.notes.append("The paper's values for this table are not sourced in analysis/data.")
    return table


GEOMETRY_METHODS = ("mean", "prompteol", "sempa")
TRAINED_METHODS = ("sempa", "listwise", "contrastive", "autoregembed_align", "autoregembed_compress")
TRAINED_EMBED = {"autoregembed_align": "autoregembed", "autoregembed_compress": "autoregembed"}  # else PromptEOL
METHOD_EMBED = {"mean": "mean", "prompteol": "prompteol", "pretended_cot": "pretended_cot"}


@dataclass(frozen=True)
class Resolved:
    value: float
    run: RunRecord
    stage: str  # "final" or "start" (step 0)

    def describe(self) -> str:
        return f"{self.run.label} {'step 0' if self.stage == 'start' else self.stage}"


def resolve(runs: list[RunRecord], backbone: str, method: str, metric: str) -> Resolved | None:
    """A method's value of a metric on a backbone, from the best evidence the runs hold: an evaluation run of the
    method (python -m sempa_exp.evaluate); for a trained method, the final evaluation of its PromptEOL training run
    with the most samples; for an untrained embedding method, step 0 of a training run using that embedding."""
    mine = [r for r in runs if r.backbone == backbone]
    evaluations = [r for r in mine if r.kind == "evaluation" and r.method == method
                   and r.value("final", metric) is not None]
    if evaluations:
        run = pick(evaluations)
        return Resolved(run.value("final", metric), run, "final")
    if method in TRAINED_METHODS:
        trained = [r for r in mine if r.is_training and r.method == method and r.embed == TRAINED_EMBED.get(
                   method, "prompteol")
                   and r.value("final", metric) is not None]
        if trained:
            run = pick(trained)
            return Resolved(run.value("final", metric), run, "final")
    embed = METHOD_EMBED.get(method)
    untrained = [r for r in mine if r.is_training and embed and r.embed == embed
                 and r.value("start", metric) is not None]
    if untrained:
        run = sorted(untrained, key=lambda r: (not r.finished, r.label))[0]
        return Resolved(run.value("start", metric), run, "start")
    return None


def _backbones(runs: list[RunRecord]) -> list[str]:
    return sorted({r.backbone for r in runs if r.backbone})


def geometry_table(runs: list[RunRecord]) -> Table:
    columns = ["backbone"]
    for method in GEOMETRY_METHODS:
        columns += [f"{method_label(method)} uniformity", f"{method_label(method)} isotropy"]
    columns.append("sources")
    table = Table("geometry", "Uniformity (lower = more uniform) and isotropy (1 = isotropic)", columns,
                  decimals={c: 4 for c in columns if c.endswith(("uniformity", "isotropy"))})
    for backbone in _backbones(runs):
        row: list[Any] = [backbone]
        described = []
        for method in GEOMETRY_METHODS:
            found = resolve(runs, backbone, method, "uniformity")
            if found is None:
                row += [None, None]
                continue
            row += [found.value, found.run.value(found.stage, "isotropy")]
            described.append(f"{method_label(method)}: {found.describe()}")
        table.rows.append([*row, "; ".join(described) or None])
    table.notes.append("Computed on each run's geometry sample (results.json 'geometry_sample'). Sources, best "
                       "first: an evaluation run of the method; for SemPA the final evaluation of its PromptEOL "
                       "training run with the most samples; for an untrained method step 0 of a training run with "
                       "that embedding (mean pooling: embed=mean). The paper's values are not sourced in "
                       "analysis/data.")
    return table


def gar_table(runs: list[RunRecord]) -> Table:
    columns = ["backbone", "GAR before training (PromptEOL)", "GAR after training (SemPA)", "delta", "sources"]
    table = Table("gar", "GAR (global alignment rate) before and after training", columns,
                  decimals={c: 4 for c in columns[1:4]})
    for backbone in _backbones(runs):
        before = resolve(runs, backbone, "prompteol", "gar")
        after = resolve(runs, backbone, "sempa", "gar")
        table.rows.append([
            backbone, before and before.value, after and after.value,
            None if before is None or after is None else after.value - before.value,
            "; ".join(f"{side}: {found.describe()}" for side, found in (("before", before), ("after", after))
                      if found) or None])
    if not any(k == "eval/gar" for r in runs for stage in (r.start, r.final) for k in stage):
        table.notes.append("No run has eval/gar: evaluate PromptEOL and the trained adapter with the gar suite "
                           "(python -m sempa_exp.evaluate method=prompteol | method=checkpoint method.path=<run>), "
                           "or add gar to a training run's eval.at_start / eval.at_end.")
    return table


EXAMPLE_SENTENCES = 3


def token_list(tokens: list[str]) -> str:
    """Tokens quoted, so leading spaces and whitespace-only tokens stay visible."""
    return " ".join(json.dumps(t, ensure_ascii=False) for t in tokens)


def aligned_tokens_table(entries: list[AlignedTokens], problems: list[str]) -> Table:
    """Per backbone, the first EXAMPLE_SENTENCES sentences with their top-10 tokens before and after training."""
    table = Table("aligned_tokens", "Top-10 aligned tokens of example sentences, before and after training",
                  ["backbone", "sentence", "before training (PromptEOL)", "after training (SemPA)", "sources"])
    by_backbone: dict[str, dict[str, dict[str, AlignedTokens]]] = defaultdict(lambda: defaultdict(dict))
    for entry in entries:
        if entry.side:
            by_backbone[entry.backbone or NO_BACKBONE][entry.sentence].setdefault(entry.side, entry)
    for backbone, sentences in sorted(by_backbone.items()):
        both = [s for s, sides in sentences.items() if len(sides) == 2]
        chosen = (both + [s for s in sentences if s not in both])[:EXAMPLE_SENTENCES]
        for sentence in chosen:
            sides = sentences[sentence]
            before, after = sides.get("before"), sides.get("after")
            table.rows.append([backbone, sentence, before and token_list(before.tokens),
                               after and token_list(after.tokens),
                               "; ".join(f"{k}: {v.run}" for k, v in sides.items())])
    unplaced = sum(1 for e in entries if not e.side)
    if unplaced:
        table.notes.append(f"{unplaced} aligned-token entries of other methods are not shown (see their runs).")
    if not entries:
        table.notes.append("No aligned-token file (aligned_tokens.json) in any run directory: python -m "
                           "sempa_exp.evaluate writes it for PromptEOL (before) and method=checkpoint (after).")
    table.notes += problems
    return table


GEN_ROWS = (("base", "base", "untrained backbone"), ("sempa", "final", "SemPA"),
            ("contrastive", "final", "Contrastive fine-tuning (foil)"))


def generation_table(runs: list[RunRecord]) -> Table:
    """lm-eval benchmarks (python -m sempa_exp.gen_eval) per backbone: the untrained backbone, SemPA and the
    contrastive foil, with deltas to the untrained one, beside the paper's LLaMA3-8B averages."""
    from sempa_exp.evaluation.generation_table import (
        PAPER_AVERAGES,
        TASK_LABELS,
        common_average,
        common_tasks,
        task_score,
    )

    tasks = list(TASK_LABELS)
    columns = ["backbone", "model", "source", *(TASK_LABELS[t] for t in tasks), "avg", "avg delta", "ppl_nli",
               "logp_margin"]
    table = Table("generation", "Generation capability (lm-evaluation-harness, scores in %)", columns,
                  decimals={"ppl_nli": 2, "logp_margin": 3})
    with_gen = [r for r in runs if r.generation]
    for backbone in sorted({r.backbone or "unknown" for r in with_gen}):
        mine = [r for r in with_gen if (r.backbone or "unknown") == backbone]
        found: list[tuple[str, RunRecord | None, dict | None]] = []
        for method, label, name in GEN_ROWS:
            candidates = [r for r in mine if label in r.generation and (method == "base" or r.method == method)]
            run = pick(candidates)
            found.append((name, run, run.generation[label] if run else None))
        common = common_tasks([rec for _, _, rec in found])
        base_avg = common_average(found[0][2], common)
        for i, (name, run, rec) in enumerate(found):
            scores = [task_score(rec, t) for t in tasks]
            avg = common_average(rec, common)
            proxy = (rec or {}).get("proxy", {})
            table.rows.append([backbone, name, run.label if run else None, *scores, avg,
                               avg - base_avg if avg is not None and base_avg is not None and i else None,
                               proxy.get("ppl_nli"), proxy.get("logp_margin")])
        table.notes.append(f"{backbone}: avg over the tasks every row has ({', '.join(common) or 'none'}); "
                           + "; ".join(_gen_counts(name, rec) for name, _, rec in found if rec))
    paper = PAPER_AVERAGES
    for key, name in (("base", "untrained backbone"), ("sempa", "SemPA"), ("contrastive", "Contrastive fine-tuning")):
        table.rows.append([paper["backbone"], name, "paper", *([None] * len(tasks)), paper[key],
                           paper[key] - paper["base"] if key != "base" else None, None, None])
    table.notes.append("Paper rows: the SemPA paper's generation table, LLaMA3-8B, average of the five tasks "
                       "(per-task values not restated). 'missing': the task was not run or had no data "
                       "(unavailable tasks are never scored).")
    if not with_gen:
        table.notes.append("No run has generation results: python -m sempa_exp.gen_eval [gen.target=RUN_DIR].")
    return table


def _gen_counts(name: str, record: dict) -> str:
    done = [f"{t} n={r['n']}" for t, r in record.get("tasks", {}).items() if r.get("status") == "ok"]
    return f"{name}: " + ", ".join(done)
