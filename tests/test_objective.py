"""The blockwise, factored KL equals the textbook KL(P_model || P_lens), values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from attention_lens import Lens
from attention_lens.objective import head_kl, target_distribution
from conftest import make_tiny_model


def _naive_kl(lens, z, layer, model_logits, final_scale):
    log_q = torch.log_softmax(lens.logits(z, layer, final_scale), dim=-1)  # (tokens, head, vocab)
    log_p = torch.log_softmax(model_logits, dim=-1)[:, None, :].expand_as(log_q)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # (tokens, head)


@pytest.mark.parametrize("kind", ["logit", "dla", "affine", "full"])
def test_factored_kl_matches_naive(tiny_model, kind, monkeypatch):
    monkeypatch.setattr("attention_lens.objective.VOCAB_CHUNK", 7)  # many chunks: the online logsumexp
    torch.manual_seed(1)
    lens = Lens.from_model(tiny_model, kind, heads=[1, 3])
    with torch.no_grad():
        for parameter in lens.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    z = torch.randn(11, tiny_model.n_heads, tiny_model.d_head)
    model_logits = torch.randn(11, tiny_model.vocab) * 3
    final_scale = torch.rand(11) + 0.5
    p, neg_entropy = target_distribution(model_logits)
    expected = _naive_kl(lens, z, 1, model_logits, final_scale)
    got = head_kl(lens, z, 1, p, neg_entropy, final_scale, block_rows=6)  # several blocks
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    if kind in ("affine", "full"):
        expected.sum().backward()
        naive_grads = [parameter.grad.clone() for parameter in lens.parameters()]
        lens.zero_grad()
        head_kl(lens, z, 1, p, neg_entropy, final_scale, backward_scale=1.0, block_rows=6)
        for naive, factored in zip(naive_grads, (parameter.grad for parameter in lens.parameters())):
            torch.testing.assert_close(factored, naive, atol=1e-4, rtol=1e-3)


def test_bfloat16_stays_close_to_float32():
    model = make_tiny_model("llama")
    lens = Lens.from_model(model, "affine")
    z = torch.randn(16, model.n_heads, model.d_head)
    p, neg_entropy = target_distribution(torch.randn(16, model.vocab))
    exact = head_kl(lens, z, 0, p, neg_entropy)
    rounded = head_kl(lens, z, 0, p, neg_entropy, dtype=torch.bfloat16)
    torch.testing.assert_close(rounded, exact, atol=0.05, rtol=0.02)
