"""Load a model folder's tokenizer and weights: base (with its manifest), merged or any local model.

Every step after `prepare_base_model` loads through here, from safetensors only; the device and
the 4-bit choice come from `sft_pipeline.model.device`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from sft_pipeline.common.config import QuantizationConfig
from sft_pipeline.common.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_DTYPES = ("float32", "bfloat16", "float16")


class ModelResolutionError(UserError, ValueError):
    """`model.name_or_path` could not be resolved to loadable safetensors weights."""


# Whether loaders may run code shipped with a model: `model.trust_remote_code` of this run, set
# by the project's hook when the run starts. A manifest is data (DVC may pull it from a remote),
# so what it records never turns remote code on by itself.
_remote_code_allowed = False


def allow_remote_code(allowed: bool) -> None:
    """Record `model.trust_remote_code` of this run for every later load in this process."""
    global _remote_code_allowed
    _remote_code_allowed = bool(allowed)


def remote_code_allowed() -> bool:
    """This run's `model.trust_remote_code`, to hand on to processes the run starts."""
    return _remote_code_allowed


def trust_remote_code(model_dir: str | os.PathLike, allowed: bool | None = None) -> bool:
    """Whether to load `model_dir` with its own code: only when it needs it and it is allowed.

    `allowed` None means this run's `model.trust_remote_code` (`allow_remote_code`). A folder
    whose manifest asks for remote code that is not allowed is refused, naming the parameter.
    """
    model_dir = Path(model_dir)
    wanted = bool(_manifest_or_default(model_dir).get("trust_remote_code"))
    allowed = _remote_code_allowed if allowed is None else allowed
    if wanted and not allowed:
        raise ModelResolutionError(
            f"{model_dir / MANIFEST} records trust_remote_code: true, but this run's parameters "
            "do not allow running the model's own code; set model.trust_remote_code: true if "
            "you trust it (and re-run prepare_base_model)"
        )
    return wanted


