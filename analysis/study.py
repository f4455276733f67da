"""The small-backbone study (conf/experiment/study_*.yaml): per setting, the 7-task STS of the best-by-dev checkpoint
of each seed against the untrained PromptEOL baseline, with the seeds' spread and a paired bootstrap interval over
the STS pairs; and the STS-B dev curves.

A setting ("cell") is a run group with the overrides that tell its runs apart, the seed left out. A run counts once
it is finished and its results hold ``best_checkpoint`` (``eval.at_best``). The interval resamples the pairs of every
task (the same resample for the baseline and every seed: paired), recomputes each Spearman, and takes the 2.5 and 97.5
percentiles of (mean over seeds of the trained 7-task average) - (the baseline's); it measures how much the test
pairs' sampling moves the difference, the seeds' spread is its own column.

Question 5's tables: the perplexity proxy of each setting's final adapters against the untrained backbone's, and the
lm-eval benchmarks the same way, paired by document (each record keeps every document's outcome, ``per_doc``), with a
bootstrap interval over the documents.
"""

from __future__ import annotations

import logging
import re
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from analysis.figures import FigureResult, _plot_line, plt
from analysis.runs import STS_TASKS, RunRecord, method_label
from analysis.tables import Table
from sempa_exp.evaluation.suites import STS_PAIRS_DIR, load_pairs

log = logging.getLogger(__name__)

BOOTSTRAP_SAMPLES = 1000
_SEED = re.compile(r"(^|,)seed=[^,]*")
Pairs = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass
class Cell:
    group: str
    setting: str  # the overrides that tell the cell apart within its group, the seed left out
    backbone: str
    method: str
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.group}/{self.setting}"


def seed_of(run: RunRecord) -> int | None:
    seed = run.config.get("seed")
    return int(seed) if isinstance(seed, (int, float)) else None


def setting_of(run: RunRecord) -> str:
    name = _SEED.sub("", run.short_name or run.name).strip(",")
    return name or "default"


def study_cells(runs: list[RunRecord]) -> list[Cell]:
    """The training runs with a best-by-dev evaluation, grouped by setting (one run per seed: the first by label)."""
    cells: dict[tuple[str, str], Cell] = {}
    for run in sorted(runs, key=lambda r: r.label):
        if not (run.is_training and run.finished and run.best):
            continue
        key = (run.group, setting_of(run))
        cell = cells.setdefault(key, Cell(run.group, key[1], run.backbone or "unknown", run.method))
        if seed_of(run) not in {seed_of(r) for r in cell.runs}:
            cell.runs.append(run)
    return sorted(cells.values(), key=lambda c: (c.backbone, c.group, c.setting))


def _pairs_at(run: RunRecord, step: int) -> Pairs | None:
    if run.run_dir is None:
        return None
    path = Path(run.run_dir) / STS_PAIRS_DIR / f"step-{step}.npz"
    if not path.exists():
        return None
    try:
        return load_pairs(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # the cell's interval is shown as missing
        log.warning("unreadable pair similarities %s (%s): that run's interval is missing", path, exc)
        return None


def baseline_pairs(cell: Cell, runs: list[RunRecord]) -> tuple[Pairs | None, str]:
    """The untrained backbone's PromptEOL pair similarities: step 0 of a run of the cell, else of another training
    run on the same backbone that starts from the untrained backbone (AutoRegEmbed starts from its stage 1)."""
    candidates = [*cell.runs, *sorted((r for r in runs if r.backbone == cell.backbone and r.is_training
                                       and r not in cell.runs and r.embed == "prompteol"), key=lambda r: r.label)]
    for run in candidates:
        if run.embed != "prompteol":
            continue
        pairs = _pairs_at(run, 0)
        if pairs is not None:
            return pairs, f"step 0 of {run.label}"
    return None, "missing"


def _spearman_rows(values: np.ndarray, gold_ranks: np.ndarray) -> np.ndarray:
    """Row-wise Spearman x 100 of (B, n) resampled predictions against the (B, n) ranks of the resampled gold."""
    ranks = rankdata(values, axis=1)
    a = ranks - ranks.mean(axis=1, keepdims=True)
    b = gold_ranks - gold_ranks.mean(axis=1, keepdims=True)
    return 100.0 * (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))


