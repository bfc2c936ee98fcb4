"""Verification measured by replay (replay_edits) equals one full forward pass per intervention
(concept_metrics.effect): for every architecture and intervention, for found heads, random draws, k sweeps and steering; its cost counts."""

import random

import pytest
import torch

from attention_lens.concept_metrics import Metrics, compare, effect, measure, target_sums
from attention_lens.intervene import Amplify, HeadIntervention, HeadMeans, Mean, Resample, Scale, Zero
from attention_lens.replay_edits import Edit, cost, measure_edits
from attention_lens.verify import HeldWindows, frequency_matched_weights, plan_sweep, random_heads, verify_ranking
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
             Edit(((0, 1),), Scale(5.0)), Edit(((last, 2), (0, 3)), Mean()), Edit(((last, 1),), Resample()),
             Edit(((0, 2), (last, 3)), Amplify(4.0))]
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


@pytest.mark.parametrize("mode, steer_mode", [(Zero(), "scale"), (Mean(), "amplify")])
def test_sweep_equals_the_full_forward_verification(mode, steer_mode):
    """The records `verify_ranking` reports are those of one full forward pass per draw, k and steering."""
    model = make_tiny_model("qwen2")
    windows = _windows(6)
    held = HeldWindows(windows=windows, drawn=9, targets=6)
    ranked = [(1, 2), (0, 1), (1, 0), (0, 3)]
    records, steered = verify_ranking(model, ranked, [1, 3], CONCEPT, held, mode, repeats=4, seed=3, bootstrap=50,
                                      steer_mode=steer_mode)
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
        steering = Scale(5.0) if steer_mode == "scale" else Amplify(5.0)
        amplified = effect(model, ranked[:k], steering, windows, CONCEPT, clean, recorder.means)
        assert record["steer"]["heads"] == record["heads"] and record["steer"]["edit"] == f"{steer_mode}=5"
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


def test_frequency_matched_weights_give_other_targets_the_concept_targets_frequencies():
    counts = torch.zeros(12, dtype=torch.long)
    counts[[1, 2, 3]] = 10  # bin 3: the concept token 1 and the other tokens 2, 3
    counts[[4, 5]] = 100  # bin 6: other tokens only
    counts[6] = 1000  # bin 9: the concept token 6, and no other token as frequent
    windows = torch.tensor([[0, 1, 2, 4, 4, 6], [0, 3, 5, 1, 2, 4]])  # targets: 1 2 4 4 6 | 3 5 1 2 4
    weights = frequency_matched_weights([1, 6], counts, windows)
    # bin 3: 2 concept targets, 3 other (2, 3, 2) -> 2/3 each; bin 6 has no concept target; bin 9 no other target.
    assert weights[2].item() == weights[3].item() == pytest.approx(2 / 3)
    assert weights[4].item() == weights[5].item() == 0.0
    assert weights[1].item() == weights[6].item() == 0.0  # concept tokens are never other targets
    targets = windows[:, 1:].flatten()
    assert weights[targets].sum().item() == pytest.approx(2.0)  # as many as the concept targets in matched bins


def test_matched_specificity_ignores_damage_shared_by_tokens_as_rare_as_the_concept():
    """A head that lowers every rare token alike is not specific to a rare concept: the plain specific drop
    (against all other targets, mostly common) says it is, the frequency-matched one says 0."""
    counts = torch.tensor([5000, 8, 8, 8, 5000, 5000])  # tokens 1-3 rare, 0, 4, 5 common
    targets = torch.tensor([[1, 2, 0, 4, 3, 5, 0, 2], [3, 0, 4, 1, 5, 0, 2, 4]])
    windows = torch.cat([torch.zeros(2, 1, dtype=torch.long), targets], 1)
    concept = torch.tensor([1])
    weights = frequency_matched_weights([1], counts, windows)
    clean_log_p = torch.full(targets.shape, -2.0, dtype=torch.float64)
    damaged_log_p = torch.where(counts[targets] < 100, clean_log_p - 1.0, clean_log_p)  # every rare token -1 nat
    clean, damaged = (Metrics.from_sums(target_sums(log_p, targets, concept, weights), 0.0)
                      for log_p in (clean_log_p, damaged_log_p))
    result = compare([(0, 0)], damaged, clean)
    assert result.concept_drop == pytest.approx(1.0)
    assert result.specific_drop > 0.5
    assert result.matched_drop == pytest.approx(1.0) and result.matched_specific_drop == pytest.approx(0.0)


def test_replayed_frequency_matched_sums_equal_the_full_forward():
    model = make_tiny_model("gemma3_text")
    windows = _windows(6)
    weights = frequency_matched_weights(CONCEPT, torch.arange(model.vocab) % 40, windows)
    assert weights.sum() > 0
    edits = [Edit(((1, 2),), Zero()), Edit(((0, 1), (1, 0)), Scale(-1.0))]
    clean, measured = measure_edits(model, windows, CONCEPT, edits, batch_size=4, other_weights=weights)
    reference_clean = measure(model, windows, CONCEPT, other_weights=weights)
    assert clean.per_window.shape == (6, 6) and clean.matched_logprob is not None
    _assert_same(clean, reference_clean)
    log_p = torch.log_softmax(model.hf(input_ids=windows).logits[:, :-1].double(), -1)
    target_log_p = log_p.gather(-1, windows[:, 1:, None])[..., 0]
    weight = weights[windows[:, 1:]] * ~torch.isin(windows[:, 1:], torch.tensor(CONCEPT))
    assert clean.matched_logprob == pytest.approx(float((target_log_p * weight).sum() / weight.sum()), abs=2e-5)
    for edit, ours in zip(edits, measured):
        with HeadIntervention(model, list(edit.heads), edit.intervention.prepared(model, list(edit.heads), windows, None)):
            reference = measure(model, windows, CONCEPT, other_weights=weights)
        _assert_same(ours, reference)
        assert ours.matched_logprob == pytest.approx(reference.matched_logprob, abs=2e-5)


def test_sweep_reports_the_frequency_matched_specificity():
    model = make_tiny_model("llama")
    windows = _windows(6)
    weights = frequency_matched_weights(CONCEPT, torch.arange(model.vocab) % 40, windows)
    held = HeldWindows(windows=windows, drawn=6, targets=6, other_weights=weights)
    ranked = [(1, 2), (0, 1), (1, 0)]
    (record,), _ = verify_ranking(model, ranked, [2], CONCEPT, held, Zero(), repeats=3, seed=1, bootstrap=40,
                                  alpha=None)
    clean = measure(model, windows, CONCEPT, other_weights=weights)
    with HeadIntervention(model, ranked[:2], Zero().prepared(model, ranked[:2], windows, None)):
        found = compare(ranked[:2], measure(model, windows, CONCEPT, other_weights=weights), clean)
    assert record["matched_specificity"] == pytest.approx(found.matched_specific_drop, abs=1e-5)
    assert record["matched_other_drop"] == pytest.approx(found.matched_drop, abs=1e-5)
    low, high = record["matched_specificity_interval"]
    assert low <= high and record["matched_specificity_percentile"] is not None
    assert record["matched_other_targets"] == int((weights[windows[:, 1:]] > 0).sum())
    unweighted = HeldWindows(windows=windows, drawn=6, targets=6)
    (plain,), _ = verify_ranking(model, ranked, [2], CONCEPT, unweighted, Zero(), repeats=3, seed=1, bootstrap=40,
                                 alpha=None)
    assert "matched_specificity" not in plain and plain["specificity"] == pytest.approx(record["specificity"])
