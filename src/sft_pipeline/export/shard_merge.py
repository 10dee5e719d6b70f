"""Merge a LoRA adapter into a base checkpoint one tensor at a time, on CPU.

    base checkpoint (safetensors)            adapter (adapter_model.safetensors, small)
      model-00001-of-00003.safetensors         q_proj.lora_A (r x in), q_proj.lora_B (out x r)
      model-00002-of-00003.safetensors         lm_head.weight (modules_to_save: replaces)
      model-00003-of-00003.safetensors         embed_tokens.base_layer.weight (resized vocab)
      model.safetensors.index.json
                |
                v   for each shard: plan every output tensor's dtype and shape from the
                    headers, write the output header, then for each tensor, in turn:
      pread W -> W + scale * B @ A      (fp32 arithmetic in row blocks, rounded once to W's dtype)
              -> replaced tensors taken from the adapter, in W's dtype
              -> 4-bit packed W (a pre-quantized base) dequantized first
              -> bytes appended to the output shard -> W dropped (and its file pages)
                |
                v
      merged folder: same shard names and layout, index (new total size), config without
      `quantization_config`, generation config

`scale` is `lora_alpha / r` (`lora_alpha / sqrt(r)` with rsLoRA; per module with PEFT's rank and
alpha patterns); `B @ A` is transposed for fan-in-fan-out layers (GPT-2's Conv1D stores weights
as in x out) and for LoRA on embeddings. Peak memory is about the largest tensor twice (input
and output) plus the adapter, whatever the shard size: a 7B with a 10 GB shard merges like one
with 1 GB shards. Adapters this does not express (DoRA, LoRA biases, trainable token
indices, replicated layers, keys the checkpoint does not hold) raise `NotShardwise`, and the
caller merges the whole model with PEFT instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft_pipeline.common.safetensors_files import (
    INDEX,
    ShardReader,
    safetensors_dtype,
    torch_dtype,
    weight_map,
    write_index,
    write_shard,
)
from sft_pipeline.export.errors import NotShardwise
from sft_pipeline.export.finite import require_finite

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# fp32 elements of one row block of a merged weight (64 MiB).
_BLOCK_ELEMENTS = 16 * 2**20
# Components bitsandbytes stores next to a packed 4-bit weight `X.weight`.
_QUANT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.")
# adapter_config keys whose non-default value changes the merge in ways handled only by PEFT.
_PEFT_ONLY = {
    "use_dora": "DoRA (its magnitude vector renormalizes each merged weight)",
    "lora_bias": "LoRA biases",
    "trainable_token_indices": "trainable token indices",
    "layer_replication": "replicated layers",
    "target_parameters": "LoRA on parameters",
    "alora_invocation_tokens": "activated LoRA",
}


@dataclass(frozen=True)
class Delta:
    """`W += scale * B @ A` (transposed when `transpose`) for one base weight."""

    a: Any
    b: Any
    scale: float
    transpose: bool

    def apply(self, weight):
        """`weight + scale * B @ A` computed in fp32 and rounded once to `weight`'s dtype.

        Row block by row block, so the fp32 intermediates stay small next to the weight:

            weight (out x in, bf16) ─┬─ rows 0..k    -> fp32 + scale * (B[0..k] @ A)  -> bf16
                                     ├─ rows k..2k   -> ...
                                     └─ ...             written into one output tensor
        """
        import torch

        a, b = self.a.to(torch.float32), self.b.to(torch.float32)
        if self.transpose:  # (B @ A).T == A.T @ B.T
            a, b = b.T, a.T
        shape = (b.shape[0], a.shape[1])
        if shape != tuple(weight.shape):
            raise NotShardwise(f"LoRA delta {shape} does not fit weight {tuple(weight.shape)}")
        out = torch.empty_like(weight)
        step = max(1, _BLOCK_ELEMENTS // max(1, shape[1]))
        for start in range(0, shape[0], step):
            rows = slice(start, start + step)
            block = weight[rows].to(torch.float32) + self.scale * (b[rows] @ a)
            out[rows] = block.to(weight.dtype)
        return out


@dataclass
class AdapterWeights:
    deltas: dict[str, Delta] = field(default_factory=dict)
    # Base keys whose tensor the adapter holds whole (modules_to_save, resized embeddings).
    replaced: dict[str, Any] = field(default_factory=dict)


def _pattern_value(patterns: dict[str, Any], module: str, default):
    # PEFT matches a pattern against the end of the module path, on dot boundaries.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def read_adapter(adapter_dir: Path) -> AdapterWeights:
    """The adapter's deltas and whole tensors, keyed by the base checkpoint's tensor names."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise NotShardwise(f"peft_type {config.get('peft_type')} is not LoRA")
    for key, what in _PEFT_ONLY.items():
        if config.get(key):
            raise NotShardwise(f"{what} ({key} in adapter_config.json)")
    if config.get("bias", "none") != "none":
        raise NotShardwise(f"bias: {config['bias']} (trained biases)")
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    pairs: dict[str, dict[str, Any]] = {}
    out = AdapterWeights()
    for name, tensor in tensors.items():
        if not name.startswith(_PEFT_PREFIX):
            raise NotShardwise(f"adapter tensor {name} outside {_PEFT_PREFIX}")
        name = name[len(_PEFT_PREFIX) :]
        match = re.match(r"^(.*)\.(lora_A|lora_B)\.weight$", name) or re.match(
            r"^(.*)\.(lora_embedding_A|lora_embedding_B)$", name
        )
        if match:
            module, part = match.groups()
            pairs.setdefault(module, {})[part] = tensor
        elif name.endswith(".base_layer.weight"):
            out.replaced[name.replace(".base_layer.weight", ".weight")] = tensor
        elif re.search(r"\.lora_[A-Za-z_]+", name):
            raise NotShardwise(f"adapter tensor {name} is not a LoRA A/B matrix")
        else:
            out.replaced[name] = tensor
    r, alpha = config["r"], config["lora_alpha"]
    for module, parts in pairs.items():
        rank = _pattern_value(config.get("rank_pattern") or {}, module, r)
        module_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha)
        scale = module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        embedding = "lora_embedding_A" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A")
        b = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            raise NotShardwise(f"{module}: LoRA A or B missing from the adapter")
        transpose = embedding or bool(config.get("fan_in_fan_out"))
        out.deltas[f"{module}.weight"] = Delta(a, b, scale, transpose)
    return out


