"""Verification measured by replay (replay_edits) equals one full forward pass per intervention (intervene.effect):
for every architecture and intervention, for found heads, random draws, k sweeps and steering; its cost counts."""

import random

import pytest
import torch

from attention_lens.intervene import HeadMeans, Mean, Resample, Scale, Zero, effect, measure
from attention_lens.replay_edits import Edit, cost, measure_edits
from attention_lens.verify import plan_sweep, random_heads, sweep, verify_ranking, HeldWindows
from conftest import TINY_ARCHITECTURES, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CONCEPT = [5, 17, 33]


def _windows(count: int = 5, length: int = 10, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    windows = torch.randint(2, 90, (count, length), generator=generator)
    windows[:, 3] = torch.tensor(CONCEPT)[torch.arange(count) % 3]  # concept targets in every window
    windows[1, 7] = 1  # an end-of-text token inside a window
    return windows


def _full_forward(model, windows, edit, means=None):
    """The reference: one full forward pass of the model with the intervention hooked in."""
    clean = measure(model, windows, CONCEPT, batch_size=2)
    return effect(model, list(edit.heads), edit.intervention, windows, CONCEPT, clean, means).metrics


def _assert_same(ours, reference):
    torch.testing.assert_close(ours.per_window, reference.per_window, atol=2e-4, rtol=1e-5)
    assert ours.concept_targets == reference.concept_targets and ours.other_targets == reference.other_targets
    for key in ("concept_logprob", "other_logprob", "concept_mass", "loss"):
        assert getattr(ours, key) == pytest.approx(getattr(reference, key), abs=2e-5, rel=1e-5), key


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
def test_replayed_interventions_equal_one_full_forward_each(model_type):
    model = make_tiny_model(model_type)
    windows = _windows()
    last = model.n_layers - 1
    edits = [Edit(((last, 1),), Zero()), Edit(((0, 2), (last, 0)), Zero()), Edit(((last, 3), (last, 0)), Scale(-1.0)),
             Edit(((0, 1),), Scale(5.0)), Edit(((last, 2), (0, 3)), Mean()), Edit(((last, 1),), Resample())]
    # A tiny replay budget: each replay holds one or two interventions, batches of two windows.
    clean, measured = measure_edits(model, windows, CONCEPT, edits, batch_size=2, max_tokens=2 * 2 * 10)
    _assert_same(clean, measure(model, windows, CONCEPT))
    with HeadMeans(model) as recorder:
        measure(model, windows, CONCEPT)
    for edit, ours in zip(edits, measured):
        reference = _full_forward(model, windows, edit, recorder.means)
        assert (reference.per_window - clean.per_window).abs().max() > 1e-5, edit  # the edit changes the output
        _assert_same(ours, reference)


def test_replay_budget_does_not_change_the_numbers():
    model = make_tiny_model("llama")
    windows = _windows(7)
    edits = [Edit(((1, head),), Zero()) for head in range(4)] + [Edit(((0, 0), (1, 1)), Zero())]
    _, wide = measure_edits(model, windows, CONCEPT, edits, batch_size=3)
    _, narrow = measure_edits(model, windows, CONCEPT, edits, batch_size=3, max_tokens=1)
    for a, b in zip(wide, narrow):
        torch.testing.assert_close(a.per_window, b.per_window, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("mode", [Zero(), Mean()])
def test_sweep_equals_the_full_forward_verification(mode):
    """The records `verify_ranking` reports are those of one full forward pass per draw, k and steering."""
    model = make_tiny_model("qwen2")
    windows = _windows(6)
    held = HeldWindows(windows=windows, drawn=9, targets=6)
    ranked = [(1, 2), (0, 1), (1, 0), (0, 3)]
    records, steered = verify_ranking(model, ranked, [1, 3], CONCEPT, held, mode, repeats=4, seed=3, bootstrap=50)
    with HeadMeans(model) as recorder:
        clean = measure(model, windows, CONCEPT)
    for k, record in zip([1, 3], records):
        found = effect(model, ranked[:k], mode, windows, CONCEPT, clean, recorder.means)
        rng = random.Random(3)
        drops = [effect(model, random_heads(model, ranked[:k], rng), mode, windows, CONCEPT, clean,
                        recorder.means).concept_drop for _ in range(4)]
        assert record["k"] == k and record["repeats"] == 4 and record["windows"] == 6
        assert record["found_drop"] == pytest.approx(found.concept_drop, abs=1e-5)
        assert record["specificity"] == pytest.approx(found.specific_drop, abs=1e-5)
        assert record["collateral_loss_change"] == pytest.approx(found.loss_change, abs=1e-5)
        assert record["random_drop_mean"] == pytest.approx(sum(drops) / 4, abs=1e-5)
        assert record["clean_loss"] == pytest.approx(clean.loss, abs=1e-6)
        amplified = effect(model, ranked[:k], Scale(5.0), windows, CONCEPT, clean)
        assert record["steer"]["heads"] == record["heads"]
        assert record["steer"]["mass_change"] == pytest.approx(amplified.mass_change, abs=1e-5)
        assert record["steer"]["loss_change"] == pytest.approx(amplified.loss_change, abs=1e-5)
    assert steered == records[-1]["steer"] and steered["heads"] == ["1.2", "0.1", "1.0"]


def test_cost_counts_replayed_blocks():
    model = make_tiny_model("llama")
    ranked = [(1, 2), (1, 0), (0, 1)]
    late = plan_sweep(model, ranked, [1, 2], Zero(), repeats=5, alpha=5.0)
    assert len(late.edits) == 2 * (6 + 1) and all(edit.first_layer == 1 for edit in late.edits)
    per_replay = (late.cost(model) - 1) / len(late.edits)
    assert 0 < per_replay < 1  # a replay of the last block and the unembedding: less than a full pass
    early = plan_sweep(model, ranked, [3], Zero(), repeats=5)
    assert early.cost(model) == pytest.approx(1 + 6)  # from block 0: one full pass each, plus the clean one
    assert cost(model, [Edit(((0, 0),), Mean())]) == pytest.approx(3)  # the means need a pass of their own
