"""HeadStream, the one corpus pipeline: the windows of the chosen split in the seeded order, resumable, capped,
sharded over processes, the same head outputs as a direct forward pass, and one error for too little text."""

import pytest
import torch

from attention_lens import AttentionLensError, DataConfig, load_model
from attention_lens.data import load_documents, split_by_document, token_windows
from attention_lens.distributed import World
from attention_lens.heads import run_with_heads
from attention_lens.stream import HeadStream
from conftest import make_corpus, make_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    model = load_model(str(make_model_dir(root / "model")))
    return model, DataConfig(data=str(make_corpus(root / "corpus")), seq_len=16, holdout=0.25)


def expected_windows(model, data, side, seed):
    train, held = split_by_document(load_documents(data.data), data.holdout)
    return list(token_windows({"train": train, "held": held}[side], model.tokenizer, data.seq_len, seed))


@pytest.mark.parametrize("split", ["train", "held"])
def test_windows_are_the_split_in_the_seeded_order(setup, split):
    model, data = setup
    got = list(HeadStream(model, data, split=split, seed=3).windows())
    want = expected_windows(model, data, split, 3)
    assert len(got) == len(want) > 4 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_start_skips_windows_and_windows_caps_them(setup):
    model, data = setup
    want = expected_windows(model, data, "train", 0)
    got = list(HeadStream(model, data, start=2, windows=3).windows())
    assert [w.tolist() for w in got] == [w.tolist() for w in want[2:5]]


def test_batches_carry_the_head_outputs_of_a_direct_forward_pass(setup):
    model, data = setup
    stream = HeadStream(model, data, [0, 1], batch_size=3, windows=5, final_residual=True)
    windows = torch.stack(expected_windows(model, data, "train", 0)[:5])
    seen = []
    for batch in stream:
        seen.append(batch.windows)
        logits, capture = run_with_heads(model, batch.input_ids, [0, 1], final_residual=True)
        torch.testing.assert_close(batch.logits, logits)
        torch.testing.assert_close(batch.final_scale(), model.unembed.scale(capture.final_residual).flatten())
        for index, layer, z in batch.layers([0, 1]):
            torch.testing.assert_close(z, capture.heads[layer].z)
            assert layer not in batch.capture.heads  # handed out once: freed as the consumer goes
        assert batch.tokens == batch.windows * data.seq_len
    assert seen == [3, 2]
    assert torch.equal(torch.cat([b for b in stream.batches()]), windows)


def test_each_process_runs_its_share_and_a_batch_too_small_to_share_is_dropped(setup):
    model, data = setup
    total = len(expected_windows(model, data, "train", 0))
    batch_size = total - 1  # the second batch holds one window: less than two processes can share
    shares = []
    for rank in range(2):
        stream = HeadStream(model, data, [0], batch_size=batch_size, world=World(rank=rank, size=2))
        batches = list(stream)
        assert len(batches) == 1 and batches[0].windows == batch_size
        shares.append(batches[0].input_ids)
    assert shares[0].shape[0] + shares[1].shape[0] == batch_size and not torch.equal(shares[0][0], shares[1][0])


def test_too_little_text_gives_one_error_but_a_finished_resume_just_ends(setup):
    model, data = setup
    long = DataConfig(data=data.data, seq_len=100_000, holdout=data.holdout)
    with pytest.raises(AttentionLensError, match="training data is too small for one window of 100000 tokens"):
        list(HeadStream(model, long, [0]))
    total = len(expected_windows(model, data, "train", 0))
    assert list(HeadStream(model, data, [0], start=total)) == []
    with pytest.raises(AttentionLensError, match="unknown split"):
        HeadStream(model, data, split="test")
