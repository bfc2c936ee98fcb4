"""`eval` and `specialize` end to end, in-process: JSON documents, tables, --out, seeds, one-line errors."""

import json

import pytest

from conftest import make_corpus, make_model_dir, run_cli

SMALL = ["--tokens", "64", "--seq-len", "16", "--constant-tokens", "64", "--bootstrap", "20"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_evaluate")
    return make_model_dir(root / "model"), make_corpus(root / "corpus"), root


def test_eval_json_out_and_table(paths, capsys):
    model, corpus, root = paths
    args = ["eval", "--model", model, "--data", corpus, "--lens", "logit", *SMALL]
    code, stdout, _ = run_cli(args + ["--json", "--out", root / "results.json"], capsys)
    assert code == 0
    document = json.loads(stdout)  # stdout holds exactly one JSON document
    summary = document["summary"]
    for key in ("kl_mean", "frac_beats_logit", "frac_beats_dla", "frac_beats_constant", "top1_mean"):
        assert isinstance(summary[key], float), key
    assert len(document["heads"]) == 2 * 4
    assert all(isinstance(h["layer"], int) and isinstance(h["head"], int) for h in document["heads"])
    assert json.loads((root / "results.json").read_text()) == document

    code, again, _ = run_cli(args + ["--json"], capsys)
    assert code == 0 and json.loads(again) == document  # same seed, same numbers

    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "constant" in stdout and "best heads" in stdout


def test_eval_of_a_trained_lens_uses_its_model_and_split(paths, capsys):
    model, corpus, root = paths
    out = root / "lens"
    assert run_cli(["train", "--model", model, "--data", corpus, "--layers", "1", "--tokens", "32", "--seq-len", "16",
                "--eval-tokens", "0", "--holdout", "0.25", "--out", out], capsys)[0] == 0
    code, stdout, _ = run_cli(["eval", "--lens", out, "--data", corpus, "--json", *SMALL], capsys)
    assert code == 0
    document = json.loads(stdout)
    assert document["lens"] == "affine" and document["holdout"] == 0.25
    assert {h["layer"] for h in document["heads"]} == {1}
    code, _, err = run_cli(["eval", "--lens", out, "--data", corpus, "--holdout", "0.5", *SMALL], capsys)
    assert code == 2 and "trained on" in err and len(err.strip().splitlines()) == 1


def test_specialize_json_and_tables(paths, capsys):
    model, corpus, root = paths
    args = ["specialize", "--model", model, "--data", corpus, "--lens", "dla", "--tokens", "64", "--seq-len", "16"]
    code, stdout, _ = run_cli(args + ["--json", "--compare-layers"], capsys)
    assert code == 0
    document = json.loads(stdout)
    assert len(document["heads"]) == 8 and len(document["layers"]) == 2
    record = document["heads"][0]
    assert {"entropy_bits", "top_mass", "promoted", "description", "group"} <= set(record)
    code, stdout, _ = run_cli(args + ["--compare-layers"], capsys)
    assert code == 0 and "most specialized heads" in stdout and "specialization by depth" in stdout


@pytest.mark.parametrize("argv, message", [
    (["eval", "--tokens", "0"], "at least 1"),
    (["eval", "--margin", "-0.5"], "margin"),
    (["eval", "--bootstrap", "1"], "bootstrap"),
    (["eval", "--constant-data", "{root}/missing.txt"], "no data"),
    (["eval", "--data", "{root}/missing.txt"], "no data"),
    (["eval", "--seq-len", "1"], "seq-len"),
    (["eval", "--lens", "affine"], "needs training"),
    (["specialize", "--top", "0"], "at least 1"),
    (["specialize", "--group-similarity", "2"], "Jaccard"),
    (["specialize", "--lens", "{root}/no-lens"], "does not exist"),
])
def test_user_mistakes_give_one_line(paths, capsys, argv, message):
    model, corpus, root = paths
    command, *rest = argv
    args = [command, "--model", model, "--data", corpus, "--seq-len", "16"]
    code, _, err = run_cli(args + [a.format(root=root) for a in rest], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
