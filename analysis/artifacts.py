"""Optional per-run files beside results.json, written by the method evaluations: PCA data and aligned tokens.

The report finds them by name in the run directory (top level or one folder down, never in checkpoints/adapter):

- PCA data, ``*pca*.{json,npz,csv}``. The evaluate entry's ``pca.json``: ``{"points": [{"role": "anchor"|"positive"|
  "negative", "x", "y", ...}], "explained_variance_ratio": [..]}`` (already projected). Also accepted: raw embeddings
  (npz or json) keyed ``[<method>/]anchors|positives|negatives`` (singular names too), one row per sentence, which
  the report projects onto their first two principal components; or a csv with columns ``[method,]role,x,y``.
  Without a method in the file, the points belong to the run's method.
- Aligned tokens, ``*aligned*.json`` or ``*gar*.json``: the top tokens of example sentences. The evaluate entry's
  ``aligned_tokens.json`` is a list of ``{"sentence", "aligned_tokens", "in_sentence"}``; also accepted: ``"tokens"``
  / ``"top_tokens"`` / ``"top10"`` for the tokens, an optional ``"stage"``, ``{"before"|"after"|<stage>: <list>}``,
  ``{"examples": <list>}`` and ``{sentence: [tokens]}``. Tokens may be strings, ``[token, score]`` pairs or
  ``{"token": ...}`` objects. Without a stage, the run's method says which side it is: PromptEOL = before training,
  SemPA = after; other methods' tokens are not shown.

A file that exists but cannot be read is reported as unreadable (with the reason), never silently dropped.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis.runs import NOT_RUNS, RunRecord

ROLES = ("anchors", "positives", "negatives")
ROLE_ALIASES = {"anchor": "anchors", "positive": "positives", "negative": "negatives", "anchors": "anchors",
                "positives": "positives", "negatives": "negatives"}
TOKEN_KEYS = ("tokens", "top_tokens", "top10", "top_10", "aligned_tokens")
SENTENCE_KEYS = ("sentence", "text", "input")
STAGE_KEYS = ("stage", "when", "model")


class ArtifactError(ValueError):
    pass


def find_files(run_dir: Path | None, patterns: tuple[str, ...]) -> list[Path]:
    if run_dir is None or not Path(run_dir).is_dir():
        return []
    found: set[Path] = set()
    for folder in [run_dir, *(p for p in Path(run_dir).iterdir() if p.is_dir() and p.name not in NOT_RUNS
                               and not p.name.startswith(("checkpoint", ".")))]:
        for pattern in patterns:
            found.update(p for p in folder.glob(pattern) if p.is_file())
    return sorted(found)


# ---- PCA -------------------------------------------------------------------------------------------------------------

@dataclass
class PcaPanel:
    method: str
    points: dict[str, np.ndarray]  # role -> (n, 2)
    explained: tuple[float, float] | None  # variance ratio of PC1, PC2 when projected here
    origin: str


def project_2d(groups: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], tuple[float, float] | None]:
    """The first two principal components of the union of the groups (centred, SVD); 2-D input is kept as is."""
    stacked = np.concatenate([np.asarray(v, dtype=np.float64) for v in groups.values()])
    if stacked.ndim != 2 or len(stacked) < 2:
        raise ArtifactError(f"need a 2-D array of at least 2 embeddings, got shape {stacked.shape}")
    if stacked.shape[1] == 2:
        return {k: np.asarray(v, dtype=np.float64) for k, v in groups.items()}, None
    centred = stacked - stacked.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    variance = singular**2 / max((singular**2).sum(), 1e-300)
    out, offset = {}, 0
    for role, values in groups.items():
        n = len(values)
        out[role] = centred[offset:offset + n] @ vt[:2].T
        offset += n
    return out, (float(variance[0]), float(variance[1]) if len(variance) > 1 else 0.0)


# PCA files made elsewhere name their methods freely; these spellings map onto the report's method keys.
EXTERNAL_METHOD_NAMES = {"mean_pooling": "mean", "meanpooling": "mean", "echo_embedding": "echo",
                         "echo_embeddings": "echo", "cp": "contrastive_prompting", "tp": "token_prepending",
                         "prompt_eol": "prompteol", "dpo": "sempa"}


def method_key(raw: str | None) -> str:
    """A method name of an external PCA file as a report method key (METHOD_LABELS)."""
    key = (raw or "unknown").strip().lower().replace("-", "_").replace(" ", "_")
    key = EXTERNAL_METHOD_NAMES.get(key, key)
    return key


def _split_keys(arrays: dict[str, Any], default_method: str) -> dict[str, dict[str, np.ndarray]]:
    by_method: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        method, _, role = key.rpartition("/")
        role = ROLE_ALIASES.get(role.lower())
        if role is None:
            continue
        by_method.setdefault(method_key(method) if method else default_method, {})[role] = np.asarray(value)
    return by_method


def _projected_panel(payload: dict, method: str, path: Path) -> PcaPanel:
    points: dict[str, list[tuple[float, float]]] = {}
    for point in payload["points"]:
        role = ROLE_ALIASES.get(str(point.get("role", "")).lower())
        if role is None or not isinstance(point.get("x"), (int, float)) or not isinstance(point.get("y"), (int, float)):
            raise ArtifactError(f"{path.name}: a point needs role (anchor/positive/negative), x and y: {point}")
        points.setdefault(role, []).append((float(point["x"]), float(point["y"])))
    if not points:
        raise ArtifactError(f"{path.name}: no points")
    ratio = payload.get("explained_variance_ratio")
    explained = (float(ratio[0]), float(ratio[1])) if isinstance(ratio, list) and len(ratio) >= 2 else None
    ordered = {role: np.array(points[role]) for role in ROLES if role in points}
    return PcaPanel(method, ordered, explained, str(path))


def read_pca_file(path: Path, default_method: str) -> list[PcaPanel]:
    path = Path(path)
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"role", "x", "y"} <= set(rows[0]):
            raise ArtifactError(f"{path.name}: expected columns [method,]role,x,y")
        grouped: dict[str, dict[str, list]] = {}
        for row in rows:
            role = ROLE_ALIASES.get(row["role"].strip().lower())
            if role is None:
                raise ArtifactError(f"{path.name}: unknown role {row['role']!r} (anchor/positive/negative)")
            method = method_key(row["method"]) if row.get("method") else default_method
            grouped.setdefault(method, {}).setdefault(role, []).append((float(row["x"]), float(row["y"])))
        arrays = {m: {r: np.array(v) for r, v in roles.items()} for m, roles in grouped.items()}
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            flat = {k: data[k] for k in data.files}
        method = str(flat.pop("method")) if "method" in flat else default_method
        arrays = _split_keys(flat, method_key(method))
    elif path.suffix == ".json":
        payload = json.loads(path.read_text())
        if not isinstance(payload, dict):
            raise ArtifactError(f"{path.name}: expected a JSON object")
        method = method_key(payload["method"]) if isinstance(payload.get("method"), str) else default_method
        if isinstance(payload.get("points"), list):  # already projected (sempa_exp.evaluation.pca)
            return [_projected_panel(payload, method, path)]
        flat = {}
        for key, value in payload.items():
            if isinstance(value, dict):  # {"<method>": {"anchors": ...}}
                flat.update({f"{key}/{k}": v for k, v in value.items()})
            elif isinstance(value, list):
                flat[key] = value
        arrays = _split_keys(flat, method)
    else:
        raise ArtifactError(f"{path.name}: unsupported PCA file type")
    if not arrays:
        raise ArtifactError(f"{path.name}: no anchors/positives/negatives found")
    panels = []
    for method, groups in arrays.items():
        ordered = {role: groups[role] for role in ROLES if role in groups}
        points, explained = project_2d(ordered)
        panels.append(PcaPanel(method, points, explained, str(path)))
    return panels


def pca_panels(runs: list[RunRecord]) -> tuple[list[PcaPanel], list[str]]:
    """Every PCA panel found in the runs, and a note for each file that could not be read."""
    panels, problems = [], []
    for run in runs:
        for path in find_files(run.run_dir, ("*pca*.npz", "*pca*.json", "*pca*.csv")):
            try:
                panels += read_pca_file(path, run.method)
            except (ArtifactError, ValueError, OSError, KeyError) as exc:
                problems.append(f"{path}: unreadable PCA data ({exc})")
    return panels, problems


# ---- aligned tokens --------------------------------------------------------------------------------------------------

BEFORE_STAGES = {"before", "untrained", "start", "base", "step 0"}
AFTER_STAGES = {"after", "trained", "final"}


@dataclass
class AlignedTokens:
    sentence: str
    stage: str  # as the file says it; "" when it does not
    tokens: list[str]
    run: str = ""
    method: str = ""
    backbone: str | None = None
    gar: float | None = None

    @property
    def side(self) -> str:
        """'before' or 'after' training, from the stage or else the run's method; '' when neither says."""
        stage = self.stage.lower()
        if stage in BEFORE_STAGES:
            return "before"
        if stage in AFTER_STAGES:
            return "after"
        return {"sempa": "after", "prompteol": "before"}.get(self.method, "")


