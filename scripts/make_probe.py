"""Generate the shipped benchmark probe: conf/base/benchmarks/data/probe.jsonl.

The probe is general knowledge the demo fine-tune never trains on: integer arithmetic and unit
conversions, as four-way multiple choice. `evaluate_model` scores the base and the tuned model on
it through lm-evaluation-harness (task `sft_probe`, conf/base/benchmarks/sft_probe.yaml), so
every run shows what the fine-tune cost outside its own task. The distractors are the near
misses a model makes (off by one step, the wrong operation, the wrong factor), so guessing by
the shape of the number does not help.

Deterministic: the same seed writes the same bytes. Run: python scripts/make_probe.py
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUT = Path("conf/base/benchmarks/data/probe.jsonl")
DEFAULT_ITEMS = 300
CHOICES = 4

# (from unit, to unit, factor): 1 <from> = factor <to>; whole numbers only, so every answer is
# exact and written without rounding.
CONVERSIONS = [
    ("metres", "centimetres", 100),
    ("kilometres", "metres", 1000),
    ("centimetres", "millimetres", 10),
    ("kilograms", "grams", 1000),
    ("litres", "millilitres", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("years", "months", 12),
    ("feet", "inches", 12),
    ("yards", "feet", 3),
]
OPERATIONS = {
    "+": (lambda a, b: a + b, "plus"),
    "-": (lambda a, b: a - b, "minus"),
    "*": (lambda a, b: a * b, "times"),
}


def _options(answer: int, near: list[int], rng: random.Random) -> tuple[list[str], int]:
    """Four distinct choices (the answer and three near misses), shuffled; -> (choices, index)."""
    wrong = [n for n in dict.fromkeys(near) if n != answer]
    step = max(1, abs(answer) // 10)
    offset = 1
    while len(wrong) < CHOICES - 1:  # too few distinct near misses: add neighbours
        for candidate in (answer + offset * step, answer - offset * step):
            if candidate != answer and candidate not in wrong and len(wrong) < CHOICES - 1:
                wrong.append(candidate)
        offset += 1
    values = [answer, *rng.sample(wrong[: CHOICES + 2], CHOICES - 1)]
    rng.shuffle(values)
    return [str(v) for v in values], values.index(answer)


def arithmetic_item(rng: random.Random) -> dict:
    symbol = rng.choice(sorted(OPERATIONS))
    compute, word = OPERATIONS[symbol]
    if symbol == "*":
        a, b = rng.randint(2, 19), rng.randint(2, 12)
    else:
        a, b = rng.randint(10, 99), rng.randint(2, 60)
    answer = compute(a, b)
    near = [answer + 1, answer - 1, answer + 10, answer - 10]
    near += [op(a, b) for s, (op, _) in OPERATIONS.items() if s != symbol]
    choices, index = _options(answer, near, rng)
    question = rng.choice([f"What is {a} {symbol} {b}?", f"What is {a} {word} {b}?"])
    return {"kind": "arithmetic", "question": question, "choices": choices, "answer": index}


def conversion_item(rng: random.Random) -> dict:
    big, small, factor = rng.choice(CONVERSIONS)
    amount = rng.randint(2, 12)
    if rng.random() < 0.5:  # big -> small: multiply
        question = f"How many {small} are in {amount} {big}?"
        answer = amount * factor
    else:  # small -> big: divide (the amount is chosen so the answer is whole)
        question = f"How many {big} are in {amount * factor} {small}?"
        answer = amount
    near = [answer * 10, answer + factor, amount + factor, answer + 1, max(1, answer - 1)]
    choices, index = _options(answer, near, rng)
    return {"kind": "unit_conversion", "question": question, "choices": choices, "answer": index}


def make_items(count: int, seed: int) -> list[dict]:
    """`count` items, arithmetic and conversions alternating (so any prefix, which is what
    lm-evaluation-harness's `limit` takes, has both kinds), each with a stable id."""
    rng = random.Random(seed)
    items = []
    for i in range(count):
        item = (arithmetic_item if i % 2 == 0 else conversion_item)(rng)
        items.append({"id": f"probe-{i:04d}", **item})
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--items", type=int, default=DEFAULT_ITEMS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8", newline="\n") as f:
        for item in make_items(args.items, args.seed):
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"wrote {args.items} items to {args.out}")


if __name__ == "__main__":
    main()
