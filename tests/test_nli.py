"""NLI triplets: cleaning with counted skips, nested deterministic subsets, DPO records, local and hub sources."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import pytest

from sempa_exp.config.schema import ConfigError, DataConfig
from sempa_exp.data import nli

HEADER = b"sent0,sent1,hard_neg\n"


def write_raw(path: Path, body: bytes, gz: bool = True) -> Path:
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(HEADER + body)
    return path


def good_rows(n: int, start: int = 0) -> bytes:
    return b"".join(f"premise {i},entailment {i},contradiction {i}\n".encode() for i in range(start, start + n))


def test_clean_file_reads_every_row(tmp_path):
    triplets, report = nli.read_triplets(write_raw(tmp_path / "d.csv.gz", good_rows(5)), max_chars=100)
    assert [t.premise for t in triplets] == [f"premise {i}" for i in range(5)]
    assert triplets[2] == nli.Triplet("premise 2", "entailment 2", "contradiction 2")
    assert (report.rows_read, report.kept, report.skipped) == (5, 5, {})
    assert report.summary().endswith("5 rows read, 5 kept, skipped: none")


def test_bad_rows_are_skipped_and_counted(tmp_path):
    body = (
        good_rows(3)
        + b",entailment,contradiction\n"  # empty field
        + b"premise x,   ,contradiction\n"  # blank field
        + b"premise y,entailment y\n"  # missing field
        + b"premise 1,entailment 1,contradiction 1\n"  # duplicate of row 2
        + b"premise 2,entailment 2 ,contradiction 2\n"  # duplicate once the hypotheses are stripped
        + b"caf\xe9 au lait,entailment,contradiction\n"  # latin-1 byte: not UTF-8
        + b"premise z,entailment z," + b"long " * 300 + b"\n"  # 1500 characters
        + "premise \u00e9,entailment \u2014,contradiction \U0001f600\n".encode()  # valid UTF-8 is kept
        + b'"premise, quoted","entailment ""q""",contradiction q\n'
    )
    path = write_raw(tmp_path / "d.csv.gz", body)
    kept_all, _ = nli.read_triplets(path, max_chars=1000)  # the official trans_data.py keeps repeated rows
    assert len(kept_all) == 7 and kept_all[3] == kept_all[1]
    triplets, report = nli.read_triplets(path, max_chars=1000, deduplicate=True)
    assert report.rows_read == 12
    assert report.kept == len(triplets) == 5
    assert report.skipped == {"empty or missing field": 3, "duplicate": 2, "non-UTF-8 bytes": 1,
                              "longer than 1000 characters": 1}
    assert triplets[3] == nli.Triplet("premise \u00e9", "entailment \u2014", "contradiction \U0001f600")
    assert triplets[4] == nli.Triplet("premise, quoted", 'entailment "q"', "contradiction q")
    summary = report.summary()
    assert "12 rows read, 5 kept" in summary and "2 duplicate" in summary and "1 non-UTF-8 bytes" in summary


def test_a_row_beyond_the_csv_field_limit_is_skipped_not_fatal(tmp_path):
    huge = b"x" * (csv.field_size_limit() + 10)
    body = good_rows(2) + huge + b",entailment,contradiction\n" + good_rows(2, start=2)
    triplets, report = nli.read_triplets(write_raw(tmp_path / "d.csv", body, gz=False), max_chars=1000)
    assert [t.premise for t in triplets] == [f"premise {i}" for i in range(4)]
    assert report.rows_read == 5 and report.skipped == {"malformed CSV row": 1}


def test_missing_columns_and_missing_file_are_clear_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("premise,hypothesis,label\na,b,c\n")
    with pytest.raises(ConfigError, match=r"header lacks column\(s\) \['sent0', 'sent1', 'hard_neg'\]"):
        nli.read_triplets(path, 100)
    with pytest.raises(ConfigError, match="NLI data file not found"):
        nli.read_triplets(tmp_path / "absent.csv", 100)


