"""A model directory that cannot load is one line saying what is wrong and what to do, never a traceback from
transformers: an inconsistent config, no tokenizer, NaN in config.json, sizes no machine holds, garbage weights."""

from __future__ import annotations

import json
import shutil

import pytest
from clirun import run
from conftest import make_model_dir

pytestmark = pytest.mark.robustness


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("load-errors") / "model")


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def broken_copy(model_dir, tmp_path, how: str):
    broken = tmp_path / how
    shutil.copytree(model_dir, broken)
    if how == "inconsistent":
        edit_config(broken, hidden_size=7)  # 4 heads cannot split 7 dimensions
    elif how == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (broken / name).unlink()
    elif how == "nan":
        text = (broken / "config.json").read_text()
        (broken / "config.json").write_text(text.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN'))
    elif how == "huge":
        edit_config(broken, hidden_size=2**16, intermediate_size=2**18, num_hidden_layers=512)
    elif how == "garbage-weights":
        (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    return broken


@pytest.mark.parametrize("how, fragments", [
    ("inconsistent", ["is not usable", "hidden size (7)", "config.json"]),
    ("no-tokenizer", ["has no tokenizer", "tokenizer.save_pretrained"]),
    ("nan", ["NaN", "config.json", "finite"]),
    ("huge", ["GiB", "config.json"]),
    ("garbage-weights", ["could not load the model", "weight files"]),
])
def test_broken_model_directory_is_one_line(model_dir, tmp_path, how, fragments):
    broken = broken_copy(model_dir, tmp_path, how)
    run("decode", "--model", broken, "hello").assert_one_line_error(*fragments)
