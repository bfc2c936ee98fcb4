"""Head effects: the batched replay against one full forward pass per head for every architecture; the report's
numbers against a direct computation; the head that is the only path for a token; determinism; the CLI."""

import json

import pytest
import torch

from attention_lens import AttentionLensError, DataConfig
from attention_lens.effects import Ablation, EffectsConfig, head_effects, measured_batches
from attention_lens.intervene import HeadIntervention, HeadMeans, Mean, Zero
from conftest import TINY_ARCHITECTURES, make_corpus, make_model_dir, make_tiny_model, run_cli
from test_concepts import TOKEN, WRITER, make_only_path

pytestmark = pytest.mark.usefixtures("one_thread")


def _log_probs(model, input_ids):
    with torch.no_grad():
        return torch.log_softmax(model.hf(input_ids=input_ids, use_cache=False).logits.float(), -1).flatten(0, 1)


def _means(model):
    with HeadMeans(model) as recorder, torch.no_grad():
        model.hf(input_ids=torch.randint(2, 90, (4, 9)), use_cache=False)
    return recorder.means


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
def test_replay_equals_one_full_forward_per_head(model_type):
    model = make_tiny_model(model_type)
    input_ids = torch.randint(2, 90, (3, 9))
    means = _means(model)
    measured = Ablation(model, range(model.n_layers), "mean", means, torch.float32).measure(input_ids)
    torch.testing.assert_close(measured.clean_log_probs(model), _log_probs(model, input_ids), atol=1e-5, rtol=0)
    for layer in range(model.n_layers):
        ours = measured.ablated_log_probs(model, layer, slice(None), torch.float32)  # (head, tokens, vocab)
        for head in range(model.n_heads):
            with HeadIntervention(model, [(layer, head)], Mean(means=means)):
                naive = _log_probs(model, input_ids)
            effect = (naive - measured.clean_log_probs(model)).abs().max().item()
            assert effect > 1e-5  # the edit changes the output, and the replay reproduces that change
            torch.testing.assert_close(ours[head], naive, atol=1e-6 + 1e-3 * effect, rtol=0)


