"""Corpus files: .txt, .jsonl, .parquet, and every kind of bad input with its line number."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from entropy_fast.corpus import Corpus, CorpusError, read_corpus

TEXTS = ["The capital of France is", "def add(a, b):", "Once upon a time"]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_blank_lines_are_skipped_counted_and_reported(tmp_path, suffix, caplog):
    lines = TEXTS if suffix == ".txt" else [json.dumps({"text": t}) for t in TEXTS]
    path = tmp_path / f"c{suffix}"
    path.write_text(f"{lines[0]}\n\n{lines[1]}\r\n   \n{lines[2]}")
    with caplog.at_level("WARNING", logger="entropy_fast"):
        corpus = read_corpus(path)
    assert corpus.texts == TEXTS and corpus.blank_lines == 2
    assert [p.prompt_id for p in corpus.prompts] == [0, 1, 2]
    assert [p.source_line for p in corpus.prompts] == [1, 3, 5]
    (message,) = [r.getMessage() for r in caplog.records]
    assert "skipped 2 blank lines (line 2, 4)" in message and "other 3" in message


def test_a_corpus_without_blank_lines_says_nothing(tmp_path, caplog):
    (tmp_path / "c.txt").write_text("\n".join(TEXTS) + "\n")
    with caplog.at_level("WARNING", logger="entropy_fast"):
        assert read_corpus(tmp_path / "c.txt").blank_lines == 0
    assert caplog.records == []


def test_formats_agree_and_fingerprint_follows_content(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(TEXTS))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": t, "n": 1}) for t in TEXTS))
    pq.write_table(pa.table({"body": TEXTS}), tmp_path / "c.parquet")
    corpora = [read_corpus(tmp_path / "c.txt"),
               read_corpus(tmp_path / "c.jsonl", text_field="body"),
               read_corpus(tmp_path / "c.parquet", text_field="body")]
    assert all(c.texts == TEXTS for c in corpora)
    assert len({c.fingerprint for c in corpora}) == 1
    assert Corpus.from_texts(TEXTS[:2]).fingerprint != corpora[0].fingerprint
    # no ambiguity from concatenation: ["ab", "c"] vs ["a", "bc"]
    assert Corpus.from_texts(["ab", "c"]).fingerprint != Corpus.from_texts(["a", "bc"]).fingerprint


@pytest.mark.parametrize(("line", "message"), [
    ('{"text": "ok", ', "line 2: not valid JSON"),
    ('{"other": "x"}', "line 2: no 'text' field (fields: other"),
    ('{"text": 3}', "line 2: field 'text' is int"),
    ('["a"]', "line 2: expected a JSON object"),
    ('{"text": "  "}', "line 2: empty text"),
])
def test_bad_jsonl_line_is_named(tmp_path, line, message):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n' + line + '\n{"text": "also fine"}\n')
    with pytest.raises(CorpusError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_corpus(path)
    skipped = read_corpus(path, on_error="skip")
    assert skipped.texts == ["fine", "also fine"]
    assert [p.prompt_id for p in skipped.prompts] == [0, 1]
    assert skipped.skipped[0][0] == 2


def test_invalid_utf8_is_named(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"good\nbad \xff\xfe\n")
    with pytest.raises(CorpusError, match="line 2: not valid UTF-8"):
        read_corpus(path)


def test_parquet_problems(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), path)
    with pytest.raises(CorpusError, match="row 2: column 'text' is null"):
        read_corpus(path)
    with pytest.raises(CorpusError, match="no 'prompt' column"):
        read_corpus(path, text_field="prompt")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(CorpusError, match="not a readable Parquet file"):
        read_corpus(tmp_path / "junk.parquet")


def test_missing_empty_and_unsupported(tmp_path):
    with pytest.raises(CorpusError, match="corpus file not found"):
        read_corpus(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(CorpusError, match="has no prompts"):
        read_corpus(tmp_path / "empty.txt")
    (tmp_path / "c.csv").write_text("text\na\n")
    with pytest.raises(CorpusError, match=r"unsupported corpus format '\.csv'"):
        read_corpus(tmp_path / "c.csv")
    (tmp_path / "bad.jsonl").write_text("{\n")
    with pytest.raises(CorpusError, match=r"no prompts \(1 bad records skipped\)"):
        read_corpus(tmp_path / "bad.jsonl", on_error="skip")


def test_other_fields_and_columns_are_the_prompts_metadata(tmp_path):
    records = [{"text": TEXTS[0], "kind": "fact", "n": 1},
               {"text": TEXTS[1], "kind": "code", "tags": ["py"]}, {"text": TEXTS[2]}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    jsonl = read_corpus(tmp_path / "c.jsonl")
    assert [p.metadata for p in jsonl.prompts] == [
        {"kind": "fact", "n": 1}, {"kind": "code", "tags": ["py"]}, None]
    pq.write_table(pa.table({"kind": ["fact", None, "story"], "body": TEXTS}),
                   tmp_path / "c.parquet")
    parquet = read_corpus(tmp_path / "c.parquet", text_field="body")
    assert [p.metadata for p in parquet.prompts] == [
        {"kind": "fact"}, {"kind": None}, {"kind": "story"}]
    assert read_corpus(tmp_path / "c.parquet", text_field="body").texts == TEXTS
    # metadata labels prompts; it does not change what is profiled
    assert jsonl.fingerprint == parquet.fingerprint == Corpus.from_texts(TEXTS).fingerprint
