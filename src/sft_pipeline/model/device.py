"""Device and precision: the one place that decides where training runs and in which dtypes.

Every other module asks here: the trainer's `SFTConfig` (which precision can run), the training
workflow (`precision: auto`, `load_in_4bit: auto`, the 4-bit compute dtype, deterministic
kernels) and the model loaders. The rules form one table:

    device          | precision auto | bf16 asked        | fp16 asked        | 4-bit auto
    ----------------+----------------+-------------------+-------------------+-----------
    CUDA, bf16      | bf16           | bf16              | fp16              | yes (LoRA)
    CUDA, no bf16   | fp16           | fp16 (warned)     | fp16              | yes (LoRA)
    CPU, native bf16| bf16 if faster | bf16              | bf16/fp32 (warned)| no
    CPU, emulated   | fp32           | bf16 (warned)     | fp32 (warned)     | no

"native bf16" means the CPU reports AVX512-BF16 or AMX; "faster" is measured only on such CPUs:
by timing a training step of the actual model and batch shape in both precisions where the
caller can give one (`step_cost`: the training workflow does), else by a matmul, once per
process. bf16 can lose on a CPU that has it (casts between fp32 LoRA weights and a bf16 base,
padded batches), so only a step of the real shape decides reliably.

The 4-bit compute dtype `auto` follows the training precision (bf16 -> bfloat16, fp16 ->
float16, fp32 -> float32), so the 4-bit matmuls and the rest of the model never disagree.
bitsandbytes 4-bit works on CPU but is slower there than a full-precision base, hence
`load_in_4bit: auto` picks it on CUDA only.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from collections.abc import Callable
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


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU reports bf16 instructions (AVX512-BF16 or AMX) in /proc/cpuinfo.

    Without them bf16 is emulated: on an AVX2 EPYC a bf16 matmul ran at 0.9 GFLOP/s against
    137 in fp32.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return any(flag in flags for flag in _CPU_BF16_FLAGS)


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_faster() -> bool:
    """Whether bf16 autocast beats fp32 on this CPU: ruled out by flags, else measured once.

    CPUs without native bf16 are ruled out by their flags rather than by a timing that a busy
    machine could skew. On the others a ~0.1 s measurement decides, since how much bf16 gains
    depends on the chip.
    """
    import torch

    if not torch.backends.mkldnn.is_available() or not cpu_has_native_bf16():
        return False
    x = torch.randn(256, 512)
    weight = torch.randn(512, 512)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, w = x.to(dtype), weight.to(dtype)
        torch.nn.functional.linear(a, w)  # warm-up: the first call pays for kernel selection
        start = time.perf_counter()
        for _ in range(3):
            torch.nn.functional.linear(a, w)
        timings[dtype] = (time.perf_counter() - start) / 3
    faster = timings[torch.bfloat16] < 0.9 * timings[torch.float32]
    log.info(
        "CPU linear 256x512x512: fp32 %.2f ms, bf16 %.2f ms -> %s",
        timings[torch.float32] * 1e3,
        timings[torch.bfloat16] * 1e3,
        "bf16" if faster else "fp32",
    )
    return faster


def resolve_precision(
    requested: str,
    *,
    cuda: bool | None = None,
    step_cost: Callable[[Precision], float] | None = None,
) -> Precision:
    """The precision that runs for a request (`auto`, `bf16`, `fp16`, `fp32`): the table above.

    A request this device cannot honour is replaced by the best one it can, with one warning.
    `step_cost(precision)` -> seconds of one training step, for `auto` on a CPU with native bf16.
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
    if requested == "auto":
        if step_cost is not None and cpu_has_native_bf16():
            return faster_of_steps(step_cost)
        return "bf16" if cpu_bf16_is_faster() else "fp32"
    if requested == "bf16":
        # bf16 autocast always runs on CPU; it is only slow without native bf16 instructions.
        if not cpu_bf16_is_faster():
            warn_once("bf16 autocast is slower than fp32 on this CPU (measured); fp32 is faster")
        return "bf16"
    if requested == "fp16":
        use_bf16 = cpu_bf16_is_faster()
        warn_once(
            "fp16 was requested but cannot run on a CPU; training in "
            f"{'bf16 autocast' if use_bf16 else 'fp32'} instead (the faster one here)"
        )
        return "bf16" if use_bf16 else "fp32"
    raise ValueError(f"precision: expected auto, bf16, fp16 or fp32, got {requested!r}")


def faster_of_steps(step_cost: Callable[[Precision], float]) -> Precision:
    """bf16 when a training step in it takes under 0.9x the fp32 step (margin for timing noise)."""
    seconds = {precision: step_cost(precision) for precision in ("fp32", "bf16")}
    chosen: Precision = "bf16" if seconds["bf16"] < 0.9 * seconds["fp32"] else "fp32"
    log.info(
        "precision auto: one training step took %.3f s in fp32, %.3f s in bf16 -> %s",
        seconds["fp32"],
        seconds["bf16"],
        chosen,
    )
    return chosen


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
