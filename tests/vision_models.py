"""Tiny random vision-language models with real tokenizers from the shared fixtures.

Each family is an `AutoModelForImageTextToText` built from a config (hidden size 32-64, images
of 28-64 pixels), with a real tokenizer that gets its family's image tokens, the family's PIL
image processor (torchvision is not needed) and a chat template of the family's layout. Saved
with `save_pretrained`, the folder loads with `AutoProcessor` + `AutoModelForImageTextToText`.
"""

from __future__ import annotations

import json
from pathlib import Path

# LLaVA-1.5's layout: "USER: <image>\n... ASSISTANT: ...</s>".
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}\n"
    "{% elif message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{% if item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# SmolVLM's layout (Idefics3): "<|im_start|>User:<image>...<end_of_utterance>\nAssistant: ...".
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
VISION_FAMILIES = ("llava", "idefics3", "gemma3")


def build_vision_model(family: str, fixtures: Path, seed: int = 0):
    """(model, processor) of a tiny random `family` model."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    tokenizers = fixtures / "tokenizers"
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if family == "llava":
        from transformers import LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizers / "phi-3-mini"))
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA_TEMPLATE,
        )
        config = AutoConfig.for_model(
            "llava",
            vision_config=dict(
                model_type="clip_vision_model",
                image_size=28,
                patch_size=14,
                projection_dim=32,
                **vision,
            ),
            text_config=dict(model_type="llama", vocab_size=len(tokenizer), **text),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-1,
        )
    elif family == "idefics3":
        from transformers import Idefics3Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import (
            Idefics3ImageProcessorPil,
        )

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizers / "phi-2"))
        tiles = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
        specials = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
        tokenizer.add_special_tokens({"additional_special_tokens": specials + tiles})
        image_processor = Idefics3ImageProcessorPil(
            size={"longest_edge": 64}, max_image_size={"longest_edge": 32}
        )
        processor = Idefics3Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_len=4,
            chat_template=IDEFICS3_TEMPLATE,
        )
        config = AutoConfig.for_model(
            "idefics3",
            vision_config=dict(image_size=32, patch_size=8, **vision),
            text_config=dict(model_type="llama", vocab_size=len(tokenizer), pad_token_id=0, **text),
            scale_factor=2,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        )
    elif family == "gemma3":
        from transformers import Gemma3Processor
        from transformers.models.gemma3.image_processing_pil_gemma3 import (
            Gemma3ImageProcessorPil,
        )

        tokenizer = AutoTokenizer.from_pretrained(
            str(tokenizers / "llama-2"),
            extra_special_tokens={
                "boi_token": "<start_of_image>",
                "eoi_token": "<end_of_image>",
                "image_token": "<image_soft_token>",
            },
        )
        tokenizer.add_special_tokens(
            {"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}
        )
        template = fixtures / "tokenizers" / "chat_templates" / "gemma-3__chat_template.json"
        processor = Gemma3Processor(
            image_processor=Gemma3ImageProcessorPil(size={"height": 28, "width": 28}),
            tokenizer=tokenizer,
            chat_template=json.loads(template.read_text())["chat_template"],
            image_seq_length=4,
        )
        config = AutoConfig.for_model(
            "gemma3",
            vision_config=dict(
                model_type="siglip_vision_model", image_size=28, patch_size=7, **vision
            ),
            text_config=dict(
                model_type="gemma3_text", vocab_size=len(tokenizer), head_dim=16, **text
            ),
            mm_tokens_per_image=4,
            image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
            boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
            eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        )
    else:
        raise ValueError(f"unknown vision family {family!r}; expected one of {VISION_FAMILIES}")
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    tokenizer = processor.tokenizer
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    return model, processor


def save_vision_model(path: Path, family: str, fixtures: Path) -> Path:
    model, processor = build_vision_model(family, fixtures)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
