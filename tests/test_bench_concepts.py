"""bench/concepts.py, the method x concept x k table: an estimate that measures nothing, rows appended as they are
measured, a rerun that skips them (and measures only a k it lacks), settings that may not change under a file."""

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import make_corpus, make_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "concepts.py"
    spec = importlib.util.spec_from_file_location("bench_concepts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_are_appended_resumed_and_estimated(tmp_path, capsys):
    bench = _bench()
    model, corpus = make_model_dir(tmp_path / "model"), make_corpus(tmp_path / "corpus", documents=16)
    out = tmp_path / "rows.json"
    base = ["--model", str(model), "--data", str(corpus), "--seq-len", "16", "--holdout", "0.3", "--tokens", "64",
            "--min-targets", "20", "--repeats", "3", "--concept", "animals=fox, dog", "--methods", "dla",
            "--out", str(out)]
    capsys.readouterr()

    assert bench.main(base + ["--k", "1", "--estimate"]) == 0
    err = capsys.readouterr().err
    assert "forward-equivalents" in err and "total:" in err
    document = json.loads(out.read_text())
    assert document["rows"] == [] and len(document["rankings"]["dla/animals: fox, dog"]) == 8  # scored once, kept

    assert bench.main(base + ["--k", "1"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["method"], row["concept"], row["k"]) for row in rows] == [("dla", "animals", 1)]
    assert rows[0]["repeats"] == 3 and rows[0]["concept_targets"] >= 20 and rows[0]["steer_mass_change"] is not None
    assert "1/" in capsys.readouterr().err  # progress over windows

    assert bench.main(base + ["--k", "1"]) == 0
    assert "already measured" in capsys.readouterr().err and json.loads(out.read_text())["rows"] == rows

    assert bench.main(base + ["--k", "1,2", "--json"]) == 0  # only k = 2 is measured now, and it steers
    document = json.loads(capsys.readouterr().out)
    assert [row["k"] for row in document["rows"]] == [1, 2] and document["rows"][0] == rows[0]
    assert document["rows"][1]["steer_mass_change"] is not None and document["rows"][1]["sweep_ks"] == [2]
    assert document["rows"][1]["steer"]["heads"] == document["rows"][1]["heads"]  # every k steers its own heads

    rare = ["--concept", "rare=fox", "--concepts", "rare", "--min-targets", "100000", "--k", "1",
            "--out", str(tmp_path / "rare.json")]
    assert bench.main(base + rare) == 0  # a concept the held-out text cannot supply: its refusal is its row
    assert "not measured" in capsys.readouterr().err
    rows = json.loads((tmp_path / "rare.json").read_text())["rows"]
    assert rows[0]["concept"] == "rare" and rows[0]["error"].startswith("the held-out text holds")
    assert bench.main(base + rare) == 0 and "already measured" in capsys.readouterr().err

    assert bench.main(base + ["--k", "1", "--repeats", "4"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "other settings (repeats 3 -> 4)" in err


def test_a_method_that_found_the_same_heads_gets_the_same_row_without_measuring_it(tmp_path, capsys):
    bench = _bench()
    model, corpus = make_model_dir(tmp_path / "model"), make_corpus(tmp_path / "corpus", documents=16)
    base = ["--model", str(model), "--data", str(corpus), "--seq-len", "16", "--holdout", "0.3", "--tokens", "64",
            "--min-targets", "20", "--repeats", "3", "--concept", "animals=fox, dog", "--k", "2"]
    shared, alone = tmp_path / "shared.json", tmp_path / "alone.json"
    assert bench.main(base + ["--methods", "dla", "--out", str(shared), "--estimate"]) == 0
    document = json.loads(shared.read_text())
    dla = document["rankings"]["dla/animals: fox, dog"]
    logit = [dla[1], dla[0], *dla[2:]]  # the same two heads first, in another order
    document["rankings"]["logit/animals: fox, dog"] = logit
    shared.write_text(json.dumps(document))
    alone.write_text(json.dumps({**document, "rankings": {"logit/animals: fox, dog": logit}}))
    capsys.readouterr()

    assert bench.main(base + ["--methods", "dla,logit", "--out", str(shared), "--estimate"]) == 0
    assert "the heads dla found" in capsys.readouterr().err
    assert bench.main(base + ["--methods", "dla,logit", "--out", str(shared)]) == 0
    dla_row, copied = json.loads(shared.read_text())["rows"]
    assert copied["method"] == "logit" and copied["same_heads_as"] == "dla" and copied["heads"] == logit[:2]
    assert bench.main(base + ["--methods", "logit", "--out", str(alone)]) == 0  # measured for itself
    (measured,) = json.loads(alone.read_text())["rows"]
    ignored = {"same_heads_as", "sweep_ks", "sweep_forward_equivalents", "sweep_seconds"}
    assert {key: value for key, value in copied.items() if key not in ignored} == \
        {key: value for key, value in measured.items() if key not in ignored}
    assert copied["found_drop"] == dla_row["found_drop"] and measured["steer_mass_change"] is not None
