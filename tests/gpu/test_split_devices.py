"""Two GPUs (skipped with fewer): a model split between them by a device map keeps each layer's lens parameters on
that layer's GPU, and trains and decodes like the same model on one device."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attention_lens as al  # noqa: E402
from attention_lens.data import DataConfig  # noqa: E402
from attention_lens.train import TrainConfig  # noqa: E402
from conftest import make_corpus, make_model_dir  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
SPLIT = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
         "model.norm": 1, "lm_head": 1}


def test_each_layers_lens_lives_on_its_gpu_and_trains_like_one_device(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    data = DataConfig(data=str(make_corpus(tmp_path / "corpus")), seq_len=16, holdout=0.2)
    split = al.load_model(str(model_dir), device_map=SPLIT, dtype=torch.float32)
    whole = al.load_model(str(model_dir), device="cuda:1", dtype=torch.float32)
    assert [split.layer_device(layer) for layer in range(2)] == [torch.device("cuda", 0), torch.device("cuda", 1)]
    lenses = [al.Lens.from_model(model, "affine") for model in (split, whole)]
    assert lenses[0].is_split and lenses[0].runs == [(0, 1), (1, 2)]
    assert [lenses[0].layer_device(layer) for layer in range(2)] == [torch.device("cuda", 0), torch.device("cuda", 1)]
    for lens in lenses:
        al.train(lens, data, TrainConfig(tokens=64, batch_size=4))
    for name, tensor in lenses[0].tensors().items():
        torch.testing.assert_close(tensor, lenses[1].tensors()[name], rtol=1e-3, atol=1e-5)
    assert lenses[0].split[0]["delta"].device == torch.device("cuda", 0)  # training left it at home
    decoded = [al.decode(model, lens, "The quick brown fox", k=3, position="all", exact=True)
               for model, lens in zip((split, whole), lenses)]
    assert [[e.id for e in r.top] for r in decoded[0].heads] == [[e.id for e in r.top] for r in decoded[1].heads]
