"""decode --reading: raw, promoted (log-probs minus the prior's) and effect (read(z) - read(z̄)) against their
definitions; the cached corpus statistics; the CLI labels the reading and refuses an unknown one."""

import json

import pytest
import torch

from attention_lens import DataConfig, Lens, decode
from attention_lens.heads import run_with_heads
from attention_lens.readings import cached_head_means, default_reading, prior_log_probs
from conftest import make_corpus, make_model_dir, make_tiny_model, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "Fortune favours the bold"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("readings") / "corpus")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr("attention_lens.readings.CACHE_DIR", tmp_path / "cache")


def _top(result, layer, head, position):
    return [r.to_json() for r in result.heads if (r.layer, r.head, r.position) == (layer, head, position)][0]["top"]


def test_promoted_ranks_by_share_of_kl_to_the_prior(corpus):
    model = make_tiny_model("llama")
    lens = Lens.from_model(model, "affine")
    with torch.no_grad():
        lens.delta.normal_(std=0.5)
    prior = prior_log_probs(model, DataConfig(data=str(corpus), seq_len=12), tokens=48)
    assert torch.allclose(prior.exp().sum(), torch.tensor(1.0), atol=1e-4)
    result = decode(model, lens, PROMPT, k=5, position="all", reading="promoted", prior=prior)
    _, capture = run_with_heads(model, model.encode(PROMPT), range(model.n_layers))
    for layer in range(model.n_layers):
        with torch.no_grad():
            log_q = torch.log_softmax(lens.logits(capture.heads[layer].z[0], layer), -1)  # (pos, head, vocab)
        for position in result.positions:
            log_ratio = log_q[position] - prior
            expected = (log_q[position].exp() * log_ratio).topk(5, dim=-1)
            for head in range(model.n_heads):
                top = _top(result, layer, head, position)
                assert [e["id"] for e in top] == expected.indices[head].tolist()
                assert top[0]["share"] == pytest.approx(float(expected.values[head, 0]), abs=1e-4)
                assert top[0]["promoted"] == pytest.approx(float(log_ratio[head, top[0]["id"]]), abs=1e-3)
                assert top[0]["prob"] == pytest.approx(float(log_q[position, head, top[0]["id"]].exp()), abs=1e-5)
    assert result.to_json()["reading"] == "promoted"


def test_effect_reading_is_the_readings_change_from_the_mean(corpus):
    model = make_tiny_model("gemma3_text")  # a post-attention norm: z̄ is scaled as the lens reads z
    lens = Lens.from_model(model, "effect")
    means = cached_head_means(model, DataConfig(data=str(corpus), seq_len=12), tokens=48)
    assert torch.equal(means, cached_head_means(model, DataConfig(data=str(corpus), seq_len=12), tokens=48))
    result = decode(model, lens, PROMPT, k=3, reading="effect", means=means)
    position = result.positions[0]
    _, capture = run_with_heads(model, model.encode(PROMPT), range(model.n_layers), final_residual=True)
    scale = capture.final_scale([position])
    for layer in range(model.n_layers):
        heads = capture.heads[layer]
        z = heads.z[0, [position]]
        z_bar = means[layer].expand_as(z) * heads.scale[0, [position]][:, None, None]
        change = (Lens.dla(model).logits(z, layer, scale) - Lens.dla(model).logits(z_bar, layer, scale))[0]
        for head in range(model.n_heads):
            top = _top(result, layer, head, position)
            assert [e["id"] for e in top] == change[head].topk(3).indices.tolist()
            assert top[0]["change"] == pytest.approx(float(change[head].max()), abs=1e-3) and top[0]["prob"] is None


def test_default_readings():
    model = make_tiny_model("llama")
    assert default_reading(Lens.from_model(model, "affine")) == "promoted"
    assert default_reading(Lens.from_model(model, "effect")) == "effect"
    assert default_reading(Lens.logit(model)) == default_reading(Lens.dla(model)) == "raw"


def test_cli_decode_readings(tmp_path, corpus, capsys):
    model_dir = make_model_dir(tmp_path / "model")
    base = ["decode", PROMPT, "--model", model_dir, "--lens", "logit", "--prior-data", corpus]
    code, stdout, stderr = run_cli(base + ["--reading", "promoted", "--json"], capsys)
    assert code == 0, stderr
    document = json.loads(stdout)
    assert document["reading"] == "promoted" and "promoted" in document["heads"][0]["top"][0]
    code, stdout, stderr = run_cli(base + ["--reading", "effect"], capsys)
    assert code == 0, stderr
    assert "effect reading" in stdout.replace("\n", " ")
    code, stdout, _ = run_cli(base, capsys)
    assert code == 0 and "raw reading" in stdout.replace("\n", " ")
    code, stdout, stderr = run_cli(base + ["--reading", "sideways"], capsys)
    assert code == 2 and stdout == "" and "reading" in stderr and len(stderr.strip().splitlines()) == 1


def test_effect_reading_marks_heads_whose_reading_missed_their_effect_on_held_back_text(tmp_path, corpus, capsys):
    """An effect lens fitted in the KL's metric records, per head, the share of the measured effect it predicted on
    held-back windows: decode carries it into the JSON and marks the heads under UNREAD_SHARE in the table."""
    from attention_lens import load_model
    from attention_lens.readings import held_back_shares
    from attention_lens.results import UNREAD_SHARE
    model_dir = str(make_model_dir(tmp_path / "model"))
    model = load_model(model_dir)
    lens = Lens.from_model(model, "effect")
    lens.config.training = {"fit_choice": {"held_back_recovered_by_head": {"0.1": 0.4, "1.0": UNREAD_SHARE / 5}}}
    assert held_back_shares(lens) == {(0, 1): 0.4, (1, 0): UNREAD_SHARE / 5}
    assert held_back_shares(Lens.from_model(model, "effect")) == {}
    lens.save(tmp_path / "lens")
    base = ["decode", PROMPT, "--model", model_dir, "--lens", str(tmp_path / "lens"), "--prior-data", corpus]
    code, stdout, stderr = run_cli(base + ["--json"], capsys)
    assert code == 0, stderr
    shares = {(r["layer"], r["head"]): r.get("held_back_recovered") for r in json.loads(stdout)["heads"]}
    assert shares[(0, 1)] == 0.4 and shares[(1, 0)] == UNREAD_SHARE / 5
    assert sum(value is None for value in shares.values()) == len(shares) - 2  # no record: no key
    assert json.loads(stdout)["unread"] == [[1, 0]] and json.loads(stdout)["unread_below"] == UNREAD_SHARE
    code, stdout, stderr = run_cli(base, capsys)
    assert code == 0, stderr
    assert stdout.count(" ?") == 1 and "held back" in stdout.replace("\n", " ")
    code, stdout, stderr = run_cli(base + ["--reading", "raw"], capsys)  # the share is about the effect reading
    assert code == 0 and " ?" not in stdout and "held back" not in stdout
