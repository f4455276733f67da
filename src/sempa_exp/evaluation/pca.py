"""Data for the embedding-space figure: a 2-D PCA of anchor / positive / negative embeddings of a fixed NLI sample.

The sample is a fixed fraction of the usable NLI triplets (the paper: 0.2%), drawn with its own seed so it does not
depend on data.size. The embeddings are L2-normalised (the cosine geometry STS scores use) and projected jointly onto
their first two principal components.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from sempa_exp.data import nli

PCA_SAMPLE_SEED = 0
ROLES = ("anchor", "positive", "negative")


def pca_sample(triplets: Sequence[nli.Triplet], fraction: float, seed: int = PCA_SAMPLE_SEED) -> list[nli.Triplet]:
    """The first ceil(fraction * N) triplets of a seeded permutation (at least one when fraction > 0)."""
    if fraction <= 0 or not triplets:
        return []
    return nli.subset(triplets, max(1, math.ceil(fraction * len(triplets))), seed)


def pca_2d(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coordinates (n, 2), explained-variance ratio of the two components) of the L2-normalised rows."""
    x = np.asarray(vectors, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
    x = x - x.mean(axis=0)
    _, singular, components = np.linalg.svd(x, full_matrices=False)
    variance = singular ** 2
    ratio = variance[:2] / variance.sum() if variance.sum() > 0 else np.zeros(2)
    coords = x @ components[:2].T
    for j in range(coords.shape[1]):  # a component's sign is arbitrary: make the anchors' mean non-negative
        if coords[0::3, j].mean() < 0:
            coords[:, j] *= -1
    return coords, ratio


def nli_pca(triplets: Sequence[nli.Triplet], encode: Callable[[Sequence[str]], np.ndarray], fraction: float,
            data_file: str = "") -> dict:
    """The figure's data: one point per sentence with its triplet index, role and text, plus the explained variance."""
    sample = pca_sample(triplets, fraction)
    if not sample:
        return {}
    sentences = [s for t in sample for s in (t.premise, t.entailment, t.contradiction)]  # interleaved a, p, n
    coords, ratio = pca_2d(encode(sentences))
    points = [{"triplet": i // 3, "role": ROLES[i % 3], "text": text, "x": float(x), "y": float(y)}
              for i, (text, (x, y)) in enumerate(zip(sentences, coords, strict=True))]
    return {
        "sample": f"{len(sample)} triplets = ceil({fraction} x {len(triplets)} usable triplets), the first of a "
                  f"permutation with seed {PCA_SAMPLE_SEED}; embeddings L2-normalised, then PCA",
        "data_file": data_file,
        "num_triplets": len(sample),
        "explained_variance_ratio": [float(r) for r in ratio],
        "points": points,
    }