def paired_bootstrap(base: Pairs, trained: list[Pairs], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
                     ) -> tuple[float, float]:
    """The 95% percentile interval of mean_seeds(7-task avg of trained) - 7-task avg of base, over resamples of
    each task's pairs (the same resample for all)."""
    return paired_difference(trained, [base], samples, seed)


def paired_difference(a: list[Pairs], b: list[Pairs], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
                      ) -> tuple[float, float]:
    """The 95% percentile interval of mean_seeds(7-task avg of a) - mean_seeds(7-task avg of b), every evaluation
    scored on the same resample of each task's pairs."""
    rng = np.random.default_rng(seed)
    deltas = np.zeros(samples)
    for task in STS_TASKS:
        gold = b[0][task][1]
        idx = rng.integers(0, len(gold), size=(samples, len(gold)))
        gold_ranks = rankdata(gold[idx], axis=1)
        a_scores = np.mean([_spearman_rows(p[task][0][idx], gold_ranks) for p in a], axis=0)
        b_scores = np.mean([_spearman_rows(p[task][0][idx], gold_ranks) for p in b], axis=0)
        deltas += (a_scores - b_scores) / len(STS_TASKS)
    low, high = np.percentile(deltas, [2.5, 97.5])
    return float(low), float(high)


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def study_table(runs: list[RunRecord], samples: int = BOOTSTRAP_SAMPLES) -> Table:
    columns = ["backbone", "method", "setting", "seeds", "PromptEOL avg", "best-by-dev avg", "sd (seeds)",
               "delta", "95% CI (STS pairs)", "start STS-B dev", "best STS-B dev", "best at samples",
               "ppl_nli final", "baseline source"]
    table = Table("study", "Small-backbone study: the best-by-dev checkpoint against the untrained baseline "
                           "(7-task STS avg, Spearman x 100)", columns)
    for cell in study_cells(runs):
        base, source = baseline_pairs(cell, runs)
        best = [r.best for r in cell.runs]
        avgs = [float(b["eval/sts_avg"]) for b in best if isinstance(b.get("eval/sts_avg"), (int, float))]
        mean, sd = _mean_sd(avgs)
        base_avg = None if base is None else float(np.mean([_full_spearman(*base[t]) for t in STS_TASKS]))
        trained = [p for r in cell.runs if (p := _pairs_at(r, int(r.best["step"]))) is not None]
        interval = None
        if base is not None and trained and len(trained) == len(cell.runs):
            low, high = paired_bootstrap(base, trained, samples)
            interval = f"[{low:+.2f}, {high:+.2f}]"
        dev_base = _mean_sd([v for r in cell.runs if (v := r.value("start", "stsb_dev")) is not None])[0]
        dev_best = _mean_sd([float(b["eval/stsb_dev"]) for b in best])[0]
        at = sorted({int(b.get("samples_seen", 0)) for b in best})
        ppl = _mean_sd([v for r in cell.runs if (v := _proxy(r)) is not None])[0]
        table.rows.append([cell.backbone, method_label(cell.method), cell.label,
                           ", ".join(str(seed_of(r)) for r in cell.runs), base_avg, mean, sd,
                           None if mean is None or base_avg is None else mean - base_avg, interval, dev_base,
                           dev_best, ", ".join(map(str, at)), ppl, source])
    table.notes += [
        "best-by-dev: per seed, the trained checkpoint (step > 0) with the highest STS-B dev, scored once on the 7 "
        "tasks (eval.at_best); mean and sd over the seeds. delta: that mean - the untrained PromptEOL average.",
        f"95% CI: paired bootstrap over the pairs of each STS task ({samples} resamples, the same for baseline and "
        "every seed), percentile interval of the delta; it holds the test sets' sampling, not the seeds' spread.",
        "ppl_nli final: the perplexity proxy of the final adapter (gen.at_end), mean over seeds.",
        "start STS-B dev: the run's own step 0, mean over seeds: the untrained PromptEOL for a run that starts from "
        "the backbone; AutoRegEmbed's stage 2 starts from its stage-1 adapter, read out with its own embedding.",
    ]
    return table


