"""What is wrong with a record's images, found once per record when validation builds its view.

An image file is checked before it is read (`sft_pipeline.data.file_checks`): one that does not
exist is `image_missing`; one that is not a regular file (a FIFO, a device, a folder) or is over
`validation.max_image_bytes` is `image_unreadable` without being opened, as is one that does not
decode or is over `validation.max_image_pixels`. Each problem names the image by its path (or
its size when the dataset embeds it).
"""

from __future__ import annotations

import functools
import io
from typing import Any

from sft_pipeline.common.config import ValidationConfig
from sft_pipeline.data import file_checks, images

NOT_FOUND = file_checks.NOT_FOUND


def problems(turns: Any, cfg: ValidationConfig) -> list[str]:
    """`image k (<path>): <problem>` for every image of a conversation that cannot be used."""
    found = []
    parts = [p for p in images.image_parts(turns) if p.get("placeholder", True)]
    for k, part in enumerate(parts, 1):
        if "given" in part:
            found.append(f"image {k}: not a path or image ({part['given']})")
        elif any(part.get(key) for key in images.SOURCE_KEYS):
            problem = _check_image(part, cfg)
            if problem:
                found.append(f"image {k} ({images.describe(part)}): {problem}")
    return found


def is_missing(problem: str) -> bool:
    return problem.endswith(NOT_FOUND)


@functools.lru_cache(maxsize=4096)
def _decode_problem(path: str | None, data: bytes | None, max_bytes: int):
    """(problem or None, (bytes, width, height)); cached: a dataset reuses its images."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = data
        if raw is None:
            raw = file_checks.read_regular(path, max_bytes, "validation.max_image_bytes")
        with Image.open(io.BytesIO(raw)) as image:
            image.load()  # a truncated or damaged file fails here, not at training time
            return None, (len(raw), image.width, image.height)
    except file_checks.UnreadableFile as exc:
        return exc.problem, None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"does not decode as an image ({exc})", None
    except Image.DecompressionBombError as exc:
        return f"refused by the image decoder ({exc})", None


def _check_image(part: dict[str, Any], cfg: ValidationConfig) -> str | None:
    path = part.get("path")
    data = None if path else images.read_bytes(part)
    problem, size = _decode_problem(path, data, cfg.max_image_bytes)
    if problem:
        return problem
    nbytes, width, height = size
    if nbytes > cfg.max_image_bytes:
        return f"{nbytes} bytes, over validation.max_image_bytes={cfg.max_image_bytes}"
    if width * height > cfg.max_image_pixels:
        return f"{width}x{height} pixels, over validation.max_image_pixels={cfg.max_image_pixels}"
    return None
