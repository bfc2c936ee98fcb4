"""A lens kind is one class: a kind defined only here (nothing else added to the package) trains, decodes,
evaluates, searches, saves and loads through the same code as the built-in kinds, with the same exactness."""

import json

import pytest
import torch

from attention_lens import (DataConfig, EvalConfig, Lens, TrainConfig, decode, evaluate, heldout_kl, load_model,
                            run_with_heads, train)
from attention_lens.concepts import concept_logits
from attention_lens.kinds import REGISTRY, ResidualKind, kind_names, register, unregister
from attention_lens.objective import head_kl, target_distribution
from conftest import make_corpus, make_model_dir, run_cli
from test_evaluate import direct_scores, streamed
from test_objective import _naive_kl

pytestmark = pytest.mark.usefixtures("one_thread")


class ShiftKind(ResidualKind):
    """The logit lens of o_h + c_h: a learned per-head shift of the head's output, nothing else."""

    name = "shift"
    description = "final norm + W_U of o_h + c_h: the logit lens with a learned per-head shift"

    def parameter_shapes(self, layers, heads, d_head, d_model, vocab):
        return {"shift": (layers, heads, d_model)}

    def affine_map(self, lens, layer):
        return lens.model.W_O[layer, lens.config.heads], lens.shift[lens.layer_index(layer)]


@pytest.fixture(scope="module")
def shift_kind():
    register(ShiftKind)
    yield REGISTRY["shift"]
    unregister("shift")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shift_kind):
    root = tmp_path_factory.mktemp("kinds")
    model_dir = make_model_dir(root / "model")
    data = DataConfig(data=str(make_corpus(root / "corpus")), seq_len=16, holdout=0.25)
    return load_model(str(model_dir)), data, model_dir, root


def shifted(model, **coverage) -> Lens:
    lens = Lens.from_model(model, "shift", **coverage)
    torch.manual_seed(3)
    with torch.no_grad():
        lens.shift.normal_(std=0.3)
    return lens


def test_the_registry_lists_the_built_in_kinds_and_the_new_one(shift_kind):
    assert kind_names()[:4] == ["logit", "dla", "affine", "full"]
    assert "shift" in kind_names(trainable=True) and "shift" not in kind_names(closed_form=True)
    assert shift_kind.trainable and not shift_kind.needs_final_residual


def test_untrained_it_is_the_logit_lens(setup):
    model, _, _, _ = setup
    z = torch.randn(5, model.n_heads, model.d_head)
    lens, logit = Lens.from_model(model, "shift"), Lens.logit(model)
    torch.testing.assert_close(lens.logits(z, 1), logit.logits(z, 1))


def test_factored_kl_and_its_gradient_match_the_textbook_kl(setup, monkeypatch):
    monkeypatch.setattr("attention_lens.objective.VOCAB_CHUNK", 7)
    model, _, _, _ = setup
    lens = shifted(model, heads=[1, 3])
    z = torch.randn(11, model.n_heads, model.d_head)
    model_logits = torch.randn(11, model.vocab) * 3
    p, neg_entropy = target_distribution(model_logits)
    expected = _naive_kl(lens, z, 1, model_logits, None)
    torch.testing.assert_close(head_kl(lens, z, 1, p, neg_entropy, block_rows=6), expected, atol=1e-4, rtol=1e-4)
    expected.sum().backward()
    naive = lens.shift.grad.clone()
    lens.zero_grad()
    head_kl(lens, z, 1, p, neg_entropy, backward_scale=1.0, block_rows=6)
    torch.testing.assert_close(lens.shift.grad, naive, atol=1e-4, rtol=1e-3)


def test_it_trains_and_saves_and_loads(setup, tmp_path):
    model, data, _, _ = setup
    lens = Lens.from_model(model, "shift")
    before = heldout_kl(lens, data, tokens=256).mean
    train(lens, data, TrainConfig(tokens=1024, batch_size=4, lr=3e-2), out=tmp_path / "lens")
    assert heldout_kl(lens, data, tokens=256).mean < before
    loaded = Lens.load(tmp_path / "lens", model)
    assert loaded.kind == "shift" and torch.equal(loaded.shift, lens.shift)
    assert json.loads((tmp_path / "lens" / "config.json").read_text())["kind"] == "shift"


