"""Generate the embedded demo dataset: data/01_raw/demo_sft.jsonl.

The task: turn a customer's free-text order message into one line of JSON with fixed keys.
SmolLM2-135M-Instruct does not do it out of the box (it chats, invents keys or drops fields),
and a few minutes of LoRA training on a CPU teach it, so a default run shows real learning.
Deterministic: the same seed writes the same bytes. Run: python scripts/make_demo_data.py
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ITEMS = [
    "mug",
    "notebook",
    "backpack",
    "lamp",
    "umbrella",
    "scarf",
    "kettle",
    "chair",
    "pillow",
    "wallet",
    "teapot",
    "candle",
    "jacket",
    "headphones",
    "bottle",
    "towel",
]
COLORS = ["red", "blue", "green", "black", "white", "yellow", "grey", "orange", "purple", "pink"]
CITIES = [
    "Berlin",
    "Lisbon",
    "Oslo",
    "Madrid",
    "Dublin",
    "Vienna",
    "Prague",
    "Warsaw",
    "Athens",
    "Zurich",
    "Rome",
    "Paris",
    "Helsinki",
    "Budapest",
    "Brussels",
    "Porto",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NAMES = [
    "Ana",
    "Ben",
    "Chloe",
    "Dmitri",
    "Elif",
    "Farid",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Luca",
    "Mina",
    "Nils",
    "Olga",
    "Pedro",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
]
NUMBER_WORDS = {
    1: "one",
    2: "two",
    3: "three",
    4: "four",
    5: "five",
    6: "six",
    7: "seven",
    8: "eight",
    9: "nine",
    10: "ten",
    12: "twelve",
}

TEMPLATES = [
    "Hi, this is {name}. I'd like {qty} {color} {item}{s} delivered to {city} by {day}.",
    "Please send {qty} {item}{s} in {color} to {city}. I need them before {day}. Thanks, {name}",
    "{name} here: could you ship {qty} {color} {item}{s} to our office in {city}? "
    "{day} at the latest.",
    "Order request from {name} - {qty} x {item} ({color}), destination {city}, deliver by {day}.",
    "Hello! Can I get {qty} of the {color} {item}{s}? Ship to {city}, please, "
    "no later than {day}. - {name}",
    "We need {qty} {item}{s}, colour {color}, in {city} by {day}. Contact: {name}.",
]
INSTRUCTION = (
    "Extract the order from the message as JSON with the keys customer, item, color, quantity, "
    "city and deadline.\n\nMessage: "
)


def make_record(rng: random.Random) -> dict[str, str]:
    qty = rng.choice(list(NUMBER_WORDS))
    fields = {
        "name": rng.choice(NAMES),
        "item": rng.choice(ITEMS),
        "color": rng.choice(COLORS),
        "city": rng.choice(CITIES),
        "day": rng.choice(DAYS),
    }
    # Quantities appear as digits or words, so the model has to normalise, not copy.
    qty_text = NUMBER_WORDS[qty] if rng.random() < 0.5 else str(qty)
    message = rng.choice(TEMPLATES).format(qty=qty_text, s="s" if qty > 1 else "", **fields)
    answer = {
        "customer": fields["name"],
        "item": fields["item"],
        "color": fields["color"],
        "quantity": qty,
        "city": fields["city"],
        "deadline": fields["day"],
    }
    return {"prompt": INSTRUCTION + message, "response": json.dumps(answer)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("data/01_raw/demo_sft.jsonl"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seen, rows = set(), []
    while len(rows) < args.n:
        record = make_record(rng)
        if record["prompt"] not in seen:  # distinct prompts: the eval split never leaks
            seen.add(record["prompt"])
            rows.append(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} records to {args.out}")


if __name__ == "__main__":
    main()
