"""`plan`: sizes read from config.json alone, and memory figures that hold against what a run really uses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attention_lens as al
import attention_lens.models as models
from attention_lens.plan import Hardware, model_shape, plan, skeleton
from attention_lens.sources import read_config
from conftest import make_model_dir, run_cli

FIXED_HARDWARE = Hardware("test", flops=1e11, exps=1e9, source="table")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("plan") / "qwen3", model_type="qwen3")


@pytest.fixture
def nothing_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("plan loaded weights")

    monkeypatch.setattr(models, "_from_pretrained", refuse)


def test_shape_from_the_config_alone_matches_the_loaded_model(model_dir, nothing_loads, monkeypatch):
    shape = model_shape(read_config(str(model_dir)), "qwen3")
    monkeypatch.undo()
    loaded = al.load_model(str(model_dir))
    assert (shape.n_layers, shape.n_heads, shape.d_head, shape.d_model, shape.vocab) == (
        loaded.n_layers, loaded.n_heads, loaded.d_head, loaded.d_model, loaded.vocab)
    assert shape.d_head * shape.n_heads != shape.d_model  # qwen3's head_dim, not d_model / heads
    assert shape.parameters == sum(p.numel() for p in loaded.hf.parameters())


@pytest.mark.parametrize("kind", ["affine", "full", "logit"])
def test_lens_figures_are_the_lens_a_run_builds(model_dir, kind):
    loaded = al.load_model(str(model_dir))
    lens = al.Lens.from_model(loaded, kind, layers=[1])
    predicted = plan(model_shape(loaded.hf.config, "qwen3"), kind, layers=[1], hardware=FIXED_HARDWARE)
    assert predicted.memory.lens_parameters == sum(4 * p.numel() for p in lens.parameters())
    assert predicted.training == bool(list(lens.parameters()))
    assert predicted.memory.optimizer_state == 3 * predicted.memory.lens_parameters  # gradient + Adam moments
    assert predicted.memory.weights == sum(4 * p.numel() for p in loaded.hf.parameters())


def test_time_scales_with_tokens_and_hardware(model_dir):
    shape = model_shape(read_config(str(model_dir)), "qwen3")
    one = plan(shape, "affine", tokens=1000, hardware=FIXED_HARDWARE)
    assert plan(shape, "affine", tokens=3000, hardware=FIXED_HARDWARE).seconds == pytest.approx(3 * one.seconds)
    faster = Hardware("x2", flops=2e11, exps=2e9, source="table")
    assert plan(shape, "affine", tokens=1000, hardware=faster).seconds == pytest.approx(one.seconds / 2)


def test_plan_command_reads_only_the_config(model_dir, nothing_loads, capsys):
    code, out, err = run_cli(["plan", "--model", model_dir, "--kind", "affine", "--tokens", 5000, "--json"], capsys)
    assert code == 0, err
    document = json.loads(out)
    assert document["model"]["model_type"] == "qwen3" and document["tokens"] == 5000
    memory = document["memory"]
    steady = ("runtime", "weights", "readout", "lens_parameters", "optimizer_state")
    phases = max(memory["activations"], memory["layer_activations"] + memory["layer_workspace"])
    assert memory["peak"] == sum(memory[key] for key in steady) + phases
    assert document["seconds"] > 0 and document["hardware"]["source"] == "measured"
    code, out, err = run_cli(["plan", "--model", model_dir], capsys)
    assert code == 0 and "peak" in out and "time for 20,000 tokens" in out


def test_plan_refuses_an_unknown_kind_in_one_line(model_dir, capsys):
    code, out, err = run_cli(["plan", "--model", model_dir, "--kind", "huge"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "unknown lens kind 'huge'" in err


MEASURE = """
import sys
from attention_lens.cli.app import main
code = main(sys.argv[1:])
peak = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM'))
print(f'PEAK {peak * 1024} {code}')
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc")
@pytest.mark.parametrize("batch_size, layers", [(4, "20-29"), (8, "25-29")])
def test_predicted_peak_is_within_ten_percent_of_a_real_run(tmp_path, capsys, batch_size, layers):
    """SmolLM2 on CPU: one step of `train` in a fresh process, its peak resident memory against plan's figure."""
    code, out, err = run_cli(["plan", "--model", "smollm2-135m", "--kind", "affine", "--layers", layers,
                              "--batch-size", batch_size, "--seq-len", 128, "--json"], capsys)
    assert code == 0, err
    predicted = json.loads(out)["memory"]["peak"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(al.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, "train", "--model", "smollm2-135m", "--kind", "affine", "--layers", layers,
         "--tokens", str(batch_size * 128), "--batch-size", str(batch_size), "--seq-len", "128",
         "--eval-tokens", "0", "--out", str(tmp_path / "lens")],
        capture_output=True, text=True, env=env, timeout=3600)
    peak_line = [line for line in run.stdout.splitlines() if line.startswith("PEAK ")]
    assert peak_line and peak_line[0].endswith(" 0"), run.stderr[-2000:]
    measured = int(peak_line[0].split()[1])
    assert abs(predicted - measured) <= 0.10 * measured, (predicted / 2**20, measured / 2**20)


def test_plan_splits_the_weights_as_a_device_map_would(model_dir, nothing_loads, capsys):
    split = '{"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "disk", ' \
            '"lm_head": "disk"}'
    code, out, err = run_cli(["plan", "--model", model_dir, "--device-map", split, "--json"], capsys)
    assert code == 0, err
    document = json.loads(out)
    devices, weights = document["devices"], document["memory"]["weights"]
    assert set(devices) == {"cpu", "disk"} and sum(devices.values()) == weights
    config = read_config(str(model_dir))
    on_disk = [p for name, p in skeleton(config, "qwen3").named_parameters() if name.startswith(("model.layers.1.",
                                                                                                "model.norm", "lm_head"))]
    assert devices["disk"] == sum(4 * p.numel() for p in on_disk)