def test_decode_gives_the_top_k_of_its_logits(setup):
    model, _, _, _ = setup
    lens = shifted(model)
    result = decode(model, lens, "The quick brown fox", k=3, position="all")
    _, capture = run_with_heads(model, model.encode("The quick brown fox"), lens.config.layers)
    for record in result.heads:
        logits = lens.logits(capture.heads[record.layer].z[0, record.position], record.layer)
        expected = logits[lens.config.heads.index(record.head)].topk(3).indices.tolist()
        assert [t.id for t in record.top] == expected


@pytest.mark.parametrize("exact", [True, False], ids=["fp32", "bf16-tiles"])
def test_evaluation_matches_a_direct_computation(setup, exact):
    model, data, _, _ = setup
    lens = shifted(model, layers=[0, 1], heads=[1, 3])
    config = EvalConfig(tokens=96, constant_tokens=160, bootstrap=50, block_rows=64, exact=exact)
    result = evaluate(lens, data, config)
    for name, value in direct_scores(lens, data, config).items():
        # bf16 tiles round every logit to ~2^-8 relative (see tests/test_evaluate.py)
        atol = (0.02 if exact else 0.1) if name in ("top1", "top10") else (2e-5 if exact else 5e-3)
        torch.testing.assert_close(streamed(result, name), value.float().expand(2, 2), atol=atol, rtol=2e-4,
                                   msg=lambda m: f"{name}: {m}")


def test_concept_logits_are_its_logits(setup):
    model, _, _, _ = setup
    lens = shifted(model)
    z = torch.randn(7, model.n_heads, model.d_head)
    ids = torch.tensor([3, 50, 11])
    logits = lens.logits(z, 0)
    expected = torch.cat([logits[..., ids], logits.mean(-1, keepdim=True)], dim=-1)
    torch.testing.assert_close(concept_logits(lens, z, 0, ids, block_rows=8), expected, atol=1e-4, rtol=1e-4)


def test_the_cli_trains_and_decodes_it(setup, capsys):
    _, _, model_dir, root = setup
    out = root / "cli-lens"
    code, stdout, err = run_cli(["train", "--model", model_dir, "--data", setup[1].data, "--kind", "shift",
                                 "--tokens", "64", "--seq-len", "16", "--eval-tokens", "32", "--out", out, "--json"],
                                capsys)
    assert code == 0, err
    assert json.loads(stdout)["kind"] == "shift"
    code, stdout, err = run_cli(["decode", "--lens", out, "--json", "jumps over"], capsys)
    assert code == 0 and json.loads(stdout)["lens"] == "shift"


class TiltKind(ResidualKind):
    """The logit lens under another name: an untrained kind, so `--lens tilt` is offered and `--kind tilt` is not."""

    name = "tilt"
    description = "final norm + W_U of o_h (the logit lens), untrained"

    def affine_map(self, lens, layer):
        return lens.model.W_O[layer, lens.config.heads], None


def _option_help(command: str, option: str) -> str:
    import typer

    from attention_lens.cli import app

    group = typer.main.get_command(app)  # built as each run, --help and docs/cli.md build it
    return next(p.help for p in group.commands[command].params if p.name == option)


def test_the_cli_help_lists_the_kinds_registered_when_it_is_shown(shift_kind):
    # The help is read when the command is built, not when the CLI was first imported: otherwise a kind registered
    # at that moment (shift, here) stays listed after it is gone, and docs/cli.md depends on the order tests run in.
    assert "shift" in _option_help("train", "kind") and "shift" not in _option_help("decode", "lens")
    assert "tilt" not in _option_help("decode", "lens")
    register(TiltKind)
    try:
        assert "tilt" in _option_help("decode", "lens") and "tilt" in _option_help("eval", "lens")
        assert "tilt" not in _option_help("train", "kind")
    finally:
        unregister("tilt")
    assert "tilt" not in _option_help("decode", "lens")
