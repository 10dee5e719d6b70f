"""Export a merged model folder as GGUF files (llama.cpp, Ollama) with an Ollama Modelfile.

Written with the `gguf` package's own writer. Tensor names come from gguf's tensor name maps,
per-family rules from `gguf_families`, the tokenizer (vocabulary, scores or merges, token types,
special tokens, pre-tokenizer) and the Jinja chat template from `gguf_vocab`.

The file is written tensor by tensor, so memory holds one tensor, not the model:

    merged/model*.safetensors ──> for each tensor: rename (name map) -> family rule (permute
                                  Q/K, norm + 1, transpose, ...) -> convert -> append

    model-<type>.gguf = header | metadata (config, tokenizer, chat template) | tensor infos
                        | tensor data (aligned), in the order of the infos

Types: `f32`, `f16`, `bf16`, `q8_0`, `q5_0`, `q4_0` are written here (the `gguf` package
quantizes in numpy); 1-D tensors (norms, biases) stay f32 and a matrix whose rows do not split
into quantization blocks falls back to f16, as llama.cpp's own converter does. `Q6_K`, `Q5_K_M`
and `Q4_K_M` are llama.cpp's k-quants: an f16/bf16 file is written first, then llama.cpp's own
quantizer (`llama_model_quantize`, from the prebuilt llama.cpp the `llamacpp` module finds)
rewrites it.

After writing, each file is checked (`gguf_check`): teacher-forced next-token agreement with the
merged model on held-out prompts, below `MIN_AGREEMENT[type]` the export fails.
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
from sft_pipeline.common.safetensors_files import ShardReader
from sft_pipeline.export.errors import ExportError
from sft_pipeline.export.finite import require_finite
from sft_pipeline.export.gguf_families import Family, family_of
from sft_pipeline.export.gguf_vocab import add_tokenizer_metadata, check_tokenizer

log = logging.getLogger(__name__)

MODEL_STEM = "model"
SUMMARY = "export.json"
MODELFILE = "Modelfile"

# Written here, by the gguf package's numpy quantizers.
NUMPY_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_0", "q4_0")
# Written by llama.cpp's own quantizer from an f16/bf16 file.
LLAMACPP_TYPES = ("Q6_K", "Q5_K_M", "Q4_K_M")
GGUF_TYPES = NUMPY_TYPES + LLAMACPP_TYPES
# Lowest teacher-forced next-token agreement with the merged model a file may have (the share of
# positions of the merged model's greedy continuations where the file's argmax is the same
# token). 8 bits and up lose nearly nothing; below, floors under what the default model
# (SmolLM2-135M) measures, with a margin: f16 1.00, q8_0 0.98, Q6_K 0.95, Q5_K_M 0.87,
# Q4_K_M 0.90, q5_0 0.90, q4_0 0.66 (README, "GGUF export").
MIN_AGREEMENT = {
    "f32": 0.95,
    "f16": 0.95,
    "bf16": 0.95,
    "q8_0": 0.95,
    "Q6_K": 0.88,
    "Q5_K_M": 0.82,
    "q5_0": 0.80,
    "Q4_K_M": 0.80,
    "q4_0": 0.60,
}


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
        from sft_pipeline.export.gguf_check import check_files
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
        if files and self.cfg.check:
            checks = check_files(self.merged_dir, {t: path / f["file"] for t, f in files.items()})
            for gguf_type, check in checks.items():
                files[gguf_type]["check"] = check
            summary["check"] = {"min_agreement": {t: MIN_AGREEMENT[t] for t in files}}
        if files:
            first = export_file_name(self.cfg.gguf[0])
            others = [export_file_name(t) for t in self.cfg.gguf[1:]]
            text, chat_format = modelfile(self.merged_dir, first, others)
            (path / MODELFILE).write_text(text, encoding="utf-8")
            summary.update(modelfile=MODELFILE, ollama_template=chat_format)
        (path / SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", "utf-8")
        self.summary = summary
        if files and self.cfg.check:
            _fail_below_threshold(files)


def _fail_below_threshold(files: dict[str, Any]) -> None:
    failed = [
        f"{f['file']}: {f['check']['agreement']:.3f} < {MIN_AGREEMENT[t]} ({f['check']['by']})"
        for t, f in files.items()
        if f["check"].get("agreement") is not None and f["check"]["agreement"] < MIN_AGREEMENT[t]
    ]
    if failed:
        raise ExportError(
            "exported GGUF files disagree with the merged model (teacher-forced next-token "
            "agreement below the type's threshold): " + "; ".join(failed)
        )


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
        family_of(AutoConfig.from_pretrained(str(merged_dir)))
        check_tokenizer(load_tokenizer(merged_dir))
        if any(t in LLAMACPP_TYPES for t in cfg.gguf):
            from sft_pipeline.export.llamacpp import require_quantizer

            require_quantizer()
    else:
        log.info("export.gguf is empty: no GGUF written (set e.g. export.gguf: [q8_0])")
    return ExportedModel(merged_dir=merged_dir, cfg=cfg)


def _weights(model_dir: Path) -> ShardReader:
    try:
        return ShardReader(model_dir)
    except FileNotFoundError:
        raise ExportError(f"{model_dir}: no model.safetensors(.index.json) to export") from None


def _tensor_type(gguf_type: str, shape: tuple[int, ...], gguf_name: str = ""):
    """GGML type of one tensor in a file of `gguf_type` (a numpy-written type)."""
    import gguf

    q = gguf.GGMLQuantizationType
    # Position embeddings (GPT-2) stay f32 in every type, as llama.cpp's converter keeps them.
    if len(shape) < 2 or gguf_type == "f32" or gguf_name == "position_embd.weight":
        return q.F32
    if gguf_type == "f16":
        return q.F16
    if gguf_type == "bf16":
        return q.BF16
    wanted = {"q8_0": q.Q8_0, "q5_0": q.Q5_0, "q4_0": q.Q4_0}[gguf_type]
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else q.F16


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


def _plan_tensors(
    reader: ShardReader, config, family: Family, gguf_type: str
) -> list[_PlannedTensor]:
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == family.arch)
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    planned: list[_PlannedTensor] = []
    for shard in reader.shards:
        for hf_name, entry in reader.header(shard).items():
            if hf_name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):
                continue  # buffers llama.cpp recomputes (rotary frequencies, causal masks)
            if tied and hf_name == "lm_head.weight":
                continue  # a file without output.weight ties it to token_embd
            gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ExportError(f"GGUF export: no {family.arch} tensor name for {hf_name!r}")
            shape = family.shape(hf_name, tuple(entry.shape))
            planned.append(
                _PlannedTensor(
                    reader.folder / shard,
                    hf_name,
                    gguf_name,
                    shape,
                    _tensor_type(gguf_type, shape, gguf_name),
                )
            )
    return planned


# --- metadata -----------------------------------------------------------------------------------


_FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q5_0": "MOSTLY_Q5_0",
    "q4_0": "MOSTLY_Q4_0",
}


def model_name(tokenizer) -> str:
    """`general.name`. llama.cpp keys one tokenizer rule on it: in a model named "phi3" every
    special token swallows the whitespace after it (rstrip), as Phi-3's tokenizer does. Only a
    tokenizer that behaves so gets the name; any other must not (llama.cpp would also look up
    Phi-3's own special tokens and fail on a vocabulary without them)."""
    added = [t for t in tokenizer.added_tokens_decoder.values() if t.special]
    vocab = tokenizer.get_vocab()
    phi3 = (
        added
        and all(t.rstrip for t in added if t.content not in ("<unk>", "<s>", "<|endoftext|>"))
        and all(t in vocab for t in ("</s>", "<unk>", "<s>", "<|endoftext|>"))
    )
    return "phi3 fine-tune (sft-pipeline)" if phi3 else "fine-tune (sft-pipeline)"


def _add_model_metadata(writer, config, tokenizer, family: Family, gguf_type: str) -> None:
    import gguf

    writer.add_name(model_name(tokenizer))
    writer.add_type(gguf.GGUFType.MODEL)
    family.hparams(writer, config)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[gguf_type]))
    if gguf_type not in ("f32", "f16", "bf16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --- writing ------------------------------------------------------------------------------------


def write_gguf(model_dir: str | os.PathLike, target: str | os.PathLike, gguf_type: str) -> Path:
    """Write the model in `model_dir` (safetensors + tokenizer) to one GGUF file of `gguf_type`."""
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"GGUF type {gguf_type!r} not supported; supported: {GGUF_TYPES}")
    model_dir, target = Path(model_dir), Path(target)
    if gguf_type in LLAMACPP_TYPES:
        from sft_pipeline.export.llamacpp import quantize

        source = target.with_name(target.name + ".source.gguf")
        try:
            _write_numpy_gguf(model_dir, source, _source_type(model_dir))
            quantize(source, target, gguf_type)
        finally:
            source.unlink(missing_ok=True)
        return target
    return _write_numpy_gguf(model_dir, target, gguf_type)


