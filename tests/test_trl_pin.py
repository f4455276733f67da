"""SempaDPOTrainer overrides private TRL methods (see TRL_VERSION_OVERRIDDEN in sempa_exp.objectives.dpo): the pinned
version is the one pyproject.toml installs, and TRL's own code paths still call every override (tiny backbone)."""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import sys
from pathlib import Path

import pytest
import trl
from datasets import Dataset
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer
from trl.trainer import dpo_trainer as trl_dpo_module

from sempa_exp.config.schema import BackboneConfig
from sempa_exp.data import nli
from sempa_exp.models.backbones import load_backbone
from sempa_exp.objectives import dpo
from sempa_exp.objectives.dpo import TRL_VERSION_OVERRIDDEN, PreparedDataCache, SempaDPOTrainer, turn_end_ids

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# Who must call each override: the private DPOTrainer methods from TRL's trainer, get_batch_samples and training_step
# from transformers'.
OVERRIDES = {
    "_prepare_dataset": "trl.trainer.dpo_trainer",
    "_precompute_ref_logps": "trl.trainer.dpo_trainer",
    "get_batch_samples": "transformers.trainer",
    "training_step": "transformers.trainer",
}


def _pinned_trl() -> str:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"trl\s*==\s*([^\s;,]+)", d.strip()))]
    assert len(pins) == 1, f"pyproject.toml must pin trl with == exactly once: {deps}"
    return pins[0]


def test_the_overridden_trl_version_is_the_pinned_and_installed_one():
    assert _pinned_trl() == TRL_VERSION_OVERRIDDEN
    assert trl.__version__ == TRL_VERSION_OVERRIDDEN
    assert dpo.check_trl_version() is True


def test_another_trl_version_warns(monkeypatch, caplog):
    monkeypatch.setattr(trl, "__version__", "0.0.1")
    with caplog.at_level(logging.WARNING, logger=dpo.__name__):
        assert dpo.check_trl_version() is False
    assert "TRL 0.0.1 is installed" in caplog.text and TRL_VERSION_OVERRIDDEN in caplog.text


def test_the_overrides_are_exactly_the_known_ones():
    """A method of ours that shadows one of TRL's/transformers' (e.g. a helper TRL later adds under the same name)."""
    ours = {name for name, value in vars(SempaDPOTrainer).items() if callable(value) or isinstance(value, staticmethod)}
    shadowing = {name for name in ours if any(name in vars(base) for base in DPOTrainer.__mro__)}
    assert shadowing == {"__init__", *OVERRIDES}


def _record_calls(monkeypatch) -> list[tuple[str, str]]:
    """Wraps each override so that every call is recorded with the module that made it."""
    calls: list[tuple[str, str]] = []
    for name in OVERRIDES:
        original = vars(SempaDPOTrainer)[name]

        def wrapper(self, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, sys._getframe(1).f_globals.get("__name__", "?")))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(SempaDPOTrainer, name, functools.wraps(original)(wrapper))
    return calls


def _count_trl_main_first(monkeypatch) -> list[int]:
    """Counts TRL's own uses of the global_then_local_main_first that its dpo_trainer module looks up."""
    entered = [0]
    original = trl_dpo_module.global_then_local_main_first

    @contextlib.contextmanager
    def counted():
        entered[0] += 1
        with original():
            yield

    monkeypatch.setattr(trl_dpo_module, "global_then_local_main_first", counted)
    return entered


def _trainer(tmp_path: Path, *, cached: bool) -> SempaDPOTrainer:
    """A SempaDPOTrainer on the tiny backbone as a SemPA run builds it (LoRA, reference log-probs precomputed,
    completions ending at the turn end), 8 pairs of different lengths, one step of 2 micro-batches of 2 pairs."""
    model, tokenizer = load_backbone(BackboneConfig(name="tiny", source="tiny", dtype="float32"), str(tmp_path))
    triplets = [nli.Triplet("A man is playing a guitar" + " near the house" * (i % 4) + f" {i}.",
                            "A man is playing" + " music" * (i % 3) + ".", "A woman is sleeping.") for i in range(8)]
    records = nli.dpo_records(triplets, 'Keep the same meaning of this sentence: "{s}".', "You are a helpful assistant")
    args = DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     max_steps=1, learning_rate=1e-4, max_length=512, precompute_ref_log_probs=True, use_cpu=True,
                     bf16=False, report_to="none", save_strategy="no", logging_steps=1, dataloader_num_workers=0,
                     remove_unused_columns=False, seed=0)
    return SempaDPOTrainer(
        turn_end=turn_end_ids(tokenizer, "<|im_end|>"), completion_only_logits=True,
        data_cache=PreparedDataCache(tmp_path / "dpo_data", "tok", "ref") if cached else None,
        sort_within_step=True, model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(records),
        processing_class=tokenizer, peft_config=LoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                                           task_type="CAUSAL_LM"))


def test_trl_still_calls_every_override(tmp_path, monkeypatch):
    """Without the cache, TRL's __init__ prepares the data and precomputes the reference log-probs through our
    overrides, and one training step (4 pairs x 2 micro-batches) draws its micro-batches through ours."""
    calls = _record_calls(monkeypatch)
    main_first = _count_trl_main_first(monkeypatch)
    trainer = _trainer(tmp_path, cached=False)
    assert trainer.args.gradient_accumulation_steps > 1
    trainer.train()
    assert trainer.state.global_step == 1
    callers = {name: {caller for n, caller in calls if n == name} for name in OVERRIDES}
    assert callers == {name: {module} for name, module in OVERRIDES.items()}
    # TRL's _prepare_dataset still looks global_then_local_main_first up in its module (what the cache swaps out)
    assert main_first[0] > 0


def test_with_the_cache_trl_tokenizes_without_its_process_ordering(tmp_path, monkeypatch):
    """The cache's tokenization runs TRL's _prepare_dataset with its main-process-first ordering swapped out (ours
    takes its place), and restored afterwards."""
    calls = _record_calls(monkeypatch)
    main_first = _count_trl_main_first(monkeypatch)
    counted = trl_dpo_module.global_then_local_main_first
    trainer = _trainer(tmp_path, cached=True)
    assert trainer.data_cache.last_event["tokenized"] == "built"
    assert ("_prepare_dataset", "trl.trainer.dpo_trainer") in calls
    assert main_first[0] == 0
    assert trl_dpo_module.global_then_local_main_first is counted


def test_swapped_restores_on_error():
    class Owner:
        value = 1

    with pytest.raises(RuntimeError), dpo._swapped(Owner, "value", 2):
        assert Owner.value == 2
        raise RuntimeError
    assert Owner.value == 1
    with pytest.raises(AttributeError), dpo._swapped(Owner, "missing", 2):
        pass
    assert not hasattr(Owner, "missing")