# --- the checkpoint -------------------------------------------------------------------------------


def _is_quant_component(name: str, names: set[str]) -> bool:
    for suffix in _QUANT_SUFFIXES:
        head, sep, _ = name.partition(".weight." + suffix)
        if sep and f"{head}.weight" in names:
            return True
    return False


class _Reader(ShardReader):
    """The checkpoint's tensors, bitsandbytes 4-bit packed weights dequantized on request."""

    def _quant_state(self, name: str):
        prefix = name + "."
        components = {k[len(prefix) :]: self.get(k) for k in self.mapping if k.startswith(prefix)}
        if not components:
            return None
        if "SCB" in components or any(k.startswith("weight_format") for k in components):
            raise NotShardwise(f"{name}: bitsandbytes 8-bit weights are not supported")
        import bitsandbytes.functional as bnbf

        return bnbf.QuantState.from_dict(components, device="cpu")

    def dequantized_shape(self, name: str) -> tuple[int, ...]:
        state = self._quant_state(name)
        return tuple(state.shape) if state is not None else self.entry(name).shape

    def dequantized(self, name: str):
        """A plain weight: the packed 4-bit `name` dequantized, or `name` as stored."""
        state = self._quant_state(name)
        packed = self.get(name)
        if state is None:
            return packed
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(packed, quant_state=state)


def quantized_weights(folder: Path) -> list[str]:
    """Names of the bitsandbytes 4-bit packed weights in a checkpoint (empty for a plain one)."""
    names = set(weight_map(folder))
    return sorted(n for n in names if f"{n}.absmax" in names or _has_quant_state(n, names))


def _has_quant_state(name: str, names: set[str]) -> bool:
    return any(k.startswith(f"{name}.quant_state.") for k in names)


# --- the merge ------------------------------------------------------------------------------------


