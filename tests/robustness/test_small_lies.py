"""Messages and progress that say what happened: the fit bar never shows more tokens done than its total, a lens
*file* is called a file, a reversed range is called reversed, a concept path that does not exist is not searched
as a word."""

from __future__ import annotations

import re

import pytest
from attention_lens.cli import main
from clirun import run
from conftest import make_corpus, make_model_dir

pytestmark = [pytest.mark.robustness, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("lies")
    return make_model_dir(root / "model"), make_corpus(root / "corpus"), root


def test_fit_progress_never_passes_its_total_in_a_real_process(paths, tmp_path):
    model, corpus, _ = paths
    done = run("fit", "--model", model, "--data", corpus, "--seq-len", 16, "--batch-size", 8, "--tokens", 64,
               "--eval-tokens", 0, "--out", tmp_path / "lens")
    assert done.code == 0, done.err[-2000:]
    counts = [(int(a), int(b)) for a, b in re.findall(r"(\d+)/(\d+) tokens", done.err)]
    assert counts and all(a <= b for a, b in counts) and counts[-1][0] > 64, done.err  # whole batches: past 64


@pytest.mark.parametrize("argv, message", [
    (["decode", "--lens", "{model}/config.json", "hi"], "is a file, not a lens directory"),
    (["fit", "--layers", "1-0", "--out", "{root}/never"], "is reversed; write 0-1"),
    (["search", "--concept", "{root}/missing-words.txt"], "concept file"),
    (["ablate", "--heads", "0.0", "--concept", "words/war.txt"], "does not exist"),
])
def test_messages_say_what_is_wrong(paths, capsys, argv, message):
    model, corpus, root = paths
    args = [a.format(model=model, root=root) for a in argv]
    assert main([args[0], "--model", str(model), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (root / "never").exists()
