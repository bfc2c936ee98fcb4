"""Concepts: words -> token ids; search ranks the head that is the only path for a token first; CLI search."""

import json

import pytest
import torch

from attention_lens import AttentionLensError, DataConfig, Lens
from attention_lens.concepts import Concept, concept_logits, make_concept, read_concept_words, search
from attention_lens.kinds import kind_names
from conftest import make_corpus, make_model_dir, make_tiny_model, run_cli

TOKEN, WRITER = 17, (1, 2)


def make_only_path(token: int = TOKEN, writer: tuple[int, int] = WRITER, strength: float = 10.0,
                   varying: bool = False):
    """A tiny Qwen2 in which head `writer` is the only path for `token`: nothing else reaches its logit.

    Residual dimension 0 is written by no embedding, no MLP and no head except `writer`, whose z_h is its
    value bias (value weights zero) whatever it attends to; W_U[token] reads dimension 0 alone. So the
    token's logit is large with the head and exactly 0 without it (and the other logits stay near 0).
    A small `strength` keeps the head's write comparable to the rest of the residual, so that the final
    norm does not saturate and scaling the head changes the token's probability. `varying` keeps the head's
    value weights, so what it writes (still the only write to dimension 0) varies with what it attends to.
    """
    model = make_tiny_model("qwen2", randomize_norms=False)
    hf, d_head = model.hf, model.d_head
    layer, head = writer
    with torch.no_grad():
        hf.model.embed_tokens.weight[:, 0] = 0
        for block in hf.model.layers:
            block.self_attn.o_proj.weight[0] = 0
            block.mlp.down_proj.weight[0] = 0
        attention = hf.model.layers[layer].self_attn
        group = head // (model.n_heads // model.config.num_key_value_heads)
        if not varying:
            attention.v_proj.weight[group * d_head:(group + 1) * d_head] = 0
        attention.v_proj.bias[group * d_head:(group + 1) * d_head] = 1.0
        attention.o_proj.weight[0, head * d_head:(head + 1) * d_head] = strength
        hf.model.norm.weight.fill_(1.0)
        hf.lm_head.weight[token] = 0
        hf.lm_head.weight[token, 0] = 3.0
    model._cache.clear()
    return model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("concepts") / "corpus")


def test_concept_words_from_a_list_or_a_file(tmp_path):
    assert read_concept_words(" war, battle ,, war ,army") == ["war", "battle", "army"]
    path = tmp_path / "numbers.txt"
    path.write_text("# numbers\none\ntwo, three  # small ones\n\n")
    assert read_concept_words(str(path)) == ["one", "two", "three"]
    with pytest.raises(AttentionLensError, match="no words"):
        read_concept_words(" , ")


class _WordPieces:
    """Greedy longest-match tokenizer over a fixed vocabulary, single characters as the fallback."""

    def __init__(self, pieces):
        self.vocab = {piece: i for i, piece in enumerate(pieces)}

    def __call__(self, text, add_special_tokens=False):
        ids = []
        while text:
            piece = max((p for p in self.vocab if text.startswith(p)), key=len, default=text[0])
            ids.append(self.vocab.setdefault(piece, len(self.vocab)))
            text = text[len(piece):]
        return {"input_ids": ids}

    def decode(self, ids):
        names = {i: p for p, i in self.vocab.items()}
        return "".join(names[i] for i in ids)


def test_concept_prefers_spaced_single_tokens_and_says_what_it_changed():
    tokenizer = _WordPieces([" war", " War", "war", " sold", "iers", "he", " he", " He"])
    concept = make_concept(tokenizer, ["war", "soldiers", "he", "?!", "war"])
    names = [tokenizer.decode([i]) for i in concept.ids]
    assert names == [" war", " War", " sold", " he", " He"]  # bare 'war', 'he' are pieces of other words
    assert concept.truncated == ["soldiers -> \u0020sold"]
    assert concept.dropped == ["?!"]
    with pytest.raises(AttentionLensError, match="no word"):
        make_concept(tokenizer, ["?!"])


@pytest.mark.parametrize("kind", ["logit", "dla"])
def test_search_ranks_the_only_path_head_first(corpus, kind):
    model = make_only_path()
    concept = Concept(words=["m"], ids=[TOKEN, 40])
    result = search(Lens.from_model(model, kind), concept, DataConfig(data=str(corpus), seq_len=16), tokens=128)
    assert result.ranked()[0] == WRITER
    assert result.tokens >= 128 and result.scores.shape == (model.n_layers, model.n_heads)
    best = result.records(1, model.tokenizer)[0]
    assert (best.layer, best.head) == WRITER and best.top_tokens[0].id == TOKEN
    scores = result.scores.flatten().sort(descending=True).values
    assert scores[0] > scores[1] + 5  # nats: no other head comes close


