"""Interventions: exact no-ops and exact zeroing for every architecture; ablating the only path for a token
removes its probability mass and random heads do not; ablate / generate end to end."""

import json

import pytest
import torch

from attention_lens import AttentionLensError
from attention_lens.heads import HeadCapture
from attention_lens.concept_metrics import effect, measure
from attention_lens.intervene import (INTERVENTIONS, Amplify, HeadIntervention, HeadMeans, Intervention, Mean,
                                      Resample, Scale, Zero, generate, parse_heads)
from attention_lens.verify import ablate
from conftest import make_corpus, make_model_dir, make_tiny_model, run_cli
from test_concepts import TOKEN, WRITER, make_only_path


def _logits(model, input_ids):
    with torch.no_grad():
        return model.hf(input_ids=input_ids, use_cache=False).logits


def test_scale_one_leaves_logits_unchanged_exactly(tiny_model):
    input_ids = torch.randint(2, 90, (2, 7))
    every_head = [(layer, head) for layer in range(tiny_model.n_layers) for head in range(tiny_model.n_heads)]
    with HeadIntervention(tiny_model, every_head, Scale(1.0)):
        edited = _logits(tiny_model, input_ids)
    assert torch.equal(edited, _logits(tiny_model, input_ids))


def test_zero_ablation_equals_zeroing_the_heads_W_O_slice(tiny_model):
    model, (layer, head) = tiny_model, (1, 2)
    input_ids = torch.randint(2, 90, (2, 7))
    with HeadIntervention(model, [(layer, head)], Zero()):
        ablated = _logits(model, input_ids)
    weight = model.out_proj(layer).weight
    columns = slice(head * model.d_head, (head + 1) * model.d_head)
    with torch.no_grad():
        if model.spec.out_proj_is_conv1d:  # GPT-2's Conv1D: (in, out), the head is a row slice
            weight[columns] = 0
        else:
            weight[:, columns] = 0
    torch.testing.assert_close(ablated, _logits(model, input_ids), atol=1e-6, rtol=0)
    assert not torch.equal(ablated, _logits(make_tiny_model(model.model_type), input_ids))


def test_mean_ablation_writes_the_mean_where_the_lens_reads():
    model = make_tiny_model("llama")
    windows = torch.randint(2, 90, (3, 9))
    with HeadMeans(model) as recorder:
        _logits(model, windows)
    edit = Mean().prepared(model, [(0, 1)], windows, recorder.means)
    with HeadIntervention(model, [(0, 1)], edit), HeadCapture(model, [0]) as capture:
        _logits(model, torch.randint(2, 90, (1, 5)))
    z = capture.heads[0].z[0, :, 1]  # (pos, d_head)
    torch.testing.assert_close(z, recorder.means[0, 1].expand_as(z))
    with pytest.raises(AttentionLensError, match="mean"):
        Mean().prepared(model, [(0, 1)], windows, None)


def test_resample_writes_what_the_head_wrote_on_the_next_window():
    model, pair = make_tiny_model("llama"), (1, 2)
    windows = torch.randint(2, 90, (3, 9))
    with HeadCapture(model, [1]) as capture:
        _logits(model, windows)
    clean = capture.heads[1].z[:, :, 2]  # (window, pos, d_head)
    edit = Resample().prepared(model, [pair], windows, None, batch_size=2)
    seen = []
    with HeadIntervention(model, [pair], edit):
        for start in (0, 2):  # the intervention counts windows across forward passes
            with HeadCapture(model, [1]) as capture:
                _logits(model, windows[start:start + 2])
            seen.append(capture.heads[1].z[:, :, 2])
    torch.testing.assert_close(torch.cat(seen), clean.roll(-1, dims=0))
    with pytest.raises(AttentionLensError, match="two"):
        Resample().prepared(model, [pair], windows[:1], None)


