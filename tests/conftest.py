"""Shared fixtures: a small synthetic data root in the normalized layout, and composed configs on the tiny backbone."""

from __future__ import annotations

import csv
import gzip
import os
import random
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from sempa_exp.config.location import CONF_DIR
from sempa_exp.config.registry import register_all

SUBJECTS = ["a man", "a woman", "the dog", "two children", "a cat", "the chef", "a girl", "an old man"]
VERBS = ["is playing", "is eating", "is riding", "is cutting", "is watching", "is cleaning"]
OBJECTS = ["a guitar", "an apple", "a horse", "the bread", "a movie", "the kitchen", "a ball", "the car"]

STS_LAYOUT = {
    "STS12": ["MSRpar", "MSRvid"],
    "STS13": ["FNWN", "headlines"],
    "STS14": ["images", "OnWN"],
    "STS15": ["belief", "images"],
    "STS16": ["headlines", "plagiarism"],
    "STSBenchmark": ["train", "dev", "test"],
    "SICKRelatedness": ["train", "trial", "test"],
}


def _sentence(rng: random.Random) -> tuple[int, int, int]:
    return rng.randrange(len(SUBJECTS)), rng.randrange(len(VERBS)), rng.randrange(len(OBJECTS))


def _text(parts: tuple[int, int, int]) -> str:
    s, v, o = parts
    return f"{SUBJECTS[s].capitalize()} {VERBS[v]} {OBJECTS[o]}."


def write_sts_split(path: Path, rng: random.Random, n_pairs: int) -> None:
    """Pairs whose gold score is the number of shared slots (subject/verb/object) plus noise, 0-5."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.write("sentence1\tsentence2\tscore\n")
        for _ in range(n_pairs):
            a = _sentence(rng)
            b = tuple(x if rng.random() < 0.5 else rng.randrange(n) for x, n in
                      zip(a, (len(SUBJECTS), len(VERBS), len(OBJECTS)), strict=True))
            shared = sum(x == y for x, y in zip(a, b, strict=True))
            score = min(5.0, shared * 5 / 3 + rng.uniform(-0.4, 0.4))
            f.write(f"{_text(a)}\t{_text(b)}\t{max(0.0, score):.3f}\n")


def write_nli(path: Path, rng: random.Random, n: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sent0", "sent1", "hard_neg"])
        for i in range(n):
            s, v, o = _sentence(rng)
            premise = f"{SUBJECTS[s].capitalize()} {VERBS[v]} {OBJECTS[o]} near house {i}."
            entail = f"{SUBJECTS[s].capitalize()} {VERBS[v]} something."
            contra = f"{SUBJECTS[(s + 1) % len(SUBJECTS)].capitalize()} is sleeping."
            writer.writerow([premise, entail, contra])


def make_data_root(root: Path, seed: int = 0, pairs: int = 24, nli_rows: int = 160) -> Path:
    rng = random.Random(seed)
    for task, splits in STS_LAYOUT.items():
        for split in splits:
            write_sts_split(root / "sts" / task / f"{split}.tsv", rng, pairs)
    write_nli(root / "nli" / "nli_triplets_devsets_subset.csv.gz", rng, nli_rows)
    return root


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    return make_data_root(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two threads per process lose
    several-fold to oversubscription. Session scope: module-scoped runs are set up before function fixtures."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _restored_environ():
    """Whatever a test (or the code it calls, e.g. distributed.export_from_submitit) writes into os.environ is undone:
    a leaked WORLD_SIZE/MASTER_ADDR makes every later trainer wait for a rendezvous that never comes."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch, _restored_environ):
    """No test touches the user's runs, caches or W&B account."""
    monkeypatch.setenv("SEMPA_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("SEMPA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("SEMPA_DATA_DIR", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # subprocesses (the CLI tests) too


TINY_OVERRIDES = [
    "backbone=tiny",
    "trainer=cpu",
    "trainer.bf16=false",
    "trainer.per_device_batch_size=4",
    "trainer.grad_accum_steps=2",
    "trainer.checkpoint_every_samples=16",
    "trainer.max_length=512",
    "data.size=32",
    "eval=geometry",
    "eval.geometry_sample=40",
    "logger=none",
]


def compose_config(overrides: list[str] | None = None, data_root: Path | None = None) -> DictConfig:
    register_all()
    extra = [f"paths.data_dir={data_root}"] if data_root is not None else []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*(overrides or []), *extra], return_hydra_config=False)


@pytest.fixture
def tiny_cfg(data_root, tmp_path):
    def make(*overrides: str) -> DictConfig:
        return compose_config([*TINY_OVERRIDES, f"paths.runs_dir={tmp_path / 'runs'}", *overrides], data_root)

    return make


def tiny_trainer(cfg: DictConfig, triplets, output_dir: Path, world_size: int = 1):
    """The HF trainer a training run builds for ``cfg``'s objective (LoRA attached), on the tiny backbone, CPU."""
    from omegaconf import OmegaConf

    from sempa_exp.models.backbones import load_backbone
    from sempa_exp.objectives.base import build_objective

    config = OmegaConf.to_object(cfg)
    objective = build_objective(config)
    model, tokenizer = load_backbone(config.backbone, config.paths.cache_dir)
    return objective.build_trainer(config, model, tokenizer, objective.dataset(config, triplets), output_dir, [],
                                   world_size=world_size, use_cpu=True)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a backbone is loaded (a bad configuration must be rejected before that)."""
    from sempa_exp.models import backbones
    from sempa_exp.pipelines import training

    def fail(*args, **kwargs):
        pytest.fail("a backbone was loaded although the configuration is invalid")

    monkeypatch.setattr(training, "load_backbone", fail)
    monkeypatch.setattr(backbones, "load_backbone", fail)


class FakeWandbRun:
    """What the code under test sees of ``wandb.init()``'s run: it records what it is sent."""

    def __init__(self, run_id: str, fail_after: int | None = None) -> None:
        self.id = run_id
        self.fail_after = fail_after
        self.logged: list[tuple[int, dict]] = []
        self.summary: dict = {}
        self.finished: list[int] = []

    def define_metric(self, *args, **kwargs) -> None:
        pass

    def log(self, metrics: dict, step: int) -> None:
        if self.fail_after is not None and len(self.logged) >= self.fail_after:
            raise ConnectionError("api.wandb.ai unreachable")
        self.logged.append((step, dict(metrics)))

    def finish(self, exit_code: int = 0) -> None:
        self.finished.append(exit_code)


@pytest.fixture
def fake_wandb(monkeypatch):
    """``fake_wandb(fail_after=None, wrong_ids=0)`` replaces wandb.init (its first ``wrong_ids`` runs answer with
    another run's id, as W&B's service once did) and wandb.teardown; returns the list of (init kwargs, FakeWandbRun)
    made, and ``teardowns`` counts the service restarts."""
    import wandb

    made: list[tuple[dict, FakeWandbRun]] = []

    def install(fail_after: int | None = None, wrong_ids: int = 0) -> list:
        def init(**kwargs):
            wrong = len(made) < wrong_ids
            run = FakeWandbRun("an0ther0run00000" if wrong else kwargs["id"], fail_after)
            made.append((kwargs, run))
            return run

        monkeypatch.setattr(wandb, "init", init)
        monkeypatch.setattr(wandb, "teardown", lambda: install.teardowns.append(len(made)))
        return made

    install.teardowns = []

    return install


def pytest_report_header(config):
    return f"SEMPA_DATA_DIR={os.environ.get('SEMPA_DATA_DIR', '(unset)')}"