class ShardwiseMerge:
    """A merged model that exists only as a plan until `save_pretrained` streams the shards.

    It has what the merged-folder code uses of a model: `config`, `generation_config`,
    `resize_token_embeddings` (a pad token added at the last resort: new rows are the mean
    embedding) and `eval`.
    """

    def __init__(self, weights_dir: Path, adapter_dir: Path, *, trust_remote_code: bool = False):
        from transformers import AutoConfig, GenerationConfig

        self.weights_dir, self.adapter_dir = Path(weights_dir), Path(adapter_dir)
        self.mapping = weight_map(self.weights_dir)
        self.adapter = read_adapter(self.adapter_dir)
        names = set(self.mapping)
        self.quantized = set(quantized_weights(self.weights_dir))
        missing = sorted(
            k for k in [*self.adapter.deltas, *self.adapter.replaced] if k not in names
        )
        if missing:
            raise NotShardwise(f"adapter weights for tensors the checkpoint lacks: {missing[:4]}")
        self.config = AutoConfig.from_pretrained(
            str(self.weights_dir), trust_remote_code=trust_remote_code
        )
        if hasattr(self.config, "quantization_config"):
            del self.config.quantization_config
        self.dtype = self._plain_dtype()
        self.config.dtype = self.dtype
        self.embedding_keys = self._embedding_keys()
        self.vocab_size = self._vocab_after_adapter()
        if self.vocab_size != getattr(self.config, "vocab_size", self.vocab_size):
            self.config.vocab_size = self.vocab_size
        try:
            self.generation_config = GenerationConfig.from_pretrained(str(self.weights_dir))
        except OSError:
            self.generation_config = GenerationConfig.from_model_config(self.config)

    def _plain_dtype(self):
        """The dtype merged weights are stored in: the checkpoint's floating dtype."""
        import torch

        from sft_pipeline.model import device

        floating = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
        reader = _Reader(self.weights_dir, self.mapping)
        names = set(self.mapping)
        counts: dict[Any, int] = {}
        for name in self.mapping:
            if name in self.quantized or _is_quant_component(name, names):
                continue
            dtype, shape = reader.meta(name)
            if dtype in floating:
                counts[floating[dtype]] = counts.get(floating[dtype], 0) + math.prod(shape)
        if counts:
            return max(counts, key=counts.get)
        stored = getattr(self.config, "dtype", None) or "float32"
        return stored if isinstance(stored, torch.dtype) else device.torch_dtype(str(stored))

    def _embedding_keys(self) -> list[str]:
        vocab = getattr(self.config, "vocab_size", None)
        keys = []
        reader = _Reader(self.weights_dir, self.mapping)
        for name in self.mapping:
            # Vocabulary-sized tensors: embeddings, the LM head and its bias (Phi-2 has one).
            is_head_bias = name.endswith(".bias") and re.search(r"lm_head|output", name)
            if (name.endswith(".weight") and re.search(r"embed|lm_head|wte|output", name)) or (
                is_head_bias
            ):
                if name in self.quantized:
                    continue
                replaced = self.adapter.replaced.get(name)
                rows = replaced.shape[0] if replaced is not None else reader.meta(name)[1][0]
                if vocab is None or rows >= vocab:
                    keys.append(name)
        return keys

    def _vocab_after_adapter(self) -> int:
        rows = [
            self.adapter.replaced[k].shape[0]
            for k in self.embedding_keys
            if k in self.adapter.replaced
        ]
        return max(rows, default=getattr(self.config, "vocab_size", 0))

    def resize_token_embeddings(self, new_num_tokens: int) -> None:
        self.vocab_size = max(self.vocab_size, int(new_num_tokens))
        self.config.vocab_size = self.vocab_size

    def get_input_embeddings(self):  # only its row count is read
        return _Rows(self.vocab_size)

    def eval(self) -> ShardwiseMerge:
        return self

    def planned(self, reader: _Reader, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype, shape) that `merged_tensor(name)` will have, without computing it."""
        stored = reader.meta(name)[0]
        if name in self.adapter.replaced:
            replaced = self.adapter.replaced[name]
            dtype = stored if stored in ("F32", "BF16", "F16") else safetensors_dtype(self.dtype)
            shape = tuple(replaced.shape)
        elif name in self.quantized:
            dtype, shape = safetensors_dtype(self.dtype), reader.dequantized_shape(name)
        else:
            dtype, shape = stored, tuple(reader.meta(name)[1])
        if name in self.embedding_keys and shape[0] < self.vocab_size:
            shape = (self.vocab_size, *shape[1:])
        return dtype, shape

    def merged_tensor(self, reader: _Reader, name: str):
        import torch

        if name in self.adapter.replaced:
            # A whole tensor from the adapter (a resized embedding may also carry a LoRA delta).
            dtype = torch_dtype(self.planned(reader, name)[0])
            tensor = self.adapter.replaced[name].to(dtype)
        elif name in self.quantized:
            tensor = reader.dequantized(name).to(self.dtype)
        else:
            tensor = reader.get(name)
        delta = self.adapter.deltas.get(name)
        if delta is not None:
            tensor = delta.apply(tensor)
        if name in self.embedding_keys and tensor.shape[0] < self.vocab_size:
            extra = self.vocab_size - tensor.shape[0]
            # New rows are the mean of the old ones, as transformers' resize_token_embeddings
            # initializes them (for the head's bias too).
            mean = tensor.mean(dim=0, keepdim=True, dtype=torch.float32).to(tensor.dtype)
            tensor = torch.cat([tensor, mean.expand(extra, *tensor.shape[1:])])
        require_finite(tensor, name, f"merging {self.adapter_dir} into {self.weights_dir}")
        return tensor.contiguous()

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the merged shards tensor by tensor (`write_shard`: one merged tensor alive at a
        time), then the index and the config."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        reader = _Reader(self.weights_dir, self.mapping)
        names = set(self.mapping)
        kept = {n: s for n, s in self.mapping.items() if not _is_quant_component(n, names)}
        merged_map: dict[str, str] = {}
        total_size = 0
        for shard in sorted(set(kept.values())):
            members = sorted(n for n in kept if kept[n] == shard)
            plan = {n: self.planned(reader, n) for n in members}
            total_size += write_shard(
                path / shard, plan, lambda name: self.merged_tensor(reader, name)
            )
            merged_map.update(dict.fromkeys(members, shard))
            log.info("merged %s (%d tensors)", shard, len(members))
        reader.close()
        if (self.weights_dir / INDEX).is_file():
            write_index(path, merged_map, total_size)
        self.config.save_pretrained(path)
        self.generation_config.save_pretrained(path)


@dataclass(frozen=True)
class _Rows:
    num_embeddings: int
