"""What each model family becomes in GGUF: llama.cpp's architecture, its hyperparameters and the
few tensors whose layout or values llama.cpp expects differently from Hugging Face.

    family (config.model_type)  GGUF arch  tensors changed on the way out
    llama, mistral              llama      Q/K rows: rotary halves -> interleaved pairs
    qwen2, qwen3                qwen2/3    -
    gemma, gemma2, gemma3_text  gemma*     RMSNorm weights + 1 (HF computes x * (1 + w))
    phi (Phi-2)                 phi2       -
    phi3                        phi3       - (fused qkv_proj and gate_up_proj stay fused)
    gpt2                        gpt2       Conv1D weights (in x out) transposed
    gpt_neox                    gptneox    fused QKV: per-head [q k v] blocks -> [Q | K | V]

Tensor names go through the `gguf` package's own name map for the architecture. A family not
in the table, or a setting llama.cpp would silently compute differently (scaled rotary
embeddings other than linear, Gemma's attention scale), is refused naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sft_pipeline.export.errors import ExportError


@dataclass(frozen=True)
class Family:
    arch: str
    hparams: Callable[[Any, Any], None]  # (gguf writer, HF config)
    # (HF tensor name, shape) -> the shape written; (HF name, array, config) -> the array written
    shape: Callable[[str, tuple[int, ...]], tuple[int, ...]] = lambda name, shape: shape
    convert: Callable[[str, np.ndarray, Any], np.ndarray] = lambda name, array, config: array
    # llama.cpp's loader for the architecture: "tied" has no output matrix (the embeddings are
    # the head), "untied" requires one, "either" takes both.
    head: str = "either"


# --- hyperparameters ------------------------------------------------------------------------------


def _rope(config) -> dict[str, Any]:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(rope)


def _rope_for(config, layer_type: str) -> dict[str, Any]:
    rope = _rope(config)
    return dict(rope.get(layer_type, rope)) if layer_type in rope else rope


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_scaling(writer, config, rope: dict[str, Any]) -> None:
    import gguf

    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return
    raise ExportError(
        f"GGUF export of {config.model_type!r} does not support rope scaling {kind!r} (only "
        "unscaled or linearly scaled rotary embeddings are written)"
    )


def _decoder_common(
    writer,
    config,
    *,
    rms: bool = True,
    rope_dims: int | None = None,
    kv_length: bool = False,
    grouped: bool = True,
) -> None:
    head_count = config.num_attention_heads
    head_dim = _head_dim(config)
    rope = _rope_for(config, "full_attention")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(head_count)
    kv_heads = getattr(config, "num_key_value_heads", None) if grouped else None
    writer.add_head_count_kv(kv_heads or head_count)
    if rms:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    else:
        writer.add_layer_norm_eps(config.layer_norm_eps)
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(rope_dims or head_dim)
    if kv_length or head_dim * head_count != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    _rope_scaling(writer, config, rope)


def _llama_hparams(writer, config) -> None:
    _decoder_common(writer, config)


def _gemma_scale_check(config) -> None:
    # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B layer
    # counts); Hugging Face by query_pre_attn_scalar^-0.5. Refuse a model where they differ.
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is None:
        return
    big = {"gemma2": 46, "gemma3_text": 62}.get(config.model_type) == config.num_hidden_layers
    expected = config.hidden_size // config.num_attention_heads if big else _head_dim(config)
    if int(scalar) != expected:
        raise ExportError(
            f"GGUF export of {config.model_type!r}: query_pre_attn_scalar {scalar} is not the "
            f"{expected} llama.cpp uses for this model size"
        )


def _swa_pattern(config) -> list[bool] | None:
    types = getattr(config, "layer_types", None)
    return [t == "sliding_attention" for t in types] if types else None


def _gemma_hparams(writer, config) -> None:
    _gemma_scale_check(config)
    _decoder_common(writer, config, kv_length=True)
    if config.model_type == "gemma2" and config.attn_logit_softcapping:
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    pattern = _swa_pattern(config)
    if getattr(config, "sliding_window", None) and pattern and any(pattern):
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern(pattern)
        local = _rope_for(config, "sliding_attention")
        if local.get("rope_theta") is not None:
            writer.add_rope_freq_base_swa(float(local["rope_theta"]))
        elif getattr(config, "rope_local_base_freq", None):
            writer.add_rope_freq_base_swa(float(config.rope_local_base_freq))


def _partial_rotary(config) -> float:
    rope = _rope(config)
    return float(
        rope.get("partial_rotary_factor")
        or getattr(config, "partial_rotary_factor", None)
        or getattr(config, "rotary_pct", None)
        or 1.0
    )


def _phi2_hparams(writer, config) -> None:
    head_dim = config.hidden_size // config.num_attention_heads
    _decoder_common(writer, config, rms=False, rope_dims=int(_partial_rotary(config) * head_dim))
    writer.add_add_bos_token(False)


def _phi3_hparams(writer, config) -> None:
    head_dim = _head_dim(config)
    _decoder_common(writer, config, rope_dims=int(_partial_rotary(config) * head_dim))
    original = getattr(config, "original_max_position_embeddings", None)
    if original:
        writer.add_rope_scaling_orig_ctx_len(int(original))
    writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))


def _neox_hparams(writer, config) -> None:
    head_dim = config.hidden_size // config.num_attention_heads
    rope_dims = int(_partial_rotary(config) * head_dim)
    _decoder_common(writer, config, rms=False, rope_dims=rope_dims, grouped=False)
    writer.add_parallel_residual(bool(getattr(config, "use_parallel_residual", True)))


def _gpt2_hparams(writer, config) -> None:
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


# --- tensors --------------------------------------------------------------------------------------


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from halves (x0..x63 | y0..y63) to pairs (x0 y0 x1 y1 ...)."""
    rows = weights.shape[0]
    shaped = weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
    return shaped.swapaxes(1, 2).reshape(weights.shape)


