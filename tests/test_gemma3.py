"""End-to-end on the real Gemma-3-270M: 4 query heads per KV head, d_head 256 != d_model / heads, post-norm."""

import pytest
import torch

import attention_lens as al
from attention_lens.heads import head_contributions, run_with_heads

pytestmark = pytest.mark.slow  # ~1 minute to load (2.6 GB in fp32) on 2 cores


@pytest.fixture(scope="module")
def gemma():
    return al.load_model("gemma3-270m")


def test_gemma3_layout(gemma):
    assert (gemma.n_layers, gemma.n_heads, gemma.d_head, gemma.d_model, gemma.vocab) == (18, 4, 256, 640, 262144)


def test_gemma3_heads_sum_to_the_post_normed_block(gemma):
    ids = gemma.encode("The capital of France is Paris, and the capital of Italy is")
    outputs = {}
    norm = gemma.post_attn_norm(9)
    handle = norm.register_forward_hook(lambda m, i, o: outputs.__setitem__("block", o.float()))
    try:
        _, capture = run_with_heads(gemma, ids, [9])
    finally:
        handle.remove()
    total = head_contributions(gemma, 9, capture.heads[9]).sum(-2)
    torch.testing.assert_close(total, outputs["block"], atol=1e-3, rtol=1e-3)


def test_gemma3_decodes_all_heads(gemma):
    result = al.decode(gemma, al.Lens.logit(gemma), "The capital of France is", k=3)
    assert len(result.heads) == 18 * 4
