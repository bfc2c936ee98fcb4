"""Closed-form fit: recovers an exact linear map, finds the best constant, and beats the logit lens."""

import pytest
import torch

from attention_lens import AttentionLensError, DataConfig, EvalConfig, Lens, evaluate, heldout_kl, load_model
from attention_lens.fit import FitConfig, _accumulate, _empty_moments, _solve_into, best_constant, fit
from conftest import make_corpus, make_model_dir, make_tiny_model


def test_ridge_solution_recovers_a_linear_map():
    model = make_tiny_model("llama")
    lens = Lens.from_model(model, "affine", layers=[1], heads=[2])
    true_M = torch.randn(model.d_head, model.d_model, dtype=torch.float64)
    moments = _empty_moments(lens)
    for _ in range(3):
        z = torch.randn(200, 1, model.d_head, dtype=torch.float64) + 2.0  # off-center: the fit must center
        target = z[:, 0] @ true_M + 5.0
        _accumulate(moments, z, target)
    constant = torch.randn(model.d_model)
    _solve_into(lens, 1, moments, constant, ridge=0.0)
    M = lens.delta[0, 0].double() + model.W_O[1, 2].double()
    torch.testing.assert_close(M, true_M, atol=1e-6, rtol=1e-6)
    # At its average input the head predicts the best constant.
    mean_z = moments.sum_z[0] / moments.count
    torch.testing.assert_close(mean_z @ M + lens.bias[0, 0].double(), constant.double(), atol=1e-5, rtol=1e-5)


def test_best_constant_beats_uniform_and_random():
    model = make_tiny_model("gpt2")
    mean_p = torch.softmax(torch.randn(model.vocab) * 2, dim=-1)
    b, kl = best_constant(model, mean_p, steps=300)
    _, kl_default = best_constant(model, mean_p)
    assert kl_default == pytest.approx(kl, abs=2e-3)  # the default's few L-BFGS iterations converge

    def kl_of(vector):
        log_q = torch.log_softmax(model.unembed(vector), dim=-1)
        return float((mean_p * (mean_p.log() - log_q)).sum())

    uniform = float((mean_p * (mean_p.log() + torch.log(torch.tensor(float(model.vocab))))).sum())
    assert kl == pytest.approx(kl_of(b), abs=1e-3)
    assert kl < uniform
    assert all(kl <= kl_of(torch.randn(model.d_model)) for _ in range(20))


def test_fit_beats_logit_lens_on_heldout(tmp_path):
    model = load_model(str(make_model_dir(tmp_path / "model")))
    data = DataConfig(data=str(make_corpus(tmp_path / "corpus")), seq_len=16, holdout=0.25)
    lens = Lens.from_model(model, "affine")
    report = fit(lens, data, FitConfig(tokens=1024, batch_size=8))
    assert report.tokens >= 1024
    fitted = heldout_kl(lens, data, tokens=256).kl
    logit = heldout_kl(Lens.logit(model), data, tokens=256).kl
    assert (fitted < logit).all()

    # The library records how the lens was made, whoever calls it: eval's guard against scoring training text
    # then holds for a lens fitted from Python too.
    training = lens.config.training
    assert training["method"] == "fit" and training["split"] == "train" and training["data"]["holdout"] == 0.25
    assert training["tokens_seen"] == report.tokens and training["seed"] == 0 and training["ridge"] == 0.01
    wider = DataConfig(data=data.data, seq_len=16, holdout=0.5)
    with pytest.raises(AttentionLensError, match="trained on"):
        evaluate(lens, wider, EvalConfig(tokens=32))


def test_fit_refuses_other_kinds():
    model = make_tiny_model("llama")
    with pytest.raises(AttentionLensError, match="affine"):
        fit(Lens.from_model(model, "full", layers=[0]), DataConfig(), FitConfig())
