"""STS files and the SentEval/SimCSE scorer, on cases computed by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sempa_exp.config.schema import ConfigError
from sempa_exp.data import sts
from sempa_exp.evaluation.suites import EvalData, evaluate, load_eval_data


def make_split(name: str, sims: list[float], gold: list[float]) -> tuple[sts.StsSplit, dict[str, np.ndarray]]:
    """A split whose pair i has cosine similarity sims[i]: sentence1 = e1, sentence2 at angle arccos(sims[i])."""
    vectors = {}
    s1, s2 = [], []
    for i, sim in enumerate(sims):
        a, b = f"{name} first {i}", f"{name} second {i}"
        angle = np.arccos(sim)
        vectors[a] = np.array([3.0, 0.0])  # norms differ on purpose: cosine ignores them
        vectors[b] = np.array([np.cos(angle), np.sin(angle)]) * (i + 1)
        s1.append(a)
        s2.append(b)
    return sts.StsSplit("STS12", name, s1, s2, np.asarray(gold, dtype=float)), vectors


def lookup_from(*tables: dict[str, np.ndarray]):
    merged = {k: v for t in tables for k, v in t.items()}
    return lambda sentences, group=None: np.stack([merged[s] for s in sentences])


def test_cosine_and_spearman100():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    assert sts.cosine(a, b) == pytest.approx([1.0, -1.0, 0.0])
    assert sts.spearman100(np.array([0.1, 0.5, 0.3]), np.array([1, 3, 2])) == pytest.approx(100.0)
    assert sts.spearman100(np.array([0.1, 0.5, 0.3]), np.array([3, 1, 2])) == pytest.approx(-100.0)
    # ranks (1, 2, 3, 4) vs (1, 3, 2, 4): 1 - 6 * 2 / (4 * 15) = 0.8
    assert sts.spearman100(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4])) == pytest.approx(80.0)


def test_pooled_spearman_differs_from_the_per_subset_ones():
    # Within each subset the similarities order the pairs perfectly (100), but subset B's similarities are all below
    # subset A's while its gold scores are all above: pooled, every pair is 3 ranks off,
    # rho = 1 - 6 * (6 * 3^2) / (6 * (36 - 1)) = 1 - 54 / 35.
    a, va = make_split("A", [0.7, 0.8, 0.9], [1, 2, 3])
    b, vb = make_split("B", [0.1, 0.2, 0.3], [4, 5, 6])
    scores = sts.score_task([a, b], lookup_from(va, vb))
    assert scores["A"] == pytest.approx(100.0)
    assert scores["B"] == pytest.approx(100.0)
    assert scores["all"] == pytest.approx(100 * (1 - 54 / 35))
    assert np.mean([scores["A"], scores["B"]]) != pytest.approx(scores["all"])


def test_single_split_task_scores_that_split():
    split, vectors = make_split("test", [0.9, 0.1, 0.5, 0.3], [4.0, 1.0, 2.0, 3.0])
    scores = sts.score_task([split], lookup_from(vectors))
    # ranks of sims (4, 1, 3, 2) vs gold (4, 1, 2, 3): d^2 = 2 -> 1 - 12 / 60 = 0.8
    assert scores == {"test": pytest.approx(80.0), "all": pytest.approx(80.0)}


def test_evaluate_names_headline_subset_and_average_scores():
    a, va = make_split("A", [0.7, 0.8, 0.9], [1, 2, 3])
    b, vb = make_split("B", [0.1, 0.2, 0.3], [4, 5, 6])
    test, vt = make_split("test", [0.9, 0.1, 0.5, 0.3], [4.0, 1.0, 2.0, 3.0])

    class Encoder:
        encode = staticmethod(lookup_from(va, vb, vt))

    data = EvalData(tasks={"STS12": [a, b], "STSBenchmark": [test]}, stsb_dev=test)
    metrics = evaluate(Encoder(), data, ["sts", "stsb_dev"])
    pooled = 100 * (1 - 54 / 35)
    assert metrics["eval/sts12"] == pytest.approx(pooled)
    assert metrics["eval/sts12/A"] == pytest.approx(100.0) and metrics["eval/sts12/B"] == pytest.approx(100.0)
    assert metrics["eval/stsb"] == pytest.approx(80.0) and "eval/stsb/test" not in metrics
    assert metrics["eval/sts_avg"] == pytest.approx((pooled + 80.0) / 2)
    assert metrics["eval/stsb_dev"] == pytest.approx(80.0)


# ------------------------------------------------------------------------------------------------------ STS files


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


GOOD = "sentence1\tsentence2\tscore\nA man eats.\tA person eats.\t4.2\nA cat.\tThe car.\t0\n"


def test_read_split(tmp_path):
    split = sts.read_split(write(tmp_path / "dev.tsv", GOOD + 'Quotes "kept"\t{braces}\t5.0\n'), "STSBenchmark")
    assert split.name == "dev" and split.task == "STSBenchmark"
    assert split.sentences1 == ["A man eats.", "A cat.", 'Quotes "kept"']
    assert split.sentences2 == ["A person eats.", "The car.", "{braces}"]
    assert split.scores.tolist() == [4.2, 0.0, 5.0]
    assert split.sentences == split.sentences1 + split.sentences2


@pytest.mark.parametrize(("body", "where", "problem"), [
    (GOOD + "only one field\n", ":4:", "expected 3 tab-separated fields, got 1"),
    (GOOD + "a\tb\tc\td\n", ":4:", "expected 3 tab-separated fields, got 4"),
    ("sentence1\tsentence2\tscore\na\tb\thigh\n", ":2:", "score 'high' is not a number"),
    ("sentence1\tsentence2\tscore\na\tb\tnan\n", ":2:", "score 'nan' is not a finite number"),
    (GOOD + "\tb\t1.0\n", ":4:", "empty sentence"),
    ("s1\ts2\tlabel\na\tb\t1\n", ":1:", "expected header"),
    (GOOD.encode() + b"caf\xe9\tb\t1.0\n", ":4:", "not valid UTF-8"),
    ("sentence1\tsentence2\tscore\n", "", "no pairs"),
])
def test_malformed_sts_file_names_file_and_line(tmp_path, body, where, problem):
    path = write(tmp_path / "STS12" / "bad.tsv", body)
    with pytest.raises(sts.StsFormatError) as err:
        sts.read_split(path, "STS12")
    message = str(err.value)
    assert message.startswith(f"{path}{where}")
    assert problem in message


def test_load_task_reads_all_subsets_or_the_test_split(tmp_path):
    for name in ("b_sub", "a_sub"):
        write(tmp_path / "sts" / "STS13" / f"{name}.tsv", GOOD)
    for name in ("train", "dev", "test"):
        write(tmp_path / "sts" / "STSBenchmark" / f"{name}.tsv", GOOD)
    assert [s.name for s in sts.load_task(tmp_path, "STS13")] == ["a_sub", "b_sub"]
    assert [s.name for s in sts.load_task(tmp_path, "STSBenchmark")] == ["test"]
    assert sts.load_stsb_dev(tmp_path).name == "dev"
    with pytest.raises(ConfigError, match="unknown STS task 'STS99'"):
        sts.load_task(tmp_path, "STS99")
    with pytest.raises(ConfigError, match="no STS files in .*STS14"):
        sts.load_task(tmp_path, "STS14")
    with pytest.raises(ConfigError, match="STS file not found: .*SICKRelatedness/test.tsv"):
        sts.load_task(tmp_path, "SICKRelatedness")


def test_geometry_sample_is_the_first_distinct_dev_sentences(tmp_path):
    write(tmp_path / "sts" / "STSBenchmark" / "dev.tsv",
          "sentence1\tsentence2\tscore\nA\tB\t1\nB\tC\t2\nA\tD\t3\nE\tF\t4\n")
    assert load_eval_data(tmp_path, ["geometry"], geometry_sample=4).geometry_sentences == ["A", "B", "C", "D"]
    assert load_eval_data(tmp_path, ["stsb_dev"]).geometry_sentences == []
