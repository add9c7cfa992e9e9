#!/usr/bin/env python
"""Full-ranking throughput: users/s for U users against N random item vectors (default the
paper's scale: 100K users x 1.02M items, H = 64), on CPU and on CUDA when available.

    PYTHONPATH=. python bench/ranking.py                       # CPU (+ CUDA if present)
    PYTHONPATH=. python bench/ranking.py --device cuda --measure-users 100000

On a small CPU the whole 100K users would take many minutes, so only ``--measure-users``
users are ranked (after one warm-up chunk) and users/s is extrapolated to ``--users``; the
JSON says so ("extrapolated": true).  Writes bench/results/ranking.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reolm.eval.metrics import MetricAccumulator  # noqa: E402
from reolm.eval.ranking import evaluate_vectors  # noqa: E402


def peak_rss_gb() -> float:
    # ru_maxrss is KiB on Linux (bytes on macOS)
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    try:
        info["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def bench_device(device: str, args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(0)
    items = torch.randn(args.items, args.hidden, generator=gen)
    measure = min(args.measure_users or (args.users if device.startswith("cuda") else 2048), args.users)
    users = torch.randn(measure + args.user_chunk, args.hidden, generator=gen)
    targets = torch.randint(0, args.items, (measure + args.user_chunk,), generator=gen)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # warm-up chunk (kernel selection, allocator), not timed
    evaluate_vectors(users[:args.user_chunk], items, targets[:args.user_chunk], user_chunk=args.user_chunk,
                     item_chunk=args.item_chunk, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    acc = MetricAccumulator(args.items)
    start = time.perf_counter()
    evaluate_vectors(users[args.user_chunk:], items, targets[args.user_chunk:], user_chunk=args.user_chunk,
                     item_chunk=args.item_chunk, device=device, accumulator=acc)
    metrics, _ = acc.result()  # forces the device to finish
    elapsed = time.perf_counter() - start
    result = {"device": device, "num_users": args.users, "num_items": args.items, "hidden": args.hidden,
              "measured_users": measure, "extrapolated": measure < args.users,
              "seconds_measured": round(elapsed, 3), "users_per_s": round(measure / elapsed, 1),
              "seconds_for_all_users": round(args.users * elapsed / measure, 1),
              "user_chunk": args.user_chunk, "item_chunk": args.item_chunk, "peak_rss_gb": round(peak_rss_gb(), 3),
              "sanity_auc_random": round(metrics["AUC"], 4)}
    if device.startswith("cuda"):
        result["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000, help="users the figure is for")
    parser.add_argument("--items", type=int, default=1_020_000, help="catalogue size")
    parser.add_argument("--hidden", type=int, default=64, help="vector dimension H")
    parser.add_argument("--measure-users", type=int, default=0,
                        help="users actually ranked (default: 2048 on CPU, all on CUDA)")
    parser.add_argument("--user-chunk", type=int, default=256)
    parser.add_argument("--item-chunk", type=int, default=65536)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = CPU, then CUDA when available")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ranking.json"))
    args = parser.parse_args()
    devices = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []), "cpu": ["cpu"],
               "cuda": ["cuda"]}[args.device]
    results = [bench_device(d, args) for d in devices]
    print(f"{'device':<8}{'users':>9}{'items':>10}{'measured':>10}{'users/s':>11}{'all users (s)':>15}{'peak RSS GB':>13}")
    for r in results:
        print(f"{r['device']:<8}{r['num_users']:>9}{r['num_items']:>10}{r['measured_users']:>10}"
              f"{r['users_per_s']:>11.1f}{r['seconds_for_all_users']:>15.1f}{r['peak_rss_gb']:>13.2f}")
    doc = {**results[0], "results": results, "machine": machine(),
           "note": "users/s of full ranking (scores against every item, optimistic + pessimistic ranks, "
                   "all metrics); extrapolated = measured on measured_users users and scaled"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
