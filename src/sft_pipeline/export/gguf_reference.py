"""llama.cpp's own converter (`convert_hf_to_gguf.py`), the reference our GGUF export is tested
against.

It ships, with the `gguf-py` it imports, in the llama-cpp-python source distribution on the
package index. `make llamacpp` downloads that sdist (pinned in the Makefile: `LLAMACPP_VERSION`)
and keeps only the converter, its `conversion/` package, `gguf-py/` and the licence, in
`tools/llamacpp/convert/` (git-ignored):

    pip download llama-cpp-python==<pin> (sdist) ──> tools/llamacpp/convert/
                                                        convert_hf_to_gguf.py, conversion/,
                                                        gguf-py/ (its own gguf, put first on
                                                        sys.path by the converter), LICENSE

The converter runs in its own process with this project's Python (torch, transformers,
sentencepiece and numpy of the venv, newer than the ones it names, and read fine by it), with its
own `gguf-py` first on `sys.path` (its default): with the `gguf` 0.19.0 release we pin it stops
at `gguf.LazyChunkedTensor`. Nothing of it is imported here.

What the tests show (tests/export/test_gguf_reference.py) decides which writer the export uses:
ours, for every family. The converter cannot read what transformers 5 saves for Gemma and
Phi-3 (it wants `tokenizer.model`, which transformers no longer writes), nor a GPT-2 config
without `n_ctx`, nor a byte-level vocabulary it does not know by the hash of its encoding; for
Llama-2 and Mistral it reads the SentencePiece vocabulary from `tokenizer.json` with every score
-1000, and llama.cpp then merges by position instead of by rank (`▁pond` becomes `▁pon d` where
training had `▁p ond`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sft_pipeline.export.errors import ExportError

INSTALL_HINT = (
    "install llama.cpp's converter with `make llamacpp` (the llama-cpp-python sdist pinned in "
    "the Makefile, from the package index)"
)
# The converter writes these itself; the k-quants are llama.cpp's quantizer's (`llamacpp`).
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")


def converter_dir() -> Path:
    configured = os.environ.get("SFT_PIPELINE_LLAMACPP_CONVERT")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[3] / "tools" / "llamacpp" / "convert"


def unavailable() -> str | None:
    """Why llama.cpp's converter cannot be run here, or None when it can."""
    folder = converter_dir()
    for part in ("convert_hf_to_gguf.py", "conversion", "gguf-py"):
        if not (folder / part).exists():
            return f"{folder / part} is missing; {INSTALL_HINT}"
    return None


def convert(model_dir: Path, target: Path, gguf_type: str = "f16") -> Path:
    """Write the model folder `model_dir` to `target` with llama.cpp's converter."""
    reason = unavailable()
    if reason:
        raise ExportError(f"llama.cpp's converter is not available: {reason}")
    if gguf_type not in CONVERTER_TYPES:
        raise ExportError(f"llama.cpp's converter writes {CONVERTER_TYPES}, not {gguf_type!r}")
    result = subprocess.run(
        [
            sys.executable,
            str(converter_dir() / "convert_hf_to_gguf.py"),
            str(model_dir),
            "--outfile",
            str(target),
            "--outtype",
            gguf_type,
        ],
        capture_output=True,
        text=True,
        check=False,
        # Offline as the rest of the pipeline: the converter reads the tokenizer through
        # transformers, which must not reach for the Hub.
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if result.returncode != 0 or not target.is_file():
        raise ExportError(
            f"llama.cpp's converter could not convert {model_dir}: {result.stderr.strip()[-1500:]}"
        )
    return target
