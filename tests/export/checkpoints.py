"""Random bf16 Llama checkpoints and LoRA adapters written straight as safetensors files.

No model is instantiated: each tensor is drawn, written and dropped, so a 0.5B checkpoint is
ready in seconds and the folder looks as `save_pretrained` leaves it (config, shards, index).
Shared by the merge memory test and `benchmarks/merge_memory.py`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_shapes(config) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a Llama checkpoint with untied embeddings."""
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes.update(
            {
                f"{p}.input_layernorm.weight": (hidden,),
                f"{p}.self_attn.q_proj.weight": (hidden, hidden),
                f"{p}.self_attn.k_proj.weight": (kv, hidden),
                f"{p}.self_attn.v_proj.weight": (kv, hidden),
                f"{p}.self_attn.o_proj.weight": (hidden, hidden),
                f"{p}.post_attention_layernorm.weight": (hidden,),
                f"{p}.mlp.gate_proj.weight": (inter, hidden),
                f"{p}.mlp.up_proj.weight": (inter, hidden),
                f"{p}.mlp.down_proj.weight": (hidden, inter),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def _random(shape: tuple[int, ...], seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def write_random_llama(
    folder: Path, *, hidden: int, layers: int, shard_bytes: int | None, vocab: int = 32000
) -> Path:
    """A random bf16 Llama in `folder`: one `model.safetensors` (`shard_bytes=None`) or shards of
    about `shard_bytes` with an index, the same tensors (same seeds) either way."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 128),
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    shapes = llama_shapes(config)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if shard_bytes is not None and groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if shard_bytes is None:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    seeds = {name: i for i, name in enumerate(shapes)}
    for file, names in zip(files, groups, strict=True):
        tensors = {n: _random(shapes[n], seeds[n]) for n in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    if shard_bytes is not None:
        total = sum(2 * math.prod(s) for s in shapes.values())
        weight_map = {n: f for f, names in zip(files, groups, strict=True) for n in names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_lora_adapter(folder: Path, base: Path, *, r: int = 16, alpha: int = 32) -> Path:
    """A rank-`r` LoRA on every linear layer of the Llama in `base`, as PEFT saves one."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    shapes = llama_shapes(AutoConfig.from_pretrained(base))
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in LINEAR:
            continue
        out, inp = shape
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn((r, inp), generator=generator) * 0.02
        tensors[f"{prefix}.lora_B.weight"] = torch.randn((out, r), generator=generator) * 0.02
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(LINEAR),
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": str(base),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def expected_merge(base: Path, adapter: Path, name: str):
    """`W + (alpha / r) * B @ A` in fp32, rounded once to bf16, for one tensor `name`."""
    import torch
    from safetensors import safe_open

    config = json.loads((adapter / "adapter_config.json").read_text())
    index = base / "model.safetensors.index.json"
    file = (
        json.loads(index.read_text())["weight_map"][name]
        if index.is_file()
        else "model.safetensors"
    )
    with safe_open(str(base / file), framework="pt") as f:
        weight = f.get_tensor(name)
    module = f"base_model.model.{name.removesuffix('.weight')}"
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        if f"{module}.lora_A.weight" not in f.keys():  # noqa: SIM118
            return weight
        a, b = f.get_tensor(f"{module}.lora_A.weight"), f.get_tensor(f"{module}.lora_B.weight")
    scale = config["lora_alpha"] / config["r"]
    return (weight.float() + scale * (b.float() @ a.float())).to(torch.bfloat16)
