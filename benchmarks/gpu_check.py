"""CUDA path check: 4-bit QLoRA in bf16, packing kept apart, throughput side by side.

For a machine with one NVIDIA GPU and no network (nothing here needs a hub): models are built
from configs with random weights (throughput does not depend on their values), the data are the
256 Alpaca rows already tokenized with the SmolLM2 tokenizer by the pipeline's own code
(`input_ids`/`labels`, one JSON object per line). It prints and writes, in one run:

* the measured bf16 matmul peak of the card;
* packing correctness on CUDA: eval loss of the same rows packed vs unpacked (fp32, sdpa);
* per model shape and system (ours packed / unpacked, a naive `transformers.Trainer` with
  `DataCollatorForLanguageModeling`, and TRL's `SFTTrainer` when importable): non-padding
  tokens/s over optimizer steps 2..N, step-1 and final loss, peak GPU memory, MFU, and ratios.

    python benchmarks/gpu_check.py --data rows.jsonl --tokenizer smollm2_dir --out results/
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

SHAPES = {
    # SmolLM2-135M (the default model's shape) and a 1.1B Llama (TinyLlama's shape).
    "smollm2-135m": None,  # read from the tokenizer folder's config.json
    "llama-1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
}


def matmul_peak_tflops(dtype=torch.bfloat16, n=8192, reps=10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def build_random_model(name: str, tokenizer_dir: Path, work: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tokenizer_dir)
    if SHAPES[name]:
        config = AutoConfig.for_model("llama", vocab_size=config.vocab_size, **SHAPES[name])
    config.use_cache = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    path = work / name
    model.save_pretrained(path)
    return path


def load(path: Path, quantized: bool, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = dict(device_map="cuda:0", attn_implementation="sdpa", dtype=dtype)
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")


class StepClock:
    """Times optimizer steps (after a CUDA sync) and reads the non-padding token counter."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                torch.cuda.synchronize()
                clock.marks.append((time.perf_counter(), state.num_input_tokens_seen))

        self.marks: list[tuple[float, int]] = []
        self.callback = _Callback()

    def tokens_per_second(self) -> float:
        (t1, n1), (tn, nn) = self.marks[0], self.marks[-1]
        return (nn - n1) / (tn - t1)


def run_system(system: str, model_path: Path, rows, tokenizer, steps: int, out: Path) -> dict:
    from datasets import Dataset

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    clock = StepClock()
    common = dict(
        output_dir=str(out / f"ckpt-{system}"),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=2e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=True,
        seed=0,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )
    model = load(model_path, quantized=True)
    if system.startswith("ours"):
        from sft_pipeline import SFTConfig, SFTTrainer

        data = Dataset.from_list([{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows])
        args = SFTConfig(
            **common, max_length=512, packing=system.endswith("packed"), pad_to_multiple_of=8
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=lora_config(),
            callbacks=[clock.callback],
        )
    elif system.startswith("trl"):
        from trl import SFTConfig as TRLConfig
        from trl import SFTTrainer as TRLTrainer

        data = Dataset.from_list(rows)
        packed = system.endswith("packed")
        args = TRLConfig(**common, max_length=512, packing=packed, gradient_checkpointing=False)
        trainer = TRLTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=lora_config(),
            callbacks=[clock.callback],
        )
    else:  # naive: plain Trainer, labels = every token, padding by the LM collator
        from peft import get_peft_model, prepare_model_for_kbit_training
        from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

        model = get_peft_model(prepare_model_for_kbit_training(model), lora_config())
        data = Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows])
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=data,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            callbacks=[clock.callback],
        )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = {
        "system": system,
        "tokens_per_s": clock.tokens_per_second(),
        "loss_step1": losses[0],
        "loss_final": losses[-1],
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
        "trainable_params": trainable,
    }
    del trainer, model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def packing_parity(model_path: Path, rows, tokenizer) -> dict:
    """Eval loss of the same rows, packed vs unpacked, fp32 on sdpa: must agree."""
    from datasets import Dataset

    from sft_pipeline import SFTConfig, SFTTrainer

    data = Dataset.from_list([{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows])
    losses = {}
    for packed in (False, True):
        model = load(model_path, quantized=False, dtype=torch.float32)
        args = SFTConfig(
            output_dir="/tmp/parity",
            per_device_eval_batch_size=8,
            report_to="none",
            max_length=512,
            packing=packed,
            bf16=False,
        )
        trainer = SFTTrainer(model=model, args=args, eval_dataset=data, processing_class=tokenizer)
        losses["packed" if packed else "unpacked"] = trainer.evaluate()["eval_loss"]
        del trainer, model
        torch.cuda.empty_cache()
    losses["abs_diff"] = abs(losses["packed"] - losses["unpacked"])
    return losses


def flops_per_token(model_path: Path) -> float:
    """4 x linear params (forward + activation gradients of the frozen base) + LM head;
    LoRA and attention scores are small at this length and left out (a lower bound)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    d, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * inter
    return 4 * (per_layer * layers + d * c.vocab_size)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import peft
    import transformers
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in args.data.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    report = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bf16_matmul_tflops": matmul_peak_tflops(),
    }
    print(json.dumps(report), flush=True)
    work = Path("/tmp/gpu_models")
    systems = ["ours-packed", "ours", "naive", "trl", "trl-packed"]
    for shape in SHAPES:
        path = build_random_model(shape, args.tokenizer, work)
        if shape == "smollm2-135m":
            report["packing_parity_fp32_sdpa"] = packing_parity(path, rows[:64], tokenizer)
            print(json.dumps(report["packing_parity_fp32_sdpa"]), flush=True)
        flops = flops_per_token(path)
        results = []
        for system in systems:
            try:
                r = run_system(system, path, rows, tokenizer, args.steps, args.out)
            except Exception as exc:  # a reference system failing must not hide ours
                r = {"system": system, "error": f"{type(exc).__name__}: {exc}"[:500]}
            if "tokens_per_s" in r:
                r["mfu"] = r["tokens_per_s"] * flops / (report["bf16_matmul_tflops"] * 1e12)
            print(json.dumps(r), flush=True)
            results.append(r)
        base = {r["system"]: r.get("tokens_per_s") for r in results}
        for r in results:
            for ref in ("trl", "naive"):
                if r.get("tokens_per_s") and base.get(ref):
                    r[f"x_{ref}"] = r["tokens_per_s"] / base[ref]
        report[shape] = results
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
