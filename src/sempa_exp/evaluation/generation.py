"""Generation capability through EleutherAI's lm-evaluation-harness: the paper's five benchmarks, hub or local files.

The tasks and shots are those of the official SemPA script (``generation_eval.sh``): gsm8k_cot 8-shot, mmlu 5-shot,
hellaswag 0-shot, drop 3-shot, truthfulqa_mc1 0-shot, scored by lm-eval's own task configs. The official script swaps
in its own DROP task (another prompt and answer normalization); here DROP is lm-eval's stock task.

``source=local`` reads each task from JSON Lines under ``<data_dir>/gen`` (the hub datasets' field names): a task
config is generated that *includes* lm-eval's official YAML and only replaces where the documents come from, so the
prompts, few-shot examples and metrics are the harness's. A task whose files are missing is reported as unavailable.
``source=hub`` uses lm-eval's task names as they are; ``auto`` takes the local files when they are all there.

The model is passed to lm-eval's ``HFLM`` as a loaded instance (a merged adapter or a PEFT model).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from sempa_exp.config.schema import GenConfig
from sempa_exp.records import rundir

log = logging.getLogger(__name__)

LOCAL_PREFIX = "sempa_local_"


@dataclass(frozen=True)
class Benchmark:
    name: str  # lm-eval's task (or group) name on the hub
    num_fewshot: int
    metric: str  # the headline key in lm-eval's results
    official_yaml: str  # relative to lm_eval/tasks; {subject} for MMLU's per-subject configs
    files: dict[str, str]  # split -> file under <data_dir>/gen that a local run needs
    optional_files: dict[str, str] = field(default_factory=dict)  # used when present (else that split is off)
    split_keys: tuple[str, ...] = ("training_split", "validation_split", "test_split", "fewshot_split")


BENCHMARKS: dict[str, Benchmark] = {
    "gsm8k_cot": Benchmark("gsm8k_cot", 8, "exact_match,strict-match", "gsm8k/gsm8k-cot.yaml",
                           {"test": "gsm8k/test.jsonl"}),
    "mmlu": Benchmark("mmlu", 5, "acc,none", "mmlu/default/mmlu_{subject}.yaml",
                      {"test": "mmlu/test/{subject}.jsonl", "dev": "mmlu/dev/{subject}.jsonl"}),
    "hellaswag": Benchmark("hellaswag", 0, "acc_norm,none", "hellaswag/hellaswag.yaml",
                           {"validation": "hellaswag/validation.jsonl"}, {"train": "hellaswag/train.jsonl"}),
    "drop": Benchmark("drop", 3, "f1,none", "drop/default.yaml",
                      {"validation": "drop/validation.jsonl", "train": "drop/train.jsonl"}),
    "truthfulqa_mc1": Benchmark("truthfulqa_mc1", 0, "acc,none", "truthfulqa/truthfulqa_mc1.yaml",
                                {"validation": "truthfulqa/mc_validation.jsonl"}),
}


def lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks"


def mmlu_subjects() -> list[str]:
    """The 57 subjects of lm-eval's default MMLU group, from its per-subject configs."""
    folder = lm_eval_tasks_dir() / "mmlu" / "default"
    return sorted(p.stem.removeprefix("mmlu_") for p in folder.glob("mmlu_*.yaml"))


@dataclass
class TaskPlan:
    name: str
    source: str  # local | hub | unavailable
    lm_eval_task: str | None = None
    reason: str | None = None
    data_files: list[Path] = field(default_factory=list)


def _task_config(bench: Benchmark, official: Path, task_name: str, files: dict[str, Path]) -> dict[str, Any]:
    """A task config that includes lm-eval's official one and reads the documents from local JSON Lines."""
    official_cfg = _read_official(official)
    config: dict[str, Any] = {
        "include": str(official),
        "task": task_name,
        "tag": [],  # the official tags would put the local task into the hub groups
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path) for split, path in files.items()}},
    }
    for key in bench.split_keys:  # a split the official config names but the local data lacks is switched off
        split = official_cfg.get(key)
        if split is not None and split not in files:
            config[key] = None
    return config


