"""Uniformity and isotropy on closed-form cases."""

from __future__ import annotations

import numpy as np
import pytest

from sempa_exp.evaluation.geometry import isotropy, uniformity


def test_uniformity_of_identical_vectors_is_zero():
    # every pairwise distance is 0: log mean exp(0) = 0, the maximum (least uniform)
    assert uniformity(np.tile([[0.3, -1.2, 2.0]], (10, 1))) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_uniformity_of_a_regular_simplex(k):
    # k unit vectors with pairwise cosine -1/(k-1): squared distance 2 + 2/(k-1), uniformity -t times that
    centered = np.eye(k) - 1.0 / k
    assert uniformity(centered, t=2.0) == pytest.approx(-2.0 * (2 + 2 / (k - 1)))
    assert uniformity(centered, t=0.5) == pytest.approx(-0.5 * (2 + 2 / (k - 1)))


def test_uniformity_mixes_distances_in_log_mean_exp():
    # e1, e1, e2: pairs at squared distance 0, 2, 2 -> log((1 + 2 e^-4) / 3)
    x = np.array([[1.0, 0.0], [5.0, 0.0], [0.0, 2.0]])  # norms are ignored (L2-normalised first)
    assert uniformity(x) == pytest.approx(np.log((1 + 2 * np.exp(-4.0)) / 3))


def test_uniformity_is_scale_invariant():
    x = np.random.default_rng(0).normal(size=(50, 8))
    assert uniformity(x * 37.0) == pytest.approx(uniformity(x))


def test_isotropy_of_identical_vectors_is_exp_minus_norm():
    # V^T V = n c c^T: u_1 = c/|c| gives Z = n e^{|c|}; the orthogonal directions give Z = n e^0
    c = np.array([1.0, -2.0, 0.5, 0.0])
    assert isotropy(np.tile(c, (20, 1))) == pytest.approx(np.exp(-np.linalg.norm(c)))


def test_isotropy_of_an_isotropic_gaussian_sample_is_near_one():
    x = np.random.default_rng(0).normal(size=(20_000, 8))
    assert isotropy(x) > 0.95


def test_isotropy_with_one_dominant_direction_is_near_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(scale=0.1, size=(2_000, 8)) + 30.0 * np.eye(8)[3]
    assert isotropy(x) < 1e-10


def test_isotropy_does_not_overflow_on_large_norms():
    # LLM hidden states reach norms in the hundreds: exp(c^T v) overflows without the log-space computation
    x = np.random.default_rng(1).normal(size=(500, 16)) * 400.0
    value = isotropy(x)
    assert np.isfinite(value) and 0.0 <= value <= 1.0
    # identical rows c: the exact value is exp(-|c|). |c| = 708 keeps exp(-|c|) a normal double, while the direct sum
    # Z(u_1) = n exp(|c|) overflows: only the log-space computation can give it
    n, norm = 20, 708.0
    with np.errstate(over="ignore"):
        assert np.isinf(n * np.exp(norm))
    expected = np.exp(-norm)
    assert expected > np.finfo(np.float64).tiny
    assert isotropy(np.tile([norm, 0.0], (n, 1))) == pytest.approx(expected, rel=1e-9)


def test_isotropy_orients_eigenvectors_towards_the_mean():
    # rows (m +- a, +-b): V^T V is diagonal, so u = e1, e2. Oriented towards the mean (m, 0), u1 = +e1:
    # Z(e1) = 2 e^(m+a) + 2 e^(m-a), Z(e2) = 2 e^b + 2 e^-b. Taking -e1 instead would give a different value.
    m, a, b = 1.0, 0.5, 0.3
    x = np.array([[m + a, b], [m + a, -b], [m - a, b], [m - a, -b]])
    z1, z2 = 2 * np.exp(m + a) + 2 * np.exp(m - a), 2 * np.exp(b) + 2 * np.exp(-b)
    assert isotropy(x) == pytest.approx(min(z1, z2) / max(z1, z2))
    assert isotropy(x[::-1]) == pytest.approx(isotropy(x))
