"""Embedding-space geometry: uniformity (Wang & Isola, 2020) and isotropy (Mu et al., 2018)."""

from __future__ import annotations

import numpy as np
import torch


def uniformity(embeddings: np.ndarray, t: float = 2.0) -> float:
    """log E_{x != y} exp(-t ||f(x) - f(y)||^2) over L2-normalised embeddings; lower = more uniform."""
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float64)
    x = torch.nn.functional.normalize(x, dim=1)
    sq_dists = torch.pdist(x, p=2).pow(2)
    return float(torch.logsumexp(-t * sq_dists, dim=0) - np.log(sq_dists.numel()))


def isotropy(embeddings: np.ndarray) -> float:
    """min_j Z(u_j) / max_j Z(u_j), Z(c) = sum_s exp(c^T v(s)), u_j the eigenvectors of V^T V; 1 = isotropic.

    Computed in log space (LLM hidden states have large norms, exp overflows). Eigenvectors have no sign of their
    own; each u_j is oriented towards the mean embedding (u_j . mean >= 0) so the score is deterministic.
    """
    v = np.asarray(embeddings, dtype=np.float64)
    _, eigvecs = np.linalg.eigh(v.T @ v)
    mean = v.mean(axis=0)
    signs = np.where(eigvecs.T @ mean < 0, -1.0, 1.0)
    eigvecs = eigvecs * signs
    log_z = torch.logsumexp(torch.as_tensor(v @ eigvecs), dim=0).numpy()
    return float(np.exp(log_z.min() - log_z.max()))