def test_scale_minus_one_inverts_the_heads_output(tiny_model):
    model, pair = tiny_model, (0, 1)
    input_ids = torch.randint(2, 90, (1, 6))
    with HeadCapture(model, [0]) as capture:
        _logits(model, input_ids)
    with HeadIntervention(model, [pair], Scale(-1.0)), HeadCapture(model, [0]) as inverted:
        _logits(model, input_ids)
    if model.post_attn_norm(0) is None:  # under a post-norm the shared scale changes too
        torch.testing.assert_close(inverted.heads[0].z[:, :, 1], -capture.heads[0].z[:, :, 1])
        torch.testing.assert_close(inverted.heads[0].z[:, :, 0], capture.heads[0].z[:, :, 0])


def test_ablating_the_only_path_removes_the_tokens_mass_and_random_heads_do_not():
    model = make_only_path()
    windows = torch.randint(2, 90, (4, 12))
    windows[windows == TOKEN] = TOKEN + 1
    windows[:, 5] = TOKEN  # a true next token once per window
    result = ablate(model, [WRITER], [TOKEN], windows, Zero(), repeats=5)
    assert result.clean.concept_mass > 0.9 and result.clean.concept_targets == 4
    assert result.found.metrics.concept_mass < 0.05 and result.found.mass_change < -0.9
    assert result.found.concept_drop > 3 and result.found.specific_drop > 3
    assert len(result.random) == 5
    for effect in result.random:
        assert WRITER not in effect.heads and abs(effect.mass_change) < 0.05
        assert abs(effect.concept_drop) < 0.01
    record = result.verify_record()
    assert record["specificity"] > 3 and record["random_drop_std"] < 0.01
    assert record["z_score"] is None or record["z_score"] > 100  # None: random heads change nothing at all


def test_steering_with_scale_above_one_raises_the_tokens_mass():
    model = make_only_path(strength=0.01)
    windows = torch.randint(2, 90, (2, 10))
    masses = []
    for factor in (0.0, 1.0, 3.0):
        with HeadIntervention(model, [WRITER], Scale(factor)):
            masses.append(measure(model, windows, [TOKEN]).concept_mass)
    assert masses[0] + 0.05 < masses[1] < masses[2] - 0.05, masses


def test_amplify_moves_the_head_away_from_its_mean():
    """amplify=0 is mean ablation, amplify=1 the unmodified model, amplify=a writes mean + a (z - mean): the head's
    captured z_h under amplify=3 is exactly that."""
    model = make_tiny_model("llama")
    windows = torch.randint(2, 90, (3, 10), generator=torch.Generator().manual_seed(1))
    heads = [(0, 1), (1, 2)]
    with HeadMeans(model) as recorder:
        clean = measure(model, windows, [5, 6])
    means = recorder.means
    as_mean = effect(model, heads, Mean(), windows, [5, 6], clean, means).metrics
    at_zero = effect(model, heads, Amplify(0.0), windows, [5, 6], clean, means).metrics
    at_one = effect(model, heads, Amplify(1.0), windows, [5, 6], clean, means).metrics
    torch.testing.assert_close(at_zero.per_window, as_mean.per_window)
    torch.testing.assert_close(at_one.per_window, clean.per_window, atol=1e-5, rtol=1e-5)
    assert (as_mean.per_window - clean.per_window).abs().max() > 1e-4  # the heads matter
    with HeadCapture(model, [0]) as plain, torch.no_grad():
        model.hf(input_ids=windows)
    amplified = Amplify(3.0).prepared(model, heads, windows, means)
    with HeadIntervention(model, heads, amplified), HeadCapture(model, [0]) as captured, torch.no_grad():
        model.hf(input_ids=windows)
    expected = means[0, 1] + 3.0 * (plain.heads[0].z[:, :, 1] - means[0, 1])
    torch.testing.assert_close(captured.heads[0].z[:, :, 1], expected, atol=1e-5, rtol=1e-5)


def test_generation_with_and_without_the_head():
    model = make_only_path()
    plain, edited = generate(model, "abc", [WRITER], Zero(), max_new_tokens=4)
    assert plain == model.tokenizer.decode([TOKEN] * 4) and plain != edited


