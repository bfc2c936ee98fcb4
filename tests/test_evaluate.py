"""Evaluation against a direct, non-streamed computation; the token-writer head; seeds; refusals."""

import math
from itertools import islice

import pytest
import torch

from attention_lens import AttentionLensError, DataConfig, Lens
from attention_lens.data import load_documents, split_by_document, token_windows
from attention_lens.evaluate import EvalConfig, evaluate, sink_mask
from attention_lens.heads import run_with_heads
from attention_lens.kinds import get_kind, kind_names
from conftest import make_corpus, make_tiny_model
from test_lens import TARGET_TOKEN, WRITER_HEAD, WRITER_LAYER, make_token_writer

SEQ_LEN, TOKENS, CONSTANT_TOKENS = 16, 96, 160


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("evaluate") / "corpus")


def small_config(**overrides) -> EvalConfig:
    settings = dict(tokens=TOKENS, constant_tokens=CONSTANT_TOKENS, bootstrap=50, block_rows=64)
    return EvalConfig(**{**settings, **overrides})


def direct_scores(lens: Lens, data: DataConfig, config: EvalConfig) -> dict[str, torch.Tensor]:
    """Every score with everything materialized at once: (tokens, head, vocab) logits, no blocks, no streams."""
    model = lens.model
    train, held = split_by_document(load_documents(data.data), data.holdout)

    def windows(documents, tokens):
        return torch.stack(list(islice(token_windows(documents, model.tokenizer, data.seq_len, config.seed),
                                       math.ceil(tokens / data.seq_len))))

    with torch.no_grad():
        constant = torch.softmax(model.hf(input_ids=windows(train, config.constant_tokens)).logits, -1).mean((0, 1))
        input_ids = windows(held, config.tokens)
        logits, capture = run_with_heads(model, input_ids, lens.config.layers, final_residual=True)
        log_p = torch.log_softmax(logits, -1)  # (batch, pos, vocab)
        final_scale = model.unembed.scale(capture.final_residual)
        keep = ~sink_mask(input_ids, model.tokenizer)  # (batch, pos)
        has_next = torch.zeros_like(keep)
        has_next[:, :-1] = True

        def kl(log_q):  # log_q (batch, pos, ..., vocab) -> mean over kept positions (...)
            target = log_p.view(*log_p.shape[:2], *[1] * (log_q.dim() - 3), -1)  # broadcast over layer, head
            per_token = (target.exp() * (target - log_q)).sum(-1)
            return per_token[keep].mean(0)

        def per_head(of_lens):
            out = [torch.log_softmax(of_lens.logits(capture.heads[layer].z, layer, final_scale), -1)
                   for layer in lens.config.layers]
            return torch.stack(out, dim=2)  # (batch, pos, layer, head, vocab)

        log_q = per_head(lens)
        model_top = logits.topk(10, -1).indices
        lens_top = log_q.topk(10, -1).indices
        next_token = input_ids[:, 1:, None, None, None].expand(-1, -1, *log_q.shape[2:4], 1)
        cross_entropy = -log_q[:, :-1].gather(-1, next_token).squeeze(-1)  # (batch, pos - 1, layer, head)
        both = (keep & has_next)[:, :-1]
        return {
            "kl": kl(log_q),
            "logit": kl(per_head(Lens.from_model(model, "logit", lens.config.layers, lens.config.heads))),
            "dla": kl(per_head(Lens.from_model(model, "dla", lens.config.layers, lens.config.heads))),
            "uniform": kl(torch.full_like(log_p, -math.log(model.vocab))),
            "constant": kl(constant.log().expand_as(log_p)),
            "top1": (lens_top[..., 0] == model_top[:, :, None, None, 0]).float()[keep].mean(0),
            "top10": (lens_top[..., None] == model_top[:, :, None, None, None, :]).any(-1).float().mean(-1)[keep].mean(0),
            "cross_entropy": cross_entropy[both].mean(0),
            "entropy": -(log_q.exp() * log_q).sum(-1)[keep].mean(0),
        }


