"""A method's layer settings chosen for one backbone (``python -m sempa_exp.select backbone=NAME method=NAME``).

Chooses a training-free method's layer settings for one backbone on STS-B dev, as the methods' authors chose theirs
per backbone (Token Prepending's layer range and exit layer, Contrastive Prompting's steered layer, strength and exit
layer differ between their LLaMA-2 and LLaMA-3 settings). Every point of the grid (``select.grids.<method>``) is
embedded once and scored at every candidate output layer (``select.output_layers``; default: every hidden state from
the middle of the stack to the last, pre-norm, and the final normed one), since one forward yields them all. The best
point by STS-B dev Spearman (ties: the earlier grid point) is printed as the YAML block for
``conf/backbone/<backbone>.yaml`` (``methods.<method>``); the whole search goes to
``<runs_dir>/select/<backbone>/<method>.json``. The test sets are never read.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sempa_exp.config.schema import Config, ConfigError, data_dir, refuse_unknown_keys, validate
from sempa_exp.data import sts
from sempa_exp.embedding import loading as methods
from sempa_exp.embedding.encoder import SentenceEncoder
from sempa_exp.launch.distributed import device_for
from sempa_exp.models.architecture import decoder_parts
from sempa_exp.models.backbones import load_backbone
from sempa_exp.records import rundir

log = logging.getLogger("sempa_exp")


def candidate_output_layers(num_layers: int, wanted: list[int] | None) -> list[int]:
    """hidden_states indices: 0 = embeddings, k = output of layer k-1 (no norm), -1 = final after the norm."""
    if wanted:
        return list(wanted)
    return [*range(num_layers // 2, num_layers), -1]


def grid_points(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def select(cfg: DictConfig, command: str = "") -> dict:
    """Runs the search; returns (and writes) its record. ``command``: the command line, for the record."""
    refuse_unknown_keys(cfg)
    config: Config = OmegaConf.to_object(cfg)
    m = config.method
    if m is None or config.select is None:
        raise ConfigError("run through conf/select.yaml: python -m sempa_exp.select backbone=NAME method=NAME")
    grid = config.select.grids.get(m.name)
    if not grid:
        raise ConfigError(f"select.grids has no grid for method={m.name}; grids: {', '.join(config.select.grids)}")
    points = grid_points(grid)
    for key, value in points[0].items():  # validate with a complete setting; the grid supplies the rest
        setattr(config.method, key, value)
    validate(config)
    dev = sts.load_stsb_dev(data_dir(config))
    out_file = Path(config.paths.runs_dir) / "select" / config.backbone.name / f"{m.name}.json"

    device = device_for(config.run.device)
    model, tokenizer = load_backbone(config.backbone, config.paths.cache_dir, dtype=config.eval.dtype)
    model.to(device).eval()
    layers = candidate_output_layers(decoder_parts(model).num_layers, config.select.output_layers)
    rows, started = [], time.time()
    for point in points:
        for key, value in point.items():
            setattr(config.method, key, value)
        config.method.output_layer = None
        method = methods.build_method(config, model, tokenizer)
        method.output_layer = tuple(layers)  # one forward, every candidate layer side by side
        encoder = SentenceEncoder(model, tokenizer, config.embed, batch_size=config.eval.batch_size,
                                  max_length=config.eval.max_length, method=method, progress=False)
        vectors = encoder.encode(dev.sentences)
        per_layer = np.split(vectors, len(layers), axis=1)
        for layer, chunk in zip(layers, per_layer, strict=True):
            lookup = dict(zip(dev.sentences, chunk))
            score = sts.score_task([dev], lambda ss, lookup=lookup: np.stack([lookup[s] for s in ss]))["all"]
            rows.append({**point, "output_layer": layer, "stsb_dev": score})
        best_here = max(r["stsb_dev"] for r in rows[-len(layers):])
        log.info("%s: best STS-B dev %.2f over output layers", point, best_here)
    best = max(rows, key=lambda r: r["stsb_dev"])  # max keeps the first of equal scores
    record = {
        "backbone": config.backbone.name, "method": m.name, "dtype": config.eval.dtype, "criterion": "STS-B dev",
        "grid": grid, "output_layers": layers, "best": best, "rows": rows, "seconds": time.time() - started,
        "command": command,
        "versions": rundir.library_versions(), "git_commit": rundir.git_commit(),
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_json_atomic(out_file, record)
    settings = {k: v for k, v in best.items() if k != "stsb_dev"}
    block = {"methods": {m.name: {**settings, "source": f"STS-B dev selection ({out_file.name}: {len(rows)} "
                                                          f"settings, best {best['stsb_dev']:.2f})"}}}
    print(f"[sempa-exp] {len(rows)} settings scored on STS-B dev; best {best['stsb_dev']:.2f}: {settings}")
    print(f"[sempa-exp] the search: {out_file}\n[sempa-exp] for conf/backbone/{config.backbone.name}.yaml:\n"
          + OmegaConf.to_yaml(OmegaConf.create(block)))
    return record
