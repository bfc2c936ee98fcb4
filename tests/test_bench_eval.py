"""bench/run.py's eval comparison runs on a subset of layers (what --quick measures) and on all of them."""

import pytest
import torch

from bench.run import eval_speed
from conftest import make_tiny_model


@pytest.mark.parametrize("layers", [None, [1]])
def test_eval_speed_on_all_layers_and_on_a_subset(layers):
    model = make_tiny_model("llama")
    batch = torch.randint(3, model.vocab, (2, 12))
    result = eval_speed(model, batch, layers)
    assert result["eval_tokens_per_s"] > 0 and result["eval_exact_tokens_per_s"] > 0
    assert result["eval_speedup_vs_fp32"] == pytest.approx(result["eval_tokens_per_s"] / result["eval_exact_tokens_per_s"])
