"""A lens on a model split over devices keeps each layer's parameters on that layer's device, and computes what
the same lens computes in one piece: train, fit, decode, eval, search, the effect lens, save/load, checkpoints.

This machine has one device, so the split is told to the model (`layer_device`) rather than found: layers on
distinct CPU device objects run the split code paths (per-run stacks, copies to the readout's device, gradients
back, per-run optimizer state) with real numbers; a layer on the meta device checks the bookkeeping against a
device that really differs. The model itself is accelerate-offloaded (layer 1 and the readout on disk)."""

import pytest
import torch

import attention_lens as al
from attention_lens.checkpoint import load_checkpoint
from attention_lens.concepts import make_concept, search
from attention_lens.data import DataConfig
from attention_lens.effect_lens import EffectTrainConfig, train_effect
from attention_lens.effects import EffectsConfig
from attention_lens.fit import FitConfig, fit
from attention_lens.lens_config import WEIGHTS_FILE
from attention_lens.storage import read_tensors
from attention_lens.train import TrainConfig, _make_optimizer
from conftest import make_corpus, make_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "The quick brown fox jumps over the lazy dog."
LAYER_SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
               "model.layers.1": "disk", "model.norm": "disk", "lm_head": "disk"}
PLACEMENT = [torch.device("cpu", 0), torch.device("cpu", 1)]
"""Layer -> device as the split model reports it: two device objects, both runnable here."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model") / "llama")


@pytest.fixture(scope="module")
def whole(model_dir):
    return al.load_model(str(model_dir))


@pytest.fixture(scope="module")
def split(model_dir):
    model = al.load_model(str(model_dir), device_map=LAYER_SPLIT)
    assert model.hf.hf_device_map["model.layers.1"] == "disk"
    assert [model.layer_device(layer) for layer in range(2)] == [torch.device("cpu")] * 2  # all run on the CPU
    model.layer_device = PLACEMENT.__getitem__
    return model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return DataConfig(data=str(make_corpus(tmp_path_factory.mktemp("corpus"))), seq_len=16, holdout=0.2)


def _pair(split, whole, kind):
    lenses = al.Lens.from_model(split, kind), al.Lens.from_model(whole, kind)
    assert lenses[0].is_split and not lenses[1].is_split
    return lenses


def test_each_layers_parameters_live_on_its_device(whole):
    placed = [torch.device("cpu"), torch.device("meta")]
    whole.layer_device = placed.__getitem__
    try:
        for kind in ("affine", "full", "effect"):
            lens = al.Lens.from_model(whole, kind)
            assert lens.runs == [(0, 1), (1, 2)]
            assert [lens.layer_device(layer) for layer in range(2)] == placed
            for run, device in zip(lens.split, placed):
                assert all(p.device == device and p.shape[0] == 1 for p in run.values())
        assert not al.Lens.from_model(whole, "logit").is_split  # nothing to place
        whole.layer_device = lambda layer: torch.device("meta")
        lens = al.Lens.from_model(whole, "affine")
        assert lens.runs == [(0, 2)] and lens.layer_device(1).type == "meta"  # one run per device, away from W_U
    finally:
        del whole.layer_device
    assert not al.Lens.from_model(whole, "affine").is_split


@pytest.mark.parametrize("kind", ["affine", "full"])
def test_train_decode_and_eval_match_the_lens_in_one_piece(split, whole, data, kind):
    ours, reference = _pair(split, whole, kind)
    for lens in (ours, reference):
        al.train(lens, data, TrainConfig(tokens=64, batch_size=4))
    for name, tensor in ours.tensors().items():
        torch.testing.assert_close(tensor, reference.tensors()[name], rtol=1e-4, atol=1e-6)
    decoded = [al.decode(m, lens, PROMPT, k=5, position="all", exact=True)
               for m, lens in ((split, ours), (whole, reference))]
    ids = [[[entry.id for entry in record.top] for record in result.heads] for result in decoded]
    assert ids[0] == ids[1]
    kl = [al.heldout_kl(lens, data, tokens=64).kl for lens in (ours, reference)]
    torch.testing.assert_close(kl[0], kl[1], rtol=1e-4, atol=1e-6)
    scores = [al.evaluate(lens, data, al.EvalConfig(tokens=64, batch_size=4, bootstrap=2, constant_tokens=64))
              for lens in (ours, reference)]
    assert scores[0].summary["kl_mean"] == pytest.approx(scores[1].summary["kl_mean"], rel=1e-4)


def test_fit_and_search_match(split, whole, data):
    ours, reference = _pair(split, whole, "affine")
    for lens in (ours, reference):
        fit(lens, data, FitConfig(tokens=256, batch_size=4))
    torch.testing.assert_close(ours.tensors()["delta"], reference.tensors()["delta"], rtol=1e-4, atol=1e-6)
    concept = make_concept(whole.tokenizer, ["fox", "dog"])
    found = [search(lens, concept, data, tokens=64) for lens in (ours, reference)]
    torch.testing.assert_close(found[0].token_lift, found[1].token_lift, rtol=1e-4, atol=1e-5)


def test_the_effect_lens_trains_the_same(split, whole, data):
    ours, reference = _pair(split, whole, "effect")
    config = EffectTrainConfig(effects=EffectsConfig(tokens=32, batch_size=2, mean_tokens=32, dtype="float32"),
                               epochs=1)
    records = [train_effect(lens, data, config) for lens in (ours, reference)]
    assert records[0]["final_loss"] == pytest.approx(records[1]["final_loss"], rel=1e-4)
    torch.testing.assert_close(ours.tensors()["delta"], reference.tensors()["delta"], rtol=1e-4, atol=1e-6)


def test_save_load_and_checkpoints_are_the_same_files(split, whole, data, tmp_path):
    ours, reference = _pair(split, whole, "affine")
    al.train(ours, data, TrainConfig(tokens=64, batch_size=4), out=tmp_path / "split")
    al.train(reference, data, TrainConfig(tokens=64, batch_size=4), out=tmp_path / "whole")
    saved = [read_tensors(tmp_path / name / WEIGHTS_FILE, "")[0] for name in ("split", "whole")]
    assert saved[0].keys() == saved[1].keys() == {"delta", "bias"}  # the file knows nothing of the split
    for name in saved[0]:
        torch.testing.assert_close(saved[0][name], saved[1][name], rtol=1e-4, atol=1e-6)
    loaded = al.Lens.load(tmp_path / "split", split)
    assert loaded.is_split and loaded.runs == ours.runs
    for name, tensor in loaded.tensors().items():
        assert torch.equal(tensor, ours.tensors()[name])  # exactly what was saved
    unsplit = al.Lens.load(tmp_path / "split", whole)
    assert not unsplit.is_split and torch.equal(unsplit.delta, ours.tensors()["delta"])

    # A split run's checkpoint resumes in one piece and back, Adam's moments included.
    run = {"data": "x"}
    for source, target in ((ours, al.Lens.from_model(whole, "affine")), (reference, al.Lens.from_model(split, "affine"))):
        from attention_lens.checkpoint import Progress, save_checkpoint

        optimizer = _make_optimizer(source, TrainConfig())
        source.zero_grad()
        (sum((p * p).sum() for p in source.parameters())).backward()
        optimizer.step()
        save_checkpoint(tmp_path / "ck", source, optimizer, Progress(step=1), run)
        resumed = _make_optimizer(target, TrainConfig())
        load_checkpoint(tmp_path / "ck", target, resumed, run)
        for name, tensor in target.tensors().items():
            assert torch.equal(tensor, source.tensors()[name])
        moments = [_moments(lens, opt) for lens, opt in ((source, optimizer), (target, resumed))]
        assert moments[0].keys() == moments[1].keys()
        for key in moments[0]:
            assert torch.equal(moments[0][key], moments[1][key]), key


def _moments(lens, optimizer) -> dict:
    """Adam's exp_avg / exp_avg_sq per parameter name, as whole (layer, ...) stacks."""
    if lens.runs is None:
        named = dict(lens.named_parameters())
        return {(name, key): optimizer.state[p][key] for name, p in named.items() for key in ("exp_avg", "exp_avg_sq")}
    return {(name, key): torch.cat([optimizer.state[run[name]][key] for run in lens.split])
            for name in lens.split[0] for key in ("exp_avg", "exp_avg_sq")}


def test_cli_effects_under_a_device_map_match_the_whole_model(model_dir, data, capsys):
    import json

    from conftest import run_cli

    documents = []
    for extra in ([], ["--device-map", json.dumps(LAYER_SPLIT)]):
        code, out, err = run_cli(["effects", "--model", model_dir, "--data", data.data, "--seq-len", "16",
                                  "--tokens", "32", "--mean-tokens", "32", "--bootstrap", "2", "--dtype", "float32",
                                  "--json", *extra], capsys)
        assert code == 0, err
        documents.append(json.loads(out))
    kl = [[h["effect_kl"] for h in document["heads"]] for document in documents]
    assert kl[0] == pytest.approx(kl[1], rel=1e-4)
