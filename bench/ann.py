"""Approximate item search against exact search on a synthetic catalogue (default 1M items).

For each index kind of ``reolm embed items`` (exact flat inner product, HNSW, IVF), built by
the service's own code (``reolm.serve.index.VectorIndex``): build time, memory (serialised
index size and the process's resident-memory growth), query latency one query at a time
(p50/p99) and in one batch (queries/s), and recall@10 against the exact top 10, at several
search settings (HNSW efSearch, IVF nprobe).

The catalogue is clustered like real item embeddings, not uniform noise (on which every ANN
index degrades): ``clusters`` unit centres, each item its centre plus Gaussian noise
(within-cluster cosine about 0.5), queries a random item plus smaller noise (a user vector
near what they interacted with). Vectors are float32 and unit length, like the service's.
One index is held at a time, so peak memory is about twice the vectors (array + index copy).

    python bench/ann.py                 # 1M items x 128 dims -> bench/results/ann.json
    python bench/ann.py --quick         # 100k items, fewer queries (a minute)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_result  # noqa: E402

from reolm.config import to_dict  # noqa: E402
from reolm.serve.config import IndexConfig  # noqa: E402
from reolm.serve.index import VectorIndex, ivf_lists_for, normalise  # noqa: E402


def rss_bytes() -> int:
    """Current resident memory of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def catalogue(items: int, dim: int, clusters: int, seed: int, chunk: int = 131072) -> np.ndarray:
    """Clustered unit vectors, generated in chunks (float32 throughout, no float64 copy)."""
    rng = np.random.default_rng(seed)
    centres = normalise(rng.standard_normal((clusters, dim), dtype=np.float32))
    out = np.empty((items, dim), dtype=np.float32)
    for start in range(0, items, chunk):
        n = min(chunk, items - start)
        noise = rng.standard_normal((n, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
        out[start:start + n] = normalise(centres[rng.integers(0, clusters, n)] + noise)
    return out


def queries_near(vectors: np.ndarray, n: int, seed: int, noise: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    base = vectors[rng.integers(0, len(vectors), n)]
    return normalise(base + noise * rng.standard_normal(base.shape, dtype=np.float32) / np.sqrt(base.shape[1]))


def latency(index: VectorIndex, queries: np.ndarray, single: int, **search: int) -> dict[str, float]:
    """p50/p99 of one-query searches and the queries/s of one batched search."""
    times = []
    for q in queries[:single]:
        t = time.perf_counter()
        index.search(q[None], 10, **search)
        times.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    index.search(queries, 10, **search)
    batch_s = time.perf_counter() - t
    return {"single_p50_ms": round(float(np.percentile(times, 50)), 3),
            "single_p99_ms": round(float(np.percentile(times, 99)), 3),
            "batch_qps": round(len(queries) / batch_s, 1)}


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / 10 for f, e in zip(found, exact)]))


def measure(kind: str, vectors: np.ndarray, queries: np.ndarray, exact: np.ndarray | None, single: int,
            settings: list[int], cfg: IndexConfig) -> tuple[dict[str, Any], np.ndarray]:
    before = rss_bytes()
    t = time.perf_counter()
    index = VectorIndex.build(vectors, cfg)
    build_s = time.perf_counter() - t
    grown = rss_bytes() - before
    row: dict[str, Any] = {"kind": kind, "config": {k: v for k, v in to_dict(cfg).items()
                                                     if k == "kind" or k.startswith(kind)},
                           "build_s": round(build_s, 2), "index_bytes": index.memory_bytes(),
                           "rss_growth_bytes": grown}
    if kind == "ivf":
        row["config"]["lists"] = ivf_lists_for(len(vectors), cfg.ivf_lists)
    runs = []
    knob = {"hnsw": "ef_search", "ivf": "nprobe"}.get(kind)
    for value in (settings if knob else [0]):
        search = {knob: value} if knob else {}
        _, found = index.search(queries, 10, **search)
        if exact is None:
            exact = found  # the flat index IS the exact answer
        runs.append({**({knob: value} if knob else {}), "recall@10": round(recall_at_10(found, exact), 4),
                     **latency(index, queries, single, **search)})
        print(f"  {kind} {search or ''}: {runs[-1]}", flush=True)
    row["search"] = runs
    del index
    gc.collect()
    return row, exact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128, help="vector width (the demo model's hidden size is 128)")
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=1000, help="queries for recall and batched throughput")
    parser.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    parser.add_argument("--kinds", default="flat,hnsw,ivf")
    parser.add_argument("--ef-search", default="16,32,64,128", help="HNSW efSearch values to measure")
    parser.add_argument("--nprobe", default="4,16,64", help="IVF nprobe values to measure")
    parser.add_argument("--threads", type=int, default=0, help="FAISS threads (0 = FAISS's default, all cores)")
    parser.add_argument("--quick", action="store_true", help="100k items, 300 queries, 100 timed singly")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="ann.json", help="file name under bench/results/")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.queries, args.single = min(args.items, 100_000), 300, 100
        args.out = "ann_quick.json" if args.out == "ann.json" else args.out
    import faiss
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    kinds = args.kinds.split(",")
    if kinds[0] != "flat":
        raise SystemExit("--kinds must start with flat: it provides the exact top 10 the others are scored against")
    start = time.perf_counter()
    vectors = catalogue(args.items, args.dim, args.clusters, args.seed)
    queries = queries_near(vectors, args.queries, args.seed)
    print(f"catalogue {vectors.shape} in {time.perf_counter() - start:.1f}s, {vectors.nbytes / 2**20:.0f} MiB",
          flush=True)
    exact, rows = None, []
    for kind in kinds:
        settings = [int(x) for x in (args.ef_search if kind == "hnsw" else args.nprobe).split(",")]
        row, exact = measure(kind, vectors, queries, exact, args.single, settings, IndexConfig(kind=kind))
        rows.append(row)
    result = {"benchmark": "bench/ann.py: approximate vs exact item search (reolm.serve.index)",
              "machine": {**machine(), "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads()},
              "catalogue": {"items": args.items, "dim": args.dim, "clusters": args.clusters,
                            "queries": args.queries, "timed_singly": args.single, "seed": args.seed,
                            "vectors_bytes": int(vectors.nbytes)},
              "indexes": rows, "peak_rss_bytes": peak_rss_bytes(),
              "total_s": round(time.perf_counter() - start, 1)}
    print(f"wrote {write_result(args.out, result)}; peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
