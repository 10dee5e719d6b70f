"""Greedy generation, batched with left padding, tokenized exactly as training tokenized prompts.
Evaluation and `kedro sft chat|generate` share it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sft_pipeline.common.config import EvaluationConfig
from sft_pipeline.data.tokenization import encode_literal_row, encode_texts

# A prompt: its text, or its rendered segments when some are literal (control-token text inside
# the record's content, which training encoded as text; see `prompt_for`).
Prompt = str | list[dict[str, Any]]


def batches(rows: Sequence[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(rows), size):
        yield list(rows[start : start + size])


def prompt_for(row: dict[str, Any], prompt: str) -> Prompt:
    """What `generate` should encode for `prompt`, a prefix of the rendered `row`: the prompt
    text, or the row's segments that make it up when the row has literal segments, so that the
    prompt is tokenized as training tokenized it (control-token text in content stays text)."""
    segments = row.get("segments") or []
    if not any(seg.get("literal") for seg in segments):
        return prompt
    pieces, size = [], 0
    for seg in segments:
        if size >= len(prompt):
            break
        text = seg["text"][: len(prompt) - size]
        if seg.get("literal") and text != seg["text"]:
            break  # never cut a control-token text in two
        pieces.append({**seg, "text": text})
        size += len(text)
    return pieces if "".join(p["text"] for p in pieces) == prompt else prompt


def _text(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else "".join(p["text"] for p in prompt)


def _encode_prompts(tokenizer, prompts: list[Prompt]) -> list[list[int]]:
    """Token ids of each prompt, as training encoded it: text in one batch (a leading BOS split
    off first, as `encode_texts` does), segments with literal pieces one by one."""
    texts = [p for p in prompts if isinstance(p, str)]
    plain = iter(encode_texts(tokenizer, texts)[0] if texts else [])
    return [
        list(next(plain)) if isinstance(p, str) else encode_literal_row(tokenizer, p)[0]
        for p in prompts
    ]


def generate(
    model,
    tokenizer,
    prompts: list[Prompt],
    stop_ids: list[int],
    cfg: EvaluationConfig,
    *,
    desc: str = "",
) -> list[dict[str, Any]]:
    """Greedy completions, batched with left padding; each {text, stopped, num_tokens}.

    A progress bar (prompts done, per model: `desc`) shows on stderr: generation is the
    longest part of an evaluation.
    """
    import torch
    from tqdm.auto import tqdm

    if not prompts:
        return []
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    stop_set = set(stop_ids)
    # Longest prompts first reduces padding; results go back to the input order.
    order = sorted(range(len(prompts)), key=lambda i: (-len(_text(prompts[i])), i))
    by_index: dict[int, dict[str, Any]] = {}
    progress = tqdm(total=len(prompts), desc=f"generating {desc}".strip(), unit="prompt")
    with torch.inference_mode(), progress:
        for batch in batches(order, cfg.batch_size):
            # Tokenized exactly as training tokenized them, then left-padded.
            ids = _encode_prompts(tokenizer, [prompts[i] for i in batch])
            enc = tokenizer.pad(
                {"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt"
            ).to(device)
            out = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=cfg.max_new_tokens,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = out[:, enc["input_ids"].shape[1] :].tolist()
            for i, tokens in zip(batch, new_tokens, strict=True):
                by_index[i] = _completion(tokenizer, tokens, stop_set)
            progress.update(len(batch))
    return [by_index[i] for i in range(len(prompts))]


def generate_with_images(
    model, processor, samples: list[dict[str, Any]], stop_ids: list[int], cfg: EvaluationConfig
) -> list[dict[str, Any]]:
    """Greedy completions of prompts with their images, one prompt at a time (each image
    expanded by the processor as at tokenization); each {text, stopped, num_tokens}."""
    import torch

    from sft_pipeline.data import images

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tokenizer = processor.tokenizer
    stop_set = set(stop_ids)
    results = []
    with torch.inference_mode():
        for sample in samples:
            pictures = [images.open_image(p) for p in sample.get("images") or []]
            enc = processor(
                text=[sample["prompt"]],
                images=[pictures] if pictures else None,
                add_special_tokens=False,
                return_tensors="pt",
            ).to(device)
            if "pixel_values" in enc:
                enc["pixel_values"] = enc["pixel_values"].to(dtype)
            out = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=cfg.max_new_tokens,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
            tokens = out[0, enc["input_ids"].shape[1] :].tolist()
            results.append(_completion(tokenizer, tokens, stop_set))
    return results


def _completion(tokenizer, tokens: list[int], stop_set: set[int]) -> dict[str, Any]:
    """{text, stopped, num_tokens} of generated `tokens`, cut at the first stop token."""
    end = next((k for k, t in enumerate(tokens) if t in stop_set), None)
    kept = tokens if end is None else tokens[:end]
    return {
        "text": tokenizer.decode(kept, skip_special_tokens=True).strip(),
        "stopped": end is not None,
        "num_tokens": len(kept) + (end is not None),
    }


THUMBNAIL_PIXELS = 96


def image_fields(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample's images for the report: where each came from and a small PNG thumbnail."""
    if not sample.get("images"):
        return {}
    import base64
    import io

    from sft_pipeline.data import images

    thumbnails = []
    for part in sample["images"]:
        picture = images.open_image(part)
        picture.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        thumbnails.append(
            "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        )
    return {"images": [images.describe(p) for p in sample["images"]], "thumbnails": thumbnails}