def read_manifest(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: expected a base model folder written by prepare_base_model"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _manifest_or_default(model_dir: Path) -> dict[str, Any]:
    # Folders written by merge (or by users) have no manifest: they are plain local models.
    if (model_dir / MANIFEST).is_file():
        return read_manifest(model_dir)
    return {"model_path": ".", "revision": None, "trust_remote_code": False, "dtype": None}


def load_tokenizer_from(folder: str | Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(folder), use_fast=True, trust_remote_code=trust_remote_code
    )
    if not getattr(tokenizer, "is_fast", False):
        raise ModelResolutionError(
            f"{folder}: only a slow tokenizer ({type(tokenizer).__name__}) could be loaded; the "
            "pipeline needs a fast tokenizer (tokenizer.json, or sentencepiece/tiktoken files "
            "that transformers can convert)"
        )
    return tokenizer


def load_tokenizer(model_dir: str | os.PathLike, *, allow_remote_code: bool | None = None):
    """The fast tokenizer saved in a model folder, with a pad token set.

    pad == eos is acceptable for batching: labels are prebuilt with -100 on padding, so EOS is
    never masked out of the loss by this choice.
    """
    model_dir = Path(model_dir)
    tokenizer = load_tokenizer_from(model_dir, trust_remote_code(model_dir, allow_remote_code))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelResolutionError(f"{model_dir}: tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_vision_model(model_dir: str | os.PathLike) -> bool:
    """Whether a base (manifest `vision`) or merged folder (config `vision_config`) holds an
    image-text-to-text model."""
    model_dir = Path(model_dir)
    if (model_dir / MANIFEST).is_file():
        return bool(read_manifest(model_dir).get("vision"))
    config = model_dir / "config.json"
    return config.is_file() and "vision_config" in json.loads(config.read_text(encoding="utf-8"))


def image_only_processor_class(processor_class: type) -> type:
    """`processor_class` without its video part: same name, same saved folder, no video processor.

    Qwen2-VL/Qwen2.5-VL processors take a video processor, and transformers' video processors
    need torchvision, which does not import beside every torch build. Image-text training never
    needs videos: this subclass builds from the image processor and the tokenizer alone, and
    keeps the parent's class name so the folder it saves names the standard processor class,
    with video settings taken from the image processor's (`AutoProcessor` builds the full
    processor from that folder wherever torchvision is installed).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # Only image_processor and tokenizer are attributes (ProcessorMixin reads them from this
        # signature), so the parent's video_processor=None is dropped, never checked or saved.
        processor_class.__init__(
            self, image_processor, tokenizer, video_processor=None, chat_template=chat_template
        )

    def to_dict(self) -> dict[str, Any]:
        # The saved folder keeps the video settings a full processor needs: Qwen2-VL's video
        # processor reads the image processor's (as the first Qwen2-VL folders have it).
        out = processor_class.to_dict(self)
        if "image_processor" in out:
            out.setdefault("video_processor", dict(out["image_processor"]))
        return out

    return type(
        processor_class.__name__, (processor_class,), {"__init__": __init__, "to_dict": to_dict}
    )


def _processor_class_name(model_dir: Path) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = model_dir / name
        if path.is_file():
            found = json.loads(path.read_text(encoding="utf-8")).get("processor_class")
            if found:
                return found
    return None


def _image_only_processor(model_dir: Path, remote_code: bool):
    """The folder's processor built without its video part, or None when it has no video part
    (or is not a class transformers ships)."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    name = _processor_class_name(model_dir)
    processor_class = getattr(transformers, name, None) if name else None
    if processor_class is None or "video_processor" not in processor_class.get_attributes():
        return None
    chat_template = None
    for file in ("chat_template.jinja", "chat_template.json"):
        if (model_dir / file).is_file():
            text = (model_dir / file).read_text(encoding="utf-8")
            chat_template = text if file.endswith(".jinja") else json.loads(text)["chat_template"]
            break
    return image_only_processor_class(processor_class)(
        image_processor=AutoImageProcessor.from_pretrained(
            str(model_dir), backend="pil", trust_remote_code=remote_code
        ),
        tokenizer=AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=remote_code),
        chat_template=chat_template,
    )


def load_processor(model_dir: str | os.PathLike, *, allow_remote_code: bool | None = None):
    """The processor of a vision-language model folder (PIL image processors: they need no
    torchvision), its tokenizer with a pad token and the processor's chat template.

    A processor whose video part cannot be built here (Qwen2-VL's needs torchvision) is built
    without it (`image_only_processor_class`)."""
    from transformers import AutoProcessor

    model_dir = Path(model_dir)
    remote_code = trust_remote_code(model_dir, allow_remote_code)
    try:
        processor = AutoProcessor.from_pretrained(
            str(model_dir), backend="pil", trust_remote_code=remote_code
        )
    except (ImportError, OSError, AttributeError, ValueError) as exc:
        processor = _image_only_processor(model_dir, remote_code)
        if processor is None:
            raise
        log.info("%s: processor built without its video part (%s)", model_dir, exc)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        raise ModelResolutionError(
            f"{model_dir}: the processor has no fast tokenizer; image-token labels need offsets"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None) and getattr(processor, "chat_template", None):
        tokenizer.chat_template = processor.chat_template
    return processor


def load_tokenizer_or_processor(model_dir: str | os.PathLike):
    """(tokenizer, processor): the processor's tokenizer for a vision-language model, else the
    folder's tokenizer and None."""
    if is_vision_model(model_dir):
        processor = load_processor(model_dir)
        return processor.tokenizer, processor
    return load_tokenizer(model_dir), None


def model_source(model_dir: str | os.PathLike) -> tuple[str, str | None]:
    """(path or hub id that from_pretrained loads the weights from, revision)."""
    model_dir = Path(model_dir)
    manifest = _manifest_or_default(model_dir)
    model_path = manifest.get("model_path") or "."
    if model_path == ".":
        return str(model_dir), None
    return model_path, manifest.get("revision")


def load_model(
    model_dir: str | os.PathLike,
    quantization: QuantizationConfig | None = None,
    dtype=None,
    *,
    allow_remote_code: bool | None = None,
):
    """The model a base (or merged) folder describes, from safetensors only.

    With `quantization` (whose `load_in_4bit` the caller has decided), a bitsandbytes NF4/FP4
    model; otherwise the weights load in `dtype` (default: the manifest's dtype).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, BitsAndBytesConfig

    from sft_pipeline.model import device

    model_dir = Path(model_dir)
    manifest = _manifest_or_default(model_dir)
    path, revision = model_source(model_dir)
    kwargs: dict[str, Any] = {
        "use_safetensors": True,
        "trust_remote_code": trust_remote_code(model_dir, allow_remote_code),
        "device_map": device.device_name(),
    }
    if revision:
        kwargs["revision"] = revision
    if manifest.get("attn_implementation"):
        kwargs["attn_implementation"] = manifest["attn_implementation"]
    if isinstance(dtype, str):
        dtype = device.torch_dtype(dtype)
    if quantization is not None and quantization.load_in_4bit is True:
        precision = device.resolve_precision("auto")
        compute = device.torch_dtype(
            device.compute_dtype(quantization.bnb_4bit_compute_dtype, precision)
        )
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=quantization.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=compute,
        )
        # Non-quantized parts (norms, embeddings) follow the compute dtype unless told otherwise.
        kwargs["dtype"] = dtype or compute
    else:
        stored = manifest.get("dtype")
        kwargs["dtype"] = dtype or (device.torch_dtype(stored) if stored in _DTYPES else "auto")
    if is_vision_model(model_dir):
        # The language model alone is quantized; the vision tower and projector stay in
        # their dtype (a 4-bit vision tower loses more than it saves).
        if "quantization_config" in kwargs:
            kwargs["quantization_config"].llm_int8_skip_modules = list(VISION_MODULES)
        return AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


# Submodule names of the vision tower and of the projector across families (LLaVA, Qwen2-VL,
# Idefics3/SmolVLM, Gemma-3, ...); Qwen2-VL's `merger` sits inside its `visual` tower.
VISION_TOWER = ("vision_tower", "visual", "vision_model")
PROJECTOR = ("multi_modal_projector", "connector", "merger")
# What bitsandbytes never quantizes in a vision-language model: the tower, the projector and the
# output head.
VISION_MODULES = (*VISION_TOWER, *PROJECTOR, "lm_head")


def load_generation_config(model_dir: str | os.PathLike):
    """The folder's `GenerationConfig`, or None when it has no generation_config.json."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(model_dir))
    except OSError:
        return None


def portable_path(path: Path) -> str:
    # Relative to the project when inside it, so the manifest does not change between clones.
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(resolved)
