"""llama.cpp itself, for checking and quantizing exported GGUF files.

llama.cpp comes prebuilt from a registry package: npm's `node-llama-cpp` (pinned in
`tools/llamacpp/package.json`, installed by `make llamacpp`) ships llama.cpp's shared libraries
for Linux x64 CPUs. Two ways in:

    probe(gguf, texts, sequences)   node tools/llamacpp/probe.mjs: llama.cpp's tokenizer on the
                                    texts (special tokens parsed) and its greedy next token
                                    after every position of each id sequence (teacher-forced)
    quantize(source, target, type)  llama.cpp's own quantizer (`llama_model_quantize` of its
                                    libllama, through ctypes): Q6_K, Q5_K_M, Q4_K_M

`SFT_PIPELINE_LLAMACPP` names another folder holding an installed `node_modules`.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from sft_pipeline.export.errors import ExportError

INSTALL_HINT = (
    "install llama.cpp's prebuilt client with `make llamacpp` (npm's node-llama-cpp, pinned in "
    "tools/llamacpp/package.json; needs node >= 20 and npm)"
)


def client_dir() -> Path:
    configured = os.environ.get("SFT_PIPELINE_LLAMACPP")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[3] / "tools" / "llamacpp"


def _library_dir() -> Path | None:
    bins = client_dir() / "node_modules" / "@node-llama-cpp" / "linux-x64" / "bins" / "linux-x64"
    return bins if any(bins.glob("libllama*.so")) else None


def unavailable() -> str | None:
    """Why llama.cpp cannot be run here, or None when it can."""
    if shutil.which("node") is None:
        return f"node is not on PATH; {INSTALL_HINT}"
    if not (client_dir() / "node_modules" / "node-llama-cpp").is_dir():
        return f"node-llama-cpp is not installed in {client_dir()}; {INSTALL_HINT}"
    if _library_dir() is None:
        return f"no prebuilt llama.cpp for this platform in {client_dir()}; {INSTALL_HINT}"
    return None


def probe(
    model: Path, texts: list[str], sequences: list[list[int]], threads: int | None = None
) -> dict[str, Any]:
    """llama.cpp's tokens for each text and greedy next token after each position."""
    reason = unavailable()
    if reason:
        raise ExportError(f"llama.cpp is not available: {reason}")
    request = {
        "model": str(model),
        "texts": texts,
        "sequences": sequences,
        "threads": threads or min(4, os.cpu_count() or 1),
    }
    result = subprocess.run(
        ["node", str(client_dir() / "probe.mjs")],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        cwd=client_dir(),
        check=False,
    )
    if result.returncode != 0:
        raise ExportError(f"llama.cpp could not run {model}: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout)


# --- quantizing -----------------------------------------------------------------------------------


def require_quantizer() -> None:
    """Raise, with the install hint, unless llama.cpp's quantizer can be loaded."""
    if _library_dir() is None:
        raise ExportError(
            "GGUF types Q6_K, Q5_K_M and Q4_K_M are written by llama.cpp's own quantizer, "
            f"which is not installed: {INSTALL_HINT}; q8_0, q5_0 and q4_0 need nothing"
        )


class _QuantizeParams(ctypes.Structure):
    # llama_model_quantize_params starts with `int32_t nthread; enum llama_ftype ftype;`; the
    # rest keeps the library's defaults, so the buffer only needs to be large enough.
    _fields_ = [
        ("nthread", ctypes.c_int32),
        ("ftype", ctypes.c_int32),
        ("rest", ctypes.c_byte * 248),
    ]


def quantize(source: Path, target: Path, gguf_type: str) -> Path:
    """Rewrite the f16/bf16 GGUF `source` as `target` in llama.cpp's k-quant `gguf_type`."""
    import gguf

    require_quantizer()
    ftypes = {
        "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
        "Q5_K_M": gguf.LlamaFileType.MOSTLY_Q5_K_M,
        "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    }
    library = ctypes.CDLL(str(next(_library_dir().glob("libllama*.so"))))
    library.llama_model_quantize_default_params.restype = _QuantizeParams
    library.llama_model_quantize.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.POINTER(_QuantizeParams),
    ]
    library.llama_model_quantize.restype = ctypes.c_uint32
    library.llama_backend_init()
    params = library.llama_model_quantize_default_params()
    params.ftype = int(ftypes[gguf_type])
    params.nthread = min(4, os.cpu_count() or 1)
    status = library.llama_model_quantize(
        str(source).encode(), str(target).encode(), ctypes.byref(params)
    )
    if status != 0 or not target.is_file():
        raise ExportError(f"llama.cpp's quantizer failed ({status}) writing {target}")
    return target
