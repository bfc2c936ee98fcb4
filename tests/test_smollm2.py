"""End-to-end on the real embedded model (SmolLM2-135M, offline from its PyPI package)."""

import pytest
import torch

import attention_lens as al
from attention_lens.fit import FitConfig, fit
from attention_lens.heads import head_contributions, run_with_heads


@pytest.fixture(scope="module")
def smollm2():
    return al.load_model("smollm2-135m")


def test_logit_lens_decodes_every_head(smollm2):
    result = al.decode(smollm2, al.Lens.logit(smollm2), "The capital of France is", k=5)
    assert len(result.heads) == 30 * 9
    assert {(r.layer, r.head) for r in result.heads} == {(l, h) for l in range(30) for h in range(9)}
    assert all(len(r.top) == 5 and r.position == len(result.tokens) - 1 for r in result.heads)


@pytest.mark.parametrize("kind", ["logit", "dla"])
def test_fast_decode_equals_the_fp32_decode(smollm2, kind):
    """The bf16-screened readout certifies its top-k: same tokens and logits as fp32, on every head and position
    (logits reach ~200 here, where bf16's spacing is 1)."""
    lens = al.Lens.from_model(smollm2, kind)
    text = "The quick brown fox jumps over the lazy dog while the president speaks"
    fast = al.decode(smollm2, lens, text, k=10, position="all")
    exact = al.decode(smollm2, lens, text, k=10, position="all", exact=True)
    for ours, reference in zip(fast.heads, exact.heads, strict=True):
        assert [t.id for t in ours.top] == [t.id for t in reference.top]
        for a, b in zip(ours.top, reference.top):
            assert a.logit == pytest.approx(b.logit, abs=2e-4, rel=1e-5)
            assert a.prob == pytest.approx(b.prob, rel=2e-2, abs=2e-6)  # probs are rounded to 6 decimals


def test_shapes_follow_the_config(smollm2):
    assert (smollm2.n_layers, smollm2.n_heads, smollm2.d_head, smollm2.d_model) == (30, 9, 64, 576)
    assert smollm2.config.num_key_value_heads == 3  # grouped-query attention


def test_per_head_outputs_match_nnsight(smollm2):
    """nnsight (a test-only extra) reads the o_proj input on its own; heads + b_O must match o_proj."""
    import nnsight
    ids = smollm2.encode("Four score and seven years ago our fathers")
    language_model = nnsight.LanguageModel(smollm2.hf, tokenizer=smollm2.tokenizer)
    saved = {}
    with language_model.trace(ids):
        for layer in (0, 14, 29):
            attention = language_model.model.layers[layer].self_attn
            saved[layer] = (attention.o_proj.input.save(), attention.o_proj.output.save())
    _, capture = run_with_heads(smollm2, ids, saved)
    for layer, (theirs_in, theirs_out) in saved.items():
        ours = capture.heads[layer]
        torch.testing.assert_close(ours.z.flatten(-2), theirs_in.float(), atol=0, rtol=0)
        total = head_contributions(smollm2, layer, ours).sum(-2)
        torch.testing.assert_close(total, theirs_out.float(), atol=1e-4, rtol=1e-4)


def test_tiled_eval_agrees_with_the_fp32_eval(smollm2):
    """The default bf16-tiled scorer against --exact on a fitted lens of the real model: per-head KL within 0.005
    nats (the issue asks 0.01; without the first-order rounding correction the lens's bf16 view strays 0.007-0.010
    here), the same heads beating each baseline, the same top-1 agreement up to rank flips between near-tied
    logits."""
    lens = al.Lens.from_model(smollm2, "affine", layers=[0, 15, 29])
    fit(lens, al.DataConfig(data="sotu"), FitConfig(tokens=4096, batch_size=4))
    data = al.DataConfig(data="sotu")
    settings = dict(tokens=256, batch_size=2, constant_tokens=256, bootstrap=20)
    tiled = al.evaluate(lens, data, al.EvalConfig(**settings))
    exact = al.evaluate(lens, data, al.EvalConfig(**settings, exact=True))
    assert tiled.setup["precision"] != exact.setup["precision"]
    for ours, reference in zip(tiled.heads, exact.heads, strict=True):
        assert ours.kl == pytest.approx(reference.kl, abs=0.005)
        assert ours.top1 == pytest.approx(reference.top1, abs=0.02)
    for name, value in exact.summary.items():
        if name.startswith("frac_beats_"):
            assert tiled.summary[name] == value, name
