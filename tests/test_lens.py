"""Lens kinds against their definitions; save/load round-trip; refusal of a foreign model."""

import json

import pytest
import torch

from attention_lens import AttentionLensError, Lens, decode
from attention_lens.heads import head_contributions, run_with_heads
from conftest import make_tiny_model

TARGET_TOKEN, WRITER_LAYER, WRITER_HEAD = 17, 1, 2


def make_token_writer(token: int = TARGET_TOKEN):
    """A tiny Qwen2 whose head (1, 2) writes exactly the unembedding direction of `token`, always.

    Its value weights are zero and its value bias positive, so z_h = b_v > 0 whatever the attention
    pattern; every row of W_O_h is W_U[token], so o_h = sum(b_v) * W_U[token]. W_U rows are unit
    vectors and the final norm gain is 1, so that direction decodes to `token` and nothing else.
    """
    model = make_tiny_model("qwen2", randomize_norms=False)
    hf = model.hf
    d_head = model.d_head
    with torch.no_grad():
        hf.lm_head.weight.copy_(torch.nn.functional.normalize(hf.lm_head.weight, dim=-1))
        hf.model.norm.weight.fill_(1.0)
        attention = hf.model.layers[WRITER_LAYER].self_attn
        group = WRITER_HEAD // (model.n_heads // model.config.num_key_value_heads)
        attention.v_proj.weight[group * d_head:(group + 1) * d_head].zero_()
        attention.v_proj.bias[group * d_head:(group + 1) * d_head].fill_(0.5)
        columns = slice(WRITER_HEAD * d_head, (WRITER_HEAD + 1) * d_head)
        attention.o_proj.weight[:, columns] = hf.lm_head.weight[token][:, None]
    model._cache.clear()
    return model


def test_logit_lens_decodes_the_token_a_head_was_built_to_write():
    model = make_token_writer()
    result = decode(model, Lens.logit(model), "any prompt at all", k=3, position="all")
    for position in result.positions:
        top = [r for r in result.heads if (r.layer, r.head, r.position) == (1, 2, position)][0].top
        assert top[0].id == TARGET_TOKEN


def test_dla_of_all_heads_plus_rest_reproduces_logits(tiny_model):
    model = tiny_model
    input_ids = torch.randint(2, 90, (1, 8))
    logits, capture = run_with_heads(model, input_ids, range(model.n_layers), final_residual=True)
    lens = Lens.dla(model)
    unembed = model.unembed
    residual = capture.final_residual[0]  # (pos, d_model)
    scale = unembed.scale(residual)
    heads_total = torch.zeros(residual.shape[0], model.vocab)
    heads_written = torch.zeros_like(residual)
    for layer in range(model.n_layers):
        z = capture.heads[layer].z[0]
        heads_total += lens.logits(z, layer, scale).sum(-2)
        heads_written += head_contributions(model, layer, capture.heads[layer])[0].sum(-2)
    rest = unembed.center(residual - heads_written) * unembed.gamma / scale[:, None]
    if unembed.beta is not None:
        rest = rest + unembed.beta
    rest_logits = rest @ unembed.W_U.T + (0 if unembed.b_U is None else unembed.b_U)
    pre_cap = heads_total + rest_logits
    torch.testing.assert_close(unembed.cap(pre_cap), logits[0].float(), atol=1e-4, rtol=1e-4)


def test_untrained_affine_equals_logit(tiny_model):
    z = torch.randn(3, 5, tiny_model.n_heads, tiny_model.d_head)
    affine, logit = Lens.from_model(tiny_model, "affine"), Lens.logit(tiny_model)
    for layer in range(tiny_model.n_layers):
        assert torch.equal(affine.logits(z, layer), logit.logits(z, layer))


def test_full_lens_starts_as_logit_lens_without_final_norm(tiny_model):
    z = torch.randn(4, tiny_model.n_heads, tiny_model.d_head)
    full = Lens.from_model(tiny_model, "full", layers=[1], heads=[0, 3])
    unembed = tiny_model.unembed
    o = torch.einsum("phd,hdm->phm", z[:, [0, 3]], tiny_model.W_O[1, [0, 3]])
    expected = o @ unembed.W_U.T + (0 if unembed.b_U is None else unembed.b_U)
    torch.testing.assert_close(full.logits(z, 1), expected, atol=1e-4, rtol=1e-4)


def test_save_load_round_trips_exactly(tmp_path):
    model = make_tiny_model("llama")
    lens = Lens.from_model(model, "affine", layers=[1], heads=[0, 2])
    with torch.no_grad():
        for p in lens.parameters():
            p.normal_()
    lens.save(tmp_path / "lens")
    loaded = Lens.load(tmp_path / "lens", model)
    assert loaded.config == lens.config
    for (name, a), (_, b) in zip(lens.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == ["config.json", "lens.safetensors"]


def test_lens_refuses_another_model(tmp_path):
    lens = Lens.from_model(make_tiny_model("llama", seed=0), "affine")
    lens.save(tmp_path / "lens")
    with pytest.raises(AttentionLensError, match="made for model"):
        Lens.load(tmp_path / "lens", make_tiny_model("llama", seed=1))


def test_fingerprint_ignores_dtype():
    model = make_tiny_model("llama")
    fp32 = dict(model.fingerprint())
    model.hf.to(torch.bfloat16)
    model._cache.clear()
    assert model.fingerprint() == fp32


@pytest.mark.parametrize("damage", ["truncate", "garble_config", "wrong_type", "missing_weights"])
def test_corrupt_lens_directory_gives_clear_error(tmp_path, damage):
    model = make_tiny_model("llama")
    directory = Lens.from_model(model, "affine").save(tmp_path / "lens")
    weights, config = directory / "lens.safetensors", directory / "config.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "garble_config":
        config.write_text("{not json")
    elif damage == "wrong_type":
        raw = json.loads(config.read_text())
        raw["d_head"] = "eight"
        config.write_text(json.dumps(raw))
    else:
        weights.unlink()
    with pytest.raises(AttentionLensError):
        Lens.load(directory, model)


def test_layers_out_of_range_are_refused():
    model = make_tiny_model("llama")
    with pytest.raises(AttentionLensError, match="out of range"):
        Lens.from_model(model, "affine", layers=[5])
