"""Data path at scale: synth -> shard -> tokenizer -> token table, text only.

Each stage runs as its own ``python -m reolm ...`` subprocess; the benchmark
records its wall time and its peak resident memory (``os.wait4`` rusage of that
child), the shard bytes per interaction, and writes
``bench/results/data_scale.json`` (paper preset) or
``bench/results/data_scale_<preset>.json``::

    python bench/data_scale.py --preset demo
    python bench/data_scale.py --preset paper --out /tmp/reolm-paper   # ~tens of GB free needed

The output folder is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "torch": torch.__version__}
    try:
        import psutil
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except ImportError:
        pass
    return info


def run_stage(name: str, args: list[str]) -> dict:
    """Run ``python -m reolm ARGS``; wall seconds and the child's own peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "reolm", *args, "--quiet"]
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed with exit code {proc.returncode}")
    peak_gb = usage.ru_maxrss / 2**20  # Linux reports KiB
    print(f"[{name}] {seconds:.1f}s, peak RSS {peak_gb:.2f} GB", flush=True)
    return {"seconds": round(seconds, 2), "peak_rss_gb": round(peak_gb, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("tiny", "demo", "paper"), default="demo")
    parser.add_argument("--out", help="work folder (default /tmp/reolm-bench-<preset>)")
    parser.add_argument("--results", help="result JSON (default bench/results/data_scale[_<preset>].json)")
    parser.add_argument("--max-count", type=int, default=10_000, help="samples per shard")
    parser.add_argument("--note", default="", help="free text stored with the results")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    args = parser.parse_args()

    out = Path(args.out or f"/tmp/reolm-bench-{args.preset}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    info = machine()
    synth, corpus, tok = out / "synth", out / "corpus", out / "tokenizer"
    stages = {"synth": run_stage("synth", ["synth", "--preset", args.preset, "--out", str(synth), "--no-images"])}
    domains = [str(synth / d["name"]) for d in json.loads((synth / "corpus.json").read_text())["domains"]]
    stages["shard"] = run_stage("shard", ["shard", "--out", str(corpus), "--max-count", str(args.max_count),
                                          *domains])
    # The embedded tokenizer, learnt from one domain (the synthetic vocabulary is shared).
    stages["tokenizer"] = run_stage("tokenizer", ["tokenizer", "train", "--out", str(tok), "--domain", domains[0],
                                                  "--vocab-size", "8192"])
    stages["tokens"] = run_stage("tokens", ["tables", "tokens", "--tokenizer", str(tok), "--corpus", str(corpus)])

    manifest = json.loads((corpus / "manifest.json").read_text())
    shard_bytes = sum(e["bytes"] for split in manifest["shards"].values() for e in split)
    table_bytes = sum(p.stat().st_size for p in (corpus / "tables").rglob("*") if p.is_file())
    result = {
        "preset": args.preset,
        "machine": info,
        "stages": stages,
        "total_seconds": round(sum(s["seconds"] for s in stages.values()), 2),
        "peak_rss_gb": max(s["peak_rss_gb"] for s in stages.values()),
        "shard_bytes_per_interaction": round(shard_bytes / manifest["totals"]["interactions"], 2),
        "totals": manifest["totals"],
        "num_users": sum(d["num_users"] for d in manifest["domains"]),
        "shard_bytes": shard_bytes,
        "token_table_bytes": table_bytes,
        "num_shards": {k: len(v) for k, v in manifest["shards"].items()},
        "note": args.note,
    }
    results = Path(args.results) if args.results else (
        REPO / "bench" / "results" / ("data_scale.json" if args.preset == "paper" else f"data_scale_{args.preset}.json"))
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=2) + "\n")

    print("\n| stage | seconds | peak RSS (GB) |\n|---|---:|---:|")
    for name, s in stages.items():
        print(f"| {name} | {s['seconds']:.1f} | {s['peak_rss_gb']:.2f} |")
    print(f"| **total** | {result['total_seconds']:.1f} | {result['peak_rss_gb']:.2f} |")
    print(f"\n{manifest['totals']['interactions']:,} interactions, {shard_bytes / 2**30:.2f} GiB of shards "
          f"({result['shard_bytes_per_interaction']} B/interaction); results in {results}")
    if not args.keep:
        shutil.rmtree(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
