"""Images named by path: where they live, as DVC tracks them.

An image that records name by path is an input of ingestion like the data file itself (its
sha256 goes into the record), so its folder is a dep of `ingest_records`. `data.images` names
those folders; `auto` finds them from the first `DETECT_ROWS` records of each local data file
(reading a file whole at every `kedro dvc generate` and DVC stage start would cost as much as
ingesting it), and ingestion stops on any image outside them (`TrackedImages`): an image is
never untracked.

    data/01_raw/vqa.jsonl         {"images": ["img/cats/1.jpg"], ...}
    data/01_raw/img/cats/1.jpg    -> dep data/01_raw/img   (the top folder below the file's)
    data/01_raw/2.jpg             -> dep data/01_raw/2.jpg (beside the file: just the image)
    /srv/pics/3.jpg               -> dep /srv/pics         (outside: its own folder)

The data file's own folder is never a dep: it may hold the pipeline's outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

from sft_pipeline.common.config import DataConfig, as_list
from sft_pipeline.common.errors import InputFileError
from sft_pipeline.data import images, readers
from sft_pipeline.data.records import to_canonical
from sft_pipeline.data.schemas import DETECT_ROWS, file_format
from sft_pipeline.data.sources import Source, expand_paths, local_sources

AUTO_IMAGES = "auto"


def image_folder(source: Source) -> Path:
    """Relative image paths of a file are relative to its folder (a dataset folder: to itself)."""
    return source.path if source.path.is_dir() else source.path.parent


def _sampled_image_paths(source: Source, cfg: DataConfig) -> list[Path]:
    """Image files named by the first `DETECT_ROWS` records of one file (absolute)."""
    try:
        rows = readers.iter_rows(source.path, source.shown, DETECT_ROWS)
        head = list(islice(rows, DETECT_ROWS))
        if not head:
            return []
        schema, resolved = file_format(source.shown, readers.union_columns(head), cfg)
    except InputFileError:
        return []  # ingestion reports the file
    folder = image_folder(source)
    paths = []
    for _number, row in head:
        _fmt, messages, _text = to_canonical(row, schema, resolved, folder, digest_images=False)
        parts = images.image_parts(messages)
        paths.extend(Path(p["path"]).resolve() for p in parts if p.get("path"))
    return paths


def _image_dep(image: Path, folder: Path) -> Path:
    """The dep that tracks one image of a file in `folder` (the drawing above)."""
    try:
        inside = image.relative_to(folder)
    except ValueError:
        return image.parent
    return image if len(inside.parts) == 1 else folder / inside.parts[0]


def _outermost(paths: Iterable[Path]) -> list[Path]:
    """Paths in first-found order, without those inside another one."""
    unique = list(dict.fromkeys(paths))
    return [p for p in unique if not any(q != p and q in p.parents for q in unique)]


def image_locations(cfg: DataConfig, sources: list[Source] | None = None) -> list[Path]:
    """The folders (or files) that hold the images records name by path, as DVC tracks them:
    `data.images` expanded, or found from the data (`auto`, the note above) of `sources`
    (default: `data.path`'s local files). Absolute."""
    if cfg.images != AUTO_IMAGES:
        found = [p for e in as_list(cfg.images) for p in expand_paths(e, readable_only=False)]
        return _outermost(p.resolve() for p in found)
    deps = []
    for source in local_sources(cfg) if sources is None else sources:
        folder = image_folder(source).resolve()
        for image in _sampled_image_paths(source, cfg):
            dep = _image_dep(image, folder)
            if dep.exists():  # a missing image is validation's to report, not DVC's
                deps.append(dep)
    return _outermost(deps)


def local_image_files(cfg: DataConfig, root: Path) -> list[str]:
    """The image folders (or files) records name, as the project sees them from `root` (DVC
    deps of `ingest_records`, after the data files): `image_locations` from `root`."""
    with contextlib.chdir(root):
        return [images.shown_path(p) for p in image_locations(cfg)]


class TrackedImages:
    """Where images may live: the image locations and the data files and folders themselves
    (an image inside a dataset folder changes that dep)."""

    def __init__(self, cfg: DataConfig) -> None:
        if cfg.images != AUTO_IMAGES:
            for entry in as_list(cfg.images):
                if not any(p.exists() for p in expand_paths(entry, readable_only=False)):
                    raise InputFileError(
                        "data.images",
                        f"{entry!r} matches no file or folder",
                        expected="folders (or files, globs) that hold the records' images",
                        hint=f"Paths are relative to {Path.cwd()}",
                    )
        sources = local_sources(cfg)
        locations = image_locations(cfg, sources)
        self.shown = [images.shown_path(p) for p in locations]
        self.roots = locations + [s.path.resolve() for s in sources]

    def check(self, source: Source, number: int, messages: Any) -> None:
        """Stop ingestion on an image of `source` (record `number`) that no dep tracks."""
        for part in images.image_parts(messages):
            if not part.get("path") or part.get("sha256") is None:
                continue  # embedded bytes, or a missing image validation quarantines
            path = Path(part["path"]).resolve()
            if not any(root == path or root in path.parents for root in self.roots):
                raise InputFileError(
                    source.shown,
                    f"image {part['path']} is outside the image folders DVC tracks "
                    f"({', '.join(self.shown) or 'none'}), so editing it would not re-run "
                    "ingest_records",
                    line=number,
                    field="images",
                    hint="Name the folders that hold the images in data.images (auto finds "
                    f"them from the first {DETECT_ROWS} records of each file), then run "
                    "`kedro dvc generate`",
                )
