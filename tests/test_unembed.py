"""The readout as plain tensors must be exactly the model's final norm + unembedding."""

import torch

from attention_lens.heads import run_with_heads


def test_unembed_reproduces_model_logits(tiny_model):
    input_ids = torch.randint(2, 90, (2, 7))
    logits, capture = run_with_heads(tiny_model, input_ids, [], final_residual=True)
    unembed = tiny_model.unembed
    torch.testing.assert_close(unembed(capture.final_residual), logits.float(), atol=1e-4, rtol=1e-5)
    norm = tiny_model.hf.get_submodule(tiny_model.spec.final_norm)
    x = torch.randn(5, tiny_model.d_model) * 3
    torch.testing.assert_close(unembed.normalize(x), norm(x).float(), atol=1e-5, rtol=1e-5)


def test_softcap_is_part_of_the_unembedding():
    from conftest import make_tiny_model

    gemma2 = make_tiny_model("gemma2")
    assert gemma2.unembed.softcap == 30.0
    logits = gemma2.unembed(torch.randn(4, gemma2.d_model) * 50)
    assert logits.abs().max() <= 30.0