def _read_official(path: Path) -> dict[str, Any]:
    """An lm-eval task config with its ``include`` chain merged (the including file's keys win), read by lm-eval's
    own loader as its TaskManager indexes tasks: ``!function`` tags are left unresolved (only plain keys are looked
    at here). ``lm_eval.tasks._yaml_loader`` is private to lm-eval; pyproject.toml pins lm-eval (0.4.13)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=False, recursive=True)


def _required_files(bench: Benchmark, gen_dir: Path, subject: str | None = None) -> tuple[dict[str, Path], list[Path]]:
    files = {split: gen_dir / rel.format(subject=subject) for split, rel in bench.files.items()}
    missing = [p for p in files.values() if not p.is_file()]
    for split, rel in bench.optional_files.items():
        path = gen_dir / rel.format(subject=subject)
        if path.is_file():
            files[split] = path
    return files, missing


def _write_yaml(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def plan_local(bench: Benchmark, gen_dir: Path, out_dir: Path) -> TaskPlan:
    """Writes the local task config(s) of one benchmark into ``out_dir``, or says why it cannot run locally."""
    tasks_dir = lm_eval_tasks_dir()
    task_name = LOCAL_PREFIX + bench.name
    if "{subject}" not in bench.official_yaml:
        files, missing = _required_files(bench, gen_dir)
        if missing:
            return TaskPlan(bench.name, "unavailable",
                            reason=f"no local data: missing {', '.join(str(p) for p in missing)}")
        _write_yaml(out_dir / f"{task_name}.yaml",
                    _task_config(bench, tasks_dir / bench.official_yaml, task_name, files))
        return TaskPlan(bench.name, "local", task_name, data_files=sorted(files.values()))
    subjects = mmlu_subjects()
    configs, data_files, missing = [], [], []
    for subject in subjects:
        files, lacking = _required_files(bench, gen_dir, subject)
        missing += lacking
        sub_name = f"{task_name}_{subject}"
        official = tasks_dir / bench.official_yaml.format(subject=subject)
        configs.append((sub_name, {**_task_config(bench, official, sub_name, files), "task_alias": subject}))
        data_files += files.values()
    if missing:
        shown = ", ".join(str(p) for p in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        return TaskPlan(bench.name, "unavailable", reason=f"no local data: missing {shown}")
    for sub_name, config in configs:
        _write_yaml(out_dir / f"{sub_name}.yaml", config)
    # One group over all subjects, weighted by size: the same number as lm-eval's mmlu (size-weighted categories).
    _write_yaml(out_dir / f"{task_name}.yaml", {
        "group": task_name,
        "task": [name for name, _ in configs],
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
        "metadata": {"version": 2},
    })
    return TaskPlan(bench.name, "local", task_name, data_files=sorted(data_files))


def plan_tasks(names: Iterable[str], source: str, gen_dir: Path, out_dir: Path) -> dict[str, TaskPlan]:
    plans = {}
    for name in names:
        bench = BENCHMARKS[name]
        if source == "hub":
            plans[name] = TaskPlan(name, "hub", bench.name)
            continue
        plan = plan_local(bench, gen_dir, out_dir)
        if plan.source == "unavailable" and source == "auto":
            plan = TaskPlan(name, "hub", bench.name, reason=plan.reason)
        plans[name] = plan
    return plans


def files_digest(paths: list[Path]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(rundir.sha256_file(path).encode())
    return digest.hexdigest()[:16]


def _sample_counts(results: dict, task: str) -> tuple[int, int]:
    """(documents scored, documents in the split) over a task or every leaf task of a group."""
    counts = results.get("n-samples", {})
    leaves = [task]
    for group, children in (results.get("group_subtasks") or {}).items():
        if group == task:
            leaves = children
    scored = sum(int(counts[t]["effective"]) for t in leaves if t in counts)
    total = sum(int(counts[t]["original"]) for t in leaves if t in counts)
    return scored, total


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def summarize(bench: Benchmark, plan: TaskPlan, results: dict) -> dict[str, Any]:
    task_results = results["results"][plan.lm_eval_task]
    if bench.metric not in task_results:
        raise RuntimeError(f"lm-eval returned no {bench.metric!r} for {plan.lm_eval_task}: {sorted(task_results)}")
    metric, _, filt = bench.metric.partition(",")
    stderr = _finite(task_results.get(f"{metric}_stderr,{filt}"))
    scored, total = _sample_counts(results, plan.lm_eval_task)
    shots = {c.get("num_fewshot") for c in results.get("configs", {}).values()}
    if shots != {bench.num_fewshot}:  # lm-eval lets a task config pin its shots over the requested ones
        log.warning("%s: lm-eval ran with num_fewshot %s, not the official %d", bench.name, shots, bench.num_fewshot)
    return {
        "status": "ok",
        "source": plan.source,
        "lm_eval_task": plan.lm_eval_task,
        "num_fewshot": shots.pop() if len(shots) == 1 else sorted(shots, key=str),
        "metric": bench.metric,
        "score": 100.0 * float(task_results[bench.metric]),
        "stderr": None if stderr is None else 100.0 * stderr,
        "n": scored,
        "n_total": total,
        "metrics": {k: _finite(v) for k, v in task_results.items() if k not in ("alias", "name", "sample_len")},
    }


def per_document(bench: Benchmark, results: dict) -> dict[str, dict[str, list]] | None:
    """Each scored document's value of the headline metric, per lm-eval (leaf) task: {task: {doc_id: [...], value:
    [...]}}. Two records of the same documents can then be compared document by document (a paired interval), which
    their two means and stderrs cannot. None where lm-eval logged no samples or the metric is not one number per
    document."""
    metric, _, filt = bench.metric.partition(",")
    out: dict[str, dict[str, list]] = {}
    for task, samples in (results.get("samples") or {}).items():
        rows = [s for s in samples if s.get("filter") == filt and metric in s]
        if not rows:
            continue
        values = [_finite(s[metric]) for s in rows]
        if any(v is None for v in values):
            return None
        pairs = sorted(zip((int(s["doc_id"]) for s in rows), values))
        out[task] = {"doc_id": [d for d, _ in pairs], "value": [v for _, v in pairs]}
    return out or None


def run_benchmarks(model, tokenizer, gen: GenConfig, data_dir: Path) -> dict[str, dict[str, Any]]:
    """Runs every configured task through lm-eval; each task's record says ok, unavailable or failed (and why)."""
    import tempfile

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=gen.batch_size)
    records: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="sempa_gen_tasks_") as tmp:
        plans = plan_tasks(gen.tasks, gen.source, Path(data_dir) / "gen", Path(tmp))
        runnable = {n: p for n, p in plans.items() if p.source != "unavailable"}
        task_manager = None
        if runnable:
            task_manager = TaskManager(include_path=tmp,
                                       include_defaults=any(p.source == "hub" for p in runnable.values()))
        for name, plan in plans.items():
            bench = BENCHMARKS[name]
            if plan.source == "unavailable":
                log.warning("%s: unavailable (%s)", name, plan.reason)
                records[name] = {"status": "unavailable", "reason": plan.reason, "num_fewshot": bench.num_fewshot}
                continue
            started = time.time()
            limit = gen.limits.get(name) or gen.limit
            log.info("%s: lm-eval task %s (%s), %d-shot, limit=%s", name, plan.lm_eval_task, plan.source,
                     bench.num_fewshot, limit)
            try:
                results = lm_eval.simple_evaluate(
                    model=lm, tasks=[plan.lm_eval_task], task_manager=task_manager, num_fewshot=bench.num_fewshot,
                    limit=limit, log_samples=True, bootstrap_iters=gen.bootstrap_iters,
                    gen_kwargs={"max_gen_toks": gen.max_gen_toks} if gen.max_gen_toks else None)
                record = {**summarize(bench, plan, results), "limit": limit}
                if (docs := per_document(bench, results)) is not None:
                    record["per_doc"] = docs
            except Exception as exc:  # one task's failure (e.g. the hub unreachable) must not lose the others
                status = "unavailable" if plan.source == "hub" else "failed"
                log.error("%s (%s) %s: %s: %s", name, plan.lm_eval_task, status, type(exc).__name__, exc)
                records[name] = {"status": status, "source": plan.source, "lm_eval_task": plan.lm_eval_task,
                                 "num_fewshot": bench.num_fewshot, "reason": f"{type(exc).__name__}: {exc}"}
                if plan.reason:  # auto fell back to the hub
                    records[name]["local_data"] = plan.reason
                continue
            if plan.data_files:
                record["data_sha256"] = files_digest(plan.data_files)
                record["data_files"] = len(plan.data_files)
            if plan.reason:  # auto fell back to the hub
                record["local_data"] = plan.reason
            record["seconds"] = time.time() - started
            records[name] = record
            log.info("%s: %s = %.2f (n=%d)", name, bench.metric, record["score"], record["n"])
    return records


