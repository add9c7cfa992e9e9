"""Load test of ``reolm serve`` with a real HTTP client on loopback: QPS and latency percentiles.

Starts ``reolm serve`` (a subprocess, 127.0.0.1 only, on a copy of the index so nothing is
written back), then for each concurrency level runs that many asyncio workers (one shared
httpx.AsyncClient) that send ``POST /recommend`` with real user histories of the domain
(item ids; one level also with raw item objects, which the server must tokenise), each level
bounded by ``--requests`` and ``--seconds``. Records client-side latency (p50/p90/p99), QPS,
and (from ``GET /metrics``) how many requests shared a forward pass and the worker's own time
per request (model + search, no HTTP). Client and server share the machine's cores, so the
figures are a floor.

    python bench/serve_load.py --model runs/demo/runs/reolm --domain runs/demo/data/Scientific
        [--index IDX]   (embedded into a temporary folder first when not given)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_result  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # never anything else: this tool only loads a server on this machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(model: str, index: Path, log: Path, device: str) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "reolm", "serve", "--model", model, "--index", str(index),
                             "--host", HOST, "--port", str(port), "save_on_shutdown=false", "log_level=warning",
                             f"device={device}"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://{HOST}:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not come up within 300 s")


def histories(domain_dir: Path, objects: bool, limit: int = 20) -> list[list[Any]]:
    """Each user's training sequence (last ``limit`` items) as ids, or as item objects."""
    from reolm.data.domain import read_domain

    domain = read_domain(domain_dir, load_features=objects)
    ids = domain.item_ids()
    out = []
    for _, seq in sorted(domain.train.items()):
        seq = seq[-limit:]
        if not objects:
            out.append([ids[i] for i in seq])
            continue
        entries = []
        for i in seq:
            entry: dict[str, Any] = {"attributes": domain.item_attributes(i, ids)}
            if domain.has_image is not None and domain.has_image[i]:
                entry["image_feature"] = domain.image_features[i].astype(float).tolist()
            entries.append(entry)
        out.append(entries)
    return out


async def level(url: str, bodies: list[list[Any]], concurrency: int, requests: int, seconds: float,
                seed: int) -> dict[str, Any]:
    """``concurrency`` workers sending /recommend until ``requests`` are done or ``seconds`` pass."""
    import httpx

    rng = random.Random(seed)
    latencies: list[float] = []
    errors = 0
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        before = (await client.get("/metrics")).json()["service"]
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal sent, errors
            while sent < requests and time.perf_counter() < deadline:
                sent += 1
                body = {"history": rng.choice(bodies), "k": 10}
                t = time.perf_counter()
                r = await client.post("/recommend", json=body)
                latencies.append((time.perf_counter() - t) * 1000)
                errors += r.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        after = (await client.get("/metrics")).json()
    lat = np.asarray(latencies)
    jobs = after["service"]["jobs"] - before["jobs"]
    batches = max(after["service"]["batches"] - before["batches"], 1)
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors, "seconds": round(wall, 2),
            "qps": round(len(lat) / wall, 1),
            **{f"p{q}_ms": round(float(np.percentile(lat, q)), 2) for q in (50, 90, 99)},
            "mean_requests_per_forward_pass": round(jobs / batches, 2),
            # the worker thread's own time per request: model + search, without HTTP and client
            "worker_ms_per_request": round(1000 * (after["service"]["busy_s"] - before["busy_s"]) / max(jobs, 1), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/demo/runs/reolm", help="run directory or export (the demo's)")
    parser.add_argument("--domain", default="runs/demo/data/Scientific", help="domain whose users' histories to send")
    parser.add_argument("--index", help="index folder for --model (default: embed the domain into a temp folder)")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=2000, help="at most this many requests per level")
    parser.add_argument("--seconds", type=float, default=20.0, help="at most this long per level")
    parser.add_argument("--objects-concurrency", type=int, default=8,
                        help="also run this level with item objects instead of ids (0 = skip)")
    parser.add_argument("--device", default="auto", help="the server's device")
    parser.add_argument("--out", default="serve_cpu.json", help="file name under bench/results/")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    work = Path(tempfile.mkdtemp(prefix="reolm-serve-load-"))
    try:
        index = work / "index"
        embed_s = None
        if args.index:
            shutil.copytree(args.index, index)
        else:
            from reolm.serve.config import EmbedConfig
            from reolm.serve.embed import embed_items
            t = time.perf_counter()
            embed_items(args.model, args.domain, index, EmbedConfig(progress=False, device=args.device))
            embed_s = round(time.perf_counter() - t, 2)
        manifest = json.loads((index / "index.json").read_text())
        t = time.perf_counter()
        proc, url = start_server(args.model, index, work / "server.log", args.device)
        startup_s = round(time.perf_counter() - t, 2)
        try:
            plans = [(int(c), False) for c in args.concurrency.split(",")]
            if args.objects_concurrency:
                plans.append((args.objects_concurrency, True))
            bodies = {False: histories(Path(args.domain), False), True: histories(Path(args.domain), True)}
            rows = []
            for concurrency, objects in plans:
                asyncio.run(level(url, bodies[objects], concurrency, 20, 10, args.seed))  # warm-up
                row = asyncio.run(level(url, bodies[objects], concurrency, args.requests, args.seconds, args.seed))
                row["history"] = "item objects" if objects else "item ids"
                rows.append(row)
                print(json.dumps(row), flush=True)
            health = json.loads(__import__("httpx").get(url + "/health").text)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        result = {"benchmark": "bench/serve_load.py: POST /recommend over loopback HTTP (httpx + asyncio)",
                  "machine": {**machine(args.device), "load_average_1m_at_start": load_at_start}, "model": manifest["model"], "index": health["index"],
                  "items": health["items"], "max_history": health["max_history"], "k": 10,
                  "history_items_sent": "each user's last 20 training items (the model reads its last "
                                        f"{health['max_history']})",
                  "bounds": {"requests": args.requests, "seconds": args.seconds},
                  "embed_s": embed_s, "server_startup_s": startup_s, "levels": rows}
        print(f"wrote {write_result(args.out, result)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
