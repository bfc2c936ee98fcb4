"""Scoring methods: on a model where exactly one head carries a concept token, every method ranks it first and
verification finds it beyond any random head; with the head removed, nothing verifies. Random token sets match
the concept's token frequencies."""

import pytest
import torch

from attention_lens import DataConfig, Lens
from attention_lens.concepts import Concept
from attention_lens.errors import AttentionLensError
from attention_lens.scoring import METHODS, control_sets, pursue, score_heads
from attention_lens.intervene import Zero
from attention_lens.verify import held_windows, verify_ranking
from conftest import make_corpus
from test_concepts import TOKEN, WRITER, make_only_path

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("scoring") / "corpus", documents=20)


def _data(corpus):
    return DataConfig(data=str(corpus), seq_len=16, holdout=0.3)


def _without_writer(model):
    """The same model with the writer's output projection slice zeroed: nothing carries the token any more."""
    layer, head = WRITER
    with torch.no_grad():
        model.out_proj(layer).weight[:, head * model.d_head:(head + 1) * model.d_head] = 0
    model._cache.clear()
    return model


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_ranks_the_only_carrier_first_far_above_random_tokens(corpus, method):
    model = make_only_path(varying=True, strength=1.0)
    concept = Concept(words=["m"], ids=[TOKEN])
    result = score_heads(METHODS[method], Lens.from_model(model, "logit"), concept, _data(corpus), tokens=256, sets=8)
    assert result.ranked()[0] == WRITER, method
    i, j = WRITER
    assert result.control_z[i, j] > 3 and result.scores.flatten().sort(descending=True).values[1] < result.scores[i, j]
    best = result.records(1, model.tokenizer)[0]
    assert (best.layer, best.head) == WRITER and best.control_z > 3 and best.top_tokens[0].id == TOKEN


def test_attribution_refuses_a_concept_that_is_never_a_next_token(corpus):
    model = make_only_path(varying=True, strength=1.0)
    never = model.tokenizer("`")["input_ids"]  # no character of the corpus shares its id
    with pytest.raises(AttentionLensError, match="no position where a concept token is the next token"):
        score_heads(METHODS["attribution"], Lens.from_model(model, "logit"), Concept(["`"], never), _data(corpus),
                    sets=4)


def _verify(model, corpus, heads):
    held = held_windows(model, _data(corpus), [TOKEN], min_targets=60)
    records, steer = verify_ranking(model, heads, [1], [TOKEN], held, Zero(), repeats=20, bootstrap=200)
    return held, records[0], steer


def _verifies(record, prefix: str = "") -> bool:
    """prefix "matched_": against other targets as frequent as the concept's."""
    return ((record[f"{prefix}specificity_z_score"] or 0) >= 3 and record[f"{prefix}specificity_percentile"] >= 99
            and record[f"{prefix}specificity_interval"][0] > 0)


def test_verification_finds_the_carrier_and_not_once_it_is_gone(corpus):
    model = make_only_path(varying=True, strength=1.0)
    held, record, steer = _verify(model, corpus, [WRITER, (0, 0)])
    assert held.targets >= 60 and record["concept_targets"] == held.targets and record["layer_matched"]
    assert record["found_drop"] > 1 and _verifies(record) and _verifies(record, "matched_"), record
    assert record["matched_other_targets"] > 0
    assert steer["heads"] == ["1.2"] and steer["concept_mass"] >= steer["clean_concept_mass"] - 1e-6
    weak = make_only_path(varying=True, strength=0.01)  # a faint carrier: its mass is far from saturated
    _, _, steer = _verify(weak, corpus, [WRITER])
    assert steer["mass_change"] > 0.25 and steer["concept_logprob_change"] > 0, steer
    for method in sorted(METHODS):
        plain = _without_writer(make_only_path(varying=True, strength=1.0))
        ranked = score_heads(METHODS[method], Lens.from_model(plain, "logit"), Concept(["m"], [TOKEN]),
                             _data(corpus), tokens=256, sets=8).ranked()
        _, record, _ = _verify(plain, corpus, ranked)
        assert not _verifies(record) and not _verifies(record, "matched_"), (method, record)


def test_random_token_sets_match_the_concepts_frequencies():
    counts = torch.tensor([0, 0, 1, 1, 5, 6, 4, 100, 120, 90, 0, 0])
    sets = control_sets([4, 8], counts, sets=30, seed=1)
    assert len(sets) == 30 and all(len(s) == 2 for s in sets)
    assert {s[0] for s in sets} <= {5, 6} and {s[1] for s in sets} <= {7, 9}  # same power-of-two bin, not the concept


def test_pursuit_explains_what_lies_in_the_atoms_span():
    """One signal set living in the span of atoms 0 and 2: two steps select exactly them and explain it all."""
    atoms = torch.eye(4, dtype=torch.float64)[:3] + 0.1 * torch.randn(3, 4, dtype=torch.float64)
    atoms = atoms / atoms.norm(dim=-1, keepdim=True)
    signals = torch.randn(50, 2, dtype=torch.float64) @ atoms[[0, 2]]  # (signal, d)
    C = signals.T @ signals / 50
    explained, share = pursue((atoms @ C @ atoms.T)[None], atoms @ atoms.T, steps=2)
    torch.testing.assert_close(explained[0], torch.trace(C))
    assert set(share[0].nonzero().flatten().tolist()) == {0, 2}
