"""Export a merged model folder as GGUF files (llama.cpp, Ollama) with an Ollama Modelfile.

Written with the `gguf` package's own writer: nothing is compiled, so an export works on any
machine `make setup` prepared. Tensor names come from gguf's tensor name maps, the tokenizer
(vocabulary, merges, special tokens, pre-tokenizer kind) and the Jinja chat template go into the
file's metadata, where llama.cpp reads them.

The file is written tensor by tensor, so memory holds one tensor, not the model:

    merged/model*.safetensors ──> for each tensor: rename (name map) -> permute Q/K (llama)
                                                  -> convert (f32 | f16 | bf16 | q8_0) -> append

    model-<type>.gguf = header | metadata (config, tokenizer, chat template) | tensor infos
                        | tensor data (aligned), in the order of the infos

Quantized types keep 1-D tensors (norms, biases) in f32 and fall back to f16 for a matrix whose
rows do not split into quantization blocks, as llama.cpp's own converter does.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sft_pipeline.common.config import ExportConfig
from sft_pipeline.common.paths import read_shard_index
from sft_pipeline.export.finite import require_finite
from sft_pipeline.export.gguf_vocab import (
    ExportError,
    add_tokenizer_metadata,
    tokenizer_json,
    tokenizer_pre_type,
)

log = logging.getLogger(__name__)

MODEL_STEM = "model"
SUMMARY = "export.json"
MODELFILE = "Modelfile"

# Hugging Face model_type -> GGUF architecture. Mistral is Llama to llama.cpp (same blocks and
# rotary layout); Qwen2 has its own architecture (biased Q/K/V, rotary halves not interleaved).
SUPPORTED_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# llama.cpp's Llama kernels rotate interleaved pairs, Hugging Face's rotate halves: Q and K rows
# are reordered on the way out (transformers' GGUF loader reorders them back).
_PERMUTE_QK = {"llama"}
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def export_file_name(gguf_type: str) -> str:
    return f"{MODEL_STEM}-{gguf_type}.gguf"


@dataclass
class ExportedModel:
    """The export of one merged model folder; `save_pretrained(path)` writes every file.

    The files are written in `save_pretrained` (into the dataset's temporary folder), so a GGUF
    is streamed straight to its place instead of being built in memory first.
    """

    merged_dir: Path
    cfg: ExportConfig
    summary: dict[str, Any] = field(default_factory=dict)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        from sft_pipeline.export.ollama import modelfile

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        files: dict[str, Any] = {}
        for gguf_type in self.cfg.gguf:
            target = path / export_file_name(gguf_type)
            write_gguf(self.merged_dir, target, gguf_type)
            files[gguf_type] = {"file": target.name, "bytes": target.stat().st_size}
            log.info("wrote %s (%.1f MB)", target, target.stat().st_size / 1e6)
        summary: dict[str, Any] = {"gguf": files, "modelfile": None, "ollama_template": None}
        if files:
            first = export_file_name(self.cfg.gguf[0])
            others = [export_file_name(t) for t in self.cfg.gguf[1:]]
            text, chat_format = modelfile(self.merged_dir, first, others)
            (path / MODELFILE).write_text(text, encoding="utf-8")
            summary.update(modelfile=MODELFILE, ollama_template=chat_format)
        (path / SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", "utf-8")
        self.summary = summary


def export(merged_dir: str | os.PathLike, cfg: ExportConfig) -> ExportedModel:
    """Check that the merged model can be exported (before any heavy work) and plan it."""
    merged_dir = Path(merged_dir)
    if cfg.gguf:
        from transformers import AutoConfig

        from sft_pipeline.model.loading import is_vision_model, load_tokenizer

        if is_vision_model(merged_dir):
            raise ExportError(
                f"{merged_dir} is a vision-language model: GGUF export of vision models is not "
                "supported yet (llama.cpp needs the vision tower as a separate mmproj file); "
                "set export.gguf: [] and use the merged safetensors folder"
            )
        gguf_arch(AutoConfig.from_pretrained(str(merged_dir)))
        tokenizer_pre_type(tokenizer_json(load_tokenizer(merged_dir)))
    else:
        log.info("export.gguf is empty: no GGUF written (set e.g. export.gguf: [q8_0])")
    return ExportedModel(merged_dir=merged_dir, cfg=cfg)


def gguf_arch(config) -> str:
    """The GGUF architecture a Hugging Face config is written as, or a clear refusal."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"GGUF export does not support architecture {model_type!r}; supported: "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise ExportError(
            f"GGUF export does not support rope scaling {rope_type!r} (only unscaled rotary "
            "embeddings are written)"
        )
    return SUPPORTED_ARCHITECTURES[model_type]


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_shard_index(index).values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ExportError(f"{model_dir}: no model.safetensors(.index.json) to export")


