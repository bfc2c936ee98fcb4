"""What --init and --resume fix cannot be asked for otherwise: a conflicting option is refused in one line, never
silently dropped (train --init LENS --layers 0 once trained and saved the init lens's own layer instead)."""

from __future__ import annotations

import pytest
from attention_lens.cli import main
from clirun import run
from conftest import make_corpus, make_model_dir

pytestmark = [pytest.mark.robustness, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("conflicts")
    model, corpus = make_model_dir(root / "model"), make_corpus(root / "corpus")
    init = root / "init"
    assert main(["fit", "--model", str(model), "--data", str(corpus), "--seq-len", "16", "--tokens", "64",
                 "--layers", "1", "--heads", "1", "--eval-tokens", "0", "--out", str(init)]) == 0
    return model, corpus, init


def train_args(model, corpus, out) -> list:
    return ["train", "--model", model, "--data", corpus, "--seq-len", 16, "--tokens", 64, "--eval-tokens", 0,
            "--out", out]


def test_options_the_init_lens_fixes_are_refused_in_a_real_process(paths, tmp_path):
    model, corpus, init = paths
    out = tmp_path / "lens"
    run(*train_args(model, corpus, out), "--init", init, "--layers", 0, "--heads", 0).assert_one_line_error(
        "--layers 0 conflicts with --init", "layers 1")
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--heads", "0"], "--heads 0 conflicts with --init"),
    (["--kind", "full"], "--kind full conflicts with --init"),
])
def test_each_fixed_option(paths, tmp_path, capsys, extra, message):
    model, corpus, init = paths
    out = tmp_path / "lens"
    assert main([str(a) for a in train_args(model, corpus, out)] + ["--init", str(init), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_agreeing_options_are_honoured(paths, tmp_path, capsys):
    model, corpus, init = paths
    args = [str(a) for a in train_args(model, corpus, tmp_path / "lens")]
    assert main(args + ["--init", str(init), "--kind", "affine", "--layers", "1", "--heads", "1", "--json"]) == 0


def test_resume_with_overwrite_is_refused(paths, tmp_path, capsys):
    model, corpus, _ = paths
    assert main([str(a) for a in train_args(model, corpus, tmp_path / "lens")] + ["--resume", "--overwrite"]) == 2
    assert "pass one of them" in capsys.readouterr().err
