"""GPU checks (skipped without CUDA): a CPU fp32 lens on a GPU bf16 model, and training on the GPU."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attention_lens as al  # noqa: E402
from attention_lens.cli import main  # noqa: E402
from conftest import make_corpus, make_model_dir  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cpu_lens_loads_on_gpu_bf16_model_and_trains_there(tmp_path, capsys):
    model_dir, corpus = make_model_dir(tmp_path / "model"), make_corpus(tmp_path / "corpus")
    out = tmp_path / "lens"
    args = ["train", "--model", str(model_dir), "--data", str(corpus), "--seq-len", "16", "--tokens", "256",
            "--eval-tokens", "0", "--lr", "0.01", "--out", str(out), "--json"]
    assert main(args) == 0
    capsys.readouterr()
    cpu_model = al.load_model(str(model_dir))
    gpu_model = al.load_model(str(model_dir), device="cuda")
    assert next(gpu_model.hf.parameters()).dtype == torch.bfloat16
    assert gpu_model.fingerprint() == cpu_model.fingerprint()  # dtype-independent
    cpu = al.decode(cpu_model, al.Lens.load(out, cpu_model), "The quick brown fox", k=1, position="all")
    gpu = al.decode(gpu_model, al.Lens.load(out, gpu_model), "The quick brown fox", k=1, position="all")
    agree = sum(a.top[0].id == b.top[0].id for a, b in zip(cpu.heads, gpu.heads))
    assert agree >= 0.8 * len(cpu.heads)  # bf16 weights move a few near-ties
    assert main(args[:-3] + ["--device", "cuda", "--dtype", "bfloat16", "--out", str(tmp_path / "gpu"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 4