def _permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from halves (x0..x63 | y0..y63) to pairs (x0 y0 x1 y1 ...)."""
    rows = weights.shape[0]
    shaped = weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
    return shaped.swapaxes(1, 2).reshape(weights.shape)


def _tensor_type(gguf_type: str, shape: tuple[int, ...]):
    """GGML type of one tensor in a file of `gguf_type`."""
    import gguf

    q = gguf.GGMLQuantizationType
    if len(shape) < 2 or gguf_type == "f32":
        return q.F32
    if gguf_type == "f16":
        return q.F16
    if gguf_type == "bf16":
        return q.BF16
    block, _ = gguf.GGML_QUANT_SIZES[q.Q8_0]
    return q.Q8_0 if shape[-1] % block == 0 else q.F16


def _convert(array: np.ndarray, ggml_type) -> np.ndarray:
    import gguf

    q = gguf.GGMLQuantizationType
    if ggml_type == q.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if ggml_type == q.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), ggml_type)


def _nbytes(shape: tuple[int, ...], ggml_type) -> int:
    import gguf

    return int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, ggml_type)))


@dataclass(frozen=True)
class _PlannedTensor:
    source: Path
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    ggml_type: Any
    permute_heads: int | None


def _plan_tensors(model_dir: Path, config, arch: str, gguf_type: str) -> list[_PlannedTensor]:
    import gguf
    from safetensors import safe_open

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    planned: list[_PlannedTensor] = []
    for path in _weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue  # recomputed from rope.freq_base
                if tied and hf_name == "lm_head.weight":
                    continue  # a file without output.weight ties it to token_embd
                gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ExportError(f"GGUF export: no {arch} tensor name for {hf_name!r}")
                shape = tuple(f.get_slice(hf_name).get_shape())
                heads = None
                if arch in _PERMUTE_QK and ".attn_q." in gguf_name:
                    heads = n_head
                elif arch in _PERMUTE_QK and ".attn_k." in gguf_name:
                    heads = n_kv
                planned.append(
                    _PlannedTensor(
                        path, hf_name, gguf_name, shape, _tensor_type(gguf_type, shape), heads
                    )
                )
    return planned


# --- metadata -----------------------------------------------------------------------------------


def _add_model_metadata(writer, config, arch: str, gguf_type: str) -> None:
    import gguf

    head_count = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // head_count
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    writer.add_name(f"{config.model_type}-sft")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(head_count)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or head_count)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if rope_theta is not None:
        writer.add_rope_freq_base(float(rope_theta))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * head_count != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_file_type(file_types[gguf_type])
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --- writing ------------------------------------------------------------------------------------


def write_gguf(model_dir: str | os.PathLike, target: str | os.PathLike, gguf_type: str) -> Path:
    """Write the model in `model_dir` (safetensors + tokenizer) to one GGUF file of `gguf_type`."""
    import gguf
    from safetensors import safe_open
    from transformers import AutoConfig

    from sft_pipeline.model.loading import load_generation_config, load_tokenizer

    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"GGUF type {gguf_type!r} not supported; supported: {GGUF_TYPES}")
    model_dir, target = Path(model_dir), Path(target)
    config = AutoConfig.from_pretrained(str(model_dir))
    arch = gguf_arch(config)
    tokenizer = load_tokenizer(model_dir)
    generation_config = load_generation_config(model_dir)
    plan = _plan_tensors(model_dir, config, arch, gguf_type)

    writer = gguf.GGUFWriter(str(target), arch)
    try:
        _add_model_metadata(writer, config, arch, gguf_type)
        add_tokenizer_metadata(writer, tokenizer, generation_config, config.vocab_size)
        for t in plan:
            writer.add_tensor_info(
                t.gguf_name,
                t.shape,
                np.dtype(np.float32),
                _nbytes(t.shape, t.ggml_type),
                t.ggml_type,
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        handles: dict[Path, Any] = {}
        try:
            for t in plan:
                if t.source not in handles:
                    handles[t.source] = safe_open(str(t.source), framework="pt")
                array = handles[t.source].get_tensor(t.hf_name).float().numpy()
                require_finite(array, t.hf_name, str(t.source))
                if t.permute_heads:
                    array = _permute_qk(array, t.permute_heads)
                converted = _convert(array, t.ggml_type)
                # A finite weight past f16's range (65504) becomes inf in an f16 file.
                require_finite(converted, t.hf_name, f"{target.name} ({gguf_type})")
                writer.write_tensor_data(converted)
        finally:
            handles.clear()
    finally:
        writer.close()
    return target
