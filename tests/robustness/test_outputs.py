"""One rule for every command that writes: an existing target is refused unless --overwrite, the target is checked
(file or directory, writable place) before any work, and the write is atomic (a kill leaves the old file whole)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from attention_lens.cli import main
from clirun import REPO, environment, run
from conftest import make_corpus, make_model_dir

pytestmark = [pytest.mark.robustness, pytest.mark.usefixtures("one_thread")]

KILL_POINTS = REPO / "tests" / "robustness" / "kill_points.py"
UNRELATED = '{"mine": "an unrelated file the user cares about"}\n'


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    return make_model_dir(root / "model"), make_corpus(root / "corpus")


def quick(command: str, model, corpus) -> list[str]:
    args = [command, "--model", str(model), "--data", str(corpus), "--seq-len", "16", "--tokens", "64"]
    return args + (["--bootstrap", "2", "--constant-tokens", "64"] if command == "eval" else [])


@pytest.mark.parametrize("command", ["eval", "specialize", "report"])
def test_existing_file_is_refused_in_a_real_process(paths, tmp_path, command):
    model, corpus = paths
    target = tmp_path / ("report.html" if command == "report" else "results.json")
    target.write_text(UNRELATED)
    args = ["report", "--model", model] if command == "report" else quick(command, model, corpus)
    run(*args, "--out", target).assert_one_line_error("already exists", "--overwrite")
    assert target.read_text() == UNRELATED
    replaced = run(*args, "--out", target, "--overwrite", "--json")
    assert replaced.code == 0 and target.read_text() != UNRELATED, replaced.err[-2000:]


@pytest.mark.parametrize("command", ["train", "fit", "eval", "specialize", "report"])
def test_target_is_checked_before_any_work(tmp_path, capsys, command):
    """The model does not exist: an error about --out proves the target was checked first."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    target = blocker / ("lens" if command in ("train", "fit") else "out.json")
    args = [command, "--model", str(tmp_path / "no-model"), "--out", str(target)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is a file" in err and len(err.strip().splitlines()) == 1, err


def test_file_where_a_directory_belongs_and_the_reverse(paths, tmp_path, capsys):
    model, corpus = paths
    (tmp_path / "lens-file").write_text("x")
    assert main(["fit", "--model", str(model), "--out", str(tmp_path / "lens-file")]) == 2
    assert "is a file; give a directory" in capsys.readouterr().err
    assert main(quick("eval", model, corpus) + ["--out", str(tmp_path)]) == 2
    assert "is a directory; give a file name" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_place_is_refused_before_training(paths, tmp_path, capsys):
    model, corpus = paths
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(quick("train", model, corpus) + ["--out", str(locked / "lens")]) == 2
        assert "cannot write in" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


def test_results_written_atomically(paths, tmp_path):
    """A kill in the middle of writing --out (half the temp file written) leaves the old file as it was."""
    model, corpus = paths
    target = tmp_path / "results.json"
    target.write_text(UNRELATED)
    env = dict(environment(), KILL_AT="results.json:1:half")
    killed = subprocess.run([sys.executable, str(KILL_POINTS), *quick("eval", model, corpus), "--out", str(target),
                             "--overwrite"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert target.read_text() == UNRELATED  # the half-written temp file is a hidden one, removed by the next write
    assert all(p.name.startswith(".results.json.") for p in tmp_path.iterdir() if p != target)