def _source_type(model_dir: Path) -> str:
    """bf16 for a bf16 model (lossless), f16 otherwise: the input llama.cpp's quantizer reads."""
    from transformers import AutoConfig

    dtype = str(getattr(AutoConfig.from_pretrained(str(model_dir)), "dtype", "") or "")
    return "bf16" if "bfloat16" in dtype else "f16"


def _write_numpy_gguf(model_dir: Path, target: Path, gguf_type: str) -> Path:
    import gguf
    import torch
    from transformers import AutoConfig

    from sft_pipeline.model.loading import load_generation_config, load_tokenizer

    config = AutoConfig.from_pretrained(str(model_dir))
    family = family_of(config)
    tokenizer = load_tokenizer(model_dir)
    generation_config = load_generation_config(model_dir)
    reader = _weights(model_dir)
    plan = _plan_tensors(reader, config, family, gguf_type)

    writer = gguf.GGUFWriter(str(target), family.arch)
    try:
        _add_model_metadata(writer, config, tokenizer, family, gguf_type)
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
        for t in plan:
            array = reader.get(t.hf_name).to(torch.float32).numpy()
            require_finite(array, t.hf_name, str(t.source))
            array = family.convert(t.hf_name, array, config)
            converted = _convert(array, t.ggml_type)
            # A finite weight past f16's range (65504) becomes inf in an f16 file.
            require_finite(converted, t.hf_name, f"{target.name} ({gguf_type})")
            writer.write_tensor_data(converted)
    finally:
        writer.close()
    return target
