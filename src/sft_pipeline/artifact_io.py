"""Kedro datasets for the pipeline's artifacts: standard formats, atomic writes, no pickle.

kedro-datasets' own classes write straight to the target path, so an interrupted save leaves a
truncated file that DVC and the next run would take as complete; these write via `atomic_path`.

Each also implements kedro-viz's preview protocol: a `preview()` method whose return annotation
names the kind kedro-viz renders (`kedro viz run`, `kedro viz build --include-previews`):
records, texts and tokens as tables of their first rows (images by path and content hash,
processed pixels by their shape), JSON reports as JSON, plots as an
image, model folders as their manifest, the run report as HTML. kedro-viz reads the annotation's
name, so these stay the plain names from `kedro_datasets._typing`.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset
from kedro_datasets._typing import HTMLPreview, ImagePreview, JSONPreview, TablePreview

from sft_pipeline.common.atomic import atomic_path, write_text
from sft_pipeline.data.streams import (
    SHAPE_SUFFIX,
    JSONLines,
    RecordTable,
    move_into,
    write_json_lines,
    write_records,
)

# A preview cell longer than this is cut: a table row should fit on a screen.
PREVIEW_CELL_CHARS = 300


def _cell(value: Any) -> Any:
    """A JSON-able, short table cell (nested values as compact JSON)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= PREVIEW_CELL_CHARS else text[: PREVIEW_CELL_CHARS - 1] + "…"


def _image_label(part: dict[str, Any]) -> str:
    where = part.get("path") or ("(in the dataset)" if part.get("bytes") else "(none)")
    return f"<image {where} sha256:{(part.get('sha256') or '?')[:12]}>"


