"""Effect fidelity on hand-built models: a head that writes token 17 directly is explained by dla; a head that
reaches the logits only through a later head is not, and the effect lens recovers it; every score against a
direct computation; eval --effects end to end."""

import json

import pytest
import torch

from attention_lens import DataConfig, Lens
from attention_lens.effect_eval import EffectEvalConfig, effect_fidelity
from attention_lens.effect_fit import fit_effect_lens_kl
from attention_lens.effect_lens import effect_kl_step, fit_effect_lens, train_effect_lens
from attention_lens.effects import EffectsConfig, measured_batches
from attention_lens.kinds import kind_names
from conftest import make_corpus, make_model_dir, make_tiny_model, run_cli
from test_concepts import TOKEN, WRITER, make_only_path

pytestmark = pytest.mark.usefixtures("one_thread")
RELAY, READER = (0, 1), (1, 2)


def make_relay(strength: float = 0.02, gain: float = 0.3):
    """A tiny Qwen2 in which head RELAY (layer 0) reaches the logits only through head READER (layer 1).

    Residual dimensions 0 and 1 are read and written by nothing but: RELAY writes dimension 1 alone (its z_h is its
    value bias, whatever it attends to); READER's value reads dimension 1 alone and it writes dimension 0; only
    W_U[TOKEN] reads dimension 0, and no row of W_U reads dimension 1. So RELAY's direct effect is exactly zero
    and its whole effect on the output goes through READER.
    """
    model = make_tiny_model("qwen2", randomize_norms=False)
    hf, d_head = model.hf, model.d_head
    per_group = model.n_heads // model.config.num_key_value_heads
    with torch.no_grad():
        hf.model.embed_tokens.weight[:, :2] = 0
        for block in hf.model.layers:
            attention, mlp = block.self_attn, block.mlp
            attention.o_proj.weight[:2] = 0
            mlp.down_proj.weight[:2] = 0
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj):
                projection.weight[:, :2] = 0
        relay = hf.model.layers[RELAY[0]].self_attn
        group = slice(RELAY[1] // per_group * d_head, (RELAY[1] // per_group + 1) * d_head)
        relay.v_proj.weight[group] = 0
        relay.v_proj.bias[group] = 1.0
        relay.o_proj.weight[:, RELAY[1] * d_head:(RELAY[1] + 1) * d_head] = 0
        relay.o_proj.weight[1, RELAY[1] * d_head:(RELAY[1] + 1) * d_head] = strength
        reader = hf.model.layers[READER[0]].self_attn
        group = slice(READER[1] // per_group * d_head, (READER[1] // per_group + 1) * d_head)
        reader.v_proj.weight[group] = 0
        reader.v_proj.weight[group, 1] = 1.0
        reader.v_proj.bias[group] = 0
        reader.o_proj.weight[:, READER[1] * d_head:(READER[1] + 1) * d_head] = 0
        reader.o_proj.weight[0, READER[1] * d_head:(READER[1] + 1) * d_head] = gain
        hf.model.norm.weight.fill_(1.0)
        hf.lm_head.weight[:, :2] = 0
        hf.lm_head.weight[TOKEN, 0] = 3.0
    model._cache.clear()
    return model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("effect_eval") / "corpus")


def _data(corpus):
    return DataConfig(data=str(corpus), seq_len=12, holdout=0.25)


def _config(**change):
    settings = dict(tokens=48, batch_size=2, mode="zero", dtype="float32", bootstrap=40)
    return EffectEvalConfig(effects=EffectsConfig(**{**settings, **change}))


def test_a_head_that_writes_the_token_directly_is_explained_by_dla(corpus):
    model = make_only_path(strength=0.05)
    result = effect_fidelity(Lens.dla(model), _data(corpus), _config())
    record = result.heads[WRITER]
    assert record["effect_kl"] > 0.01
    assert record["recovered"] > 0.9 and record["recovered_low"] > 0.8
    assert record["corr"] > 0.9 and record["top10_agreement"] > 0.3
    assert record["baselines"]["zero"]["recovered"] == 0.0
    assert record["ceiling_recovered"] > 0.9


def test_a_head_that_acts_through_a_later_head_is_not_explained_by_dla_and_the_effect_lens_recovers_it(corpus):
    model = make_relay()
    config = _config()
    result = effect_fidelity(Lens.dla(model), _data(corpus), config)
    relay, reader = result.heads[RELAY], result.heads[READER]
    assert relay["effect_kl"] > 0.01 and reader["effect_kl"] > 0.01
    assert abs(relay["recovered"]) < 1e-4 and abs(relay["corr"]) < 1e-3  # W_U reads nothing it writes
    assert reader["recovered"] > 0.5
    assert relay["ceiling_recovered"] > 0.5  # linearly readable, in hindsight

    # Trained on the training split, from dla (its untrained state), the effect lens recovers the relay head.
    lens = Lens.from_model(model, "effect")
    train_data = DataConfig(data=str(corpus), seq_len=12, holdout=0.0)
    measured = list(measured_batches(model, train_data, lens.config.layers, config.effects))
    before = torch.stack([effect_kl_step(lens, b, 256, torch.float32) for b in measured]).mean(0)
    train_effect_lens(lens, measured, epochs=30, lr=3e-2, block_rows=256, dtype=torch.float32)
    after = torch.stack([effect_kl_step(lens, b, 256, torch.float32) for b in measured]).mean(0)
    assert after[RELAY] < 0.5 * before[RELAY]
    trained = effect_fidelity(lens, _data(corpus), config).heads[RELAY]
    assert trained["recovered"] > 0.5 and trained["beats_dla"]


def test_untrained_effect_lens_is_dla_and_the_fit_recovers_the_relay(corpus):
    model = make_relay()
    config = _config()
    lens = Lens.from_model(model, "effect")
    z = torch.randn(3, model.n_heads, model.d_head)
    scale = torch.rand(3) + 0.5
    for layer in range(model.n_layers):
        torch.testing.assert_close(lens.logits(z, layer, scale), Lens.dla(model).logits(z, layer, scale))
    measured = list(measured_batches(model, DataConfig(data=str(corpus), seq_len=12, holdout=0.0),
                                     lens.config.layers, config.effects))
    assert fit_effect_lens(lens, measured) > 0
    assert effect_fidelity(lens, _data(corpus), config).heads[RELAY]["recovered"] > 0.5
    weighted = Lens.from_model(model, "effect")
    fit_effect_lens_kl(weighted, measured)  # in the KL's metric, on text the eval does not score
    relay = effect_fidelity(weighted, _data(corpus), config).heads[RELAY]
    assert relay["recovered"] > 0.5 and relay["beats_dla"]


@pytest.mark.parametrize("kind", kind_names())
def test_scores_equal_a_direct_computation(corpus, kind):
    model = _loud_model()  # effects far above fp32 rounding, so the ratios are well defined
    config = _config(mode="mean", mean_tokens=24, block_rows=10)  # tiles of one head x 10 rows, the last ones short
    lens = Lens.from_model(model, kind)
    with torch.no_grad():
        for parameter in lens.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    result = effect_fidelity(lens, _data(corpus), config)
    recovered, corr, top = {}, {}, {}
    sums = {key: torch.zeros(model.n_layers, model.n_heads) for key in ("ablated", "explained", "corr", "top")}
    count = 0
    for batch in measured_batches(model, _data(corpus), range(model.n_layers), config.effects):
        keep = batch.scored
        count += int(keep.sum())
        log_p = batch.clean_log_probs(model)[keep]
        for layer in range(model.n_layers):
            effect = batch.layers[layer]
            log_q = batch.ablated_log_probs(model, layer, slice(None), torch.float32)[:, keep]
            scale = batch.final_scale[keep]
            read = lens.logits(effect.z[keep], layer, scale) - lens.logits(effect.z_ablated[keep], layer, scale)
            read = read.detach().transpose(0, 1)
            p = log_p.exp()
            sums["ablated"][layer] += (p * (log_p - log_q)).sum(-1).sum(-1)
            sums["explained"][layer] += (p * (log_p - torch.log_softmax(log_q + read, -1))).sum(-1).sum(-1)
            t = log_p - log_q
            sums["corr"][layer] += torch.stack([torch.corrcoef(torch.stack([r, c]))[0, 1]
                                                for r, c in zip(read.flatten(0, 1), t.flatten(0, 1))]
                                               ).view(model.n_heads, -1).sum(-1)
            overlap = [len(set(r.topk(10).indices.tolist()) & set(c.topk(10).indices.tolist())) / 10
                       for r, c in zip(read.flatten(0, 1), t.flatten(0, 1))]
            sums["top"][layer] += torch.tensor(overlap).view(model.n_heads, -1).sum(-1)
    for (layer, head), record in result.heads.items():
        expected = 1 - sums["explained"][layer, head] / sums["ablated"][layer, head]
        assert record["recovered"] == pytest.approx(float(expected), rel=1e-3, abs=2e-4)
        assert record["corr"] == pytest.approx(float(sums["corr"][layer, head] / count), abs=2e-4)
        assert record["top10_agreement"] == pytest.approx(float(sums["top"][layer, head] / count), abs=1e-4)
        assert record["effect_kl"] == pytest.approx(float(sums["ablated"][layer, head] / count), rel=1e-3)
        assert record["recovered_low"] <= record["recovered"] <= record["recovered_high"]
        if kind in record["baselines"]:  # the same reading, scored twice
            assert record["baselines"][kind]["recovered"] == record["recovered"]


def test_cli_eval_effects(tmp_path, corpus, capsys):
    model_dir = make_model_dir(tmp_path / "model")
    code, stdout, stderr = run_cli(["eval", "--model", model_dir, "--lens", "dla", "--data", corpus, "--tokens", 32,
                                    "--seq-len", 16, "--batch-size", 2, "--bootstrap", 20, "--constant-tokens", 32,
                                    "--effects", "--effect-mode", "zero", "--json"], capsys)
    assert code == 0, stderr
    document = json.loads(stdout)
    for key in ("effect_recovered_median", "effect_recovered_median_top10pct", "frac_beats_dla_effect_top10pct",
                "ceiling_ratio_median_top10pct"):
        assert key in document["summary"]
    effect = document["heads"][0]["effect"]
    assert {"effect_kl", "recovered", "recovered_low", "recovered_high", "corr", "top10_agreement", "baselines",
            "ceiling_recovered"} <= set(effect)
    assert {"dla", "logit", "zero"} <= set(effect["baselines"]) and "recovered" in effect["baselines"]["dla"]


def test_cli_train_effect_objective(tmp_path, corpus, capsys):
    model_dir = make_model_dir(tmp_path / "model")
    out = tmp_path / "effect-lens"
    code, stdout, stderr = run_cli(["train", "--objective", "effect", "--model", model_dir, "--data", corpus,
                                    "--tokens", 96, "--seq-len", 16, "--batch-size", 2, "--epochs", 2, "--lr", 1e-3,
                                    "--out", out, "--json"], capsys)
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["kind"] == "effect" and result["final_loss"] < result["start_loss"]
    lens = Lens.load(out)
    training = lens.config.training
    assert lens.kind == "effect" and training["objective"] == "effect" and training["fit_metric"] == "kl"
    assert training["fit_choice"]["positions"] == training["fit_tokens"] > 0
    assert "held_back_recovered_by_head" not in training["fit_choice"]  # it described the fit, not the trained lens
    held_back = training["held_back"]  # the trained lens's own check, on windows kept out of its fit and training
    assert held_back["every"] == 5 and held_back["windows"] >= 1 and held_back["positions"] > 0
    assert result["held_back"]["positions"] == held_back["positions"]  # said in the command's output too
    assert len(held_back["recovered_by_head"]) == len(result["layers"]) * len(result["heads"])
    from attention_lens.readings import held_back_shares
    assert len(held_back_shares(lens)) == len(held_back["recovered_by_head"])  # decode marks heads by it
    assert float(lens.delta.detach().abs().max()) > 0  # fitted and trained, no longer dla
    code, _, stderr = run_cli(["train", "--objective", "effect", "--kind", "affine", "--model", model_dir, "--data",
                               corpus, "--out", tmp_path / "other"], capsys)
    assert code == 2 and "--kind" in stderr and len(stderr.strip().splitlines()) == 1


def test_the_effect_kind_also_trains_on_the_predictive_objective(corpus):
    """An attribution kind needs the final residual's sigma: the per-head trainer captures it for such kinds."""
    from attention_lens import TrainConfig, train

    model = make_tiny_model("llama")
    lens = Lens.from_model(model, "effect")
    progress = train(lens, DataConfig(data=str(corpus), seq_len=12, holdout=0.25), TrainConfig(tokens=48, batch_size=2))
    assert progress.tokens == 48 and float(lens.delta.detach().abs().max()) > 0


def test_eval_of_an_effect_lens_in_fp32_whole_rows_and_in_tiles(corpus):
    """Its divisor is the final residual's sigma on both of eval's paths."""
    from attention_lens import EvalConfig, evaluate

    model = make_tiny_model("llama")
    lens = Lens.from_model(model, "effect")
    data = DataConfig(data=str(corpus), seq_len=12, holdout=0.25)
    tiled, exact = (evaluate(lens, data, EvalConfig(tokens=24, batch_size=2, bootstrap=5, constant_tokens=24,
                                                    exact=exact)) for exact in (False, True))
    for a, b in zip(tiled.to_json()["heads"], exact.to_json()["heads"]):
        assert a["kl"] == pytest.approx(b["kl"], rel=0.02, abs=1e-3)
        assert b["kl"] == pytest.approx(b["baselines"]["dla"]["kl"], abs=1e-4)  # untrained: it is dla


@pytest.mark.parametrize("arch", ["gpt_neox", "gemma2"])
def test_effect_objective_and_its_gradient_equal_autograd_on_the_normalized_kl(corpus, arch):
    """effect_kl_step never normalizes P_ablated (its KL is log E_P[exp(change + E)] - E_P[change + E]) and pushes
    the vocabulary gradient (q - p) into the factors by hand: both must equal autograd on
    KL(P || log_softmax(log P_ablated + E)), across tiles, with a soft-capped readout (gemma2) and without. The
    effect lens's E is linear in z_h (never capped); the cap acts on the ablated logits."""
    model = make_tiny_model(arch)
    with torch.no_grad():
        model.hf.get_output_embeddings().weight.mul_(20)  # a peaked P: the KLs are far above rounding
    model._cache.clear()
    lens = Lens.from_model(model, "effect")
    with torch.no_grad():
        for parameter in lens.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    config = _config(mode="mean", mean_tokens=24)
    batch = next(iter(measured_batches(model, _data(corpus), lens.config.layers, config.effects)))
    tokens = float(batch.scored.sum())
    lens.zero_grad()
    ours = effect_kl_step(lens, batch, block_rows=3 * model.n_heads, dtype=torch.float32, backward_scale=1 / tokens)
    grads = [p.grad.clone() for p in lens.parameters()]

    lens.zero_grad()
    keep = batch.scored
    log_p = batch.clean_log_probs(model)[keep]
    expected = []
    for layer in lens.config.layers:
        effect = batch.layers[layer]
        scale = batch.final_scale[keep]
        read = lens.logits(effect.z[keep], layer, scale) - lens.logits(effect.z_ablated[keep], layer, scale)
        log_q = batch.ablated_log_probs(model, layer, slice(None), torch.float32)[:, keep]
        explained = torch.log_softmax(log_q + read.transpose(0, 1), -1)
        expected.append((log_p.exp() * (log_p - explained)).sum(-1).mean(-1))  # (head,)
    expected = torch.stack(expected)
    (expected.sum() * 1.0).backward()
    torch.testing.assert_close(ours, expected.detach(), rtol=1e-3, atol=1e-6)
    for mine, reference in zip(grads, (p.grad for p in lens.parameters())):
        torch.testing.assert_close(mine, reference, rtol=1e-3, atol=1e-6)


def _loud_model():
    """A tiny GPT-NeoX whose heads all have effects far above fp32 rounding, on a peaked output distribution."""
    model = make_tiny_model("gpt_neox")
    with torch.no_grad():
        for block in model.layers:
            block.attention.dense.weight.mul_(10)
        model.hf.get_output_embeddings().weight.mul_(50)
    model._cache.clear()
    return model


def test_crossfit_reads_each_half_with_the_fit_on_the_other_half(corpus):
    model = _loud_model()
    config = _config(mode="mean", mean_tokens=24)
    result = effect_fidelity(Lens.dla(model), _data(corpus), config)
    batches = list(measured_batches(model, _data(corpus), range(model.n_layers), config.effects))
    assert len(batches) == 2
    fits = []
    for other in (batches[1], batches[0]):
        lens = Lens.from_model(model, "effect")
        fit_effect_lens(lens, [other])
        fits.append(lens)
    counts = [float(b.scored.sum()) for b in batches]
    explained = sum(effect_kl_step(fit, batch, 256, torch.float32) * n for fit, batch, n in zip(fits, batches, counts))
    for (layer, head), record in result.heads.items():
        expected = 1 - float(explained[layer, head]) / (record["effect_kl"] * sum(counts))
        assert record["crossfit_recovered"] == pytest.approx(expected, rel=1e-3, abs=1e-4)
        assert record["crossfit_recovered_low"] <= record["crossfit_recovered"] <= record["crossfit_recovered_high"]
        assert record["crossfit_recovered"] < record["ceiling_recovered"]  # 24 positions a fit: hindsight flatters
    assert "crossfit_recovered_median_top10pct" in result.summary

    relay = effect_fidelity(Lens.dla(make_relay()), _data(corpus), _config()).heads[RELAY]
    assert relay["crossfit_recovered"] > 0.5  # a deterministic relay: what is fitted on one half carries over
