"""The generation table: base backbone, SemPA and the contrastive-learning foil, with deltas, next to the paper
(``python -m sempa_exp.gen_report``; the analysis report builds the same table from its runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sempa_exp.evaluation.generation import BENCHMARKS
from sempa_exp.records.results import RESULTS_FILE, read_results

TASK_LABELS = {
    "gsm8k_cot": "GSM8K CoT 8-shot",
    "mmlu": "MMLU 5-shot",
    "hellaswag": "HellaSwag 0-shot",
    "drop": "DROP 3-shot",
    "truthfulqa_mc1": "TruthfulQA MC1 0-shot",
}
# The paper's generation table (LLaMA3-8B, average of the five tasks); per-task values are not restated here.
PAPER_AVERAGES = {"backbone": "LLaMA3-8B", "base": 57.25, "sempa": 59.34, "contrastive": 39.54}
PROXY_COLUMNS = ("ppl_nli", "logp_chosen", "logp_margin")


def load_record(path: str | Path, label: str | None = None) -> tuple[dict[str, Any], str]:
    """(generation record, its label) from a run directory or results.json."""
    path = Path(path).expanduser()
    run_dir = path if path.is_dir() else path.parent
    file = run_dir / RESULTS_FILE
    results = read_results(run_dir)
    if results is None:
        raise FileNotFoundError(f"no {RESULTS_FILE} at {path}")
    generation = results.generation
    if not generation:
        raise KeyError(f"{file} has no generation record: run python -m sempa_exp.gen_eval gen.target=... first")
    if label is None:
        label = next((k for k in ("final", "base") if k in generation),
                     max(generation, key=lambda k: generation[k].get("finished_at", "")))
    if label not in generation:
        raise KeyError(f"{file}: no generation record {label!r}; it has {sorted(generation)}")
    return generation[label], label


def task_score(record: dict | None, task: str) -> float | None:
    """A task's headline score in a generation record; None when the task was not run, failed or was unavailable."""
    r = (record or {}).get("tasks", {}).get(task, {})
    return r.get("score") if r.get("status") == "ok" else None


def common_tasks(records: list[dict | None]) -> list[str]:
    """The benchmarks every present record scored: the rows of one table are averaged over these only."""
    present = [r for r in records if r is not None]
    return [t for t in BENCHMARKS if present and all(task_score(r, t) is not None for r in present)]


def common_average(record: dict | None, common: list[str]) -> float | None:
    return sum(task_score(record, t) for t in common) / len(common) if record is not None and common else None


def _cell(record: dict | None, task: str, base: dict | None, is_base: bool) -> str:
    if record is None:
        return "missing"
    r = record.get("tasks", {}).get(task)
    if r is None:
        return "not run"
    if r.get("status") != "ok":
        return r.get("status", "?")
    text = f"{r['score']:.2f}"
    b = task_score(base, task)
    if not is_base and b is not None:
        text += f" ({r['score'] - b:+.2f})"
    return text


def _proxy(record: dict | None, key: str) -> float | None:
    return (record or {}).get("proxy", {}).get(key)


def generation_table(entries: list[tuple[str, dict | None]], base_name: str = "base") -> str:
    """A Markdown table; ``entries`` are (row name, generation record or None when that model is missing)."""
    records = dict(entries)
    base = records.get(base_name)
    common = common_tasks(list(records.values()))
    head = ["model", *(TASK_LABELS[t] for t in BENCHMARKS), f"avg ({len(common)} common tasks)", *PROXY_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base_avg = common_average(base, common)
    for name, record in entries:
        is_base = name == base_name
        cells = [_cell(record, t, base, is_base) for t in BENCHMARKS]
        if record is not None and common:
            avg = common_average(record, common)
            cells.append(f"{avg:.2f}" + ("" if is_base or base_avg is None else f" ({avg - base_avg:+.2f})"))
        else:
            cells.append("-")
        for key in PROXY_COLUMNS:
            value, ref = _proxy(record, key), _proxy(base, key)
            text = "-" if value is None else f"{value:.3f}"
            if value is not None and ref is not None and not is_base:
                text += f" ({value - ref:+.3f})"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    paper = PAPER_AVERAGES
    lines.append(f"| paper {paper['backbone']}: base / SemPA / contrastive | " + " | ".join("" for _ in BENCHMARKS)
                 + f" | {paper['base']:.2f} / {paper['sempa']:.2f} ({paper['sempa'] - paper['base']:+.2f}) / "
                   f"{paper['contrastive']:.2f} ({paper['contrastive'] - paper['base']:+.2f}) (all 5 tasks) | | | |")
    lines.append("")
    lines.append(_notes(entries))
    return "\n".join(lines)


def _notes(entries: list[tuple[str, dict | None]]) -> str:
    notes = []
    fingerprints = {r.get("proxy", {}).get("fingerprint") for _, r in entries if r and r.get("proxy")}
    for name, record in entries:
        if record is None:
            continue
        s = record.get("settings", {})
        ns = ", ".join(f"{t} {r['n']}/{r['n_total']} docs (limit {r.get('limit')})"
                       for t, r in record.get("tasks", {}).items() if r.get("status") == "ok")
        proxy = record.get("proxy", {})
        notes.append(f"- {name}: source={s.get('source')}, lm-eval {s.get('lm_eval')}; {ns}; "
                     f"proxy on {proxy.get('n')} held-out triplets")
    notes.append("- Scores in %, delta vs base in parentheses; avg over the tasks every row has; a limit is per "
                 "lm-eval task (MMLU: per subject). Headline metrics: "
                 + ", ".join(f"{t} {b.metric}" for t, b in BENCHMARKS.items())
                 + ". ppl_nli: perplexity of held-out NLI hypotheses; logp_*: mean per-token log-prob of the "
                   "reference completions after the paraphrase prompt.")
    if len(fingerprints) > 1:
        notes.append("- WARNING: the rows' proxy sets differ (fingerprints " + ", ".join(sorted(fingerprints)) + ")")
    return "\n".join(notes)


def print_record(record: dict[str, Any], title: str = "") -> None:
    table = Table(title=title or None)
    for col in ("task", "source", "shots", "metric", "score", "n"):
        table.add_column(col, justify="right" if col in ("score", "n", "shots") else "left")
    for name, r in record.get("tasks", {}).items():
        if r.get("status") == "ok":
            table.add_row(name, r["source"], str(r["num_fewshot"]), r["metric"], f"{r['score']:.2f}",
                          f"{r['n']}/{r['n_total']}")
        else:
            table.add_row(name, r.get("source", "-"), str(r.get("num_fewshot", "")), r["status"],
                          "-", (r.get("reason") or "")[:60])
    avg = record.get("average", {})
    if avg.get("score") is not None:
        table.add_row("average", "", "", ", ".join(avg["tasks"]), f"{avg['score']:.2f}", "")
    for key, value in record.get("proxy", {}).items():
        if isinstance(value, float):
            table.add_row(key, "proxy", "", "", f"{value:.4f}", str(record["proxy"].get("n", "")))
    Console().print(table)