def test_zero_and_resample_modes_equal_their_direct_edits():
    model = make_tiny_model("llama")
    input_ids, source = torch.randint(2, 90, (2, 8)), torch.randint(2, 90, (2, 8))
    layer, head = 1, 3
    zero = Ablation(model, [layer], "zero", dtype=torch.float32).measure(input_ids)
    with HeadIntervention(model, [(layer, head)], Zero()):
        naive = _log_probs(model, input_ids)
    torch.testing.assert_close(zero.ablated_log_probs(model, layer, slice(None), torch.float32)[head], naive,
                               atol=1e-5, rtol=0)
    resampled = Ablation(model, [layer], "resample", dtype=torch.float32).measure(input_ids, source)
    kept = {}
    hook = model.out_proj(layer).register_forward_pre_hook(
        lambda module, args: kept.update(z=args[0].unflatten(-1, (model.n_heads, model.d_head))))
    _log_probs(model, source)
    hook.remove()

    def put_source(module, args):
        z = args[0].unflatten(-1, (model.n_heads, model.d_head)).clone()
        z[..., head, :] = kept["z"][..., head, :]
        return (z.flatten(-2),)

    hook = model.out_proj(layer).register_forward_pre_hook(put_source)
    naive = _log_probs(model, input_ids)
    hook.remove()
    torch.testing.assert_close(resampled.ablated_log_probs(model, layer, slice(None), torch.float32)[head], naive,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(resampled.layers[layer].z_ablated[:, head], kept["z"].flatten(0, 1)[:, head])


def test_bf16_change_stays_close_to_fp32():
    model = make_tiny_model("qwen2")
    input_ids = torch.randint(2, 90, (2, 9))
    means = _means(model)
    exact = Ablation(model, [0], "mean", means, torch.float32).measure(input_ids)
    rounded = Ablation(model, [0], "mean", means, torch.bfloat16).measure(input_ids)
    p = exact.clean_log_probs(model).exp()
    kl = [(p * (exact.clean_log_probs(model) - m.ablated_log_probs(model, 0, slice(None), d))).sum(-1)
          for m, d in ((exact, torch.float32), (rounded, torch.bfloat16))]
    torch.testing.assert_close(kl[1], kl[0], rtol=0.02, atol=1e-4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("effects") / "corpus")


def _data(corpus):
    return DataConfig(data=str(corpus), seq_len=12, holdout=0.25)


def test_report_numbers_equal_a_direct_computation(corpus):
    model = make_tiny_model("llama")
    config = EffectsConfig(tokens=48, batch_size=2, mean_tokens=48, dtype="float32", bootstrap=50, top=3,
                           block_rows=10)  # tiles of one head x 10 rows, the last ones short
    result = head_effects(model, _data(corpus), config)
    kl = torch.zeros(model.n_layers, model.n_heads)
    change = torch.zeros(model.n_layers, model.n_heads, model.vocab)
    count = 0
    for batch in measured_batches(model, _data(corpus), range(model.n_layers), config):
        log_p = batch.clean_log_probs(model)
        keep = batch.scored
        count += int(keep.sum())
        for layer in range(model.n_layers):
            diff = log_p - batch.ablated_log_probs(model, layer, slice(None), torch.float32)  # (head, tokens, vocab)
            kl[layer] += (log_p.exp() * diff).sum(-1)[:, keep].sum(-1)
            change[layer] += diff[:, keep].sum(1)
    assert result.summary["tokens"] == count == 48 - 4  # 4 windows of 12, each one's first position a sink
    for record in result.heads:
        layer, head = record["layer"], record["head"]
        assert record["effect_kl"] == pytest.approx(float(kl[layer, head] / count), rel=1e-4, abs=1e-6)
        assert record["effect_kl_low"] <= record["effect_kl"] <= record["effect_kl_high"]
        mean_change = change[layer, head] / count
        assert [e["id"] for e in record["raises"]] == mean_change.topk(3).indices.tolist()
        assert [e["id"] for e in record["lowers"]] == (-mean_change).topk(3).indices.tolist()
        assert record["raises"][0]["change"] == pytest.approx(float(mean_change.max()), abs=1e-4)
    torch.testing.assert_close(result.token_change([5, 9]), (change[..., [5, 9]] / count).mean(-1),
                               atol=1e-5, rtol=1e-4)


def test_the_only_path_for_a_token_is_the_largest_effect_and_raises_it(corpus):
    model = make_only_path()
    result = head_effects(model, _data(corpus), EffectsConfig(tokens=48, batch_size=2, mode="zero", bootstrap=20))
    ranked = sorted(result.heads, key=lambda h: -h["effect_kl"])
    assert (ranked[0]["layer"], ranked[0]["head"]) == WRITER
    assert ranked[0]["raises"][0]["id"] == TOKEN and ranked[0]["raises"][0]["change"] > 3
    assert ranked[0]["effect_kl_low"] > 10 * ranked[1]["effect_kl"]


def test_deterministic_under_seed_and_mode_changes_the_numbers(corpus):
    model = make_tiny_model("gpt2")
    config = EffectsConfig(tokens=48, batch_size=2, mean_tokens=24, bootstrap=30, seed=3, mode="resample")
    first = head_effects(model, _data(corpus), config).to_json()
    assert first == head_effects(model, _data(corpus), config).to_json()
    other = head_effects(model, _data(corpus), EffectsConfig(tokens=48, batch_size=2, bootstrap=30, seed=3)).to_json()
    assert other["mode"] == "mean" and other["heads"] != first["heads"]


@pytest.mark.parametrize("change, message", [(dict(mode="half"), "mode"), (dict(dtype="int8"), "dtype"),
                                             (dict(bootstrap=1), "replicates")])
def test_bad_settings_are_refused(corpus, change, message):
    with pytest.raises(AttentionLensError, match=message):
        next(measured_batches(make_tiny_model("llama"), _data(corpus), [0], EffectsConfig(**change)))


def test_cli_effects(tmp_path, corpus, capsys):
    model_dir = make_model_dir(tmp_path / "model")
    out = tmp_path / "effects.json"
    code, stdout, stderr = run_cli(["effects", "--model", model_dir, "--data", corpus, "--tokens", 32, "--seq-len",
                                    16, "--batch-size", 2, "--mean-tokens", 32, "--bootstrap", 20, "--layers", "1",
                                    "--json", "--out", out], capsys)
    assert code == 0, stderr
    document = json.loads(stdout)
    assert json.loads(out.read_text()) == document
    assert {"summary", "heads"} <= set(document)
    assert len(document["heads"]) == 4 and {h["layer"] for h in document["heads"]} == {1}
    head = document["heads"][0]
    assert {"layer", "head", "effect_kl", "effect_kl_low", "effect_kl_high", "lowers", "raises"} <= set(head)
    assert set(head["lowers"][0]) == {"token", "id", "change"}
    code, stdout, _ = run_cli(["effects", "--model", model_dir, "--data", corpus, "--tokens", 32, "--seq-len", 16,
                               "--mean-tokens", 32, "--bootstrap", 20, "--layers", "0"], capsys)
    assert code == 0 and "L0.H" in stdout
    code, stdout, stderr = run_cli(["effects", "--model", model_dir, "--data", corpus, "--mode", "half"], capsys)
    assert code == 2 and stdout == "" and stderr.startswith("error:") and len(stderr.strip().splitlines()) == 1
