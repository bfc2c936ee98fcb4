"""A model spread over devices by a device map (here CPU memory and disk offload) reads out exactly like the
same model in one piece: decode, fit and one training step."""

import json

import pytest
import torch

import attention_lens as al
from attention_lens import AttentionLensError
from attention_lens.data import DataConfig
from attention_lens.fit import FitConfig, fit
from attention_lens.placement import parse_device_map, weight_devices
from attention_lens.train import TrainConfig, train
from conftest import make_corpus, make_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "The quick brown fox jumps over the lazy dog."
LAYER_SPLIT = ('{"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", '
               '"model.layers.1": "disk", "model.norm": "disk", "lm_head": "disk"}')


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model") / "llama")


@pytest.fixture(scope="module")
def whole(model_dir):
    return al.load_model(str(model_dir))


def test_max_memory_forces_offload_and_decode_is_unchanged(model_dir, whole):
    split = al.load_model(str(model_dir), device_map="auto", max_memory={"cpu": 100_000})
    devices = set(split.hf.hf_device_map.values())
    assert "disk" in devices, split.hf.hf_device_map  # the budget really pushed weights out of memory
    assert weight_devices(split.hf)["disk"] > 0
    for kind in ("logit", "dla"):
        lens, reference = al.Lens.from_model(split, kind), al.Lens.from_model(whole, kind)
        ours = al.decode(split, lens, PROMPT, k=5, position="all", exact=True)
        assert ours.heads == al.decode(whole, reference, PROMPT, k=5, position="all", exact=True).heads
    assert torch.equal(split.W_O, whole.W_O) and split.fingerprint() == whole.fingerprint()


def test_a_json_device_map_splits_between_layers(model_dir, whole, tmp_path):
    split = al.load_model(str(model_dir), device_map=LAYER_SPLIT)
    assert split.hf.hf_device_map["model.layers.0"] == "cpu" and split.hf.hf_device_map["model.layers.1"] == "disk"
    lens = al.Lens.from_model(split, "logit")
    ours = al.decode(split, lens, PROMPT, k=5, position="all", exact=True)
    assert ours.heads == al.decode(whole, al.Lens.logit(whole), PROMPT, k=5, position="all", exact=True).heads

    data = DataConfig(data=str(make_corpus(tmp_path / "corpus")), seq_len=16, holdout=0.2)
    fitted = [al.Lens.from_model(m, "affine") for m in (split, whole)]
    for lens in fitted:
        fit(lens, data, FitConfig(tokens=256, batch_size=4))
    torch.testing.assert_close(fitted[0].delta, fitted[1].delta, rtol=1e-4, atol=1e-6)
    trained = [al.Lens.from_model(m, "affine") for m in (split, whole)]
    losses = [train(lens, data, TrainConfig(tokens=64, batch_size=4)).loss for lens in trained]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(trained[0].delta, trained[1].delta, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("text", ["everywhere", "{}", "[1, 2]", '{"lm_head": "tpu"}'])
def test_a_bad_device_map_is_one_clear_error(text):
    with pytest.raises(AttentionLensError, match="device"):
        parse_device_map(text)


def test_cli_device_map_decodes_like_the_whole_model(model_dir, capsys):
    from conftest import run_cli

    outputs = []
    for extra in ([], ["--device-map", LAYER_SPLIT]):
        code, out, err = run_cli(["decode", "--model", model_dir, "--lens", "dla", "--position", "all", "--exact",
                                  "--json", *extra, PROMPT], capsys)
        assert code == 0, err
        outputs.append(json.loads(out)["heads"])
    assert outputs[0] == outputs[1]
    code, out, err = run_cli(["decode", "--model", model_dir, "--device-map", "everywhere", PROMPT], capsys)
    assert code == 2 and err.count("\n") == 1 and "--device-map 'everywhere'" in err


def test_a_sharded_run_builds_only_its_slice_of_the_lens(whole):
    from attention_lens.distributed import World
    from attention_lens.train import _local_shard

    skeleton = al.Lens.from_model(whole, "full", materialize=False)
    assert skeleton.is_skeleton and all(p.device.type == "meta" for p in skeleton.parameters())
    reference = al.Lens.from_model(whole, "full")
    for rank in range(2):
        local = _local_shard(skeleton, TrainConfig(batch_size=4, shard_heads=True), World(rank=rank, size=2))
        assert local.config.layers == [rank] and not local.is_skeleton
        torch.testing.assert_close(local.weight[0], reference.weight[rank])  # the kind's own initialization