@pytest.mark.parametrize("kind", kind_names())
def test_concept_logits_are_the_lens_logits(tiny_model, kind):
    """The cheap path (concept rows + mean row of W_U) equals slicing the lens's vocabulary-sized logits."""
    model = tiny_model
    lens = Lens.from_model(model, kind)
    with torch.no_grad():
        for p in lens.parameters():
            p.normal_(std=0.1)
    z = torch.randn(7, model.n_heads, model.d_head)
    scale = torch.rand(7) + 0.5
    ids = torch.tensor([3, 50, 11])
    for layer in range(model.n_layers):
        logits = lens.logits(z, layer, scale)  # (token, head, vocab)
        expected = torch.cat([logits[..., ids], logits.mean(-1, keepdim=True)], dim=-1)
        got = concept_logits(lens, z, layer, ids, scale, block_rows=8)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_cli_search_with_verify(tmp_path, corpus, capsys):
    model = make_model_dir(tmp_path / "model")
    argv = ["search", "--model", str(model), "--lens", "dla", "--concept", "fox, dog, bold", "--data", str(corpus),
            "--tokens", "128", "--seq-len", "16", "--top", "3", "--verify", "--repeats", "10", "--min-targets", "20",
            "--k", "2,1", "--bootstrap", "200", "--json"]
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0
    document = json.loads(stdout)
    assert len(document["heads"]) == 3 and {"layer", "head", "score", "top_tokens"} <= set(document["heads"][0])
    assert document["concept"]["words"] == ["fox", "dog", "bold"]
    verify = document["verify"]
    assert {"found_drop", "random_drop_mean", "random_drop_std", "specificity", "z_score",
            "collateral_loss_change"} <= set(verify)
    assert verify["repeats"] == 10 and verify["concept_targets"] >= 20 and len(verify["heads"]) == 2
    assert verify["layer_matched"] is True and 0 <= verify["percentile"] <= 100 and verify["windows_drawn"] >= 1
    low, high = verify["specificity_interval"]
    assert low <= high
    assert {"matched_specificity", "matched_specificity_z_score", "matched_specificity_percentile",
            "matched_specificity_interval", "matched_other_targets"} <= set(verify)
    assert [record["k"] for record in document["k_sweep"]] == [1, 2] and document["k_sweep"][-1] == verify
    steer = document["steer"]
    assert steer["alpha"] == 5 and steer["heads"] == verify["heads"] and steer["concept_mass"] > 0
    assert steer["edit"] == "scale=5"
    code, stdout, _ = run_cli(argv + ["--steer-mode", "amplify", "--steer", "3"], capsys)
    assert code == 0 and json.loads(stdout)["steer"]["edit"] == "amplify=3"
    code, _, err = run_cli(argv + ["--steer-mode", "push"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--steer-mode 'push'" in err

    assert document["method"] == "lens" and document["lens"] == "dla"
    assert {"concept_score", "control_mean", "control_std", "control_z"} <= set(document["heads"][0])

    code, stdout, _ = run_cli(["search", "--model", str(model), "--method", "pursuit", "--concept", "fox, dog",
                               "--data", str(corpus), "--tokens", "64", "--seq-len", "16", "--json"], capsys)
    assert code == 0
    pursuit = json.loads(stdout)
    assert pursuit["method"] == "pursuit" and len(pursuit["heads"]) == 8 and "verify" not in pursuit
    assert all(0 <= head["concept_score"] <= 1 + 1e-6 for head in pursuit["heads"])  # a share of variance

    code, stdout, _ = run_cli(["search", "--model", str(model), "--method", "attribution", "--concept", "fox, dog",
                               "--data", str(corpus), "--seq-len", "16", "--top", "4", "--json"], capsys)
    assert code == 0
    attributed = json.loads(stdout)
    assert attributed["method"] == "attribution" and len(attributed["heads"]) == 4 and attributed["tokens"] > 0
    scores = [head["score"] for head in attributed["heads"]]
    assert scores == sorted(scores, reverse=True) and all(head["top_tokens"] for head in attributed["heads"])

    code, stdout, _ = run_cli(argv[:-1], capsys)  # human output: tables
    assert code == 0 and "score" in stdout and "top k heads" in stdout and "steer" in stdout

    code, _, err = run_cli(["search", "--model", str(model), "--concept", "?!", "--data", str(corpus)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no word" in err


@pytest.mark.parametrize("extra, message", [
    (["--concept", "?!"], "no word"),
    (["--concept", "missing/words.txt"], "does not exist"),
    (["--concept", "fox", "--k", "1,99"], "more heads than the 8"),
    (["--concept", "fox", "--k", "0"], "whole numbers"),
    (["--concept", "fox", "--min-targets", "100000"], "--min-targets asks for 100000"),
    (["--concept", "fox", "--mode", "flip"], "resample"),
    (["--concept", "fox", "--method", "magic"], "pursuit"),
])
def test_cli_search_refuses_bad_concept_input_in_one_line(tmp_path, corpus, capsys, extra, message):
    model = make_model_dir(tmp_path / "model")
    capsys.readouterr()  # the model's own saving messages
    argv = ["search", "--model", str(model), "--lens", "logit", "--data", str(corpus), "--tokens", "32",
            "--seq-len", "16", "--verify", "--repeats", "2", *extra]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1 and message in err, err