_RECIPE_KEYS = {"backbone", "objective"}


def _setting_keys(cell: Cell) -> set[str]:
    return {part.split("=", 1)[0] for part in cell.setting.split(",") if "=" in part}


def _best_avgs(cell: Cell) -> list[float]:
    return [float(r.best["eval/sts_avg"]) for r in cell.runs if isinstance(r.best.get("eval/sts_avg"), (int, float))]


def _best_pairs(cell: Cell) -> list[Pairs] | None:
    pairs = [p for r in cell.runs if (p := _pairs_at(r, int(r.best["step"]))) is not None]
    return pairs if len(pairs) == len(cell.runs) else None


def _data_size(cell: Cell) -> int | None:
    return cell.runs[0].data_size


def reference_cell(cell: Cell, cells: list[Cell]) -> Cell | None:
    """The SemPA cell ``cell`` is compared with: SemPA with the default recipe (a setting that names nothing but
    the backbone and the objective) on the same backbone and data size; None for such a cell itself."""
    if cell.method == "sempa" and _setting_keys(cell) <= _RECIPE_KEYS:
        return None
    return next((c for c in cells if c.method == "sempa" and _setting_keys(c) <= _RECIPE_KEYS
                 and c.backbone == cell.backbone and _data_size(c) == _data_size(cell)), None)


def study_contrasts_table(runs: list[RunRecord], samples: int = BOOTSTRAP_SAMPLES) -> Table:
    """Every study setting against SemPA at equal data on the same backbone (question 4, and the step sizes against
    the default recipe): the difference of the best-by-dev 7-task averages, with a paired bootstrap over the pairs."""
    columns = ["backbone", "method", "setting", "seeds", "best-by-dev avg", "sd (seeds)", "SemPA setting",
               "SemPA seeds", "SemPA avg", "SemPA sd", "difference", "95% CI (STS pairs)"]
    table = Table("study_contrasts", "Small-backbone study: each setting against SemPA at equal data "
                                     "(best-by-dev 7-task STS avg, Spearman x 100)", columns)
    cells = study_cells(runs)
    for cell in cells:
        ref = reference_cell(cell, cells)
        if ref is None:
            continue
        (mean, sd), (ref_mean, ref_sd) = _mean_sd(_best_avgs(cell)), _mean_sd(_best_avgs(ref))
        interval = None
        mine, theirs = _best_pairs(cell), _best_pairs(ref)
        if mine and theirs:
            low, high = paired_difference(mine, theirs, samples)
            interval = f"[{low:+.2f}, {high:+.2f}]"
        table.rows.append([cell.backbone, method_label(cell.method), cell.label,
                           ", ".join(str(seed_of(r)) for r in cell.runs), mean, sd, ref.label,
                           ", ".join(str(seed_of(r)) for r in ref.runs), ref_mean, ref_sd,
                           None if mean is None or ref_mean is None else mean - ref_mean, interval])
    table.notes += [
        "SemPA setting: SemPA with the default recipe (the setting names only the backbone and the objective) on the "
        "same backbone and data size. difference: mean over this setting's seeds - mean over SemPA's.",
        f"95% CI: paired bootstrap over the pairs of each STS task ({samples} resamples, every seed of both settings "
        "scored on the same resample); the seeds' spread is in the sd columns.",
    ]
    return table


def _proxy_value(record: dict | None, name: str) -> float | None:
    value = ((record or {}).get("proxy") or {}).get(name)
    return float(value) if isinstance(value, (int, float)) else None


