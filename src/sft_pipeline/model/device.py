"""Device and precision: the one place that decides where training runs and in which dtypes.

Every other module asks here: the trainer's `SFTConfig` (which precision can run), the training
workflow (`precision: auto`, `load_in_4bit: auto`, the 4-bit compute dtype, deterministic
kernels) and the model loaders. The rules form one table:

    device          | precision auto | bf16 asked        | fp16 asked        | 4-bit auto
    ----------------+----------------+-------------------+-------------------+-----------
    CUDA, bf16      | bf16           | bf16              | fp16              | yes (LoRA)
    CUDA, no bf16   | fp16           | fp16 (warned)     | fp16              | yes (LoRA)
    CPU, native bf16| bf16           | bf16              | bf16 (warned)     | no
    CPU, emulated   | fp32           | bf16 (warned)     | fp32 (warned)     | no

"native bf16" means the CPU reports AVX512-BF16 or AMX in its flags. Every entry is a function of
what the hardware reports, never of a timing: a pipeline whose outputs are cached by their inputs
cannot let machine load pick the numerics (a timed choice once trained the same command in bf16,
then a minute later, on a busier machine, in fp32). Without native bf16 instructions bf16 is
emulated, about a hundred times slower than fp32 (0.9 against 137 GFLOP/s for a matmul on an
AVX2 EPYC), so `auto` never picks it there. Where bf16 is native it is the faster of the two for
matmul-bound steps; a run that must match another machine bit for bit pins `fp32`. The decision
and the flags behind it are recorded in `training_summary.json` (`precision`,
`precision_decided_by`).

The 4-bit compute dtype `auto` follows the training precision (bf16 -> bfloat16, fp16 ->
float16, fp32 -> float32), so the 4-bit matmuls and the rest of the model never disagree.
bitsandbytes 4-bit works on CPU but is slower there than a full-precision base, hence
`load_in_4bit: auto` picks it on CUDA only.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Precision = Literal["bf16", "fp16", "fp32"]
TORCH_DTYPE_NAMES: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def device_name() -> str:
    """The device this process trains on: the GPU of its LOCAL_RANK under `accelerate launch`."""
    if on_cuda():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def deterministic_kernels() -> bool:
    """Deterministic kernels only where they are cheap and available (CPU)."""
    return not on_cuda()


def _cpu_flags(cpuinfo: str | None = None) -> set[str]:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return set()
    return set(cpuinfo.split())


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU reports bf16 instructions (AVX512-BF16 or AMX) in /proc/cpuinfo."""
    flags = _cpu_flags(cpuinfo)
    return any(flag in flags for flag in _CPU_BF16_FLAGS)


def precision_basis(*, cuda: bool | None = None) -> str:
    """What `precision: auto` was decided by, in words for the run's summary."""
    import torch

    if on_cuda() if cuda is None else cuda:
        name = torch.cuda.get_device_name()
        return f"{name}: bf16 {'supported' if torch.cuda.is_bf16_supported() else 'unsupported'}"
    flags = [flag for flag in _CPU_BF16_FLAGS if flag in _cpu_flags()]
    return f"CPU flags: {', '.join(flags)}" if flags else "CPU flags: no native bf16"


def resolve_precision(requested: str, *, cuda: bool | None = None) -> Precision:
    """The precision that runs for a request (`auto`, `bf16`, `fp16`, `fp32`): the table above.

    A request this device cannot honour is replaced by the best one it can, with one warning.
    """
    import torch

    cuda = on_cuda() if cuda is None else cuda
    if requested == "fp32":
        return "fp32"
    if cuda:
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return "bf16" if bf16_ok else "fp16"
        if requested == "bf16" and not bf16_ok:
            warn_once("bf16 requested but this GPU does not support it; using fp16 instead")
            return "fp16"
        return requested  # type: ignore[return-value]
    native = cpu_has_native_bf16()
    if requested == "auto":
        return "bf16" if native else "fp32"
    if requested == "bf16":
        # bf16 autocast always runs on CPU; it is only slow without native bf16 instructions.
        if not native:
            warn_once(
                "bf16 requested but this CPU has no native bf16 instructions (AVX512-BF16 or "
                "AMX): it is emulated, far slower than fp32"
            )
        return "bf16"
    if requested == "fp16":
        warn_once(
            "fp16 was requested but cannot run on a CPU; training in "
            f"{'bf16 autocast (native on this CPU)' if native else 'fp32'} instead"
        )
        return "bf16" if native else "fp32"
    raise ValueError(f"precision: expected auto, bf16, fp16 or fp32, got {requested!r}")


def torch_dtype(precision: str):
    """The torch dtype of a precision name (`bf16`) or a torch dtype name (`bfloat16`)."""
    import torch

    return getattr(torch, TORCH_DTYPE_NAMES.get(precision, precision))


def compute_dtype(requested: str, precision: Precision) -> str:
    """The 4-bit compute dtype name: `auto` follows the training precision."""
    return TORCH_DTYPE_NAMES[precision] if requested == "auto" else requested


def use_4bit(load_in_4bit: bool | str, *, lora_enabled: bool = True) -> bool:
    """`quantization.load_in_4bit` as a decision: `auto` is QLoRA on CUDA, for LoRA only."""
    if load_in_4bit == "auto":
        return lora_enabled and on_cuda()
    return bool(load_in_4bit)


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)
        log.warning(message)
