"""The architecture table: what it refuses, and why."""

import pytest
import torch

from attention_lens import AttentionLensError
from attention_lens.architectures import arch_spec
from attention_lens.models import load_model
from conftest import VOCAB, _ByteTokenizer


def test_a_model_without_attention_heads_is_refused_with_the_reason():
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    mamba = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=1))
    with pytest.raises(AttentionLensError, match="'mamba' cannot get an attention lens: .*no attention heads"):
        load_model((mamba, _ByteTokenizer()))


def test_an_unknown_model_type_lists_what_is_supported():
    with pytest.raises(AttentionLensError, match="unsupported architecture model_type='bert'; supported: .*olmo2"):
        arch_spec("bert")