def average(tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean score over the tasks that ran; ``complete`` only when all five of the paper's did."""
    scored = {name: r["score"] for name, r in tasks.items() if r.get("status") == "ok"}
    return {
        "score": sum(scored.values()) / len(scored) if scored else None,
        "tasks": sorted(scored),
        "complete": set(scored) == set(BENCHMARKS),
    }


def evaluate_generation(model, tokenizer, gen: GenConfig, data_dir: Path, proxy=None,
                        model_info: dict | None = None) -> dict[str, Any]:
    """The generation record of one model state: benchmark scores, their average and the perplexity proxy."""
    from sempa_exp.evaluation.perplexity import proxy_metrics

    started = time.time()
    record: dict[str, Any] = {
        "model": model_info or {},
        "settings": {"source": gen.source, "limit": gen.limit, "limits": {k: v for k, v in gen.limits.items() if v},
                     "batch_size": gen.batch_size, "max_gen_toks": gen.max_gen_toks, "lm_eval": _version("lm_eval")},
    }
    if proxy is not None:
        record["proxy"] = {**proxy_metrics(model, tokenizer, proxy, gen.batch_size), **proxy.describe()}
    record["tasks"] = run_benchmarks(model, tokenizer, gen, data_dir) if gen.tasks else {}
    record["average"] = average(record["tasks"])
    record["seconds"] = time.time() - started
    record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return record


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def flat_metrics(record: dict[str, Any], prefix: str = "gen/") -> dict[str, float]:
    """The W&B / metrics.jsonl view of a record: gen/<task>, gen/avg, gen/ppl_nli, gen/logp_*."""
    out = {f"{prefix}{name}": r["score"] for name, r in record.get("tasks", {}).items() if r.get("status") == "ok"}
    if record.get("average", {}).get("score") is not None:
        out[f"{prefix}avg"] = record["average"]["score"]
    from sempa_exp.evaluation.perplexity import PROXY_KEYS

    out.update({f"{prefix}{k}": record["proxy"][k] for k in PROXY_KEYS if k in record.get("proxy", {})})
    return out