def streamed(result, name: str) -> torch.Tensor:
    """A score of every head from the evaluation's records, as (layer, head)."""
    layers = sorted({h.layer for h in result.heads})
    values = [h.baselines[name].kl if name in ("logit", "dla", "uniform", "constant") else getattr(h, name)
              for h in result.heads]
    return torch.tensor(values, dtype=torch.float32).view(len(layers), -1)


def perturbed_lens(model, kind: str) -> Lens:
    lens = Lens.from_model(model, kind, layers=[0, 1], heads=[1, 3])
    if get_kind(kind).trainable:
        torch.manual_seed(1)
        with torch.no_grad():
            for parameter in lens.parameters():
                parameter.normal_(std=0.2)
    return lens


@pytest.mark.parametrize("exact", [True, False], ids=["fp32", "bf16-tiles"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("kind", kind_names())
def test_every_score_matches_a_direct_computation(corpus, model_type, kind, exact):
    """llama: RMSNorm; gpt2: LayerNorm with bias and value biases; gemma2: post-attention norm and soft-cap
    (which the bf16 tiles hand to the fp32 path). bf16 tiles round every logit to ~2^-8 relative."""
    model = make_tiny_model(model_type)
    lens = perturbed_lens(model, kind)
    data = DataConfig(data=str(corpus), seq_len=SEQ_LEN, holdout=0.25)
    config = small_config(exact=exact)
    result = evaluate(lens, data, config)
    expected = direct_scores(lens, data, config)
    rounded = not exact and model.unembed.softcap is None
    assert result.setup["precision"] == ("bf16 tiles, fp32 sums" if rounded else "fp32")
    for name, value in expected.items():
        # Rank scores are counts: a near-tie in the top-10 may flip under another rounding order.
        atol = (0.1 if rounded else 0.02) if name in ("top1", "top10") else (5e-3 if rounded else 2e-5)
        torch.testing.assert_close(streamed(result, name), value.float().expand(2, 2), atol=atol, rtol=2e-4,
                                   msg=lambda m: f"{name}: {m}")
    assert result.setup["constant"]["tokens"] == math.ceil(CONSTANT_TOKENS / SEQ_LEN) * SEQ_LEN


def scored_windows(lens: Lens, windows: tuple[int, int], seed: int = 0):
    """Random windows (batch, pos) run through the model: the lens layers' captured heads and the targets."""
    from attention_lens import fidelity

    model = lens.model
    input_ids = torch.randint(0, model.vocab, windows, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits, capture = run_with_heads(model, input_ids, lens.config.layers, final_residual=True)
    return capture.heads, fidelity.Targets.build(model, input_ids, logits, capture.final_residual)


def layer_one(lens: Lens, windows: tuple[int, int]):
    """What a scorer of layer 1 takes for random windows (batch, pos): the logit baseline, z and the targets."""
    baseline = Lens.from_model(lens.model, "logit", lens.config.layers, lens.config.heads)
    heads, targets = scored_windows(lens, windows)
    return baseline, heads[1].z.flatten(0, 1), targets


def tiled_and_whole(lens: Lens) -> tuple[dict, dict]:
    """Layer 1's scores from the whole-row scorer and from the tiled one in fp32, with tiles of 3 rows and
    vocabulary chunks smaller than a row (the last one short)."""
    from attention_lens import fidelity, fidelity_tiles

    model = lens.model
    baseline, z, targets = layer_one(lens, (2, 12))
    with torch.no_grad():
        whole = fidelity.score_layer(lens, baseline, 1, z, targets, block_rows=64)
        chunk = fidelity_tiles.SCORE_VOCAB_CHUNK
        fidelity_tiles.SCORE_VOCAB_CHUNK = model.vocab // 3 + 1
        try:
            tiled = fidelity_tiles.score_layer_tiled(lens, baseline, 1, z, targets, block_rows=6, dtype=torch.float32)
        finally:
            fidelity_tiles.SCORE_VOCAB_CHUNK = chunk
    return tiled, whole


def assert_same_scores(tiled: dict, whole: dict, atol: float = 2e-5) -> None:
    assert set(tiled) == set(whole)
    for name in whole:
        torch.testing.assert_close(tiled[name].float(), whole[name].float(), atol=atol, rtol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("kind", kind_names())
def test_tiles_in_fp32_give_the_whole_row_scores(model_type, kind):
    """The tiled scorer's math (shift inside the product, online logsumexp, entropy, cross terms from averaged
    factors, top-k from group maxima, picked logits) with rounding taken out: in fp32 it equals the whole-row
    scorer."""
    model = make_tiny_model(model_type)
    assert_same_scores(*tiled_and_whole(perturbed_lens(model, kind)))


def test_tiles_move_their_shift_when_a_later_chunk_is_far_larger():
    """Logits that climb by hundreds of nats from chunk to chunk (and fall far below the first chunk's): the sweep
    must move its shift, rescale its sums and keep every group maximum comparable, or exp overflows or the top-k
    and entropy go wrong."""
    model = make_tiny_model("llama")
    lens = perturbed_lens(model, "full")
    with torch.no_grad():
        ramp = torch.linspace(-300.0, 300.0, model.vocab)  # later tokens far above earlier ones
        lens.bias[:] = ramp + torch.randn(model.vocab, generator=torch.Generator().manual_seed(2))
    tiled, whole = tiled_and_whole(lens)
    assert torch.isfinite(tiled["kl"]).all() and torch.isfinite(tiled["entropy"]).all()
    # The whole-row scorer subtracts logits of ~300 from each other in fp32 (eps 6e-8): ~2e-5 of its own error.
    assert_same_scores(tiled, whole, atol=2e-4)


@pytest.mark.parametrize("dla_ratio", [1.0, 0.3, 0.01, 3.0])
def test_logit_lens_and_dla_share_one_product(dla_ratio):
    """The baselines' one product at the larger scale, each view's logsumexp taken from it by its ratio, against
    logsumexp of each view's own logits, with chunks climbing by hundreds of nats (the shift moves, sums rescale)
    and a view whose scale is 1/100 of the other's (its sums must neither underflow nor lag)."""
    from attention_lens.fidelity_tiles import _baseline_sweep
    from attention_lens.sweep import extended_factors

    generator = torch.Generator().manual_seed(0)
    heads, rows, d_head, vocab = 2, 5, 4, 3000
    factors = torch.randn(heads, vocab, d_head + 1, generator=generator)
    factors[..., -1] += torch.linspace(-300.0, 300.0, vocab)  # later chunks far above the first
    z_aug = torch.cat([torch.randn(rows, heads, d_head, generator=generator), torch.ones(rows, heads, 1)], dim=-1)
    logit_scale = torch.rand(rows, heads, generator=generator) + 0.5
    dla_scale = logit_scale[:, 0] * dla_ratio  # (rows,): one per position, as the final norm's sigma
    chunks = [slice(0, 1000), slice(1000, 2000), slice(2000, vocab)]
    scaled = {"logit": (z_aug * logit_scale[..., None]).transpose(0, 1),
              "dla": (z_aug * dla_scale[:, None, None]).transpose(0, 1)}
    views = _baseline_sweep(scaled, 1 / logit_scale, 1 / dla_scale, False,
                            extended_factors(factors, None, torch.float32, chunks), torch.float32)
    for index in range(len(chunks)):
        views.add(index)
    raw = torch.einsum("rhd,hvd->hrv", z_aug.double(), factors.double())  # (head, rows, vocab)
    expected = torch.stack([torch.logsumexp(raw * logit_scale.T[..., None], -1),
                            torch.logsumexp(raw * dla_scale[None, :, None], -1)])
    torch.testing.assert_close(views.log_sum_exp().double(), expected, atol=2e-4, rtol=1e-6)


def test_token_writer_head_reads_its_token(corpus):
    model = make_token_writer()
    data = DataConfig(data=str(corpus), seq_len=SEQ_LEN, holdout=0.25)
    result = evaluate(Lens.logit(model), data, small_config())
    record = result.head(WRITER_LAYER, WRITER_HEAD)
    assert record.top_token.id == TARGET_TOKEN and record.top_token.share == 1.0
    assert record.entropy < min(h.entropy for h in result.heads if h.layer != WRITER_LAYER)
    assert isinstance(record.layer, int) and isinstance(record.head, int)


def test_a_head_beats_a_baseline_only_when_its_whole_interval_clears_the_margin(corpus):
    model = make_tiny_model("llama")
    data = DataConfig(data=str(corpus), seq_len=SEQ_LEN, holdout=0.25)
    for exact in (True, False):
        result = evaluate(Lens.logit(model), data, small_config(margin=0.0, exact=exact))
        for record in result.heads:
            for name, baseline in record.baselines.items():
                assert baseline.beats == (baseline.gain_low > 0.0)
                assert baseline.gain_low <= baseline.gain + 1e-6 <= baseline.gain_high + 2e-6
            if exact:  # the logit lens ties with itself
                assert not record.baselines["logit"].beats
            else:  # the bf16 baseline's rounding of each logit (~2^-9 relative) lifts its logsumexp by ~1e-5 nats
                assert abs(record.baselines["logit"].gain) < 1e-3
    wide = evaluate(Lens.logit(model), data, small_config(margin=1e6))
    assert all(wide.summary[f"frac_beats_{name}"] == 0 for name in ("logit", "dla", "uniform", "constant"))


def test_same_seed_same_numbers_other_seed_other_resamples(corpus):
    model = make_tiny_model("qwen2")
    data = DataConfig(data=str(corpus), seq_len=SEQ_LEN, holdout=0.25)
    first = evaluate(Lens.logit(model), data, small_config(seed=3)).to_json()
    assert evaluate(Lens.logit(model), data, small_config(seed=3)).to_json() == first
    other = evaluate(Lens.logit(model), data, small_config(seed=4)).to_json()
    assert [h["kl_low"] for h in other["heads"]] != [h["kl_low"] for h in first["heads"]]


def test_bootstrap_state_does_not_grow_with_tokens(corpus):
    """Streaming: what the evaluation keeps between batches has the same size for 2 or 12 windows."""
    from attention_lens import fidelity

    sizes = []
    original = fidelity.FidelityTotals.add

    def spy(self, *args):
        original(self, *args)
        kept = [t for group in self.sums.values() for t in group.values()] + list(self.replicates.values())
        sizes.append(sum(t.numel() for t in kept) + self.top_ids.numel())

    model = make_tiny_model("llama")
    data = DataConfig(data=str(corpus), seq_len=SEQ_LEN, holdout=0.25)
    fidelity.FidelityTotals.add = spy
    try:
        evaluate(Lens.logit(model), data, small_config(tokens=2 * SEQ_LEN, batch_size=1))
        evaluate(Lens.logit(model), data, small_config(tokens=12 * SEQ_LEN, batch_size=1))
    finally:
        fidelity.FidelityTotals.add = original
    assert len(sizes) == 14 and len(set(sizes)) == 1


def test_scoring_text_the_lens_trained_on_is_refused(corpus):
    model = make_tiny_model("llama")
    lens = Lens.from_model(model, "affine")
    lens.config.training = {"data": {"data": str(corpus), "holdout": 0.1}}
    with pytest.raises(AttentionLensError, match="trained on"):
        evaluate(lens, DataConfig(data=str(corpus), seq_len=SEQ_LEN, holdout=0.5), small_config())


@pytest.mark.parametrize("overrides, message", [
    (dict(tokens=0), "at least 1"), (dict(bootstrap=1), "bootstrap"), (dict(margin=-1.0), "margin"),
    (dict(constant_data="/nonexistent/text.txt"), "no data"),
])
def test_bad_settings_are_refused(corpus, overrides, message):
    model = make_tiny_model("llama")
    data = DataConfig(data=str(corpus), seq_len=SEQ_LEN, holdout=0.25)
    with pytest.raises(AttentionLensError, match=message):
        evaluate(Lens.logit(model), data, small_config(**overrides))


@pytest.mark.parametrize("vocab", [49152, 50257], ids=["blocked", "elementwise"])
def test_the_fp32_scorer_sums_over_the_vocabulary_without_bias(vocab):
    """KL and entropy of the --exact scorer against fp64 on SmolLM2's and GPT-2's vocabulary sizes with logits ~12:
    taken as one GEMM (einsum), sum_v p_v l_v came out ~2e-4 low relatively every time (0.003 nats of KL; ~8e-4 on
    these)."""
    from attention_lens import fidelity

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, vocab, generator=generator) * 3 + 12  # (head, rows, vocab)
    log_p = torch.log_softmax(torch.randn(8, vocab, generator=generator) * 3, dim=-1)
    p = log_p.exp()
    targets = fidelity.Targets(p=p, neg_entropy=(p * log_p).sum(-1), top=log_p.topk(20, dim=-1).indices,
                               next_token=torch.zeros(8, dtype=torch.long), final_scale=torch.ones(8))
    p64, logits64 = p.double(), logits.double()
    kl64 = (p64 * log_p.double()).sum(-1) - (p64 * logits64).sum(-1) + torch.logsumexp(logits64, dim=-1)
    q64 = torch.softmax(logits64, dim=-1)
    entropy64 = torch.logsumexp(logits64, dim=-1) - (q64 * logits64).sum(-1)
    rows = slice(0, 8)
    scores = fidelity._lens_scores(logits, targets, rows)
    torch.testing.assert_close(scores["kl"].double(), kl64.T, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores["entropy"].double(), entropy64.T, atol=1e-4, rtol=0)
    torch.testing.assert_close(fidelity._kl(logits, targets, rows).double(), kl64.T, atol=1e-4, rtol=0)


def test_tiles_share_one_workspace_across_layers_and_batches(monkeypatch):
    """eval scores every layer of every batch through one workspace of scratch tables and tiles: the scores through
    it equal those from fresh buffers, whatever it held before (a stale table, tile or maxima would leak in). Two
    batch sizes, so the tiles' shapes change and come back; a vocabulary whose chunks leave groups of one."""
    from attention_lens import fidelity_tiles

    lens = perturbed_lens(make_tiny_model("gpt2"), "affine")
    monkeypatch.setattr(fidelity_tiles, "SCORE_VOCAB_CHUNK", 33)  # 96 tokens: chunks of 33, 33, 30
    baseline = Lens.from_model(lens.model, "logit", lens.config.layers, lens.config.heads)
    scored = []
    for seed, windows in enumerate([(2, 40), (1, 7)]):
        heads, targets = scored_windows(lens, windows, seed)
        scored += [(layer, heads[layer].z.flatten(0, 1), targets) for layer in (1, 0)]
    workspace: dict = {}
    with torch.no_grad():
        for layer, z, targets in scored + scored[:1]:
            shared = fidelity_tiles.score_layer_tiled(lens, baseline, layer, z, targets, block_rows=32,
                                                      workspace=workspace)
            fresh = fidelity_tiles.score_layer_tiled(lens, baseline, layer, z, targets, block_rows=32)
            for name, value in fresh.items():
                torch.testing.assert_close(shared[name], value, atol=0, rtol=0, msg=name)
    assert workspace, "the scorer kept nothing for the next call"


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2"])
def test_bf16_tiles_take_the_rounding_of_the_lens_back(model_type, monkeypatch):
    """The lens's bf16 view with its first-order rounding correction lands closer to the fp32 scores than the same
    view without it (the rounding of the factors is fixed per token and does not average out)."""
    from attention_lens import fidelity, fidelity_tiles

    lens = perturbed_lens(make_tiny_model(model_type), "affine")
    baseline, z, targets = layer_one(lens, (4, 32))
    with torch.no_grad():
        whole = fidelity.score_layer(lens, baseline, 1, z, targets, block_rows=64)
        corrected = fidelity_tiles.score_layer_tiled(lens, baseline, 1, z, targets)
        monkeypatch.setattr(fidelity_tiles, "_rounding_correction", lambda sweep, neg_entropy, *_: {
            "kl": sweep.kl(neg_entropy), "log_sum_exp": sweep.log_sum_exp(), "entropy": sweep.entropy()})
        raw = fidelity_tiles.score_layer_tiled(lens, baseline, 1, z, targets)
    for name in ("kl", "entropy"):
        corrected_error = (corrected[name] - whole[name]).abs().max()
        assert corrected_error < 5e-5, name
        assert corrected_error < 0.75 * (raw[name] - whole[name]).abs().max(), name
