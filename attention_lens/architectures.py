"""Where each supported architecture keeps its attention output projection, norms and unembedding."""

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
    """Gemma-2/3 normalize the attention output before the residual add; None where no such norm exists."""
    norm_weight_offset: float = 0.0
    """Gemma's RMSNorm multiplies by (1 + weight), everyone else by weight."""


_LLAMA_LIKE = ArchSpec(
    layers="model.layers", out_proj="self_attn.o_proj", final_norm="model.norm", norm_kind="rms"
)
_GEMMA_TEXT = ArchSpec(
    layers="model.layers",
    out_proj="self_attn.o_proj",
    final_norm="model.norm",
    norm_kind="rms",
    # In Gemma this name is the norm of the attention output, not llama's pre-MLP norm.
    post_attn_norm="post_attention_layernorm",
    norm_weight_offset=1.0,
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma2": _GEMMA_TEXT,
    "gemma3_text": _GEMMA_TEXT,
    # The multimodal Gemma3ForConditionalGeneration wraps the text model one level deeper.
    "gemma3": replace(_GEMMA_TEXT, layers="model.language_model.layers", final_norm="model.language_model.norm"),
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
}


def arch_spec(model_type: str) -> ArchSpec:
    """The table entry for `model_type`, or a clear error listing what is supported."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise AttentionLensError(
            f"unsupported architecture model_type={model_type!r}; supported: {supported}"
        ) from None