def _gen_average(record: dict | None) -> float | None:
    value = ((record or {}).get("average") or {}).get("score")
    return float(value) if isinstance(value, (int, float)) else None


def _same_sample(record: dict, base: dict | None) -> bool:
    """Whether two proxy records scored the same held-out triplets (their fingerprints, where both have one) in the
    same precision (a final adapter's record from before session 13 names none: it was scored in the training dtype,
    bf16 here, against a float32 base, which moves the perplexity by about half a percent)."""
    mine, theirs = ((r or {}).get("proxy") or {} for r in (record, base))
    same_triplets = mine.get("fingerprint") == theirs.get("fingerprint") or None in (mine.get("fingerprint"),
                                                                                     theirs.get("fingerprint"))
    dtypes = [((r or {}).get("model") or {}).get("dtype") for r in (record, base)]
    return same_triplets and dtypes[0] is not None and dtypes[0] == dtypes[1]


def study_generation_table(runs: list[RunRecord]) -> Table:
    """Question 5: the perplexity proxy (and the lm-eval average where a run has one) of each setting's final
    adapters against the untrained backbone's (a generation record of it among the sources, e.g. runs/base)."""
    columns = ["backbone", "method", "setting", "seeds", "ppl_nli", "ppl sd", "ppl vs base", "logp_margin",
               "margin sd", "lm-eval avg"]
    table = Table("study_generation", "Small-backbone study: generation proxy of the final adapters against the "
                                      "untrained backbone", columns)
    table.decimals = {"ppl vs base": 1, "logp_margin": 3, "margin sd": 3}
    bases: dict[str, dict] = {}
    for run in sorted(runs, key=lambda r: r.label):
        if run.backbone and "base" in run.generation and run.backbone not in bases:
            bases[run.backbone] = run.generation["base"]
    cells = study_cells(runs)
    unscored = [c for c in cells if not any(r.generation.get("final") for r in c.runs)]
    overlapping: list[str] = []
    cells = [c for c in cells if c not in unscored]
    for backbone in sorted({c.backbone for c in cells}):
        base = bases.get(backbone)
        base_ppl = _proxy_value(base, "ppl_nli")
        if base is not None:
            table.rows.append([backbone, "untrained", "base", "-", base_ppl, None, None,
                               _proxy_value(base, "logp_margin"), None, _gen_average(base)])
        for cell in (c for c in cells if c.backbone == backbone):
            finals = [r.generation.get("final") for r in cell.runs]
            ppl, ppl_sd = _mean_sd([v for f in finals if (v := _proxy_value(f, "ppl_nli")) is not None])
            comparable = base_ppl is not None and all(_same_sample(f, base) for f in finals if f)
            trained_on = [f for f in finals if f and (_proxy_value(f, "overlap_with_training") or 0) > 0]
            if trained_on:  # the proxy scored triplets the run trained on: not a held-out measure
                comparable = False
                overlapping.append(cell.label)
            margin, margin_sd = _mean_sd([v for f in finals if (v := _proxy_value(f, "logp_margin")) is not None])
            scores = [v for f in finals if (v := _gen_average(f)) is not None]
            table.rows.append([backbone, method_label(cell.method), cell.label,
                               ", ".join(str(seed_of(r)) for r in cell.runs), ppl, ppl_sd,
                               100.0 * (ppl / base_ppl - 1.0) if ppl is not None and comparable else None,
                               margin, margin_sd, float(np.mean(scores)) if scores else None])
    table.notes += [
        "ppl_nli: perplexity of held-out NLI hypotheses given their premise's prompt; logp_margin: mean log-prob of "
        "the entailment minus the contradiction (what DPO trains). Mean and sd over the seeds' final adapters "
        "(gen.at_end). ppl vs base: the change in %, only where both scored the same held-out triplets (the "
        "proxy's fingerprint) in the same precision (the records' model dtype).",
        "base: the untrained backbone, from a generation record among the report's sources "
        "(python -m sempa_exp.gen_eval backbone=B 'gen.tasks=[]' writes runs/base/B); lm-eval avg only "
        "where a run was scored on the benchmarks (python -m sempa_exp.gen_eval gen=quick gen.target=RUN), the mean "
        "over the seeds that were (study_benchmarks names them and pairs them with the base by document).",
    ]
    if not bases:
        table.notes.append("No untrained-backbone generation record among the sources: the base rows are missing.")
    if overlapping:
        table.notes.append("No ppl vs base where the proxy's triplets were trained on (its overlap_with_training > 0: "
                           "data.size + eval.ppl_sample exceeds the usable triplets): " + ", ".join(overlapping) + ".")
    if unscored:
        table.notes.append("Left out, no final adapter scored (gen.at_end off; python -m sempa_exp.gen_eval "
                           "'gen.tasks=[]' gen.target=RUN scores one): "
                           + ", ".join(c.label for c in unscored) + ".")
    return table