def _shown_images(value: Any) -> Any:
    """The value with every image (a canonical image part, a rendered row's image source) as
    `<image PATH sha256:PREFIX>`: a preview names images, it never inlines their bytes.

        [{"role": "user", "content": [{"type": "image", "path": "img/1.jpg", "sha256": "9f2c.."},
                                      {"type": "text", "text": "Who?"}]}]
     -> [{"role": "user", "content": ["<image img/1.jpg sha256:9f2c..>", {"type": "text", ...}]}]
    """
    if isinstance(value, dict):
        if value.get("type") == "image" or (
            "sha256" in value and ("path" in value or "bytes" in value)
        ):
            return _image_label(value)
        return {k: _shown_images(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_shown_images(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str):
        return _shown_images(value.tolist())
    if isinstance(value, str) and value[:1] in "[{" and '"image"' in value:
        try:  # records hold messages as JSON text
            return _shown_images(json.loads(value))
        except ValueError:
            return value
    return value


def table_preview(rows: pd.DataFrame) -> dict[str, Any]:
    """kedro-viz's table payload (pandas' `split` orientation) with shortened cells, images
    shown by path and hash."""
    return {
        "index": list(range(len(rows))),
        "columns": [str(c) for c in rows.columns],
        "data": [[_cell(_shown_images(v)) for v in row] for row in rows.itertuples(index=False)],
    }


class _FileDataset(AbstractDataset):
    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}

    def _exists(self) -> bool:
        return self._filepath.exists()


class _LazyFileDataset(_FileDataset):
    """`lazy: true` in the catalog: `load` returns a lazy handle instead of the whole data."""

    def __init__(
        self, filepath: str, lazy: bool = False, metadata: dict[str, Any] | None = None
    ) -> None:
        super().__init__(filepath, metadata)
        self._lazy = lazy


class ParquetDataset(_LazyFileDataset):
    """Records as Parquet (no index, deterministic bytes for the same records).

    `save` takes a DataFrame or a spooled `RecordTable` (moved into place, never loaded);
    `load` gives a DataFrame, or with `lazy: true` a `RecordTable` read in row groups.
    """

    def load(self) -> pd.DataFrame | RecordTable:
        if self._lazy:
            return RecordTable(self._filepath)
        return pd.read_parquet(self._filepath)

    def save(self, data: pd.DataFrame | RecordTable) -> None:
        with atomic_path(self._filepath) as tmp:
            write_records(data, tmp)

    def preview(self, nrows: int = 5) -> TablePreview:
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(self._filepath).iter_batches(batch_size=nrows)
        first = next(batches, None)
        rows = first.to_pandas() if first is not None else pd.DataFrame()
        return TablePreview(table_preview(rows.head(nrows)))


class JSONLinesDataset(_LazyFileDataset):
    """Rows as JSON Lines, one UTF-8 object per line.

    `save` takes a list or any iterable of dicts (written as it is consumed), a DataFrame or a
    spooled `JSONLines` file (moved into place); `load` gives a list, or with `lazy: true` a
    `JSONLines` handle that reads the file line by line.
    """

    def load(self) -> list[dict[str, Any]] | JSONLines:
        if self._lazy:
            return JSONLines(self._filepath)
        with self._filepath.open(encoding="utf-8", newline="\n") as f:
            return [json.loads(line) for line in f if line.strip()]

    def save(self, data: Any) -> None:
        with atomic_path(self._filepath) as tmp:
            write_json_lines(data, tmp)

    def preview(self, nrows: int = 5) -> TablePreview:
        rows = []
        with self._filepath.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
                if len(rows) >= nrows:
                    break
        return TablePreview(table_preview(pd.DataFrame(rows)))


class JSONDataset(_FileDataset):
    """A JSON document, pretty-printed with sorted keys so diffs and hashes are stable."""

    def load(self) -> Any:
        return json.loads(self._filepath.read_text(encoding="utf-8"))

    def save(self, data: Any) -> None:
        write_text(self._filepath, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def preview(self) -> JSONPreview:
        return JSONPreview(self._filepath.read_text(encoding="utf-8"))


class ArrowDataset(_FileDataset):
    """A `datasets.Dataset` as a `save_to_disk` folder (Arrow)."""

    def load(self):
        import datasets

        return datasets.load_from_disk(str(self._filepath))

    def save(self, data) -> None:
        with atomic_path(self._filepath, is_dir=True) as tmp:
            spooled = getattr(data, "spooled_folder", None)
            if spooled is not None and Path(spooled).is_dir():
                # Already a save_to_disk folder (tokenize_stream): moved, never read again.
                for path in sorted(Path(spooled).iterdir()):
                    move_into(path, tmp / path.name)
            else:
                data.save_to_disk(str(tmp))

    def preview(self, nrows: int = 5) -> TablePreview:
        dataset = self.load()
        rows = dataset.select(range(min(nrows, len(dataset)))).to_pandas()
        for column in ("input_ids", "labels"):
            if column in rows:
                rows.insert(0, f"{column}_length", [len(v) for v in rows[column]])
        for shape in [c for c in rows.columns if c.endswith(SHAPE_SUFFIX)]:
            # Processed pixels are stored flat beside their shape: shown as the shape.
            column = shape[: -len(SHAPE_SUFFIX)]
            if column in rows:
                kind = dataset.features[column].feature.dtype
                rows[column] = [
                    f"<{kind} array {list(map(int, dims))}>" if len(values) else "(no image)"
                    for values, dims in zip(rows[column], rows[shape], strict=True)
                ]
                rows = rows.drop(columns=shape)
        return TablePreview(table_preview(rows))


class ModelFolderDataset(_FileDataset):
    """A Hugging Face style folder (model, adapter, tokenizer, manifest).

    `save` takes any object with `save_pretrained(path)`; `load` returns the folder's path, so
    each consumer loads only what it needs (a tokenizer, a 4-bit model, a full-precision one).
    """

    def load(self) -> Path:
        if not (self._filepath.is_dir() and any(self._filepath.iterdir())):
            raise FileNotFoundError(f"{self._filepath} is missing or empty")
        return self._filepath

    def save(self, data) -> None:
        with atomic_path(self._filepath, is_dir=True) as tmp:
            data.save_pretrained(tmp)

    def preview(self) -> JSONPreview:
        """The folder's files and sizes, with its manifest or model config when it has one."""
        files = {
            p.relative_to(self._filepath).as_posix(): p.stat().st_size
            for p in sorted(self._filepath.rglob("*"))
            if p.is_file()
        }
        shown: dict[str, Any] = {"files": files}
        for name in ("manifest.json", "adapter_config.json", "config.json"):
            if name in files:
                shown[name] = json.loads((self._filepath / name).read_text(encoding="utf-8"))
                break
        return JSONPreview(json.dumps(shown, indent=2))


class PNGFolderDataset(_FileDataset):
    """A folder of PNG plots: `save` takes {name: matplotlib Figure}."""

    def load(self) -> dict[str, Path]:
        return {p.stem: p for p in sorted(self._filepath.glob("*.png"))}

    def save(self, data: dict[str, Any]) -> None:
        import matplotlib.pyplot as plt

        with atomic_path(self._filepath, is_dir=True) as tmp:
            for name, figure in data.items():
                # No timestamp in the metadata: the same figure gives the same bytes.
                figure.savefig(tmp / f"{name}.png", dpi=100, metadata={"Software": None})
                plt.close(figure)

    def preview(self) -> ImagePreview:
        """Every plot of the folder, stacked top to bottom into one PNG (base64)."""
        import matplotlib.image as mpimg
        import numpy as np

        images = [mpimg.imread(path) for path in self.load().values()]
        if not images:
            raise FileNotFoundError(f"{self._filepath} holds no PNG")
        images = [
            img if img.shape[2] == 4 else np.dstack([img, np.ones(img.shape[:2])]) for img in images
        ]
        width = max(img.shape[1] for img in images)
        padded = [
            np.pad(img, ((0, 0), (0, width - img.shape[1]), (0, 0)), constant_values=1.0)
            for img in images
        ]
        buffer = io.BytesIO()
        mpimg.imsave(buffer, np.concatenate(padded), format="png")
        return ImagePreview(base64.b64encode(buffer.getvalue()).decode("ascii"))


class HTMLDataset(_FileDataset):
    """An HTML page (UTF-8 text), such as the self-contained run report."""

    def load(self) -> str:
        return self._filepath.read_text(encoding="utf-8")

    def save(self, data: str) -> None:
        write_text(self._filepath, data)

    def preview(self) -> HTMLPreview:
        return HTMLPreview(self.load())
