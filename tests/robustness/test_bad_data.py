"""Bad training data: refused with a clear message naming the file (and line), or handled and reported."""

import json
import logging
import os
import re

import pytest

from attention_lens import AttentionLensError
from attention_lens.cli import main
from attention_lens.data import TEXT_DOCUMENT_CHARS, load_documents, split_by_document
from conftest import SAMPLE_TEXT, make_corpus, make_model_dir

pytestmark = pytest.mark.robustness

GIANT_LINE = "word " * 1_000_000  # 5 MB, no newline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("bad-data") / "model")


def train(model_dir, data, capsys, *extra) -> tuple[int, str, str]:
    code = main(["train", "--model", str(model_dir), "--data", str(data), "--seq-len", "16", "--tokens", "64",
                 "--eval-tokens", "0", "--out", str(data) + ".lens", *map(str, extra)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "is empty"),
    ("blank.txt", b" \n\n\t\n", "is empty"),
    ("binary.txt", b"PK\x03\x04\x00\x00\x08\x00", "looks binary"),
    ("latin1.txt", "caf\xe9 au lait".encode("latin-1"), "not UTF-8 text .byte 3."),
    ("empty.jsonl", b"", "is empty"),
    ("blank-records.jsonl", b'{"text": "  "}\n{"text": ""}\n', "no records with text"),
])
def test_unusable_file_is_refused_in_one_line(model_dir, tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(AttentionLensError, match=message):
        load_documents(str(path))
    code, _, err = train(model_dir, path, capsys)
    assert code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text(SAMPLE_TEXT)
    path.chmod(0)
    with pytest.raises(AttentionLensError, match="cannot read"):
        load_documents(str(path))


def test_giant_line_is_cut_into_documents_at_spaces(tmp_path):
    path = tmp_path / "giant.txt"
    path.write_text(GIANT_LINE)
    documents = load_documents(str(path))
    assert len(documents) > 1000 and max(len(d.text) for d in documents) <= TEXT_DOCUMENT_CHARS
    assert "".join(d.text for d in documents) == GIANT_LINE and all(d.text.endswith(" ") for d in documents)
    train_docs, held = split_by_document(documents, 0.1)  # one line still gives a by-document split
    assert train_docs and held


def test_giant_line_without_spaces_and_many_tiny_paragraphs(tmp_path):
    """Neither hangs: the paragraph joiner once re-summed every paragraph (quadratic: minutes here)."""
    (tmp_path / "blob.txt").write_text("x" * 5_000_000)
    assert len(load_documents(str(tmp_path / "blob.txt"))) == 5_000_000 // TEXT_DOCUMENT_CHARS
    (tmp_path / "tiny.txt").write_text("a\n\n" * 1_000_000)
    assert len(load_documents(str(tmp_path / "tiny.txt"))) == 1_000_000 // TEXT_DOCUMENT_CHARS


def test_training_on_one_giant_line_works(model_dir, tmp_path, capsys):
    path = tmp_path / "giant.txt"
    path.write_text(GIANT_LINE)
    code, _, err = train(model_dir, path, capsys, "--eval-tokens", 64, "--json")
    assert code == 0, err


def test_jsonl_with_a_giant_record_loads(tmp_path):
    lines = [{"text": GIANT_LINE}] + [{"text": SAMPLE_TEXT}] * 3
    path = tmp_path / "giant.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    assert [len(d.text) for d in load_documents(str(path))] == [len(GIANT_LINE)] + [len(SAMPLE_TEXT)] * 3


BAD_LINES = ["{not json", '{"text": 3}', '["text", "a list"]', '{"title": "no text"}', '{"text": "\\ud800 lone surrogate"}']


def write_jsonl(path, records: int = 12):
    """Good records with the bad lines at lines 3, 5, 7, ... and one non-ASCII line separator inside a record."""
    lines = [json.dumps({"text": f"Record {i}. " + SAMPLE_TEXT * 3 + "\u2028end"}, ensure_ascii=False)
             for i in range(records)]
    for i, bad in enumerate(BAD_LINES):
        lines.insert(2 + 2 * i, bad)
    path.write_text("\ufeff" + "\r\n".join(lines) + "\r\n")  # a BOM and Windows line ends, too
    return path


def test_bad_jsonl_lines_are_reported_by_number(tmp_path, caplog):
    path = write_jsonl(tmp_path / "records.jsonl")
    with pytest.raises(AttentionLensError, match=r"records.jsonl:3: .*`skip_bad_lines`"):
        load_documents(str(path))
    with caplog.at_level(logging.WARNING):
        documents = load_documents(str(path), skip_bad_lines=True)
    assert len(documents) == 12 and all("\u2028end" in d.text for d in documents)
    assert documents[2].id == "records.jsonl:4"  # line numbers count newlines only, not U+2028
    assert f"skipped {len(BAD_LINES)} bad lines (first: line 3)" in caplog.text


def test_bad_jsonl_lines_on_the_command_line(model_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "records.jsonl")
    code, _, err = train(model_dir, path, capsys)
    assert code == 2 and "records.jsonl:3:" in err and "--skip-bad-lines" in err
    code, _, err = train(model_dir, path, capsys, "--skip-bad-lines")
    assert code == 0, err


@pytest.mark.parametrize("files", [{}, {"notes.md": "text"}, {"a.txt": "", "b.txt": " \n"}])
def test_directory_without_text_is_refused(tmp_path, files):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(AttentionLensError, match="no non-empty .txt files"):
        load_documents(str(tmp_path))


def test_directory_skips_empty_files_and_names_a_binary_one(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", documents=3, repeats=1)
    (corpus / "empty.txt").write_text("")
    assert len(load_documents(str(corpus))) == 3
    (corpus / "sub").mkdir()
    (corpus / "sub" / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(AttentionLensError, match="image.txt looks binary"):
        load_documents(str(corpus))


def test_token_budget_larger_than_the_data_warns_with_the_count(model_dir, tmp_path, capsys):
    corpus = make_corpus(tmp_path / "small", documents=4, repeats=1)
    code, out, err = train(model_dir, corpus, capsys, "--tokens", 1_000_000, "--json")
    used = json.loads(out)["tokens"]
    assert code == 0 and 0 < used < 1_000_000
    assert f"the data ran out: trained on {used} tokens, not 1000000" in err


def test_prompt_that_is_not_utf8_is_refused(model_dir, capsys):
    """argv bytes that are not UTF-8 reach Python as lone surrogates."""
    assert main(["decode", "--model", str(model_dir), "caf\udce9"]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err
