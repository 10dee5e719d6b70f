"""Images in canonical records: where each comes from, its content hash, and reading it back.

Conversations with images keep them as content parts, in TRL's vision format, each image part
naming its source and the sha256 of its bytes (so a changed image changes the record and DVC
re-runs from ingestion):

    {"role": "user", "content": [
        {"type": "image", "path": "data/01_raw/img/1.jpg", "sha256": "9f2c..."},
        {"type": "text", "text": "Who are they?"}]}

Files are named relative to the working directory when under it (absolute otherwise), the way
records name their source file; images stored inside a Parquet/Hub dataset (`{"bytes", "path"}`)
travel as base64 `"bytes"` in the part, so the records artifact is self-contained. Every input
layout maps to this:

- TRL: `content` lists with `{"type": "image"}` parts, plus an `images` column (the k-th image
  part takes the k-th image);
- LLaMA-Factory: `<image>` placeholders in string content, plus `images`;
- an image part that names its own source (`{"type": "image", "image": "a.jpg"}`).

A count mismatch is kept for validation to report: a placeholder without an image becomes an
image part without a source, an image without a placeholder a part with `"placeholder": false`.
The content id of a record with images hashes the image bytes, never where they were found.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sft_pipeline.data import file_checks

PLACEHOLDER = "<image>"
SOURCE_KEYS = ("path", "bytes")


def shown_path(path: Path) -> str:
    """The path as records name files: relative to the working directory when under it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _image_part(value: Any, root: Path | None, digest: bool = True) -> dict[str, Any]:
    """The canonical part of one image value as found in a dataset: a path string, a
    `{"bytes", "path"}` struct (Parquet/Hub image columns) or a PIL image (in-memory data).
    `digest=False` leaves an image file unread (`sha256` None): where it is, not what it is."""
    if isinstance(value, Mapping) and value.get("bytes") is not None:
        data = bytes(value["bytes"])
        return {
            "type": "image",
            "bytes": base64.b64encode(data).decode("ascii"),
            "sha256": sha256_bytes(data),
        }
    if isinstance(value, Mapping):
        value = value.get("path")
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image
        buffer = io.BytesIO()
        # Lossless either way; level 1 encodes about 3x faster than the default 6.
        value.save(buffer, format="PNG", compress_level=1)
        data = buffer.getvalue()
        return {
            "type": "image",
            "bytes": base64.b64encode(data).decode("ascii"),
            "sha256": sha256_bytes(data),
        }
    if not isinstance(value, str) or not value:
        return {"type": "image", "path": None, "sha256": None, "given": repr(value)[:80]}
    path = Path(os.path.expanduser(value))
    if not path.is_absolute() and root is not None:
        path = root / path
    sha256 = None
    if digest:
        # Validation names a missing file, or one that is not read (a FIFO, a device, too big).
        with contextlib.suppress(OSError):
            sha256 = file_checks.sha256_regular(path, *_image_limit())
    return {"type": "image", "path": shown_path(path), "sha256": sha256}


def _as_list(images: Any) -> list[Any]:
    if images is None:
        return []
    if isinstance(images, list | tuple):
        return list(images)
    if hasattr(images, "tolist") and not hasattr(images, "mode"):  # numpy arrays from Parquet
        return list(images.tolist())
    return [images]


def has_images(images: Any, turns: Any, placeholders: bool = False) -> bool:
    """Whether a row carries images: an images value, image parts in its turns, or (with
    `placeholders`: the row has an images column) `<image>` in a string content."""
    if _as_list(images):
        return True
    for turn in turns if isinstance(turns, list) else []:
        content = turn.get("content") if isinstance(turn, dict) else None
        if isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") == "image" for p in content
        ):
            return True
        if placeholders and isinstance(content, str) and PLACEHOLDER in content:
            return True
    return False