def _doc_values(record: dict | None, task: str) -> tuple[dict[tuple[str, int], float], str | None] | None:
    """One generation record's per-document values of a benchmark, keyed (lm-eval task, doc_id), and the digest of
    the documents it read; None where it has none (an older record, a failed task)."""
    entry = ((record or {}).get("tasks") or {}).get(task) or {}
    if entry.get("status") != "ok" or not entry.get("per_doc"):
        return None
    values = {(leaf, int(d)): float(v) for leaf, docs in entry["per_doc"].items()
              for d, v in zip(docs["doc_id"], docs["value"])}
    return values, entry.get("data_sha256")


def benchmark_difference(base: dict[tuple[str, int], float], trained: list[dict[tuple[str, int], float]],
                         samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[str, float] | None:
    """On the documents every record scored: the base's score, the seeds' mean score, their difference (x 100) and its
    95 % percentile interval over resamples of the documents (the same resample for the base and every seed)."""
    keys = sorted(set(base).intersection(*trained))
    if not keys:
        return None
    b = np.array([base[k] for k in keys])
    t = np.mean([[run[k] for k in keys] for run in trained], axis=0)
    idx = np.random.default_rng(seed).integers(0, len(keys), size=(samples, len(keys)))
    low, high = np.percentile(100.0 * (t[idx] - b[idx]).mean(axis=1), [2.5, 97.5])
    return {"n": len(keys), "base": 100.0 * b.mean(), "trained": 100.0 * t.mean(),
            "difference": 100.0 * (t.mean() - b.mean()), "low": float(low), "high": float(high)}


def study_benchmarks_table(runs: list[RunRecord], samples: int = BOOTSTRAP_SAMPLES) -> Table:
    """Question 5 on the lm-eval benchmarks: each setting's final adapters against the untrained backbone, question by
    question (the records' per-document outcomes), on the documents both scored."""
    columns = ["backbone", "method", "setting", "seeds", "benchmark", "documents", "untrained", "trained",
               "difference", "95% CI (documents)"]
    table = Table("study_benchmarks", "Small-backbone study: lm-eval benchmarks of the final adapters against the "
                                      "untrained backbone, paired by document (score x 100)", columns)
    bases: dict[str, dict] = {}
    for run in sorted(runs, key=lambda r: r.label):
        if run.backbone and "base" in run.generation and run.backbone not in bases:
            bases[run.backbone] = run.generation["base"]
    skipped: list[str] = []
    for cell in study_cells(runs):
        base = bases.get(cell.backbone)
        finals = [r.generation.get("final") for r in cell.runs]
        tasks = sorted({t for f in finals if f for t in (f.get("tasks") or {})})
        for task in tasks:
            base_docs = _doc_values(base, task)
            trained = [v for f in finals if (v := _doc_values(f, task)) is not None]
            if base_docs is None or not trained:
                skipped.append(f"{cell.label} {task}: " + ("no untrained record with its documents"
                                                           if base_docs is None else "no per-document record"))
                continue
            if any(digest != base_docs[1] for _, digest in trained):
                skipped.append(f"{cell.label} {task}: read other documents than the untrained record (data_sha256)")
                continue
            result = benchmark_difference(base_docs[0], [v for v, _ in trained], samples)
            if result is None:
                skipped.append(f"{cell.label} {task}: no document scored by both")
                continue
            seeds = ", ".join(str(seed_of(r)) for r, f in zip(cell.runs, finals) if _doc_values(f, task))
            table.rows.append([cell.backbone, method_label(cell.method), cell.label, seeds, task, result["n"],
                               result["base"], result["trained"], result["difference"],
                               f"[{result['low']:+.2f}, {result['high']:+.2f}]"])
    table.notes += [
        "untrained / trained: the benchmark's headline metric (lm-eval's, x 100) on the documents every record of the "
        "row scored (a limit such as gen.limits.truthfulqa_mc1=200 scores the first N); trained is the mean over the "
        "seeds' final adapters (python -m sempa_exp.gen_eval gen.target=RUN).",
        "95% CI: paired bootstrap over the documents (1000 resamples, the same for the untrained model and every "
        "seed), percentile interval of the difference; it holds the questions' sampling, not the seeds' spread.",
    ]
    table.notes += [f"Not compared: {reason}." for reason in skipped]
    return table


def _full_spearman(pred: np.ndarray, gold: np.ndarray) -> float:
    from sempa_exp.data.sts import spearman100

    return spearman100(pred, gold)


def _proxy(run: RunRecord) -> float | None:
    value = ((run.generation.get("final") or {}).get("proxy") or {}).get("ppl_nli")
    return float(value) if isinstance(value, (int, float)) else None


def study_curves_figure(runs: list[RunRecord]) -> FigureResult:
    """STS-B dev against training samples per backbone: one line per setting (the mean over its seeds at each
    evaluated sample count; the seeds' min-max as a band)."""
    cells = study_cells(runs)
    result = FigureResult("study_curves", "Small-backbone study: STS-B dev during training", None,
                          "STS-B dev (Spearman x 100) at every checkpoint of the study's runs; a line is the mean over "
                          "the seeds of one setting, the band their range; 0 samples is the untrained start.")
    if not cells:
        result.missing.append("no finished run with a best-by-dev evaluation (eval.at_best)")
        return result
    backbones = sorted({c.backbone for c in cells})
    most = max(sum(c.backbone == b for c in cells) for b in backbones)
    fig, axes = plt.subplots(1, len(backbones), figsize=(6.5 * len(backbones), 4.5 + 0.22 * most), squeeze=False)
    for ax, backbone in zip(axes[0], backbones, strict=True):
        for i, cell in enumerate(c for c in cells if c.backbone == backbone):
            by_x: dict[int, list[float]] = defaultdict(list)
            for run in cell.runs:
                for x, y in run.series("stsb_dev"):
                    by_x[x].append(y)
            xs = sorted(x for x in by_x if len(by_x[x]) == len(cell.runs))
            points = [(x, float(np.mean(by_x[x]))) for x in xs]
            # the panel is the backbone, so the legend leaves it out of the setting
            setting = ",".join(p for p in cell.setting.split(",") if p != f"backbone={backbone}") or "default"
            seeds = f"{len(cell.runs)} seed" + "s" * (len(cell.runs) > 1)
            name = f"{method_label(cell.method)}: {cell.group}/{setting} ({seeds})"
            _plot_line(ax, result, backbone, name, ", ".join(r.label for r in cell.runs), points, marker=".",
                       color=f"C{i}")
            if len(cell.runs) > 1 and xs:
                ax.fill_between(xs, [min(by_x[x]) for x in xs], [max(by_x[x]) for x in xs], color=f"C{i}", alpha=0.15)
        ax.set_title(backbone)
        ax.set_xlabel("training samples")
        ax.set_ylabel("STS-B dev (Spearman x 100)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    result.figure = fig
    return result

