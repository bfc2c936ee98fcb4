"""Per-head outputs: the key invariant (heads + b_O == attention block output) for every architecture."""

import torch

from attention_lens.heads import head_contributions, output_bias, run_with_heads


def _block_outputs(model, input_ids):
    """What each attention block adds to the residual stream, captured at the module boundary."""
    outputs, handles = {}, []
    for layer in range(model.n_layers):
        module = model.post_attn_norm(layer) or model.out_proj(layer)
        handles.append(module.register_forward_hook(
            lambda mod, inputs, output, layer=layer: outputs.__setitem__(layer, output.float())))
    try:
        with torch.no_grad():
            model.hf(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def test_head_contributions_sum_to_block_output(tiny_model):
    input_ids = torch.randint(2, 90, (2, 9))
    expected = _block_outputs(tiny_model, input_ids)
    _, capture = run_with_heads(tiny_model, input_ids, range(tiny_model.n_layers))
    for layer in range(tiny_model.n_layers):
        heads = capture.heads[layer]
        assert heads.z.shape == (2, 9, tiny_model.n_heads, tiny_model.d_head)
        total = head_contributions(tiny_model, layer, heads).sum(-2)
        bias = output_bias(tiny_model, layer, heads)
        if bias is not None:
            total = total + bias
        torch.testing.assert_close(total, expected[layer], atol=1e-5, rtol=0)


def test_hooks_leave_logits_unchanged(tiny_model):
    input_ids = torch.randint(2, 90, (1, 6))
    with torch.no_grad():
        plain = tiny_model.hf(input_ids=input_ids).logits
    hooked, _ = run_with_heads(tiny_model, input_ids, range(tiny_model.n_layers), final_residual=True)
    assert torch.equal(plain, hooked)


def test_head_dim_is_not_d_model_over_heads():
    from conftest import make_tiny_model

    gemma = make_tiny_model("gemma3_text")
    assert gemma.d_head == 16 and gemma.n_heads * gemma.d_head != gemma.d_model
    assert gemma.W_O.shape == (2, 4, 16, 32)


def test_gpt2_conv1d_head_is_a_row_slice():
    from conftest import make_tiny_model

    gpt2 = make_tiny_model("gpt2")
    weight = gpt2.hf.transformer.h[1].attn.c_proj.weight  # Conv1D: (in, out)
    torch.testing.assert_close(gpt2.W_O[1, 2], weight[2 * 8:3 * 8, :])


def test_value_bias_belongs_to_the_head():
    """Qwen2's v bias makes every head write W_O_h b_v even with zero value weights; b_O stays out."""
    from conftest import make_tiny_model

    qwen = make_tiny_model("qwen2")
    attention = qwen.hf.model.layers[0].self_attn
    with torch.no_grad():
        attention.v_proj.weight.zero_()
    _, capture = run_with_heads(qwen, torch.randint(2, 90, (1, 5)), [0])
    z = capture.heads[0].z
    # Head h reads kv group h // 2 (4 query heads, 2 kv heads): its z is exactly that group's b_v.
    b_v = attention.v_proj.bias.detach().view(2, 8)
    for head in range(4):
        torch.testing.assert_close(z[0, :, head], b_v[head // 2].expand(5, 8))
