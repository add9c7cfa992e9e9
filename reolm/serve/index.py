"""A FAISS index over L2-normalised item vectors: exact (flat), HNSW or IVF.

Index ids are catalogue rows (0..n-1, in insertion order). Deleting an item does not remove
its row from FAISS (HNSW cannot remove at all; flat and IVF would renumber or need an id map):
the catalogue keeps an ``alive`` mask and searches pass it as an ``IDSelectorBitmap``, which
flat, HNSW and IVF searches all honour. ``reolm embed items`` writes a compact index again.

Inner product of unit vectors is the cosine similarity, so the model's score (cosine /
temperature) is the FAISS score divided by the temperature.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from reolm.config import to_dict
from reolm.io import atomic_path
from reolm.serve.config import IndexConfig

__all__ = ["VectorIndex", "IndexFileError", "normalise", "ivf_lists_for"]


class IndexFileError(ValueError):
    """An index file is missing, corrupt or does not match its manifest."""


def _faiss():
    # faiss' loader tries its AVX-512 builds first and logs each failed import (with the
    # ModuleNotFoundError) at INFO before using the generic one: noise for our INFO-level logs.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss  # imported late: `reolm --help` and the rest of the library never need it
    return faiss


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32, C-contiguous); zero rows stay zero."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return np.ascontiguousarray(v / np.maximum(norms, 1e-12), dtype=np.float32)


def ivf_lists_for(n: int, requested: int = 0) -> int:
    """``requested``, or 4 x sqrt(n) cells, capped so that each cell has >= 39 training points."""
    cap = max(1, n // 39)
    return max(1, min(requested or int(4 * math.sqrt(n)), cap))


class VectorIndex:
    """One FAISS index plus the search-time settings of its kind."""

    def __init__(self, index, cfg: IndexConfig):
        self.index, self.cfg = index, cfg

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, vectors: np.ndarray, cfg: IndexConfig) -> "VectorIndex":
        """An index of ``cfg.kind`` over ``vectors`` (already unit length), rows = ids 0..n-1."""
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = vectors.shape
        if cfg.kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif cfg.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = cfg.hnsw_ef_construction
        elif cfg.kind == "ivf":
            index = cls._trained_ivf(vectors, cfg)
        else:
            raise ValueError(f"unknown index kind {cfg.kind!r}")
        out = cls(index, cfg)
        if n:
            out.add(vectors)
        return out

    @staticmethod
    def _trained_ivf(vectors: np.ndarray, cfg: IndexConfig):
        faiss = _faiss()
        n, d = vectors.shape
        if n == 0:
            raise ValueError("an IVF index needs vectors to train its cells on")
        lists = ivf_lists_for(n, cfg.ivf_lists)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = cfg.seed
        sample = vectors
        if n > cfg.train_sample:
            rows = np.sort(np.random.default_rng(cfg.seed).choice(n, cfg.train_sample, replace=False))
            sample = vectors[rows]
        index.train(sample)
        index.make_direct_map()  # rows can be read back (saving after live adds)
        return index

    # ------------------------------------------------------------------ state
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def add(self, vectors: np.ndarray) -> None:
        """Append rows (unit vectors); their ids continue from ``ntotal``."""
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def vectors(self) -> np.ndarray:
        """Every row read back from the index, [ntotal, d] float32."""
        if self.ntotal == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.index.reconstruct_n(0, self.ntotal)

    def matches(self, vectors: np.ndarray, atol: float = 1e-5, chunk: int = 65536) -> bool:
        """Whether the index holds exactly these rows (read back in chunks: no second full copy)."""
        if vectors.shape != (self.ntotal, self.dim):
            return False
        for start in range(0, self.ntotal, chunk):
            n = min(chunk, self.ntotal - start)
            if not np.allclose(self.index.reconstruct_n(start, n), vectors[start:start + n], rtol=0, atol=atol):
                return False
        return True

    def memory_bytes(self) -> int:
        """Size of the index written to disk (vectors + graph or lists), without a copy in memory."""
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            return int(self.save(Path(tmp) / "index.faiss").stat().st_size)

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int, alive_bitmap: np.ndarray | None = None,
               ef_search: int = 0, nprobe: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(inner products [B, k], rows [B, k]); -1 rows where fewer than k rows qualify.

        ``alive_bitmap`` (``np.packbits(alive, bitorder="little")``) limits the search to live rows.
        """
        faiss = _faiss()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, self.ntotal))
        selector = faiss.IDSelectorBitmap(self.ntotal, faiss.swig_ptr(alive_bitmap)) if alive_bitmap is not None \
            else None
        if self.cfg.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(ef_search or self.cfg.hnsw_ef_search, k))
        elif self.cfg.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=nprobe or self.cfg.ivf_nprobe)
        else:
            params = faiss.SearchParameters() if selector is not None else None
        if selector is not None:
            params.sel = selector
        scores, rows = self.index.search(queries, k, params=params)
        return scores, rows

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to ``path`` (atomically)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            _faiss().write_index(self.index, str(tmp))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, cfg: IndexConfig, rows: int, dim: int) -> "VectorIndex":
        """Read an index written by :meth:`save` and check it against its manifest."""
        faiss = _faiss()
        path = Path(path)
        if not path.is_file():
            raise IndexFileError(f"{path}: missing (named by index.json)")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as err:  # FAISS parses its own binary format; no pickling involved
            raise IndexFileError(f"{path}: not a readable FAISS index ({str(err).splitlines()[0]})") from None
        kind = {"IndexFlatIP": "flat", "IndexHNSWFlat": "hnsw", "IndexIVFFlat": "ivf"}.get(type(index).__name__)
        if kind != cfg.kind:
            raise IndexFileError(f"{path}: holds a {type(index).__name__}, but index.json says kind {cfg.kind!r}")
        if index.ntotal != rows or index.d != dim:
            raise IndexFileError(f"{path}: {index.ntotal} rows of dimension {index.d}, but index.json says {rows} "
                              f"rows of dimension {dim}")
        if kind == "ivf":
            index.make_direct_map()
        return cls(index, cfg)

    def describe(self) -> dict:
        return {"kind": self.cfg.kind, "rows": self.ntotal, "dim": self.dim, **{
            k: v for k, v in to_dict(self.cfg).items() if k.startswith(self.cfg.kind) or k == "kind"}}
