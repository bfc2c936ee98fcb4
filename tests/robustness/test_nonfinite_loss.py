"""An inf in one head's input at step 3 stops the run naming step, layer and head; step 2's checkpoint survives."""

import importlib
import json

import pytest
from attention_lens.cli import main
from attention_lens.storage import read_tensors
from conftest import make_corpus, make_model_dir

pytestmark = pytest.mark.robustness

POISONED_STEP, LAYER, HEAD = 3, 1, 2
stream_module = importlib.import_module("attention_lens.stream")  # where every corpus forward pass runs


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    return make_model_dir(root / "model"), make_corpus(root / "corpus")


def poison_one_head(monkeypatch):
    """Fault injection: z of (LAYER, HEAD) becomes inf in the POISONED_STEP-th forward pass, nothing else does."""
    real = stream_module.run_with_heads
    calls = 0

    def poisoned(*args, **kwargs):
        nonlocal calls
        calls += 1
        logits, capture = real(*args, **kwargs)
        if calls == POISONED_STEP:
            capture.heads[LAYER].z[..., HEAD, :] = float("inf")  # (batch, pos, head, d_head)
        return logits, capture

    monkeypatch.setattr(stream_module, "run_with_heads", poisoned)


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(paths, tmp_path, monkeypatch, capsys):
    model, corpus = paths
    args = ["train", "--model", str(model), "--data", str(corpus), "--seq-len", "16", "--batch-size", "2",
            "--tokens", "192", "--lr", "1e-2", "--checkpoint-every", "1", "--eval-tokens", "0"]
    assert main(args + ["--out", str(tmp_path / "straight")]) == 0

    out = tmp_path / "poisoned"
    with monkeypatch.context() as patch:
        poison_one_head(patch)
        assert main(args + ["--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"non-finite loss at step {POISONED_STEP}, layer {LAYER} head {HEAD}" in error
    assert not (out / "lens.safetensors").exists()
    _, metadata = read_tensors(out / "checkpoints" / "last.safetensors", "")
    assert json.loads(metadata["progress"])["step"] == POISONED_STEP - 1

    assert main(args + ["--out", str(out), "--resume"]) == 0  # the kept checkpoint is a good one
    assert (out / "lens.safetensors").read_bytes() == (tmp_path / "straight" / "lens.safetensors").read_bytes()
