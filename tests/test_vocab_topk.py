"""The bf16-screened top-k returns the fp32 top-k, even where bf16 cannot tell the tokens apart."""

import pytest
import torch

from attention_lens.vocab_topk import CANDIDATES, SUM_ROWS, WIDE_CANDIDATES, _log_sum_exp, vocab_topk


def _fp32(y, W_U, bias, k):
    logits = y @ W_U.T + (0 if bias is None else bias)
    top = logits.topk(k, dim=-1)
    return top.values, top.indices, torch.logsumexp(logits, dim=-1)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])  # nearly flat rows, ordinary, logits in the hundreds
# 3,000 and 3,005 tokens screen by group maxima (3,005: five leftover groups of one), 1,500 by one top-k
@pytest.mark.parametrize("vocab", [3000, 3005, 1500])
def test_matches_fp32(with_bias, scale, vocab):
    torch.manual_seed(0)
    W_U = torch.randn(vocab, 48) / 7
    y = torch.randn(70, 48) * scale
    bias = torch.randn(vocab) if with_bias else None
    top = vocab_topk(y, W_U, bias, k=10)
    logits, ids, log_normalizer = _fp32(y, W_U, bias, 10)
    assert torch.equal(top.ids, ids)
    torch.testing.assert_close(top.logits, logits, rtol=1e-5, atol=1e-5)
    # Outside the candidates the normalizer uses bf16 logits: close, not equal.
    torch.testing.assert_close(top.log_normalizer, log_normalizer, rtol=0, atol=2e-2 * max(1.0, scale / 30))
    assert not torch.equal(top.log_normalizer, log_normalizer) or scale < 1


def _near_ties(count: int, d: int = 16, vocab: int = 2000):
    """W_U whose first `count` tokens all score ~100 (bf16 spacing there is 0.5) and differ by ~1e-4."""
    torch.manual_seed(1)
    y = torch.zeros(1, d)
    y[0, 0] = 1.0
    W_U = torch.randn(vocab, d)
    W_U[:, 0] = torch.randn(vocab).clamp(-3, 3)  # the rest score at most 3
    W_U[:count, 0] = 100 + torch.randperm(count).float() * 1e-4
    return y, W_U


@pytest.mark.parametrize("count", [20, CANDIDATES * 3, WIDE_CANDIDATES * 2])  # stage 1, 2 and the fp32 fallback
def test_ties_bf16_cannot_split_are_ranked_exactly(count):
    y, W_U = _near_ties(count)
    assert (y.bfloat16() @ W_U.bfloat16().T)[0, :count].unique().numel() <= 2  # bf16 sees (nearly) one value
    top = vocab_topk(y, W_U, None, k=10)
    logits, ids, _ = _fp32(y, W_U, None, 10)
    assert torch.equal(top.ids, ids)
    assert torch.equal(top.logits, logits)


def test_exact_mode_is_the_fp32_computation():
    torch.manual_seed(2)
    W_U, y = torch.randn(500, 32), torch.randn(9, 32)
    top = vocab_topk(y, W_U, None, k=5, exact=True)
    logits, ids, log_normalizer = _fp32(y, W_U, None, 5)
    assert torch.equal(top.ids, ids) and torch.equal(top.logits, logits)
    assert torch.equal(top.log_normalizer, log_normalizer)


def test_probs_are_the_softmax_of_the_top_logits():
    torch.manual_seed(3)
    W_U, y = torch.randn(4000, 32), torch.randn(5, 32) * 3
    top = vocab_topk(y, W_U, None, k=4)
    softmax = torch.softmax(y @ W_U.T, dim=-1).topk(4).values
    torch.testing.assert_close(top.probs(), softmax, rtol=2e-2, atol=1e-6)


@pytest.mark.parametrize("rows", [SUM_ROWS, 2 * SUM_ROWS + 5, 3])  # whole blocks, a short last block, one short block
def test_log_sum_exp_of_bf16_rows_matches_float64(rows):
    torch.manual_seed(1)
    values = (torch.randn(rows, 5000) * 20 + torch.arange(rows)[:, None] * 30.0).to(torch.bfloat16)
    expected = torch.logsumexp(values.double(), dim=-1)
    got = _log_sum_exp(values)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4)
