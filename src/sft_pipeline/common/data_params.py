"""The `data` section: which datasets, in which format, and how they are mixed (re-exported
by `sft_pipeline.common.config`, where every section's schema is found)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from sft_pipeline.common.param_base import COUNT_MAX, SEED_MAX, _Section

SchemaName = Literal["auto", "prompt_response", "alpaca", "messages", "sharegpt", "text"]
# The fields of the input formats that `data.columns` may map to a dataset column. The registry
# of formats (sft_pipeline.data.schemas.FORMATS) is their source; this copy lets the parameter
# check name a typo's nearest key without the bottom layer importing the data half, and a test
# keeps the two equal (as it keeps `data.schema`'s names equal to the formats).
COLUMN_KEYS = (
    "prompt",
    "response",
    "completion",
    "system",
    "images",
    "instruction",
    "output",
    "input",
    "messages",
    "tools",
    "conversations",
    "text",
)
ColumnKey = Literal[COLUMN_KEYS]  # type: ignore[valid-type]


_Tag = Annotated[str, Field(min_length=1, pattern=r"\S")]


class SourceConfig(_Section):
    """One dataset of a mixture (`data.sources`): where it is, its format, and its share."""

    # How reports and the `source` column name it; by default its path.
    name: str | None = Field(None, min_length=1)
    path: str | list[str]
    schema_: SchemaName = Field("auto", alias="schema")
    columns: dict[ColumnKey, str] = Field(default_factory=dict)
    split: str = Field("train", min_length=1)
    subset: str | None = None
    # Share of the training rows (weights are normalised over the sources; a source with fewer
    # training records than its share is sampled with replacement). Either every source has a
    # weight or none has one.
    weight: float | None = Field(None, gt=0, le=1e6)
    # At most this many of its training records (sampled without replacement, by seed).
    max_records: int | None = Field(None, gt=0, le=COUNT_MAX)

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return self.path if isinstance(self.path, str) else ",".join(self.path)


class DataConfig(_Section):
    path: str | list[str] = "data/01_raw/demo_sft.jsonl"
    schema_: SchemaName = Field("auto", alias="schema")
    # Maps our field names (`COLUMN_KEYS`) to the dataset's column names.
    columns: dict[ColumnKey, str] = Field(default_factory=dict)
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = Field(42, ge=0, le=SEED_MAX)
    # For hf://datasets/<owner>/<name> paths: which split, and which config of the dataset.
    split: str = Field("train", min_length=1)
    subset: str | None = None
    # Records read, converted and written per chunk: bounds ingestion's memory, never its output.
    chunk_rows: int = Field(10_000, gt=0, le=COUNT_MAX)
    # Folders (or files, globs) holding the images records name by path: DVC deps of
    # ingest_records. "auto": found from the first records of each data file (ingestion stops
    # on an image outside them, so none is ever untracked).
    images: str | list[str] = "auto"
    # Reasoning inline at the start of assistant content, moved to `reasoning_content` on ingest.
    reasoning_tags: tuple[_Tag, _Tag] = ("<think>", "</think>")

    # Several datasets mixed (`SourceConfig`); empty: `path` and the keys above, one source.
    sources: list[SourceConfig] = Field(default_factory=list)
    # Training rows of a weighted mixture; None: as many as the sources' training records.
    mixture_rows: int | None = Field(None, gt=0, le=COUNT_MAX)

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

    @model_validator(mode="after")
    def _weights_everywhere_or_nowhere(self) -> DataConfig:
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            missing = [s.label for s in self.sources if s.weight is None]
            raise ValueError(f"sources {missing} have no weight: give every source one or none")
        labels = [s.label for s in self.sources]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two sources share a name ({labels}); give each its own `name`")
        return self
