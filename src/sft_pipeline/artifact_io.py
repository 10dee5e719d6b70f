"""Kedro datasets for the pipeline's artifacts: standard formats, atomic writes, no pickle.

kedro-datasets' own classes write straight to the target path, so an interrupted save leaves a
truncated file that DVC and the next run would take as complete; these write via `atomic_path`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset

from sft_pipeline.atomic import atomic_path, write_text


class _FileDataset(AbstractDataset):
    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}

    def _exists(self) -> bool:
        return self._filepath.exists()


class ParquetDataset(_FileDataset):
    """A pandas DataFrame as Parquet (no index, deterministic bytes for the same frame)."""

    def load(self) -> pd.DataFrame:
        return pd.read_parquet(self._filepath)

    def save(self, data: pd.DataFrame) -> None:
        with atomic_path(self._filepath) as tmp:
            data.to_parquet(tmp, index=False)


class JSONLinesDataset(_FileDataset):
    """A list of dicts (or a DataFrame) as JSON Lines, one UTF-8 object per line."""

    def load(self) -> list[dict[str, Any]]:
        with self._filepath.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def save(self, data: list[dict[str, Any]] | pd.DataFrame) -> None:
        rows = data.to_dict(orient="records") if isinstance(data, pd.DataFrame) else data
        write_text(self._filepath, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class JSONDataset(_FileDataset):
    """A JSON document, pretty-printed with sorted keys so diffs and hashes are stable."""

    def load(self) -> Any:
        return json.loads(self._filepath.read_text(encoding="utf-8"))

    def save(self, data: Any) -> None:
        write_text(self._filepath, json.dumps(data, indent=2, sort_keys=True) + "\n")


class ArrowDataset(_FileDataset):
    """A `datasets.Dataset` as a `save_to_disk` folder (Arrow)."""

    def load(self):
        import datasets

        return datasets.load_from_disk(str(self._filepath))

    def save(self, data) -> None:
        with atomic_path(self._filepath, is_dir=True) as tmp:
            data.save_to_disk(str(tmp))


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
