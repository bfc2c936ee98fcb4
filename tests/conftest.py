"""Tiny random models of every supported architecture, built from HF config classes (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from attention_lens.architectures import ARCHITECTURES  # noqa: E402
from attention_lens.models import Model, load_model  # noqa: E402

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, hidden_size=32)


def _configs():
    """One tiny config per table entry (`model_type`) and per layout variant (`model_type:variant`)."""
    import transformers as t

    grouped = dict(COMMON, num_key_value_heads=2, intermediate_size=48)
    moe = dict(grouped, num_experts_per_tok=2, moe_intermediate_size=16)
    granite_scales = dict(residual_multiplier=0.37, logits_scaling=3.0, embedding_multiplier=2.0,
                          attention_multiplier=0.2)
    neox = dict(COMMON, intermediate_size=48, attention_bias=True)
    falcon = dict(COMMON, bias=True)
    return {
        "llama": lambda: t.LlamaConfig(**grouped),
        "mistral": lambda: t.MistralConfig(**grouped),
        "mixtral": lambda: t.MixtralConfig(**grouped, num_local_experts=3, num_experts_per_tok=2),
        "qwen2": lambda: t.Qwen2Config(**grouped),  # value/query/key biases: W_O·b_v belongs to the head
        "qwen2_moe": lambda: t.Qwen2MoeConfig(**moe, num_experts=3, shared_expert_intermediate_size=24),
        "qwen3": lambda: t.Qwen3Config(**grouped, head_dim=16),  # head_dim != d_model / heads
        "qwen3_moe": lambda: t.Qwen3MoeConfig(**moe, num_experts=3, head_dim=16),
        "phi3": lambda: t.Phi3Config(**grouped, pad_token_id=0, bos_token_id=1, eos_token_id=1),
        "olmoe": lambda: t.OlmoeConfig(**dict(grouped, num_experts_per_tok=2), num_experts=3, pad_token_id=0),
        "smollm3": lambda: t.SmolLM3Config(**grouped, pad_token_id=0),
        "helium": lambda: t.HeliumConfig(**grouped, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=1),
        # Gemma: (1 + w) norms, head_dim * heads (4 x 16 = 64) != d_model (32).
        "gemma": lambda: t.GemmaConfig(**dict(grouped, num_key_value_heads=1), head_dim=16, pad_token_id=0),
        # Gemma-2/3 add a post-attention norm; Gemma-2 soft-caps the logits.
        "gemma2": lambda: t.Gemma2Config(**dict(grouped, num_key_value_heads=1), head_dim=16,
                                         final_logit_softcapping=30.0),
        "gemma3_text": lambda: t.Gemma3TextConfig(**dict(grouped, num_key_value_heads=1), head_dim=16),
        # The multimodal wrapper: the text model sits one level deeper, its config in text_config.
        "gemma3": lambda: t.Gemma3Config(
            text_config=t.Gemma3TextConfig(**dict(grouped, num_key_value_heads=1), head_dim=16).to_dict(),
            vision_config=t.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=28, patch_size=14).to_dict(),
            mm_tokens_per_image=4, image_token_index=95, boi_token_index=93, eoi_token_index=94),
        "olmo": lambda: t.OlmoConfig(**grouped, pad_token_id=0),  # parameter-free LayerNorms
        "olmo2": lambda: t.Olmo2Config(**grouped, pad_token_id=0),  # post-attention RMS norm, plain gain
        "olmo3": lambda: t.Olmo3Config(**grouped, pad_token_id=0),
        "cohere": lambda: t.CohereConfig(**grouped, logit_scale=0.3, pad_token_id=0, bos_token_id=1,
                                         eos_token_id=1),
        "cohere:qk_norm": lambda: t.CohereConfig(**grouped, logit_scale=2.5, use_qk_norm=True, pad_token_id=0,
                                                 bos_token_id=1, eos_token_id=1),
        "cohere2": lambda: t.Cohere2Config(**grouped, logit_scale=0.3, pad_token_id=0, bos_token_id=1,
                                           eos_token_id=1),
        "granite": lambda: t.GraniteConfig(**grouped, **granite_scales, attention_bias=True),
        "granitemoe": lambda: t.GraniteMoeConfig(**grouped, **granite_scales, num_local_experts=3,
                                                 num_experts_per_tok=2),
        "starcoder2": lambda: t.Starcoder2Config(**grouped, use_bias=True),
        "stablelm": lambda: t.StableLmConfig(**grouped, use_qkv_bias=True, qk_layernorm=True),
        "stablelm:parallel": lambda: t.StableLmConfig(**grouped, use_parallel_residual=True),
        "phi": lambda: t.PhiConfig(**grouped, qk_layernorm=True),
        "gpt2": lambda: t.GPT2Config(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, n_positions=64,
                                     bos_token_id=1, eos_token_id=1),
        "gpt_neox": lambda: t.GPTNeoXConfig(**neox),  # parallel attention and MLP (use_parallel_residual)
        "gpt_neox:sequential": lambda: t.GPTNeoXConfig(**neox, use_parallel_residual=False),
        "gptj": lambda: t.GPTJConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, rotary_dim=4,
                                     n_positions=64, bos_token_id=1, eos_token_id=1),
        "codegen": lambda: t.CodeGenConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, rotary_dim=4,
                                           n_positions=64, n_ctx=64, bos_token_id=1, eos_token_id=1),
        "gpt_bigcode": lambda: t.GPTBigCodeConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, n_positions=64,
                                                  bos_token_id=1, eos_token_id=1),  # multi-query
        "nemotron": lambda: t.NemotronConfig(**grouped, pad_token_id=0, bos_token_id=1, eos_token_id=1),
        "falcon": lambda: t.FalconConfig(**falcon),  # multi-query, parallel attention
        "falcon:sequential": lambda: t.FalconConfig(**falcon, parallel_attn=False, multi_query=False),
        "falcon:new_decoder": lambda: t.FalconConfig(**falcon, new_decoder_architecture=True, num_kv_heads=2),
        "falcon:alibi": lambda: t.FalconConfig(**falcon, alibi=True, multi_query=False),
    }


TINY_ARCHITECTURES = sorted(_configs())


def make_tiny_model(model_type: str, seed: int = 0, randomize_norms: bool = True) -> Model:
    """A tiny random CausalLM of `model_type` (or `model_type:variant`), wrapped; norms and biases made
    non-trivial so bugs show."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _configs()[model_type]()
    config.attn_implementation = "eager"
    hf = AutoModelForCausalLM.from_config(config)
    if randomize_norms:
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "norm" in name or "ln" in name or name.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.3)
    n_params = sum(p.numel() for p in hf.parameters())
    assert n_params < 200_000, f"tiny {model_type} has {n_params} parameters"
    return load_model((hf, _ByteTokenizer()))


