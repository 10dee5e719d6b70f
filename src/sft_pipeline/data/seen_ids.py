"""Which content ids earlier chunks held, and where each was first seen: what lets validation
find duplicates across chunks while holding only about 20 bytes a record."""

from __future__ import annotations

import hashlib

import numpy as np


class SeenIds:
    """Content ids seen in earlier chunks and where each was first seen, in sorted numpy runs
    (about 20 bytes a record, merged like a binary counter: O(log n) runs to search)."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.files: list[str] = []
        self._file_index: dict[str, int] = {}

    @staticmethod
    def key(record_id: str) -> int:
        if len(record_id) == 16:
            try:
                return int(record_id, 16)
            except ValueError:
                pass
        return int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "big")

    def first(self, keys: np.ndarray) -> list[tuple[str, int] | None]:
        """(source_file, source_row) where each key was first seen, or None."""
        found: list[tuple[str, int] | None] = [None] * len(keys)
        for ids, files, rows in self.runs:
            at = np.searchsorted(ids, keys)
            at_ok = np.minimum(at, len(ids) - 1)
            hit = (at < len(ids)) & (ids[at_ok] == keys)
            for k in np.flatnonzero(hit):
                if found[k] is None:
                    found[k] = (self.files[files[at_ok[k]]], int(rows[at_ok[k]]))
        return found

    def first_and_add(
        self, keys: np.ndarray, files: list[str], rows: np.ndarray
    ) -> list[tuple[str, int] | None]:
        """Where each record of a chunk was first seen, in an earlier chunk or earlier in this
        one (None: first seen here); then remembers the chunk's first sightings."""
        found = self.first(keys)
        new = np.array([where is None for where in found], dtype=bool)
        _unique, first_at, inverse = np.unique(keys, return_index=True, return_inverse=True)
        first_here = first_at[inverse.reshape(-1)]
        for k in np.flatnonzero(new & (first_here != np.arange(len(keys)))):
            at = first_here[k]
            found[k] = (files[at], int(rows[at]))
        firsts = np.sort(first_at[new[first_at]])
        self.add(keys[firsts], [files[p] for p in firsts], rows[firsts])
        return found

    def add(self, keys: np.ndarray, files: list[str], rows: np.ndarray) -> None:
        if not len(keys):
            return
        index = np.array(
            [self._file_index.setdefault(f, len(self._file_index)) for f in files], np.int32
        )
        self.files = list(self._file_index)
        order = np.argsort(keys, kind="stable")
        self.runs.append((keys[order], index[order], rows[order]))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            (k1, f1, r1), (k2, f2, r2) = self.runs[-2], self.runs[-1]
            keys_all = np.concatenate([k1, k2])
            order = np.argsort(keys_all, kind="stable")  # earlier run first on equal keys
            self.runs[-2:] = [
                (keys_all[order], np.concatenate([f1, f2])[order], np.concatenate([r1, r2])[order])
            ]