def _triplets(n: int) -> list[nli.Triplet]:
    return [nli.Triplet(f"p{i}", f"e{i}", f"c{i}") for i in range(n)]


def test_subsets_of_one_seed_are_nested_and_deterministic():
    data = _triplets(500)
    small, large = nli.subset(data, 50, seed=42), nli.subset(data, 200, seed=42)
    assert large[:50] == small
    assert nli.subset(data, 200, seed=42) == large
    assert len(set(large)) == 200
    assert nli.subset(data, 200, seed=7) != large
    everything = nli.subset(data, None, seed=42)
    assert sorted(everything, key=lambda t: int(t.premise[1:])) == data and everything[:200] == large


def test_subset_larger_than_the_data_is_an_error():
    with pytest.raises(ConfigError, match="data.size=11 is larger than the 10 usable triplets"):
        nli.subset(_triplets(10), 11, seed=0)


def test_dpo_records_are_conversational_preference_pairs():
    record = nli.dpo_records([nli.Triplet("A man runs.", "A person moves.", "Nobody moves.")], "Rephrase: {s}",
                             "sys")[0]
    assert record == {
        "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "Rephrase: A man runs."}],
        "chosen": [{"role": "assistant", "content": "A person moves."}],
        "rejected": [{"role": "assistant", "content": "Nobody moves."}],
    }


# ------------------------------------------------------------------------------------------------------- sources


@pytest.fixture
def hub_stand_in(tmp_path, monkeypatch):
    """huggingface_hub.hf_hub_download replaced by a local file; records the calls."""
    (tmp_path / "hub").mkdir()
    stand_in = write_raw(tmp_path / "hub" / "nli_for_simcse.csv", good_rows(7), gz=False)
    calls = []

    def fake_download(repo_id, filename, repo_type=None, **kwargs):
        calls.append((repo_id, filename, repo_type))
        return str(stand_in)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    return stand_in, calls


def test_hub_source_downloads_simcse_nli(hub_stand_in, tmp_path):
    stand_in, calls = hub_stand_in
    cfg = DataConfig(source="hub")
    triplets, report = nli.load_triplets(cfg, tmp_path)
    assert calls == [("princeton-nlp/datasets-for-simcse", "nli_for_simcse.csv", "dataset")]
    assert len(triplets) == 7 and report.source == str(stand_in)


def test_auto_source_prefers_the_local_file_and_falls_back_to_the_hub(hub_stand_in, tmp_path):
    stand_in, calls = hub_stand_in
    cfg = DataConfig(source="auto", local_file="nli/local.csv.gz")
    assert nli.resolve_source(cfg, tmp_path) == stand_in  # no local file yet: the hub
    assert len(calls) == 1
    local = tmp_path / "nli" / "local.csv.gz"
    local.parent.mkdir()
    write_raw(local, good_rows(3))
    assert nli.resolve_source(cfg, tmp_path) == local
    assert len(calls) == 1
    assert nli.resolve_source(cfg, None) == stand_in  # no data dir at all


def test_local_source_never_touches_the_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(nli, "download_from_hub", lambda cfg: pytest.fail("hub used with data.source=local"))
    with pytest.raises(ConfigError, match="NLI data file not found: .*nli_triplets_devsets_subset.csv.gz"):
        nli.resolve_source(DataConfig(source="local"), tmp_path)


def test_hub_source_is_used_by_prepare(monkeypatch, tiny_cfg, tmp_path):
    stand_in = write_raw(tmp_path / "nli_for_simcse.csv", good_rows(40), gz=False)
    monkeypatch.setattr(nli, "download_from_hub", lambda cfg: stand_in)
    from sempa_exp.pipelines import training

    prep = training.prepare(tiny_cfg("data.source=hub"))
    assert prep.data_file == stand_in
    assert prep.cleaning.kept == 40 and len(prep.triplets) == 32
    assert {t.premise for t in prep.triplets} <= {f"premise {i}" for i in range(40)}
