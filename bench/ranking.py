#!/usr/bin/env python
"""Full-ranking throughput against the bare matrix product of the same shapes, same run.

Ranks U users against N random item vectors (default the paper's scale: 100K users x
1.02M items, H = 64) with :func:`reolm.eval.ranking.evaluate_vectors`, and times, chunk by
chunk and interleaved with it, the bare matrix product of the same user and item blocks
(``torch.matmul`` into a reused buffer, nothing else).  ``fraction_of_matmul`` = ranking
throughput / matmul throughput: 1.0 would mean counting the ranks is free.  Interleaving
makes the ratio robust to a loaded machine; the absolute users/s are not.

    PYTHONPATH=. python bench/ranking.py                       # CPU (+ CUDA if present)
    PYTHONPATH=. python bench/ranking.py --quick               # < 1 minute
    PYTHONPATH=. python bench/ranking.py --device cuda --measure-users 100000

On a small CPU the whole 100K users would take many minutes, so only ``--measure-users``
users are ranked (after one warm-up chunk) and users/s is extrapolated to ``--users``; the
JSON says so ("extrapolated": true).  Writes bench/results/ranking.json (or --out), rewritten
after each device ("complete": false until the last).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PartialResult, machine  # noqa: E402
from reolm.eval.metrics import MetricAccumulator  # noqa: E402
from reolm.eval.rank_kernel import kernel_available  # noqa: E402
from reolm.eval.ranking import _block_shape, _chunks, _score_blocks, evaluate_vectors  # noqa: E402


def peak_rss_gb() -> float:
    # ru_maxrss is KiB on Linux (bytes on macOS)
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_matmul(users: torch.Tensor, items: torch.Tensor, item_chunk: int) -> torch.Tensor:
    """The ranking's matrix products alone: the same user and item blocks, one reused buffer."""
    user_block, item_block = _block_shape(users.shape[0], item_chunk, users.device)
    width = min(item_block, items.shape[0])
    buffer = torch.empty(min(user_block, users.shape[0]) * width, device=users.device)
    for lo, hi in _chunks(users.shape[0], user_block):
        for start, end, view in _score_blocks(buffer, hi - lo, items.shape[0], width):  # the ranking's own views
            out = torch.matmul(users[lo:hi], items[start:end].T, out=view)
    return out


def bench_device(device: str, args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(0)
    items = torch.randn(args.items, args.hidden, generator=gen).to(device)
    measure = min(args.measure_users or (args.users if device.startswith("cuda") else 2048), args.users)
    users = torch.randn(measure + args.user_chunk, args.hidden, generator=gen).to(device)
    targets = torch.randint(0, args.items, (measure + args.user_chunk,), generator=gen).to(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # warm-up chunk (kernel selection, allocator), not timed
    evaluate_vectors(users[:args.user_chunk], items, targets[:args.user_chunk], user_chunk=args.user_chunk,
                     item_chunk=args.item_chunk, device=device)
    bare_matmul(users[:args.user_chunk], items, args.item_chunk)
    sync(device)
    acc = MetricAccumulator(args.items)
    rank_s = matmul_s = 0.0
    for lo, hi in _chunks(measure, args.user_chunk):
        u, t = users[args.user_chunk + lo:args.user_chunk + hi], targets[args.user_chunk + lo:args.user_chunk + hi]
        # Interleaved and repeated: each chunk is ranked and multiplied `repeats` times in turn and
        # the fastest of each kept, so a burst of load from another process on a shared machine
        # slows one repeat, not the figure (the usual min-of-repeats of timeit).
        rank_times, matmul_times = [], []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            evaluate_vectors(u, items, t, user_chunk=args.user_chunk, item_chunk=args.item_chunk, device=device,
                             accumulator=acc if repeat == 0 else None)
            sync(device)
            mid = time.perf_counter()
            bare_matmul(u, items, args.item_chunk)
            sync(device)
            rank_times.append(mid - start)
            matmul_times.append(time.perf_counter() - mid)
        rank_s, matmul_s = rank_s + min(rank_times), matmul_s + min(matmul_times)
    metrics, _ = acc.result()
    user_block, item_block = _block_shape(args.user_chunk, args.item_chunk, torch.device(device))
    result = {"device": device, "num_users": args.users, "num_items": args.items, "hidden": args.hidden,
              "measured_users": measure, "extrapolated": measure < args.users,
              "seconds_measured": round(rank_s, 3), "users_per_s": round(measure / rank_s, 1),
              "seconds_for_all_users": round(args.users * rank_s / measure, 1),
              "matmul_seconds_measured": round(matmul_s, 3), "matmul_users_per_s": round(measure / matmul_s, 1),
              "fraction_of_matmul": round(matmul_s / rank_s, 3), "repeats": args.repeats,
              "counter": "numba kernel" if device == "cpu" and kernel_available() else "torch ops",
              "matmul_gflops": round(2 * measure * args.items * args.hidden / matmul_s / 1e9, 1),
              "user_chunk": args.user_chunk, "item_chunk": args.item_chunk,
              "block_users": user_block, "block_items": item_block,
              "score_buffer_mb": round(4 * user_block * min(item_block, args.items) / 2**20, 2),
              "peak_rss_gb": round(peak_rss_gb(), 3), "sanity_auc_random": round(metrics["AUC"], 4)}
    if device.startswith("cuda"):
        result["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    return result


NOTE = ("users/s of full ranking (scores against every item, optimistic + pessimistic ranks, all metrics) vs "
        "the bare matmul of the same blocks timed interleaved in the same run; fraction_of_matmul = ranking "
        "throughput / matmul throughput; extrapolated = measured on measured_users users and scaled")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000, help="users the figure is for")
    parser.add_argument("--items", type=int, default=1_020_000, help="catalogue size")
    parser.add_argument("--hidden", type=int, default=64, help="vector dimension H")
    parser.add_argument("--measure-users", type=int, default=0,
                        help="users actually ranked (default: 2048 on CPU, all on CUDA; --quick: 512)")
    parser.add_argument("--user-chunk", type=int, default=256)
    parser.add_argument("--item-chunk", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=3,
                        help="times each user chunk is ranked and multiplied in turn; the fastest of each counts")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = CPU, then CUDA when available")
    parser.add_argument("--quick", action="store_true",
                        help="512 measured users per device (CUDA: 8192): the same fields in under a minute")
    parser.add_argument("--out", default="ranking.json", help="result JSON: a file name under bench/results/, or a path")
    args = parser.parse_args()
    devices = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []), "cpu": ["cpu"],
               "cuda": ["cuda"]}[args.device]
    results: list[dict] = []
    partial = PartialResult(args.out, quick=args.quick, note=NOTE)
    for d in devices:
        if args.quick and not args.measure_users:
            args.measure_users = 8192 if d == "cuda" else 512
        results.append(bench_device(d, args))
        args.measure_users = 0 if args.quick else args.measure_users
        partial.update(**results[0], results=results, machine=machine(d))
    print(f"{'device':<8}{'users':>9}{'items':>10}{'measured':>10}{'users/s':>11}{'matmul users/s':>16}"
          f"{'fraction':>10}{'peak RSS GB':>13}")
    for r in results:
        print(f"{r['device']:<8}{r['num_users']:>9}{r['num_items']:>10}{r['measured_users']:>10}"
              f"{r['users_per_s']:>11.1f}{r['matmul_users_per_s']:>16.1f}{r['fraction_of_matmul']:>10.3f}"
              f"{r['peak_rss_gb']:>13.2f}")
    print(f"wrote {partial.finish()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
