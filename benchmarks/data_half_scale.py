"""The data half at scale: `kedro run --pipeline=sft --to-nodes=tokenize_conversations` on
10^5 and 3x10^5 records, next to TRL's own preparation (SFTTrainer construction) of the same
10^5 records with the same tokenizer, chat template and completion mask.

Records are the Alpaca fixture's rows made unique by an index suffix on the instruction, so
lengths stay real. Every measurement runs in its own process (peak RSS from getrusage of that
process alone). Prints tokens/s, the ratio to TRL, peak RSS per size, and the extrapolation to
10^6 and 10^7 records; `--json` writes the numbers.

    .venv/bin/python benchmarks/data_half_scale.py                     # 10^5, 3x10^5, TRL at 10^5
    .venv/bin/python benchmarks/data_half_scale.py --sizes 2000 --trl-size 2000   # a smoke run
    .venv/bin/python benchmarks/data_half_scale.py --million           # adds 10^6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = Path(os.environ.get("SFT_PIPELINE_FIXTURES") or ROOT.parent / "shared" / "fixtures")
ALPACA = FIXTURES / "datasets" / "llamafactory" / "alpaca_en_demo.json"
MAX_LENGTH = 512


def model_dir() -> Path:
    """SmolLM2-135M-Instruct as safetensors (converted once, cached); SFT_BENCH_MODEL overrides."""
    if os.environ.get("SFT_BENCH_MODEL"):
        return Path(os.environ["SFT_BENCH_MODEL"])
    from sft_pipeline.model.base_model import bundled_gguf_path, convert_gguf

    return convert_gguf(bundled_gguf_path())


def make_records(n: int, path: Path) -> Path:
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            row = dict(rows[i % len(rows)])
            row["instruction"] = f"{row['instruction']} ({i})"
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def measured(args: list[str], cwd: Path | None = None) -> dict:
    """Run `args` in a child process; (wall seconds, peak RSS GiB of that child alone)."""
    code = (
        "import resource, subprocess, sys, json, time; t = time.perf_counter(); "
        f"p = subprocess.run({args!r}, cwd={str(cwd) if cwd else None!r}, "
        "capture_output=True, text=True); "
        "print(json.dumps({'rc': p.returncode, 'wall_s': time.perf_counter() - t, "
        "'peak_rss_gib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, "
        "'stdout': p.stdout[-2000:], 'tail': (p.stdout + p.stderr)[-3000:]}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"`{' '.join(args)}` failed:\n{result['tail']}")
    return result


def ours(n: int, work: Path, model: Path) -> dict:
    from tests import project_copy as pc

    project = pc.make_project(work / f"project-{n}", with_model=False)
    data = make_records(n, work / f"alpaca-{n}.jsonl")
    pc.set_params(
        project,
        {
            "data": {"path": str(data), "eval_fraction": 0.1},
            "model": {"name_or_path": str(model)},
            "tokenization": {"max_seq_length": MAX_LENGTH},
            "validation": {"max_rejected_fraction": 0.5},
        },
    )
    run = [sys.executable, "-m", "kedro", "run", "--pipeline=sft"]
    run += ["--to-nodes=tokenize_conversations", "--env", pc.TINY_ENV]
    # A user's environment: the test suite's TOKENIZERS_PARALLELISM=false is not one (TRL's run
    # gets the same default environment).
    settings = {k: v for k, v in pc.env().items() if k not in ("PATH", "TOKENIZERS_PARALLELISM")}
    result = measured(["env", *(f"{k}={v}" for k, v in settings.items()), *run], project)
    stats = json.loads((project / "data/08_reporting/token_stats.json").read_text())
    result["tokens"] = sum(s["total_tokens"] for s in stats["splits"].values())
    result["records"] = n
    return result


def trl_child(n: int, data: Path, model: Path) -> None:
    """TRL's preparation: SFTTrainer construction on prompt/completion conversations."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in data.open(encoding="utf-8")]

    def prompt(row: dict) -> str:
        return (
            f"{row['instruction']}\n\n{row['input']}"
            if row["input"].strip()
            else row["instruction"]
        )

    dataset = datasets.Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": prompt(r)}],
                "completion": [{"role": "assistant", "content": r["output"]}],
            }
            for r in rows
        ]
    )
    del rows
    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForCausalLM.from_pretrained(model)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, max_length=MAX_LENGTH, report_to="none", bf16=False, use_cpu=True
        )
        start = time.perf_counter()
        trainer = SFTTrainer(
            model=net, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        seconds = time.perf_counter() - start
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    print(json.dumps({"prep_s": seconds, "tokens": tokens}))


def trl(n: int, work: Path, model: Path) -> dict:
    data = make_records(n, work / f"alpaca-{n}.jsonl")
    args = [sys.executable, __file__, "--trl-child", str(n), str(data), str(model)]
    result = measured(args)
    result.pop("tail")
    result.update(json.loads(result.pop("stdout").strip().splitlines()[-1]))
    result["records"] = n
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000])
    parser.add_argument("--trl-size", type=int, default=100_000, help="0: skip TRL")
    parser.add_argument("--million", action="store_true", help="also run 10^6 records")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--trl-child", nargs=3, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.trl_child:
        n, data, model = opts.trl_child
        trl_child(int(n), Path(data), Path(model))
        return
    sizes = sorted(set(opts.sizes + ([1_000_000] if opts.million else [])))
    model = model_dir()
    results: dict = {"ours": [], "trl": None}
    with tempfile.TemporaryDirectory(prefix="data-half-") as tmp:
        work = Path(tmp)
        for n in sizes:
            r = ours(n, work, model)
            r.pop("tail", None), r.pop("stdout", None)
            r["tokens_per_s"] = r["tokens"] / r["wall_s"]
            results["ours"].append(r)
            print(
                f"ours  {n:>9,} records: {r['tokens']:>12,} tokens in {r['wall_s']:7.1f} s = "
                f"{r['tokens_per_s']:>9,.0f} tok/s, peak RSS {r['peak_rss_gib']:.2f} GiB",
                flush=True,
            )
        if opts.trl_size:
            t = trl(opts.trl_size, work, model)
            t["tokens_per_s"] = t["tokens"] / t["prep_s"]
            results["trl"] = t
            print(
                f"TRL   {t['records']:>9,} records: {t['tokens']:>12,} tokens in "
                f"{t['prep_s']:7.1f} s = {t['tokens_per_s']:>9,.0f} tok/s (SFTTrainer "
                f"construction), peak RSS {t['peak_rss_gib']:.2f} GiB (with the model)",
                flush=True,
            )
            same = next((r for r in results["ours"] if r["records"] == t["records"]), None)
            if same:
                ratio = same["tokens_per_s"] / t["tokens_per_s"]
                results["ratio_to_trl"] = ratio
                print(
                    f"ratio to TRL at {t['records']:,} records: {ratio:.2f}x tokens/s (target 1.5)"
                )
    ours_runs = results["ours"]
    if len(ours_runs) >= 2:
        a, b = ours_runs[-2], ours_runs[-1]
        per_record = (b["wall_s"] - a["wall_s"]) / (b["records"] - a["records"])
        rss_slope = (b["peak_rss_gib"] - a["peak_rss_gib"]) / (b["records"] - a["records"])
        print(
            f"peak RSS {b['records']:,} / {a['records']:,}: "
            f"{b['peak_rss_gib'] / a['peak_rss_gib']:.2f}x (target <= 1.3, <= 2.5 GiB)"
        )
        results["extrapolation"] = {}
        for n in (1_000_000, 10_000_000):
            seconds = b["wall_s"] + per_record * (n - b["records"])
            rss = b["peak_rss_gib"] + max(rss_slope, 0.0) * (n - b["records"])
            results["extrapolation"][n] = {"wall_s": seconds, "peak_rss_gib": rss}
            print(
                f"extrapolated to {n:>10,} records: {seconds / 60:6.1f} min, peak RSS {rss:.2f} GiB"
            )
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
