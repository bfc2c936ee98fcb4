"""The blockwise, factored KL equals the textbook KL(P_model || P_lens), values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from attention_lens import Lens
from attention_lens.objective import head_kl, target_distribution
from attention_lens.kinds import get_kind, kind_names
from conftest import make_tiny_model


def _naive_kl(lens, z, layer, model_logits, final_scale):
    log_q = torch.log_softmax(lens.logits(z, layer, final_scale), dim=-1)  # (tokens, head, vocab)
    log_p = torch.log_softmax(model_logits, dim=-1)[:, None, :].expand_as(log_q)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # (tokens, head)


@pytest.mark.parametrize("kind", kind_names())
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

    if get_kind(kind).trainable:
        expected.sum().backward()
        naive_grads = [parameter.grad.clone() for parameter in lens.parameters()]
        lens.zero_grad()
        head_kl(lens, z, 1, p, neg_entropy, final_scale, backward_scale=1.0, block_rows=6)
        for naive, factored in zip(naive_grads, (parameter.grad for parameter in lens.parameters())):
            torch.testing.assert_close(factored, naive, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_kernels_give_the_eager_values_and_gradients(monkeypatch, dtype):
    """Both passes through torch.compile's fused kernels (fused.chunk_statistics, fused.gradient_terms), as every
    tile of a real model takes them: the same KL and gradients as the eager math of the same tiles."""
    from attention_lens import fused

    monkeypatch.setattr("attention_lens.objective.VOCAB_CHUNK", 16)  # several chunks, a short last one
    monkeypatch.delenv(fused.DISABLE_VARIABLE, raising=False)
    model = make_tiny_model("llama")
    torch.manual_seed(3)
    lens = Lens.from_model(model, "affine")
    with torch.no_grad():
        for parameter in lens.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    z = torch.randn(24, model.n_heads, model.d_head)
    p, neg_entropy = target_distribution(torch.randn(24, model.vocab) * 3)

    def kl_and_gradient(minimum_elements):
        monkeypatch.setattr(fused, "COMPILE_MIN_ELEMENTS", minimum_elements)
        lens.zero_grad()
        kl = head_kl(lens, z, 0, p, neg_entropy, backward_scale=1.0, dtype=dtype, block_rows=12)
        return kl, torch.cat([parameter.grad.flatten() for parameter in lens.parameters()])

    (eager_kl, eager_grad), (compiled_kl, compiled_grad) = kl_and_gradient(1 << 40), kl_and_gradient(0)
    assert not fused._compile_failed
    torch.testing.assert_close(compiled_kl, eager_kl, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-4 * eager_grad.abs().max().item(), rtol=1e-3)


def test_bfloat16_stays_close_to_float32():
    model = make_tiny_model("llama")
    lens = Lens.from_model(model, "affine")
    z = torch.randn(16, model.n_heads, model.d_head)
    p, neg_entropy = target_distribution(torch.randn(16, model.vocab))
    exact = head_kl(lens, z, 0, p, neg_entropy)
    rounded = head_kl(lens, z, 0, p, neg_entropy, dtype=torch.bfloat16)
    torch.testing.assert_close(rounded, exact, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("kind", kind_names(trainable=True))
def test_bfloat16_gradients_follow_float32(kind, monkeypatch):
    """bf16 runs keep the logits, exps and q - p in bf16: the gradient must still point where fp32's does."""
    monkeypatch.setattr("attention_lens.objective.VOCAB_CHUNK", 16)  # several chunks: the online logsumexp
    model = make_tiny_model("llama")
    torch.manual_seed(2)
    lens = Lens.from_model(model, kind)
    with torch.no_grad():
        for parameter in lens.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    z = torch.randn(24, model.n_heads, model.d_head)
    p, neg_entropy = target_distribution(torch.randn(24, model.vocab) * 3)

    scale = torch.rand(24) + 0.5 if lens.kind_spec.needs_final_residual else None  # attribution kinds (effect)

    def gradient(dtype):
        lens.zero_grad()
        head_kl(lens, z, 0, p, neg_entropy, scale, backward_scale=1.0, dtype=dtype, block_rows=12)
        return torch.cat([parameter.grad.flatten() for parameter in lens.parameters()])

    exact, rounded = gradient(torch.float32), gradient(torch.bfloat16)
    assert torch.nn.functional.cosine_similarity(exact, rounded, dim=0) > 0.999
    assert (rounded - exact).norm() < 0.03 * exact.norm()
