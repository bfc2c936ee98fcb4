"""The effect lens's fit in the KL's metric: its objective against a direct computation on tiny models (with the
soft-cap and LayerNorm's centring), the solver against a dense solve, and the choice of strength on held-back
windows (dla where nothing carries over, a planted map where it does)."""

import pytest
import torch

from attention_lens import DataConfig, Lens
from attention_lens.effect_fit import Problem, fit_effect_lens_kl, kl_problem, residual_energy, solve
from attention_lens.effect_lens import factors_of, predicted_effect
from attention_lens.effects import EffectsConfig, measured_batches
from conftest import make_corpus, make_tiny_model
from test_effect_eval import RELAY, make_relay

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("effect_fit") / "corpus")


def _measured(model, corpus, tokens=48):
    config = EffectsConfig(tokens=tokens, batch_size=2, mode="zero", dtype="float32")
    return list(measured_batches(model, DataConfig(data=str(corpus), seq_len=12, holdout=0.25),
                                 range(model.n_layers), config, split="train"))


def _lens_maps(lens):
    """(layer * head, d_head, d_model): every head's W_O + B, layer-major, as the fit lays them out."""
    return torch.cat([lens.model.W_O[layer, lens.config.heads] + lens.layer_tensor("delta", layer)
                      for layer in lens.config.layers]).float()


@pytest.mark.parametrize("arch", ["gpt2", "gemma2", "qwen3"])  # LayerNorm's centring; a soft-cap; RMSNorm
def test_residual_energy_is_the_p_variance_of_the_unexplained_change(corpus, arch):
    """With every token kept, the objective is sum over positions of Var_P(E_h + change_h): the KL's second-order
    term, computed here from the lens's own predicted effect and the measured logit change."""
    model = make_tiny_model(arch)
    if arch == "gemma2":
        model.unembed.softcap = 1.0  # tight enough that the cap's bend shows in a tiny model's small logits
    measured = _measured(model, corpus)
    lens = Lens.from_model(model, "effect", list(range(model.n_layers)))
    with torch.no_grad():
        for layer in lens.config.layers:
            lens.set_layer("delta", layer, 0.3 * torch.randn_like(lens.layer_tensor("delta", layer)))
    problem = kl_problem(lens, measured, top=model.vocab)
    expected = torch.zeros(len(lens.config.layers) * len(lens.config.heads))
    for batch in measured:
        keep = batch.scored
        p = batch.clean_log_probs(model).exp()[keep]
        rows = slice(0, batch.input_ids.numel())
        for index, layer in enumerate(lens.config.layers):
            factors_t, constant = factors_of(lens, layer)
            unexplained = (predicted_effect(lens, layer, batch, rows, factors_t, constant)
                           + batch.logit_change(model, layer, rows, torch.float32))[:, keep]  # (head, pos, vocab)
            mean = (unexplained * p).sum(-1, keepdim=True)
            variance = ((unexplained - mean).pow(2) * p).sum(-1).sum(-1)
            expected[index * len(lens.config.heads):(index + 1) * len(lens.config.heads)] += variance
    got = residual_energy(problem, _lens_maps(lens))
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-9)  # 1e-7 apart; 10% less centring: 8e-4
    assert problem.positions == sum(int(b.scored.sum()) for b in measured)


