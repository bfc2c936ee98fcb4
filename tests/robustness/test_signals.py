"""Ctrl-C and SIGTERM, sent to real processes: train keeps its last checkpoint and says how to resume, decode
stops; exit 130 for SIGINT, 143 for SIGTERM, one line, no traceback."""

from __future__ import annotations

import signal

import pytest
from attention_lens.checkpoint import checkpoint_path
from clirun import handles_sigterm, run, start, wait_for
from conftest import make_corpus, make_model_dir

pytestmark = pytest.mark.robustness


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    return make_model_dir(root / "model"), make_corpus(root / "corpus", repeats=60)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_train_stops_after_a_checkpoint_and_resumes(paths, tmp_path, signum):
    model, corpus = paths
    out, log = tmp_path / "lens", tmp_path / "train.log"
    args = ["train", "--model", model, "--data", corpus, "--seq-len", 16, "--batch-size", 2, "--tokens", 20_000,
            "--checkpoint-every", 1, "--eval-tokens", 0, "--out", out]
    process = start(*args, log=log)
    wait_for(lambda: checkpoint_path(out).is_file(), "the first checkpoint", process, log=log)
    process.send_signal(signum)
    assert process.wait(timeout=60) == 128 + signum
    text = log.read_text()
    assert "Traceback" not in text and text.strip().splitlines()[-1] == "interrupted; resume with --resume"
    assert checkpoint_path(out).is_file() and not (out / "lens.safetensors").exists()
    resumed = run(*args[:args.index("--tokens")], "--tokens", 640, *args[args.index("--tokens") + 2:], "--resume",
                  "--json")
    assert resumed.code == 0 and (out / "lens.safetensors").is_file(), resumed.err[-2000:]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_decode_stops_on_a_signal(paths, tmp_path, signum):
    model, _ = paths
    log = tmp_path / "decode.log"
    process = start("decode", "--model", model, "--position", "all", "--json", "word " * 2000, log=log)
    wait_for(lambda: handles_sigterm(process), "main() to start", process, log=log)
    process.send_signal(signum)
    assert process.wait(timeout=60) == 128 + signum
    assert log.read_text().strip().splitlines() == ["interrupted"]
