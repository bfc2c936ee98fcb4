"""The CLI end to end, in-process: train then decode; user mistakes give one line and exit 2."""

import json

import pytest

from conftest import make_corpus, make_model_dir, run_cli


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return make_model_dir(root / "model"), make_corpus(root / "corpus"), root


def test_train_then_decode(paths, capsys):
    model, corpus, root = paths
    out = root / "lens"
    code, stdout, _ = run_cli(["train", "--model", str(model), "--data", str(corpus), "--layers", "1", "--tokens", "64",
                           "--seq-len", "16", "--eval-tokens", "64", "--out", str(out), "--json"], capsys)
    assert code == 0
    result = json.loads(stdout)  # stdout holds exactly one JSON document
    assert result["steps"] == 1 and result["layers"] == [1] and result["heldout_kl"] > 0
    assert (out / "lens.safetensors").exists() and (out / "checkpoints" / "last.safetensors").exists()

    code, stdout, _ = run_cli(["decode", "--lens", str(out), "--json", "--position", "all", "-k", "3",
                           "The quick brown fox"], capsys)
    assert code == 0
    document = json.loads(stdout)
    heads = document["heads"]
    assert len(heads) == len(document["tokens"]) * 4  # one layer x 4 heads x positions
    record = heads[0]
    assert isinstance(record["layer"], int) and record["layer"] == 1
    assert {"token", "id", "logit", "prob"} <= set(record["top"][0]) and len(record["top"]) == 3

    code, stdout, _ = run_cli(["decode", "--lens", str(out), "The quick brown fox"], capsys)
    assert code == 0 and "H3" in stdout


def test_decode_logit_needs_no_training(paths, capsys):
    model, _, _ = paths
    code, stdout, _ = run_cli(["decode", "--model", str(model), "--lens", "dla", "--json", "jumps over"], capsys)
    assert code == 0 and len(json.loads(stdout)["heads"]) == 2 * 4


def test_decode_exact_gives_the_same_tokens(paths, capsys):
    model, _, _ = paths
    args = ["decode", "--model", str(model), "--lens", "logit", "--json", "--position", "all", "jumps over the"]
    _, fast, _ = run_cli(args, capsys)
    code, exact, _ = run_cli([*args, "--exact"], capsys)
    assert code == 0
    ids = lambda document: [[t["id"] for t in r["top"]] for r in json.loads(document)["heads"]]  # noqa: E731
    assert ids(fast) == ids(exact)


def test_decode_table_shows_every_head_whole_when_piped(paths, capsys):
    """Not a terminal: one table as wide as all heads need, no token cut to an ellipsis."""
    model, _, _ = paths
    code, stdout, _ = run_cli(["decode", "--model", str(model), "--lens", "logit", "jumps over the"], capsys)
    assert code == 0 and "…" not in stdout
    header = next(line for line in stdout.splitlines() if "layer" in line)
    assert all(f"H{head}" in header for head in range(4))


def test_decode_tables_fit_a_narrow_terminal(paths, capsys, monkeypatch):
    """A 40-column terminal: the heads wrap into several tables, none wider than the terminal."""
    import re

    model, _, _ = paths
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "40")
    code, stdout, _ = run_cli(["decode", "--model", str(model), "--lens", "logit", "jumps over the"], capsys)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", stdout)
    assert code == 0 and "…" not in plain
    assert max(len(line) for line in plain.splitlines()) <= 40
    headers = [line for line in plain.splitlines() if "layer" in line]
    assert len(headers) >= 2 and all(any(f"H{head}" in h for h in headers) for head in range(4))


def test_decode_layers_and_heads_select(paths, capsys):
    model, _, _ = paths
    args = ["decode", "--model", str(model), "--lens", "logit", "--layers", "1", "--heads", "0,2", "jumps over"]
    code, stdout, _ = run_cli([*args, "--json"], capsys)
    assert code == 0
    assert {(r["layer"], r["head"]) for r in json.loads(stdout)["heads"]} == {(1, 0), (1, 2)}
    code, stdout, _ = run_cli(args, capsys)
    header = next(line for line in stdout.splitlines() if "layer" in line)
    assert code == 0 and "H0" in header and "H2" in header and "H1" not in header


def test_existing_lens_is_not_overwritten(paths, capsys):
    model, corpus, root = paths
    out = root / "kept"
    args = ["train", "--model", str(model), "--data", str(corpus), "--tokens", "16", "--seq-len", "16",
            "--eval-tokens", "0", "--out", str(out)]
    assert run_cli(args, capsys)[0] == 0
    before = (out / "lens.safetensors").read_bytes()
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "--overwrite" in err
    assert (out / "lens.safetensors").read_bytes() == before
    assert run_cli(args + ["--overwrite"], capsys)[0] == 0


@pytest.mark.parametrize("argv, message", [
    (["decode", "--model", "no-such-model", "hi"], "no model"),
    (["decode", "--lens", "/nonexistent/lens", "hi"], "does not exist"),
    (["train", "--model", "{model}", "--data", "{corpus}", "--layers", "7", "--out", "{root}/x"], "out of range"),
    (["train", "--model", "{model}", "--data", "{root}/missing.txt", "--out", "{root}/y"], "no data"),
    (["train", "--model", "{model}", "--data", "{empty}", "--out", "{root}/z"], "empty"),
    (["train", "--model", "{model}", "--data", "{binary}", "--out", "{root}/w"], "binary"),
    (["train", "--model", "{model}", "--data", "{corpus}", "--seq-len", "100000", "--out", "{root}/v"], "too small"),
])
def test_user_mistakes_give_one_line(paths, capsys, argv, message):
    model, corpus, root = paths
    (root / "empty.txt").write_text("   \n")
    (root / "binary.txt").write_bytes(b"\x00\x01\x02text")
    values = dict(model=model, corpus=corpus, root=root, empty=root / "empty.txt", binary=root / "binary.txt")
    code, stdout, err = run_cli([a.format(**values) for a in argv], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    code, _, err = run_cli(["decode", "--model", str(tmp_path), "hi"], capsys)
    assert code == 2 and "supported" in err