def attach_images(turns: Any, images: Any, root: Path | None, digest: bool = True) -> Any:
    """Turns with every image as a canonical part (module doc); other shapes as found.
    `digest=False`: image files are not read (see `_image_part`)."""
    if not isinstance(turns, list):
        return turns
    pending = _as_list(images)
    out: list[Any] = []
    for turn in turns:
        if not isinstance(turn, dict):
            out.append(turn)
            continue
        content = turn.get("content")
        if isinstance(content, str) and PLACEHOLDER not in content:
            # Every turn as parts, as TRL's vision format has it (some templates index parts).
            out.append({**turn, "content": [{"type": "text", "text": content}]})
        elif isinstance(content, str):
            parts: list[dict[str, Any]] = []
            for k, piece in enumerate(content.split(PLACEHOLDER)):
                if k:
                    parts.append(_next_image(pending, root, digest))
                if piece:
                    parts.append({"type": "text", "text": piece})
            out.append({**turn, "content": parts})
        elif isinstance(content, list):
            out.append({**turn, "content": [_part(p, pending, root, digest) for p in content]})
        else:
            out.append(turn)
    if pending:
        # Images without a placeholder: kept on the last user turn for validation to report.
        extra = [{**_image_part(v, root, digest), "placeholder": False} for v in pending]
        users = [i for i, t in enumerate(out) if isinstance(t, dict) and t.get("role") == "user"]
        at = users[-1] if users else len(out) - 1
        if at >= 0 and isinstance(out[at], dict):
            content = out[at].get("content")
            parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
            out[at] = {**out[at], "content": [*parts, *extra]}
    return out


def _next_image(pending: list[Any], root: Path | None, digest: bool) -> dict[str, Any]:
    if not pending:
        return {"type": "image", "path": None, "sha256": None}
    return _image_part(pending.pop(0), root, digest)


def _part(part: Any, pending: list[Any], root: Path | None, digest: bool) -> Any:
    if not isinstance(part, dict) or part.get("type") != "image":
        if isinstance(part, dict) and part.get("type") == "text":
            return {"type": "text", "text": part.get("text")}
        return part
    own = next((part[k] for k in ("image", "path", "url") if part.get(k) is not None), None)
    if own is not None:
        return _image_part(own, root, digest)
    return _next_image(pending, root, digest)


def image_parts(turns: Any) -> list[dict[str, Any]]:
    """Every image part of a conversation, in the order the model sees them."""
    if not isinstance(turns, list):
        return []
    return [
        part
        for turn in turns
        if isinstance(turn, dict) and isinstance(turn.get("content"), list)
        for part in turn["content"]
        if isinstance(part, dict) and part.get("type") == "image"
    ]


def identity_view(turns: Any) -> Any:
    """What a record's content id hashes: image parts reduced to their sha256."""
    if not image_parts(turns):
        return turns
    return [
        {
            **turn,
            "content": [
                {"type": "image", "sha256": p.get("sha256")}
                if isinstance(p, dict) and p.get("type") == "image"
                else p
                for p in turn["content"]
            ],
        }
        if isinstance(turn, dict) and isinstance(turn.get("content"), list)
        else turn
        for turn in turns
    ]


def source(part: Mapping[str, Any]) -> dict[str, Any]:
    """The part's source and hash only: what rendering hands on to tokenization."""
    return {k: part[k] for k in (*SOURCE_KEYS, "sha256") if k in part}


def describe(part: Mapping[str, Any]) -> str:
    """How a message names an image: its path, or `<N bytes in the dataset>`."""
    if part.get("path"):
        return str(part["path"])
    if part.get("bytes"):
        return f"<{len(base64.b64decode(part['bytes']))} bytes in the dataset>"
    return "(no image)"


def read_bytes(part: Mapping[str, Any]) -> bytes:
    if part.get("bytes"):
        return base64.b64decode(part["bytes"])
    return file_checks.read_regular(part["path"], *_image_limit())


def _image_limit() -> tuple[int, str]:
    # Read at call time, so the limit can be changed where the module is used.
    return file_checks.MAX_IMAGE_FILE_BYTES, "MAX_IMAGE_FILE_BYTES"


def open_image(part: Mapping[str, Any]):
    """The decoded RGB PIL image of a part (fully loaded, so a truncated file fails here)."""
    from PIL import Image

    with Image.open(io.BytesIO(read_bytes(part))) as image:
        image.load()
        return image.convert("RGB")


def raw_safe(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """The row for the rejects report, with embedded image bytes replaced by their size."""

    def clean(value: Any) -> Any:
        if isinstance(value, bytes | bytearray | memoryview):
            return f"<{len(bytes(value))} bytes>"
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        if hasattr(value, "save") and hasattr(value, "mode"):
            return f"<PIL image {getattr(value, 'size', '')}>"
        return value

    return {k: clean(v) for k, v in row.items()}
