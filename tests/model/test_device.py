"""The device and precision rules (sft_pipeline.model.device), on every branch of the table.

CUDA branches run with a mocked capability (the rule is what is tested); the CPU branches run
both with and without native bf16, by mocking what the CPU reports.
"""

from __future__ import annotations

import pytest
import torch

from sft_pipeline.model import device
from sft_pipeline.trainer import SFTConfig

# (device, requested precision) -> precision that runs
RULES = {
    ("cuda-bf16", "auto"): "bf16",
    ("cuda-bf16", "bf16"): "bf16",
    ("cuda-bf16", "fp16"): "fp16",
    ("cuda-bf16", "fp32"): "fp32",
    ("cuda-old", "auto"): "fp16",
    ("cuda-old", "bf16"): "fp16",
    ("cuda-old", "fp16"): "fp16",
    ("cuda-old", "fp32"): "fp32",
    ("cpu-native-bf16", "auto"): "bf16",
    ("cpu-native-bf16", "bf16"): "bf16",
    ("cpu-native-bf16", "fp16"): "bf16",
    ("cpu-native-bf16", "fp32"): "fp32",
    ("cpu-emulated-bf16", "auto"): "fp32",
    ("cpu-emulated-bf16", "bf16"): "bf16",
    ("cpu-emulated-bf16", "fp16"): "fp32",
    ("cpu-emulated-bf16", "fp32"): "fp32",
}


@pytest.fixture
def on(monkeypatch):
    def set_device(kind: str) -> None:
        cuda = kind.startswith("cuda")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: kind == "cuda-bf16")
        monkeypatch.setattr(
            device, "cpu_has_native_bf16", lambda cpuinfo=None: kind == "cpu-native-bf16"
        )

    return set_device


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("where", "requested"), sorted(RULES))
def test_each_device_runs_the_precision_of_the_rule_table(on, where, requested):
    on(where)
    assert device.resolve_precision(requested) == RULES[where, requested]


@pytest.mark.parametrize("where", ["cuda-bf16", "cuda-old", "cpu-native-bf16", "cpu-emulated-bf16"])
def test_4bit_compute_dtype_auto_follows_the_training_precision(on, where):
    on(where)
    precision = device.resolve_precision("auto")
    expected = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
    assert device.compute_dtype("auto", precision) == expected
    assert device.compute_dtype("float32", precision) == "float32"  # a pinned dtype is kept


@pytest.mark.parametrize(
    ("where", "lora", "expected"),
    [
        ("cuda-bf16", True, True),
        ("cuda-old", True, True),
        ("cuda-bf16", False, False),
        ("cpu-native-bf16", True, False),
        ("cpu-emulated-bf16", True, False),
    ],
)
def test_4bit_auto_is_qlora_on_cuda_only(on, where, lora, expected):
    on(where)
    assert device.use_4bit("auto", lora_enabled=lora) is expected
    assert device.use_4bit(True) is True and device.use_4bit(False) is False


def test_native_bf16_is_read_from_the_cpu_flags():
    assert device.cpu_has_native_bf16("flags : fpu avx2 avx512f avx512_bf16") is True
    assert device.cpu_has_native_bf16("flags : fpu avx2 amx_bf16 amx_tile") is True
    assert device.cpu_has_native_bf16("flags : fpu avx2 avx512f avx512_vnni") is False


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("where", ["cpu-native-bf16", "cpu-emulated-bf16"])
def test_sft_config_runs_what_the_rule_table_says(on, where, tmp_path):
    on(where)
    args = SFTConfig(output_dir=str(tmp_path), fp16=True, report_to="none")
    ran = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    assert ran == RULES[where, "fp16"]
    assert args.use_cpu


def test_precision_auto_on_a_cpu_follows_its_flags_not_a_clock(monkeypatch):
    # Any timing would read this clock, which jumps a second per read: a decision that depended
    # on a measurement would come out arbitrary. It must follow the flags alone.
    clock = iter(range(10**6))
    monkeypatch.setattr("time.perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for flags, expected in (("fpu avx2 avx512f avx512_bf16", "bf16"), ("fpu avx2", "fp32")):
        monkeypatch.setattr(device, "_cpu_flags", lambda cpuinfo=None, f=flags: set(f.split()))
        assert {device.resolve_precision("auto") for _ in range(5)} == {expected}
        assert ("avx512_bf16" in device.precision_basis()) is (expected == "bf16")
