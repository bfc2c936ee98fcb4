"""Specialization: the token-writer head is maximally concentrated; token classes; grouping of heads."""

from itertools import islice

import pytest
import torch

from attention_lens import DataConfig, Lens
from attention_lens.data import load_documents, split_by_document, token_windows
from attention_lens.evaluate import sink_mask
from attention_lens.heads import run_with_heads
from attention_lens.specialize import SpecializeConfig, average_linkage, jaccard, specialize
from attention_lens.token_classes import describe, token_class
from conftest import make_corpus, make_tiny_model
from test_lens import TARGET_TOKEN, WRITER_HEAD, WRITER_LAYER, make_token_writer

SEQ_LEN = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return DataConfig(data=str(make_corpus(tmp_path_factory.mktemp("specialize") / "corpus")), seq_len=SEQ_LEN,
                      holdout=0.25)


def test_token_writer_head_is_maximally_concentrated_on_its_token(data):
    model = make_token_writer()
    result = specialize(Lens.logit(model), data, SpecializeConfig(tokens=96))
    record = result.head(WRITER_LAYER, WRITER_HEAD)
    assert record.promoted[0].id == TARGET_TOKEN
    assert record.promoted[0].share == 1.0 and record.top_mass == 1.0
    assert record.entropy_bits == 0.0  # the lowest possible: one token at every position
    assert record.positions > 0 and record.description.startswith("mostly")
    first = result.summary["most_specialized"][0]
    assert (first["layer"], first["head"]) == (WRITER_LAYER, WRITER_HEAD)
    others = [h for h in result.heads if h.layer != WRITER_LAYER]
    assert all(h.entropy_bits > 0 for h in others)


@pytest.mark.parametrize("kind", ["logit", "dla", "affine"])
def test_counts_match_a_direct_computation(data, kind):
    """Promoted token = argmax_v q_head(v) - mean over all heads and positions of q(v), counted per head."""
    model = make_tiny_model("gpt2")
    lens = Lens.from_model(model, kind, layers=[0, 1], heads=[0, 2, 3])
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in lens.parameters():
            parameter.normal_(std=0.2)
    config = SpecializeConfig(tokens=64, top=5)
    result = specialize(lens, data, config)
    _, held = split_by_document(load_documents(data.data), data.holdout)
    input_ids = torch.stack(list(islice(token_windows(held, model.tokenizer, SEQ_LEN, config.seed), 4)))
    _, capture = run_with_heads(model, input_ids, lens.config.layers, final_residual=True)
    keep = ~sink_mask(input_ids, model.tokenizer)
    final_scale = model.unembed.scale(capture.final_residual[keep])
    q = torch.stack([torch.softmax(lens.logits(capture.heads[layer].z[keep], layer, final_scale), -1)
                     for layer in (0, 1)], 1)
    promoted = (q - q.mean((0, 1, 2))).argmax(-1)  # (position, layer, head)
    for i, layer in enumerate((0, 1)):
        for j, head in enumerate((0, 2, 3)):
            counts = torch.bincount(promoted[:, i, j], minlength=model.vocab)
            shares = counts[counts > 0].double() / counts.sum()
            record = result.head(layer, head)
            assert record.entropy_bits == pytest.approx(float(-(shares * shares.log2()).sum()), abs=1e-6)
            assert record.positions == int(keep.sum())
            assert [p.count for p in record.promoted] == counts[counts > 0].sort(descending=True).values[:5].tolist()
            assert all(counts[p.id] == p.count for p in record.promoted)


def test_same_seed_same_result(data):
    model = make_tiny_model("qwen2")
    config = SpecializeConfig(tokens=64, seed=2)
    first = specialize(Lens.logit(model), data, config).to_json()
    assert specialize(Lens.logit(model), data, config).to_json() == first
    assert "layers" in first and len(first["layers"]) == model.n_layers


@pytest.mark.parametrize("text, expected", [
    (" the", "function word"), ("The", "function word"), (" 42", "number"), ("3,000", "number"),
    (" 1865", "date"), (" January", "date"), (".", "punctuation"), (" --", "punctuation"), ("\n\n", "whitespace"),
    (" Lincoln", "capitalized"), (" freedom", "word"), ("ing", "fragment"), (" x2", "other"), ("\ufffd", "byte"),
])
def test_token_classes(text, expected):
    assert token_class(text) == expected


def test_descriptions_name_a_dominant_token_or_class():
    assert describe({"number": 0.9}, " 7", 0.2) == "numbers (90%)"
    assert describe({"punctuation": 0.7}, ",", 0.55) == "mostly ',' (55%)"
    assert describe({"number": 0.4, "word": 0.35, "other": 0.25}, " 7", 0.1).startswith("mixed (numbers 40%")


def test_jaccard_and_average_linkage_find_the_planted_groups():
    sets = [{1, 2, 3}, {1, 2, 3, 4}, {2, 3, 4}, {10, 11}, {10, 11, 12}, {99}]
    similarity = jaccard(sets)
    assert similarity[0, 1] == pytest.approx(3 / 4) and similarity[0, 3] == 0 and similarity[5, 5] == 1
    assert average_linkage(similarity, 0.3) == [[0, 1, 2], [3, 4], [5]]
    assert average_linkage(similarity, 1.01) == [[i] for i in range(6)]
