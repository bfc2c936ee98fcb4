"""Per-head outputs: the key invariant (heads + b_O == what the attention block adds to the residual), for every
architecture."""

import torch

from attention_lens.heads import head_contributions, output_bias, run_with_heads

MLP_MODULES = ("mlp", "feed_forward", "block_sparse_moe")


def _attention_residual_writes(model, input_ids):
    """What each block adds to the residual stream with its MLP silenced: layer output - layer input.

    Measured on the residual itself, so every multiplier, post-norm or parallel branch between the output
    projection and the residual add is in it, whatever the table says about them.
    """
    with torch.no_grad():
        for layer in model.layers:
            mlps = [module for name, module in layer.named_children() if name in MLP_MODULES]
            assert mlps, f"no MLP found in {type(layer).__name__}"
            for module in mlps:
                for parameter in module.parameters():
                    parameter.zero_()  # every MLP here maps 0 weights to a 0 output (act(0) * 0, 0 @ W + 0)
    inputs, outputs, handles = {}, {}, []
    for index, layer in enumerate(model.layers):
        def before(module, args, kwargs, index=index):
            inputs[index] = (args[0] if args else kwargs["hidden_states"]).float()

        def after(module, args, output, index=index):
            outputs[index] = (output[0] if isinstance(output, tuple) else output).float()

        handles.append(layer.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(layer.register_forward_hook(after))
    try:
        with torch.no_grad():
            model.hf(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return {index: outputs[index] - inputs[index] for index in outputs}


def test_head_contributions_sum_to_residual_write(tiny_model):
    """heads + bias == layer output - layer input once the MLPs are silenced: o_h is what a head adds to the
    residual stream, through Granite's residual multiplier, Gemma's and OLMo-2's post-norms, parallel blocks."""
    input_ids = torch.randint(2, 90, (2, 9))
    expected = _attention_residual_writes(tiny_model, input_ids)
    _, capture = run_with_heads(tiny_model, input_ids, range(tiny_model.n_layers))
    for layer in range(tiny_model.n_layers):
        heads = capture.heads[layer]
        assert heads.z.shape == (2, 9, tiny_model.n_heads, tiny_model.d_head)
        total = head_contributions(tiny_model, layer, heads).sum(-2)
        bias = output_bias(tiny_model, layer, heads)
        if bias is not None:
            total = total + bias
        torch.testing.assert_close(total, expected[layer], atol=1e-5, rtol=1e-5)


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
