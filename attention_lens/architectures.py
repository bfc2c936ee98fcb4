"""Where each supported architecture keeps its attention output projection, norms and unembedding.

Every entry was read off the model's source in transformers (modeling_<type>.py): the module the attention
output passes through, anything between it and the residual stream, and everything between the final
residual and the logits. The tiny-model tests (tests/conftest.py) build one model per entry and check the
per-head outputs against the residual stream and the readout against the model's logits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import AttentionLensError


@dataclass(frozen=True)
class ArchSpec:
    """Module paths and conventions of one HF `model_type`, relative to the CausalLM module."""

    layers: str
    """Path of the ModuleList of decoder blocks."""
    out_proj: str
    """Path, inside one block, of the attention output projection (its input is the heads' z)."""
    final_norm: str
    """Path of the norm applied to the residual stream before the unembedding."""
    norm_kind: str
    """'rms' (RMSNorm) or 'layer' (LayerNorm with mean-centering)."""
    out_proj_is_conv1d: bool = False
    """GPT-2's Conv1D stores its weight as (in, out): a head's W_O is a row slice, not a column slice."""
    post_attn_norm: str | None = None
    """RMS norm of the attention output before the residual add (Gemma-2/3, OLMo-2); None where there is none."""
    norm_weight_offset: float = 0.0
    """Gemma's RMSNorm multiplies by (1 + weight), everyone else by weight."""
    norm_eps: float | None = None
    """Epsilon of norms that store none (OLMo's parameter-free LayerNorm hard-codes 1e-5)."""
    residual_multiplier: str | None = None
    """Config attribute the attention output is multiplied by before the residual add (Granite)."""
    logit_multiplier: str | None = None
    """Config attribute the logits are multiplied by (Cohere's logit_scale)."""
    logit_divisor: str | None = None
    """Config attribute the logits are divided by (Granite's logits_scaling)."""


_LLAMA_LIKE = ArchSpec(
    layers="model.layers", out_proj="self_attn.o_proj", final_norm="model.norm", norm_kind="rms"
)
# In these models `post_attention_layernorm` normalizes the attention output, not (as in llama) the MLP input.
_GEMMA_TEXT = replace(_LLAMA_LIKE, post_attn_norm="post_attention_layernorm", norm_weight_offset=1.0)
_OLMO2 = replace(_LLAMA_LIKE, post_attn_norm="post_attention_layernorm")
_COHERE = replace(_LLAMA_LIKE, norm_kind="layer", logit_multiplier="logit_scale")
_GRANITE = replace(_LLAMA_LIKE, residual_multiplier="residual_multiplier", logit_divisor="logits_scaling")
_LAYER_NORM_LLAMA_PATHS = replace(_LLAMA_LIKE, norm_kind="layer")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,  # the experts are MLPs; attention is llama's
    "qwen2": _LLAMA_LIKE,
    "qwen2_moe": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "qwen3_moe": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmoe": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
    "helium": _LLAMA_LIKE,
    "gemma": replace(_LLAMA_LIKE, norm_weight_offset=1.0),  # (1 + w) norms, no post-attention norm
    "gemma2": _GEMMA_TEXT,
    "gemma3_text": _GEMMA_TEXT,
    # The multimodal Gemma3ForConditionalGeneration wraps the text model one level deeper.
    "gemma3": replace(_GEMMA_TEXT, layers="model.language_model.layers", final_norm="model.language_model.norm"),
    "olmo": replace(_LLAMA_LIKE, norm_kind="layer", norm_eps=1e-5),
    "olmo2": _OLMO2,
    "olmo3": _OLMO2,
    "cohere": _COHERE,  # attention and MLP in parallel off one LayerNorm (no bias); logits * logit_scale
    "cohere2": _COHERE,
    "granite": _GRANITE,
    "granitemoe": _GRANITE,
    "starcoder2": _LAYER_NORM_LLAMA_PATHS,  # LayerNorms with bias; o_proj bias when use_bias
    "stablelm": _LAYER_NORM_LLAMA_PATHS,
    "phi": ArchSpec(layers="model.layers", out_proj="self_attn.dense", final_norm="model.final_layernorm",
                    norm_kind="layer"),  # lm_head has a bias
    # c_proj also names GPT-2's MLP projection; the path through `attn.` picks the attention one.
    "gpt2": ArchSpec(
        layers="transformer.h",
        out_proj="attn.c_proj",
        final_norm="transformer.ln_f",
        norm_kind="layer",
        out_proj_is_conv1d=True,
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers",
        out_proj="attention.dense",
        final_norm="gpt_neox.final_layer_norm",
        norm_kind="layer",
    ),
    # Every Falcon layout (multi-query, grouped new-decoder, parallel or sequential, alibi or rotary) merges
    # its heads into `dense`'s input the same way.
    "falcon": ArchSpec(
        layers="transformer.h", out_proj="self_attention.dense", final_norm="transformer.ln_f", norm_kind="layer"
    ),
    "gptj": ArchSpec(layers="transformer.h", out_proj="attn.out_proj", final_norm="transformer.ln_f",
                     norm_kind="layer"),  # lm_head has a bias
    "codegen": ArchSpec(layers="transformer.h", out_proj="attn.out_proj", final_norm="transformer.ln_f",
                        norm_kind="layer"),  # GPT-J's block (parallel attention and MLP); lm_head has a bias
    # Multi-query attention; unlike GPT-2 its c_proj is an nn.Linear (out, in).
    "gpt_bigcode": ArchSpec(layers="transformer.h", out_proj="attn.c_proj", final_norm="transformer.ln_f",
                            norm_kind="layer"),
    "nemotron": replace(_LAYER_NORM_LLAMA_PATHS, norm_weight_offset=1.0),  # LayerNorm1P: (1 + weight)
}

_RECURRENT = "it is a recurrent/state-space model: it has no attention heads to read"
_HYBRID = ("it is a hybrid model whose layers are mostly recurrent or linear-attention blocks without "
           "per-head softmax attention; a lens needs every layer's attention heads")
UNSUPPORTED: dict[str, str] = {
    "mamba": _RECURRENT,
    "mamba2": _RECURRENT,
    "falcon_mamba": _RECURRENT,
    "rwkv": _RECURRENT,
    "xlstm": _RECURRENT,
    "recurrent_gemma": _HYBRID,
    "jamba": _HYBRID,
    "bamba": _HYBRID,
    "zamba": _HYBRID,
    "zamba2": _HYBRID,
    "falcon_h1": _HYBRID,
    "granitemoehybrid": _HYBRID,
    "lfm2": _HYBRID,
    "lfm2_moe": _HYBRID,
    "qwen3_next": _HYBRID,
    "minimax": _HYBRID,
}


def arch_spec(model_type: str) -> ArchSpec:
    """The table entry for `model_type`, or a clear error saying why it is not supported / what is."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if model_type in UNSUPPORTED:
        raise AttentionLensError(f"model_type={model_type!r} cannot get an attention lens: {UNSUPPORTED[model_type]}")
    supported = ", ".join(sorted(ARCHITECTURES))
    raise AttentionLensError(f"unsupported architecture model_type={model_type!r}; supported: {supported}")
