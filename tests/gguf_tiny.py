"""Write a tiny llama GGUF (Q8_0 weights, a byte-level BPE tokenizer) the way llama.cpp lays one out."""

from __future__ import annotations

import json

import numpy as np
import torch


def _interleave_rotary_halves(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """HF llama keeps each head's rotary pairs as (first half, second half); GGUF interleaves them. transformers
    undoes this when it loads a GGUF, so the file must hold the interleaved order."""
    rows, columns = weight.shape
    per_head = weight.reshape(n_heads, 2, rows // n_heads // 2, columns)  # (head, half, pair, in)
    return per_head.transpose(0, 2, 1, 3).reshape(rows, columns)


def write_tiny_llama_gguf(path, seed: int = 0):
    """(path, the HF model whose weights it holds before quantization)."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import SAMPLE_TEXT

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([SAMPLE_TEXT] * 20, trainer)
    state = json.loads(tokenizer.to_str())["model"]
    vocab = sorted(state["vocab"].items(), key=lambda item: item[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]

    torch.manual_seed(seed)
    # Row lengths multiple of 32: Q8_0 quantizes blocks of 32 along each row.
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    hf = LlamaForCausalLM(config).eval()
    weights = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if token == "<eos>" else gguf.TokenType.NORMAL
                            for token, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)

    def add(name, array, quantize=True):
        if quantize:
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)

    add("token_embd.weight", weights["model.embed_tokens.weight"])
    add("output_norm.weight", weights["model.norm.weight"], quantize=False)
    add("output.weight", weights["lm_head.weight"])
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", weights[prefix + "input_layernorm.weight"], quantize=False)
        add(f"blk.{i}.ffn_norm.weight", weights[prefix + "post_attention_layernorm.weight"], quantize=False)
        add(f"blk.{i}.attn_q.weight", _interleave_rotary_halves(weights[prefix + "self_attn.q_proj.weight"], 4))
        add(f"blk.{i}.attn_k.weight", _interleave_rotary_halves(weights[prefix + "self_attn.k_proj.weight"], 2))
        add(f"blk.{i}.attn_v.weight", weights[prefix + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", weights[prefix + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_gate.weight", weights[prefix + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", weights[prefix + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", weights[prefix + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, hf
