"""Tiny random vision-language models with real tokenizers from the shared fixtures.

Each family is an `AutoModelForImageTextToText` built from a config (hidden size 32-64, images
of 28-64 pixels), with a real tokenizer that gets its family's image tokens, the family's PIL
image processor (torchvision is not needed) and a chat template of the family's layout.
Saved with `save_pretrained`, the folder loads with `AutoProcessor` + `AutoModelForImageTextToText`;
Qwen2-VL/Qwen2.5-VL processors are built without their video part (it needs torchvision), so
their folder loads with `sft_pipeline.model.loading.load_processor` here.
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
# Qwen2-VL's layout (its own template): a default system turn, images as
# "<|vision_start|><|image_pad|><|vision_end|>".
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VISION_FAMILIES = ("llava", "idefics3", "gemma3", "qwen2_vl")
# Tested in-process only (the same processor and rope code as Qwen2-VL, another vision tower).
EXTRA_FAMILIES = ("qwen2_5_vl",)


def build_vision_model(family: str, fixtures: Path, seed: int = 0):
    """(model, processor) of a tiny random `family` model."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    tokenizers = fixtures / "tokenizers"
    from tests.conftest import TINY_SHAPE

    text = dict(**TINY_SHAPE, initializer_range=0.2)
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
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        import transformers
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        from sft_pipeline.model.loading import image_only_processor_class

        # Qwen's tokenizer is byte-level BPE like phi-2's, with Qwen2.5's special tokens.
        qwen = json.loads(
            (tokenizers / "chat_templates" / "qwen2.5__tokenizer_config.json").read_text()
        )
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizers / "phi-2"))
        tokenizer.add_special_tokens(
            {
                "additional_special_tokens": qwen["additional_special_tokens"],
                "eos_token": qwen["eos_token"],
                "pad_token": qwen["pad_token"],
            }
        )
        name = "Qwen2VLProcessor" if family == "qwen2_vl" else "Qwen2_5_VLProcessor"
        processor = image_only_processor_class(getattr(transformers, name))(
            # 56x56 pixels: 4x4 patches of 14, merged 2x2 into 4 image tokens.
            image_processor=Qwen2VLImageProcessorPil(
                size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56}
            ),
            tokenizer=tokenizer,
            chat_template=QWEN2_VL_TEMPLATE,
        )
        tower = dict(depth=2, num_heads=4, patch_size=14, spatial_merge_size=2)
        if family == "qwen2_vl":
            tower |= dict(embed_dim=32, hidden_size=text["hidden_size"], mlp_ratio=2)
        else:
            tower |= dict(
                hidden_size=32,
                intermediate_size=64,
                out_hidden_size=text["hidden_size"],
                window_size=56,
                fullatt_block_indexes=[1],
            )
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3]}  # head_dim 16: 8 pairs
        config = AutoConfig.for_model(
            family,
            vision_config=tower,
            text_config=dict(
                vocab_size=len(tokenizer),
                rope_parameters=rope,
                bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **text,
            ),
            image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        )
    else:
        raise ValueError(
            f"unknown vision family {family!r}; expected one of {VISION_FAMILIES + EXTRA_FAMILIES}"
        )
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
