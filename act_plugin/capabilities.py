"""What ACT can calibrate: one capability table and one refusal function for every host.

The ACT maths (``core``) models plain causal softmax attention over per-head keys and values,
with an optional sliding window. Anything else that changes the attention probabilities
(a position bias, logit soft-capping, learned sink logits, a latent KV cache, a quantized
cache) or that is not softmax attention at all (Mamba/linear attention, cross-attention)
is outside what it computes. Each host (the vLLM backends at engine start, the transformers
path at its first call) describes a layer as :class:`LayerFeatures` and asks
:func:`unsupported_reasons`; a configured layer with any reason is refused, naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LayerFeatures", "SUPPORTED_KV_CACHE_DTYPES", "unsupported_reasons", "describe_refusal"]

# KV-cache dtypes whose stored keys/values are the model's own numbers (vLLM spellings
# included: "half"/"float" are accepted aliases of float16/float32).
SUPPORTED_KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32", "half", "float")

# Attention kinds ACT is defined for: causal self-attention of a decoder.
_SELF_ATTENTION = "decoder"


@dataclass(frozen=True)
class LayerFeatures:
    """What a host knows about one attention layer."""

    kind: str = "attention"  # "attention", "mamba", "linear", "mla", "chunked_local", ...
    attn_type: str = _SELF_ATTENTION  # "decoder", "encoder", "encoder_only", "encoder_decoder"
    causal: bool = True
    alibi: bool = False
    position_bias: bool = False  # any additive bias on the scores other than ALiBi
    logit_softcap: bool = False
    learned_sinks: bool = False
    kv_cache_dtype: str = "auto"


def unsupported_reasons(f: LayerFeatures) -> list[str]:
    """Why ACT cannot calibrate a layer with these features (empty: it can)."""
    reasons = []
    if f.kind != "attention":
        reasons.append(f"it is a {f.kind} layer, not softmax self-attention")
    if f.attn_type != _SELF_ATTENTION:
        reasons.append(f"its attention type is {f.attn_type!r} (ACT is defined for decoder self-attention)")
    elif not f.causal:
        reasons.append("it is not causal (ACT is defined for causal decoders)")
    if f.alibi:
        reasons.append("it uses ALiBi position bias")
    if f.position_bias:
        reasons.append("it adds a position bias to the scores")
    if f.logit_softcap:
        reasons.append("it uses logit soft-capping")
    if f.learned_sinks:
        reasons.append("it uses learned attention sinks (s_aux)")
    if str(f.kv_cache_dtype) not in SUPPORTED_KV_CACHE_DTYPES:
        reasons.append(f"its KV cache is quantized (kv_cache_dtype={f.kv_cache_dtype!r}; use 'auto')")
    return reasons


def describe_refusal(where: str, reasons: list[str], fix: str) -> str:
    """One message for a refused layer: where, why, and what to change."""
    return f"ACT cannot calibrate {where}: {'; '.join(reasons)}. {fix}"
