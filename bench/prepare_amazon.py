"""Benchmark `reolm prepare amazon`: throughput (review lines/s) and peak RSS.

Writes a synthetic Amazon Reviews 2018 category into /tmp (gzip JSON lines with the real field
set, grouped by item like the published files, plus matching metadata), then times
`reolm prepare amazon` on it in a child process and records its peak RSS.

    PYTHONPATH=$PWD python bench/prepare_amazon.py            # 10M review lines (the recorded run)
    PYTHONPATH=$PWD python bench/prepare_amazon.py --lines 200000

Result: bench/results/prepare_amazon.json = {"lines", "seconds", "lines_per_s", "peak_rss_gb", "machine", ...}.
The generated files are cached in --workdir and reused when the same --lines/--seed ask for them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORDS = ("great quality works fine price battery small large easy use bought gift daughter son love "
         "recommend cheap broke after months perfect exactly described fast shipping color size fits "
         "would buy again not worth money sturdy light heavy screen sound comfortable").split()
CATEGORIES = [["Electronics", "Computers & Accessories", "Cables"], ["Electronics", "Camera & Photo", "Lenses"],
              ["Electronics", "Headphones"], ["Electronics", "Car & Vehicle Electronics", "GPS"]]


def _texts(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi)))) for _ in range(n)]


def write_synthetic(reviews: Path, meta: Path, lines: int, seed: int = 0) -> dict[str, int]:
    """Reviews grouped by item (as the published files are) and one metadata line per item."""
    rng = np.random.default_rng(seed)
    n_items = max(lines // 30, 10)
    n_users = max(lines // 7, 10)
    # Item popularity ~ Zipf-like; user activity skewed so many users reach the 5-core.
    weights = 1.0 / np.arange(1, n_items + 1) ** 0.8
    counts = rng.multinomial(lines, weights / weights.sum())
    review_texts = _texts(rng, 2000, 5, 80)
    summaries = _texts(rng, 200, 1, 5)
    names = [f"Reviewer {k}" for k in range(500)]
    asins = [f"B{k:09d}" for k in range(n_items)]
    written = 0
    with gzip.open(reviews, "wt", encoding="utf-8", compresslevel=6) as fh:
        for item, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            users = (n_users * rng.random(count) ** 1.6).astype(np.int64)
            times = rng.integers(946684800, 1538352000, size=count)
            texts = rng.integers(0, len(review_texts), size=count)
            stars = rng.integers(1, 6, size=count)
            chunk = []
            for u, t, x, s in zip(users.tolist(), times.tolist(), texts.tolist(), stars.tolist()):
                chunk.append(json.dumps({
                    "overall": float(s), "verified": True, "reviewTime": "09 1, 2015", "reviewerID": f"A{u:013d}",
                    "asin": asins[item], "style": {"Format:": " Paperback"}, "reviewerName": names[u % 500],
                    "reviewText": review_texts[x], "summary": summaries[x % 200], "unixReviewTime": t}))
            fh.write("\n".join(chunk) + "\n")
            written += count
    descriptions = _texts(rng, 500, 20, 120)
    with gzip.open(meta, "wt", encoding="utf-8", compresslevel=6) as fh:
        for item, asin in enumerate(asins):
            record = {"category": CATEGORIES[item % len(CATEGORIES)], "tech1": "", "description": [descriptions[item % 500]],
                      "fit": "", "title": f"Widget &amp; gadget model {item}", "also_buy": asins[item + 1:item + 6],
                      "tech2": "", "brand": f"Brand{item % 997}", "feature": [], "rank": f"{item:,} in Electronics (",
                      "also_view": [], "main_cat": "All Electronics", "similar_item": "", "date": "",
                      "price": "$9.99", "asin": asin,
                      "imageURL": [f"https://images-na.ssl-images-amazon.com/images/I/{asin}._US40_.jpg"],
                      "imageURLHighRes": [f"https://images-na.ssl-images-amazon.com/images/I/{asin}.jpg"]}
            fh.write(json.dumps(record) + "\n")
    return {"review_lines": written, "items": n_items}


def machine() -> dict[str, object]:
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "torch": torch_version}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=10_000_000, help="review lines to generate (default 10M)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/reolm_bench_amazon", help="where the synthetic files go")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prepare_amazon.json"))
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine sharing)")
    args = parser.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    reviews, meta = work / f"reviews_{args.lines}_{args.seed}.json.gz", work / f"meta_{args.lines}_{args.seed}.json.gz"
    stamp = work / f"done_{args.lines}_{args.seed}.json"
    if not stamp.exists():
        t0 = time.perf_counter()
        info = write_synthetic(reviews, meta, args.lines, args.seed)
        stamp.write_text(json.dumps(info))
        print(f"generated {info['review_lines']:,} review lines in {time.perf_counter() - t0:.0f}s")
    out_dir = work / "prepared"
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "reolm", "prepare", "amazon", "--reviews", str(reviews), "--meta", str(meta),
           "--name", "Synthetic", "--out", str(out_dir)]
    t0 = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        return result.returncode
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_kb = usage.ru_maxrss  # Linux: KiB, max over children (only the prepare child runs here)
    cpu_seconds = usage.ru_utime + usage.ru_stime  # robust to other jobs sharing the cores
    counts = json.loads((out_dir / "domain.json").read_text())["counts"]
    row = {"lines": args.lines, "seconds": round(seconds, 2), "lines_per_s": round(args.lines / seconds),
           "peak_rss_gb": round(peak_kb / 2**20, 3), "machine": machine(),
           "cpu_seconds": round(cpu_seconds, 2), "lines_per_cpu_s": round(args.lines / cpu_seconds),
           "load_average_1m_at_end": round(os.getloadavg()[0], 2),
           "reviews_gz_bytes": reviews.stat().st_size, "meta_gz_bytes": meta.stat().st_size,
           "kept": counts, "note": args.note}
    print("| lines | seconds | lines/s | CPU s | lines/CPU s | peak RSS (GB) | users | items |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {row['lines']:,} | {row['seconds']:.1f} | {row['lines_per_s']:,} | {row['cpu_seconds']:.1f} | "
          f"{row['lines_per_cpu_s']:,} | {row['peak_rss_gb']:.2f} | {counts['users']:,} | {counts['items']:,} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