def _planted(positions=300, heads=3, d_head=4, d_model=6, top=5, noise=0.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    metric = torch.randn(positions, top, d_model, generator=generator)
    inputs = torch.randn(positions, heads, d_head, generator=generator)
    true = torch.randn(heads, d_head, d_model, generator=generator)
    written = torch.einsum("phd,hdm->pmh", inputs, true)
    targets = torch.bmm(metric, written) + noise * torch.randn(positions, top, heads, generator=generator)
    return Problem(metric, inputs, targets, torch.arange(positions) // 3), true


def test_the_solver_equals_a_dense_solve_of_the_normal_equations():
    problem, _ = _planted(noise=1.0)
    anchor = torch.randn(3, 4, 6)
    strength = torch.tensor([0.01, 0.3, 5.0])
    got = solve(problem, strength, anchor, iterations=200, tolerance=1e-9)
    from attention_lens.effect_fit import penalty_scale
    scale = penalty_scale(problem)[0]
    for head in range(3):
        # vec(M) with M (d_head, d_model): the prediction B_p M^T u_p is linear in it; build its design matrix
        design = torch.einsum("ptm,pd->ptdm", problem.metric, problem.inputs[:, head]).reshape(-1, 4 * 6).double()
        y = problem.targets[:, :, head].reshape(-1).double()
        ridge = float(strength[head] * scale[head])
        normal = design.T @ design + ridge * torch.eye(24, dtype=torch.float64)
        dense = torch.linalg.solve(normal, design.T @ y + ridge * anchor[head].reshape(-1).double())
        assert torch.allclose(got[head].reshape(-1).double(), dense, rtol=1e-4, atol=1e-5)


def test_a_huge_strength_is_the_anchor_and_no_strength_recovers_a_planted_map():
    problem, true = _planted()
    anchor = torch.zeros_like(true)
    assert solve(problem, torch.full((3,), 1e9), anchor).abs().max() < 1e-6
    fitted = solve(problem, torch.full((3,), 1e-8), anchor, iterations=300, tolerance=1e-8)
    assert torch.allclose(fitted, true, atol=1e-3)


def test_held_back_windows_keep_dla_where_the_fit_does_not_carry_over_and_take_the_fit_where_it_does(corpus):
    """The relay head's effect never reaches W_U directly, and it is the same on every window: fitted on three
    windows in four, it carries over (a finite strength). A head whose measured change is noise (replaced here
    by a random target) keeps dla."""
    model = make_relay()
    measured = _measured(model, corpus, tokens=96)
    lens = Lens.from_model(model, "effect", list(range(model.n_layers)))
    fit = fit_effect_lens_kl(lens, measured, top=model.vocab)
    relay = RELAY[0] * model.n_heads + RELAY[1]
    assert torch.isfinite(fit.strength[relay]) and fit.held_back_recovered[relay] > 0.5
    by_head = fit.summary()["held_back_recovered_by_head"]  # what decode marks heads by
    assert len(by_head) == model.n_layers * model.n_heads
    assert by_head[f"{RELAY[0]}.{RELAY[1]}"] == round(float(fit.held_back_recovered[relay]), 4)
    assert (lens.layer_tensor("delta", RELAY[0])[RELAY[1]].abs().max() > 0)  # moved away from dla
    # the KL itself, on the data it was fitted on, is lower than dla's for the relay head
    from attention_lens.effect_lens import effect_kl_step
    dla = Lens.from_model(model, "effect", list(range(model.n_layers)))
    fitted_kl = effect_kl_step(lens, measured[0], 64, torch.float32)[RELAY]
    dla_kl = effect_kl_step(dla, measured[0], 64, torch.float32)[RELAY]
    assert fitted_kl < 0.5 * dla_kl


def test_a_head_whose_change_is_noise_keeps_dla():
    problem, _ = _planted(noise=0.0)
    generator = torch.Generator().manual_seed(1)
    problem.targets[:, :, 1] = torch.randn(problem.positions, problem.targets.shape[1], generator=generator)
    from attention_lens.effect_fit import pick_strengths
    check = problem.windows % 4 == 3
    strength, recovered, _ = pick_strengths(problem.take(~check), problem.take(check), torch.zeros(3, 4, 6),
                                            (10.0, 1.0, 0.01), 100, lambda text: None)
    assert torch.isfinite(strength[[0, 2]]).all() and (recovered[[0, 2]] > 0.99).all()
    # a map fitted to noise on 150 positions does worse on the other 75 than predicting nothing (the anchor here)
    assert torch.isinf(strength[1]) or recovered[1] < 0.05


def test_with_nothing_to_hold_back_the_middle_strength_is_used(corpus):
    model = make_relay()
    measured = _measured(model, corpus)
    lens = Lens.from_model(model, "effect", list(range(model.n_layers)))
    fit = fit_effect_lens_kl(lens, measured, top=8, held_back=1, strengths=(10.0, 1.0, 0.1))
    assert (fit.strength == 1.0).all() and torch.isnan(fit.held_back_recovered).all()
    assert fit.summary()["strengths"] == {"1": len(fit.strength)} and fit.summary()["heads_kept_dla"] == 0
    unheld = fit_effect_lens_kl(Lens.from_model(model, "effect", list(range(model.n_layers))), measured, top=8,
                                held_back=0, strengths=(10.0, 1.0, 0.1))
    assert (unheld.strength == 1.0).all()  # no window held back, not a division by zero


def test_cli_refuses_an_unknown_fit_metric_in_one_line(tmp_path, corpus, capsys):
    from conftest import make_model_dir, run_cli
    model_dir = make_model_dir(tmp_path / "model")
    capsys.readouterr()  # the model's own saving progress
    code, out, err = run_cli(["train", "--objective", "effect", "--model", model_dir,
                              "--data", corpus, "--fit-metric", "cosine", "--out", tmp_path / "lens"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "unknown fit metric 'cosine'" in err
    assert not (tmp_path / "lens").exists()


def test_cli_fit_alone_skips_the_kl_passes_and_says_what_it_chose(tmp_path, corpus, capsys):
    """--epochs 0 with the KL-metric fit: measure, fit, save; no whole-measurement KL pass (minutes on SmolLM2)."""
    import json
    from conftest import make_model_dir, run_cli
    model_dir = make_model_dir(tmp_path / "model")
    capsys.readouterr()
    code, out, err = run_cli(["train", "--objective", "effect", "--model", model_dir, "--data", corpus, "--tokens", 64,
                              "--seq-len", 16, "--batch-size", 2, "--epochs", 0, "--out", tmp_path / "lens", "--json"],
                             capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["start"] == "fit" and result["start_loss"] is None and result["final_loss"] is None
    choice = result["fit_choice"]
    assert choice["positions"] > 0 and choice["heads_kept_dla"] + sum(choice["strengths"].values()) == len(
        result["layers"]) * len(result["heads"])
    assert "KL" not in err.replace("KL's", "") and "held-back" in err
    assert Lens.load(tmp_path / "lens").config.training["fit_choice"] == choice
    assert len(choice["held_back_recovered_by_head"]) == len(result["layers"]) * len(result["heads"])  # decode's "?"


def test_a_trained_effect_lens_is_checked_on_windows_kept_out_of_its_fit_and_training(corpus):
    """With epochs > 0, every 5th window (numbered across batches) is out of the fit and of Adam, and the trained
    lens's held-back share is measured there: the relay head's effect, the same on every window, carries over."""
    from attention_lens.effect_lens import EffectTrainConfig, split_windows, train_effect
    model = make_relay()
    effects = EffectsConfig(tokens=120, batch_size=2, mode="zero", dtype="float32")
    measured = _measured(model, corpus, tokens=120)
    training, check = split_windows(measured, 5)
    assert len(training) == len(measured) and 1 <= len(check) < len(measured)
    scored = torch.cat([b.scored for b in measured])
    windows = torch.arange(scored.shape[0]) // 12
    for batch, kept in zip(measured, training):
        assert not (kept.scored & ~batch.scored).any()
    kept_out = torch.cat([b.scored for b in training]) != scored
    assert (windows[kept_out] % 5 == 4).all() and kept_out.any()
    assert sum(int(b.scored.sum()) for b in check) == int(kept_out.sum())

    lens = Lens.from_model(model, "effect", list(range(model.n_layers)))
    data = DataConfig(data=str(corpus), seq_len=12, holdout=0.25)
    record = train_effect(lens, data, EffectTrainConfig(effects=effects, epochs=2, lr=1e-3, top=model.vocab))
    held_back = record["held_back"]
    assert held_back["positions"] == int(kept_out.sum()) and held_back["windows"] == len(set(windows[kept_out].tolist()))
    assert record["fit_choice"]["positions"] == record["tokens_seen"] == int(scored.sum()) - held_back["positions"]
    assert held_back["recovered_by_head"][f"{RELAY[0]}.{RELAY[1]}"] > 0.5
    maps = _lens_maps(lens).detach()
    problem = kl_problem(lens, check, top=model.vocab)
    direct = 1 - residual_energy(problem, maps) / residual_energy(problem, torch.zeros_like(maps))
    relay = RELAY[0] * model.n_heads + RELAY[1]
    assert held_back["recovered_by_head"][f"{RELAY[0]}.{RELAY[1]}"] == pytest.approx(float(direct[relay]), abs=1e-4)