@pytest.mark.parametrize("text, message", [("12", "LAYER.HEAD"), ("1.9", "out of range"), ("a.b", "LAYER.HEAD")])
def test_bad_heads_are_refused(text, message):
    with pytest.raises(AttentionLensError, match=message):
        parse_heads(text, make_tiny_model("llama"))


def test_modes_parse():
    assert Intervention.parse("scale=-1") == Scale(-1.0) and str(Intervention.parse("zero")) == "zero"
    assert str(Intervention.parse(" scale = 5 ")) == "scale=5" and isinstance(Intervention.parse("resample"), Resample)
    assert set(INTERVENTIONS) == {"zero", "mean", "resample", "scale", "amplify"}
    assert Intervention.parse("amplify=5") == Amplify(5.0) and str(Intervention.parse("amplify = 2")) == "amplify=2"
    for text, message in [("scale=big", "scale=-1"), ("zero=1", "no value"), ("flip", "resample"),
                          ("scale=inf", "finite"), ("amplify=x", "amplify=5"), ("amplify=1e9", "finite")]:
        with pytest.raises(AttentionLensError, match=message):
            Intervention.parse(text)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("intervene")
    return make_model_dir(root / "model"), make_corpus(root / "corpus")


def test_cli_ablate(paths, capsys):
    model, corpus = paths
    base = ["ablate", "--model", str(model), "--heads", "1.0,0.3", "--concept", "fox, dog", "--data", str(corpus),
            "--tokens", "64", "--seq-len", "16"]
    base += ["--min-targets", "5"]
    code, stdout, _ = run_cli(base + ["--mode", "mean", "--baseline", "random", "--repeats", "3", "--json"], capsys)
    assert code == 0
    document = json.loads(stdout)
    assert document["found"]["heads"] == ["1.0", "0.3"] and len(document["random"]) == 3
    assert document["verify"]["repeats"] == 3 and document["mode"] == "mean"
    assert document["k_sweep"] == [document["verify"]]
    code, stdout, _ = run_cli(base + ["--mode", "amplify=3", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["mode"] == "amplify=3"
    code, stdout, _ = run_cli(base + ["--baseline", "random", "--repeats", "3", "--k", "2,1", "--json"], capsys)
    assert code == 0
    document = json.loads(stdout)
    assert [record["k"] for record in document["k_sweep"]] == [1, 2] and document["k_sweep"][-1] == document["verify"]
    assert [record["heads"] for record in document["k_sweep"]] == [["1.0"], ["1.0", "0.3"]]
    assert document["found"]["heads"] == ["1.0", "0.3"] and document["k_sweep"][0]["repeats"] == 3
    code, stdout, _ = run_cli(base + ["--baseline", "random", "--repeats", "3", "--k", "1,2"], capsys)
    assert code == 0 and "top k heads" in stdout and "frequency-matched" in stdout
    code, stdout, err = run_cli(base + ["--k", "3"], capsys)
    assert code == 2 and stdout == "" and "more heads than the 2 given with --heads" in err
    code, stdout, err = run_cli(base + ["--tokens", "1000000"], capsys)  # targets enough, tokens not
    assert code == 2 and stdout == "" and "--tokens asks for 1000000" in err and len(err.strip().splitlines()) == 1
    code, stdout, _ = run_cli(base + ["--mode", "resample", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["mode"] == "resample" and "verify" not in json.loads(stdout)
    code, stdout, _ = run_cli(base + ["--scale", "2"], capsys)
    assert code == 0 and "scale=2" in stdout
    code, _, err = run_cli(base[:4] + ["9.9"] + base[5:], capsys)
    assert code == 2 and "out of range" in err and len(err.strip().splitlines()) == 1


def test_cli_generate(paths, capsys):
    model, _ = paths
    code, stdout, _ = run_cli(["generate", "--model", str(model), "--heads", "1.1", "--scale", "5",
                           "--max-new-tokens", "3", "--json", "The quick"], capsys)
    assert code == 0
    document = json.loads(stdout)
    assert {"prompt", "plain", "intervened", "heads", "mode"} <= set(document)
