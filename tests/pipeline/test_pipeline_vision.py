"""Vision-language SFT through the real `sft` pipeline (`kedro run`), with parameters only.

One tiny project per family (module-scoped, shared by the tests below): a random model with a
real tokenizer from the shared fixtures, trained on LLaMA-Factory's real `mllm_demo.json` (with
its three JPEGs), a TRL-format JSON Lines file and a Hub-style Parquet file whose images are
stored as bytes, plus one record whose image is missing and one whose image is corrupt.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests import project_copy as pc
from tests.vision_models import VISION_FAMILIES, save_vision_model

pytestmark = pytest.mark.slow

RAW = "data/01_raw/vision"
QUESTIONS = [
    ("What is in the picture?", "Football players celebrating."),
    ("Describe the scene briefly.", "A man speaking at a ceremony."),
    ("Where is this?", "On a football pitch."),
    ("What colour dominates?", "Red and white."),
]
RUN_PARAMS = {
    "data": {
        "path": [f"{RAW}/mllm_demo.json", f"{RAW}/trl.jsonl", f"{RAW}/hub.parquet"],
        "eval_fraction": 0.25,
    },
    # The two broken records of trl.jsonl are rejected on purpose.
    "validation": {"max_rejected_fraction": 0.5},
    "tokenization": {"max_seq_length": 512},
    "training": {
        "max_steps": 8,
        "learning_rate": 5e-3,
        "packing": False,
        "per_device_train_batch_size": 2,
    },
    "evaluation": {"max_samples": 2, "max_new_tokens": 4, "batch_size": 2},
}


def write_vision_data(project: Path, fixtures: Path) -> None:
    """The three files of the module doc under `RAW`; image paths relative to each file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    raw = project / RAW
    demo = fixtures / "datasets" / "llamafactory"
    shutil.copytree(demo / "mllm_demo_data", raw / "mllm_demo_data")
    shutil.copy(demo / "mllm_demo.json", raw / "mllm_demo.json")
    (raw / "mllm_demo_data" / "corrupt.jpg").write_bytes(
        (demo / "mllm_demo_data" / "3.jpg").read_bytes()[:400]
    )
    rows = []
    for k, (question, answer) in enumerate(QUESTIONS * 2):
        image = f"mllm_demo_data/{k % 3 + 1}.jpg"
        rows.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image"},
                            {"type": "text", "text": f"{question} ({k})"},
                        ],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ],
                "images": [image],
            }
        )
    broken = rows[0]["messages"]
    rows.append({"messages": broken, "images": ["mllm_demo_data/missing.jpg"]})
    rows.append({"messages": broken, "images": ["mllm_demo_data/corrupt.jpg"]})
    (raw / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    hub = []
    for k in range(3):
        buffer = io.BytesIO()
        Image.open(demo / "mllm_demo_data" / f"{k + 1}.jpg").convert("RGB").resize((40, 30)).save(
            buffer, format="PNG"
        )
        hub.append(
            {
                "messages": json.dumps(
                    [
                        {"role": "user", "content": f"<image>Picture {k}: who is shown?"},
                        {"role": "assistant", "content": "Players of a football club."},
                    ]
                ),
                "images": [{"bytes": buffer.getvalue(), "path": f"{k}.png"}],
            }
        )
    pq.write_table(pa.Table.from_pylist(hub), raw / "hub.parquet")


@pytest.fixture(scope="module", params=VISION_FAMILIES)
def vision_run(request, tmp_path_factory, fixtures_dir):
    """(family, project) after one `kedro run --pipeline=sft` of that family."""
    family = request.param
    root = tmp_path_factory.mktemp(f"vision-{family}")
    model_dir = save_vision_model(root / "model", family, fixtures_dir)
    project = pc.make_project(root / "project", records=4, model_dir=model_dir)
    write_vision_data(project, fixtures_dir)
    pc.set_params(project, RUN_PARAMS)
    pc.run([sys.executable, "-m", "kedro", "run", "--pipeline=sft", "--env", pc.TINY_ENV], project)
    return family, project


def test_missing_and_corrupt_images_are_rejected_with_their_path(vision_run):
    _family, project = vision_run
    rejected = [
        json.loads(line)
        for line in (project / "data/08_reporting/rejected_records.jsonl").read_text().splitlines()
    ]
    reasons = {
        r["source_row"]: r["reasons"] for r in rejected if r["source_file"].endswith("trl.jsonl")
    }
    assert len(rejected) == 2 and sorted(reasons) == [9, 10]
    assert "image_missing" in reasons[9][0] and "mllm_demo_data/missing.jpg" in reasons[9][0]
    assert "image_unreadable" in reasons[10][0] and "mllm_demo_data/corrupt.jpg" in reasons[10][0]
    report = pc.read_json(project, "data/08_reporting/validation_report.json")
    assert report["ingested"] == 6 + 10 + 3 == report["valid"] + report["rejected"]


def test_labels_cover_exactly_the_assistant_replies_never_images_or_prompts(vision_run):
    import pandas as pd
    from datasets import load_from_disk

    from sft_pipeline.data.vision_tokens import image_token_ids
    from sft_pipeline.model.loading import load_processor

    family, project = vision_run
    processor = load_processor(project / "data/06_models/base")  # AutoProcessor, else no video
    tokenizer = processor.tokenizer
    image_ids = image_token_ids(processor)
    records = pd.read_parquet(project / "data/03_primary/train_records.parquet")
    by_id = dict(zip(records["record_id"], records["messages"], strict=True))
    tokens = load_from_disk(str(project / "data/05_model_input/train_tokens"))
    assert len(tokens) == len(records) and "pixel_values" in tokens.column_names
    for row in tokens:
        ids, labels = row["input_ids"], row["labels"]
        assert any(t in image_ids for t in ids)  # every training row here has an image
        runs, current = [], []
        for position, (token, label) in enumerate(zip(ids, labels, strict=True)):
            if label == -100:
                if current:
                    runs.append(current)
                current = []
                continue
            assert label == token and token not in image_ids, (family, position)
            current.append(token)
        if current:
            runs.append(current)
        replies = [
            "".join(p["text"] for p in m["content"] if p["type"] == "text")
            for m in json.loads(by_id[row["record_id"]])
            if m["role"] == "assistant"
        ]
        # Each supervised run is one reply and the end-of-turn token that closes it.
        decoded = [tokenizer.decode(run[:-1]).strip() for run in runs]
        assert decoded == [r.strip() for r in replies], family
        assert all(
            tokenizer.convert_ids_to_tokens(run[-1]) in tokenizer.all_special_tokens for run in runs
        )


def test_tuned_held_out_loss_is_below_the_base(vision_run):
    _family, project = vision_run
    metrics = pc.read_json(project, "data/08_reporting/metrics.json")
    assert metrics["tuned/eval_loss"] < metrics["base/eval_loss"]
    generations = [
        json.loads(line)
        for line in (project / "data/07_model_output/eval_generations.jsonl")
        .read_text()
        .splitlines()
    ]
    assert generations and all(g["thumbnails"][0].startswith("data:image/png") for g in generations)
    assert 'class="thumb"' in (project / "data/08_reporting/report.html").read_text()


def test_merged_folder_loads_with_auto_classes_and_answers_an_image(vision_run, fixtures_dir):
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    family, project = vision_run
    merged = project / "data/06_models/merged"
    if family.startswith("qwen"):
        # AutoProcessor would build the video part, which needs torchvision: the same folder,
        # built without it.
        from sft_pipeline.model.loading import load_processor

        config = json.loads((merged / "processor_config.json").read_text())
        assert config["processor_class"] == "Qwen2VLProcessor"
        processor = load_processor(merged)
    else:
        processor = AutoProcessor.from_pretrained(merged, backend="pil")
    model = AutoModelForImageTextToText.from_pretrained(merged).eval()
    image = Image.open(fixtures_dir / "datasets/llamafactory/mllm_demo_data/1.jpg")
    message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who?"}]}]
    prompt = processor.apply_chat_template(message, add_generation_prompt=True)
    inputs = processor(
        text=[prompt], images=[[image]], add_special_tokens=False, return_tensors="pt"
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_editing_an_image_in_place_invalidates_ingest_records(vision_run):
    family, project = vision_run
    if family != VISION_FAMILIES[0]:
        pytest.skip("images are DVC deps the same way for every family: checked on one")
    folder = f"{RAW}/mllm_demo_data"
    pc.run([sys.executable, "-m", "kedro", "dvc", "generate", "--env", pc.TINY_ENV], project)
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    owners = {name for name, stage in stages.items() if folder in stage["deps"]}
    assert owners == {"ingest_records"}
    dvc = str(pc.VENV_BIN / "dvc")
    pc.run([dvc, "init", "--no-scm", "-q"], project)
    # The run above is the stage's result: record it as DVC's, then edit one image.
    pc.run([dvc, "commit", "--force", "ingest_records"], project)
    assert _dvc_status(project, dvc) == {}
    image = project / folder / "2.jpg"
    original = image.read_bytes()
    image.write_bytes(original[:-2] + bytes([original[-2] ^ 0x01]) + original[-1:])
    try:
        changed = _dvc_status(project, dvc)
        assert list(changed) == ["ingest_records"]
        assert {"changed deps": {folder: "modified"}} in changed["ingest_records"]
    finally:
        image.write_bytes(original)
    assert _dvc_status(project, dvc) == {}


def _dvc_status(project: Path, dvc: str) -> dict:
    return json.loads(pc.run([dvc, "status", "--json", "ingest_records"], project))


def test_a_picture_changed_in_place_trains_again_and_gives_another_adapter(vision_run, tmp_path):
    from datasets import load_from_disk
    from PIL import Image, ImageOps
    from safetensors.numpy import load_file

    family, project = vision_run
    if family != VISION_FAMILIES[0]:
        pytest.skip("the run fingerprint is the same code for every family: checked on one")
    copy = tmp_path / "project"
    shutil.copytree(project, copy, symlinks=True)
    kedro = [sys.executable, "-m", "kedro", "run", "--pipeline=sft", "--env", pc.TINY_ENV]
    # Checkpoints to resume from (the interval is not part of the run's identity); every record
    # trains, so a changed record id cannot move a row to the eval side and change the ids.
    same = ["--to-nodes=train_adapter", "--params", "training.save_steps=4,data.eval_fraction=0"]
    pc.run([*kedro, *same], copy)
    adapter = "data/06_models/adapter/adapter_model.safetensors"
    tokens = "data/05_model_input/train_tokens"
    before = load_file(copy / adapter)
    ids_before = load_from_disk(str(copy / tokens))["input_ids"]
    # Same size, so the same image tokens and ids: only the pixels (and the bytes) differ.
    image = copy / RAW / "mllm_demo_data" / "2.jpg"
    original = Image.open(image).convert("RGB")
    ImageOps.invert(original).save(image, format="JPEG")
    assert Image.open(image).size == original.size
    output = pc.run([*kedro, *same], copy)
    assert load_from_disk(str(copy / tokens))["input_ids"] == ids_before
    assert "resuming from" not in output
    summary = json.loads((copy / "data/08_reporting/training_summary.json").read_text())
    assert summary["resumed_from"] is None
    assert summary["global_step"] == RUN_PARAMS["training"]["max_steps"]
    after = load_file(copy / adapter)
    assert max(abs(before[k] - after[k]).max() for k in before) > 0