class _ByteTokenizer:
    """Characters -> ids below VOCAB; enough of the HF tokenizer surface for the library."""

    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % (VOCAB - 2)) for c in text]}

    def decode(self, ids):
        # The inverse of __call__ on printable characters (ids 2.. stand for ord(c) mod 94).
        return "".join("<eos>" if i < 2 else chr(i - 2) if i - 2 >= 32 else chr(i - 2 + 94) for i in ids)

    def batch_decode(self, sequences):
        return [self.decode(ids) for ids in sequences]


@pytest.fixture(params=TINY_ARCHITECTURES)
def tiny_model(request) -> Model:
    return make_tiny_model(request.param)


def test_table_covers_required_architectures():
    required = {"gpt2", "llama", "gemma3", "gemma3_text", "qwen2", "qwen3", "mistral", "gpt_neox", "phi3",
                "olmo", "olmo2", "granite", "starcoder2", "stablelm", "cohere", "gemma", "phi", "mixtral",
                "qwen2_moe", "qwen3_moe", "falcon"}
    assert required <= set(ARCHITECTURES) and len(ARCHITECTURES) >= 20


def test_every_table_entry_has_a_tiny_model():
    """Each architecture in the table is exercised by every tiny-model test, and each tiny model is its type."""
    assert {name.split(":")[0] for name in TINY_ARCHITECTURES} == set(ARCHITECTURES)
    for name in TINY_ARCHITECTURES:
        assert _configs()[name]().model_type == name.split(":")[0]


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "Fortune favours the bold, and the bold write tests. Counting: one two three four five six. "
)


def make_corpus(directory, documents: int = 12, repeats: int = 6):
    """A directory of small .txt documents, enough for a by-document split and many windows."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        (directory / f"doc{i:02d}.txt").write_text(f"Document {i}. " + SAMPLE_TEXT * repeats)
    return directory


def make_model_dir(directory, model_type: str = "llama", seed: int = 0):
    """A tiny model saved as a real local HF directory with a trained byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([SAMPLE_TEXT] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")
    torch.manual_seed(seed)
    config = _configs()[model_type]()
    config.vocab_size = len(fast)
    config.eos_token_id = config.bos_token_id = fast.eos_token_id
    hf = AutoModelForCausalLM.from_config(config)
    hf.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def run_cli(argv, capsys):
    """`attention-lens argv` in-process with warnings as errors: (exit code, stdout, stderr)."""
    import warnings

    from attention_lens.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine idle-spinning OpenMP threads make each
    forward pass hundreds of times slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