def _llama_convert(name: str, array: np.ndarray, config) -> np.ndarray:
    # llama.cpp's Llama kernels rotate interleaved pairs, Hugging Face's rotate halves.
    if name.endswith("q_proj.weight"):
        return permute_qk(array, config.num_attention_heads)
    if name.endswith("k_proj.weight"):
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return permute_qk(array, heads)
    return array


def _gemma_convert(name: str, array: np.ndarray, config) -> np.ndarray:
    # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's by w.
    return array + 1 if name.endswith("norm.weight") else array


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _gpt2_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[::-1] if name.endswith(_CONV1D) else shape


def _gpt2_convert(name: str, array: np.ndarray, config) -> np.ndarray:
    return np.ascontiguousarray(array.T) if name.endswith(_CONV1D) else array


def _neox_convert(name: str, array: np.ndarray, config) -> np.ndarray:
    """GPT-NeoX stores the fused projection head by head ([q k v] of head 0, head 1, ...);
    llama.cpp splits it as [all Q | all K | all V]."""
    if not name.endswith(("attention.query_key_value.weight", "attention.query_key_value.bias")):
        return array
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    grouped = array.reshape(heads, 3, head_dim, *array.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(0, 1)).reshape(array.shape)


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", _llama_hparams, convert=_llama_convert),
    "mistral": Family("llama", _llama_hparams, convert=_llama_convert),
    "qwen2": Family("qwen2", _llama_hparams),
    "qwen3": Family("qwen3", _llama_hparams),
    "gemma": Family("gemma", _gemma_hparams, convert=_gemma_convert, head="tied"),
    "gemma2": Family("gemma2", _gemma_hparams, convert=_gemma_convert, head="tied"),
    "gemma3_text": Family("gemma3", _gemma_hparams, convert=_gemma_convert),
    "phi": Family("phi2", _phi2_hparams, head="untied"),
    "phi3": Family("phi3", _phi3_hparams),
    "gpt2": Family("gpt2", _gpt2_hparams, shape=_gpt2_shape, convert=_gpt2_convert),
    "gpt_neox": Family("gptneox", _neox_hparams, convert=_neox_convert, head="untied"),
}


def family_of(config) -> Family:
    """The family a Hugging Face config is written as, or a refusal naming it."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        hint = ""
        if model_type == "gemma3":
            hint = " (a Gemma-3 vision-language model: export its text model, gemma3_text)"
        raise ExportError(
            f"GGUF export does not support the {model_type!r} family{hint}; supported: "
            f"{', '.join(sorted(FAMILIES))}"
        )
    family = FAMILIES[model_type]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if (family.head == "tied" and not tied) or (family.head == "untied" and tied):
        have, need = ("an untied", "tied") if not tied else ("a tied", "a separate")
        raise ExportError(
            f"GGUF export of {model_type!r}: the model has {have} output head, llama.cpp's "
            f"{family.arch} architecture needs {need} one"
        )
    return family