def _token_text(token: Any) -> str:
    if isinstance(token, str):
        return token
    if isinstance(token, (list, tuple)) and token:
        return str(token[0])
    if isinstance(token, dict):
        return str(token.get("token", token.get("text", token)))
    return str(token)


def _entries(payload: Any, stage: str, run: str) -> list[AlignedTokens]:
    if isinstance(payload, list):
        out = []
        for item in payload:
            if not isinstance(item, dict):
                raise ArtifactError(f"expected objects with a sentence and tokens, got {type(item).__name__}")
            sentence = next((item[k] for k in SENTENCE_KEYS if k in item), None)
            tokens = next((item[k] for k in TOKEN_KEYS if k in item), None)
            if sentence is None or tokens is None:
                raise ArtifactError(f"an entry lacks a sentence or tokens: keys {sorted(item)}")
            item_stage = next((str(item[k]) for k in STAGE_KEYS if k in item), stage)
            gar = item.get("gar")
            out.append(AlignedTokens(str(sentence), item_stage, [_token_text(t) for t in tokens][:10], run,
                                     gar=float(gar) if isinstance(gar, (int, float)) else None))
        return out
    if isinstance(payload, dict):
        if "examples" in payload:
            return _entries(payload["examples"], stage, run)
        out = []
        for key, value in payload.items():
            if isinstance(value, dict) or (isinstance(value, list) and value and isinstance(value[0], dict)
                                           and any(k in value[0] for k in SENTENCE_KEYS)):
                out += _entries(value, key, run)  # {stage: entries}
            elif isinstance(value, list):  # {sentence: tokens}
                out.append(AlignedTokens(key, stage, [_token_text(t) for t in value][:10], run))
        if not out:
            raise ArtifactError("no sentence/tokens entries found")
        return out
    raise ArtifactError(f"unsupported JSON shape {type(payload).__name__}")


def aligned_tokens(runs: list[RunRecord]) -> tuple[list[AlignedTokens], list[str]]:
    found, problems = [], []
    for run in runs:
        for path in find_files(run.run_dir, ("*aligned*.json", "*gar*.json")):
            try:
                entries = _entries(json.loads(path.read_text()), "", run.label)
                for entry in entries:
                    entry.method, entry.backbone = run.method, run.backbone
                found += entries
            except (ArtifactError, ValueError, OSError) as exc:
                problems.append(f"{path}: unreadable aligned-token data ({exc})")
    return found, problems
