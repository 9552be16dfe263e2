"""Vectors of a chosen list of image files, through a db used as a content-hash cache.

The one way benchmarks and training embed their images: the same indexer and store as `simsearch
index`, so an image already embedded by the same encoder weights (any run, any path) is never
embedded again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from simsearch.encoders.runtime import OnnxEncoder
from simsearch.errors import DatasetError
from simsearch.indexer.pipeline import Indexer, IndexerConfig, ProgressFn
from simsearch.indexer.scan import item_path
from simsearch.indexer.store import Store


class CachedEmbedder:
    """Embeds lists of files with one encoder into an open (writable) store, and reads their vectors back."""

    def __init__(self, encoder: OnnxEncoder, store: Store, config: IndexerConfig = IndexerConfig()):
        self.spec = encoder.spec
        self.store = store
        self.indexer = Indexer(encoder, store, config)
        self.embedded = 0  # images embedded (not found in the cache) so far

    def __call__(self, paths: Sequence[str | os.PathLike], on_progress: ProgressFn | None = None) -> np.ndarray:
        """(len(paths), dim) L2-normalised vectors, in order; DatasetError if any file cannot be read."""
        report = self.indexer.embed_files(list(paths), on_progress)
        if report.skipped:
            raise DatasetError(f"{len(report.skipped)} of {len(paths)} images could not be read, "
                               f"e.g. {report.skipped[0][1]}")
        self.embedded += report.embedded
        return self.store.vectors_of(self.spec.key, [item_path(p) for p in paths], self.spec.dim)
