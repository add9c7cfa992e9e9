"""Load test of ``reolm serve`` with a real HTTP client on loopback: QPS and latency percentiles.

Starts ``reolm serve`` (a subprocess, 127.0.0.1 only, on a copy of the index so nothing is
written back), then for each concurrency level runs that many asyncio workers, each with its
own keep-alive connection, that send ``POST /recommend`` with real user histories of the
domain (item ids; one level also with raw item objects, which the server must tokenise), each
level bounded by ``--requests`` and ``--seconds``. Records client-side latency
(p50/p90/p99), QPS, and (from ``GET /metrics``) how many requests shared a forward pass and
the worker's own time per request (model + search, no HTTP). Client and server share the
machine's cores, so the figures are a floor.

The client is a minimal HTTP/1.1 writer/reader on asyncio streams (:class:`Connection`), not
httpx: at concurrency 32 on 2 cores httpx's client used 0.66 of a core and its connection
pool, not the server, made the tail (client p99 1,418 ms while the server's own p99 for the
same requests was 116 ms).

``--mixed-seconds`` adds a mixed run: recommend workers, a worker adding new items, and a
poisoning client sending 10 hostile requests per second (lone surrogates in item text,
attributes over the length limit, a body of heavy text, invalid UTF-8 and JSON, deep nesting,
coerced types, unknown paths, a stalled body). It records errors among the good requests
(must be 0), their QPS and p99, and the statuses the poison got (all must be 4xx).

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
            asyncio.run(get_json(url, "/health"))
            return proc, url
        except OSError:
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


class Connection:
    """One keep-alive HTTP/1.1 connection: write a request, read the status, headers and body."""

    def __init__(self, url: str):
        host, port = url.rsplit("//", 1)[1].split(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                      timeout: float = 60) -> tuple[int, bytes]:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        head = (f"{method} {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(data)}\r\n\r\n").encode()
        for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile: reconnect once
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                self.writer.write(head + data)
                return await asyncio.wait_for(self._response(), timeout)
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _response(self) -> tuple[int, bytes]:
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        payload = await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(lines[0].split()[1]), payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def get_json(url: str, path: str) -> Any:
    conn = Connection(url)
    try:
        return json.loads((await conn.request("GET", path))[1])
    finally:
        conn.close()


def summary(latencies: list[float]) -> dict[str, float]:
    lat = np.asarray(latencies) if latencies else np.zeros(1)
    return {f"p{q}_ms": round(float(np.percentile(lat, q)), 2) for q in (50, 90, 99)}


async def level(url: str, bodies: list[list[Any]], concurrency: int, requests: int, seconds: float,
                seed: int) -> dict[str, Any]:
    """``concurrency`` workers sending /recommend until ``requests`` are done or ``seconds`` pass."""
    rng = random.Random(seed)
    latencies: list[float] = []
    errors = 0
    sent = 0
    before = (await get_json(url, "/metrics"))["service"]
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal sent, errors
        conn = Connection(url)
        while sent < requests and time.perf_counter() < deadline:
            sent += 1
            body = {"history": rng.choice(bodies), "k": 10}
            t = time.perf_counter()
            status, _ = await conn.request("POST", "/recommend", body)
            latencies.append((time.perf_counter() - t) * 1000)
            errors += status != 200
        conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    after = await get_json(url, "/metrics")
    jobs = after["service"]["jobs"] - before["jobs"]
    batches = max(after["service"]["batches"] - before["batches"], 1)
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors, "seconds": round(wall, 2),
            "qps": round(len(latencies) / wall, 1), **summary(latencies),
            "mean_requests_per_forward_pass": round(jobs / batches, 2),
            # the worker thread's own time per request: model + search, without HTTP and client
            "worker_ms_per_request": round(1000 * (after["service"]["busy_s"] - before["busy_s"]) / max(jobs, 1), 2)}


def poison_requests(item_id: str, health: dict[str, Any]) -> list[tuple[str, str, bytes]]:
    """Hostile requests (method, path, raw body), one of each kind the service must refuse alone."""
    attr = health["attributes"][0]
    big = "word " * 800  # within max_attribute_chars (4,096)...
    heavy = {"history": [{"attributes": {a: big for a in health["attributes"]}} for _ in range(60)], "k": 10}
    surrogate = '{"history": [{"attributes": {"%s": "x\\udc80"}}], "k": 10}' % attr
    return [
        ("POST", "/recommend", surrogate.encode()),
        ("POST", "/items", ('{"items": [{"id": "p-1", "attributes": {"%s": "\\ud800"}}]}' % attr).encode()),
        ("POST", "/recommend", json.dumps({"history": [{"attributes": {attr: "y" * 100_000}}]}).encode()),
        ("POST", "/recommend", json.dumps(heavy).encode()),  # ...but 60 items x 3 x 4,000 characters: heavy
        ("POST", "/recommend", b'{"history": ["\xff\xfe"], "k": 10}'),
        ("POST", "/recommend", b'{"history": [' * 1 + b"[" * 5000 + b"]" * 5000 + b"]}"),
        ("POST", "/recommend", b'{"history": ["x"], "k": ' + b"9" * 5000 + b"}"),
        ("POST", "/recommend", json.dumps({"history": [item_id], "k": "10"}).encode()),
        ("POST", "/recommend", json.dumps({"history": [item_id], "exclude_history": "yes"}).encode()),
        ("GET", "/no-such-path", b""),
        ("POST", "/recommend", b'{"history": ['),
    ]


async def stalled_body(url: str) -> None:
    """Headers promising 1,000 bytes, then 10 of them and silence: the server must give up on it."""
    host, port = url.rsplit("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /recommend HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n0123456789")
    try:
        await asyncio.wait_for(reader.read(), 120)
    except asyncio.TimeoutError:
        pass
    writer.close()


async def mixed(url: str, bodies: list[list[Any]], new_items: list[dict[str, Any]], concurrency: int,
                seconds: float, poison_rate: float, seed: int) -> dict[str, Any]:
    """Recommends + adds + a poisoning client at ``poison_rate`` requests/s, all at once."""
    rng = random.Random(seed)
    health = await get_json(url, "/health")
    poison = poison_requests(bodies[0][0], health)
    rec_lat: list[float] = []
    add_lat: list[float] = []
    good_errors: list[str] = []
    poison_status: dict[str, int] = {}
    deadline = time.perf_counter() + seconds

    async def recommender() -> None:
        conn = Connection(url)
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            status, payload = await conn.request("POST", "/recommend", {"history": rng.choice(bodies), "k": 10})
            rec_lat.append((time.perf_counter() - t) * 1000)
            if status != 200:
                good_errors.append(f"recommend {status}: {payload[:200]!r}")
        conn.close()

    async def adder() -> None:
        conn = Connection(url)
        j = 0
        while time.perf_counter() < deadline:
            items = [{**new_items[(j * 4 + m) % len(new_items)], "id": f"mixed-{j}-{m}"} for m in range(4)]
            t = time.perf_counter()
            status, payload = await conn.request("POST", "/items", {"items": items})
            add_lat.append((time.perf_counter() - t) * 1000)
            if status != 200:
                good_errors.append(f"add {status}: {payload[:200]!r}")
            j += 1
            await asyncio.sleep(0.05)
        conn.close()

    def count(status: str) -> None:
        poison_status[status] = poison_status.get(status, 0) + 1

    async def one_poison(i: int) -> None:
        if i % 20 == 19:
            count("stalled body")
            return await stalled_body(url)
        method, path, raw = poison[i % len(poison)]
        conn = Connection(url)
        try:
            status, _ = await conn.request(method, path, raw=raw)
            count(str(status))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError) as err:
            count(type(err).__name__)
        finally:
            conn.close()

    async def poisoner() -> None:
        # Fired on a clock, not one after another: a slow answer must not slow the attack down.
        tasks, i = [], 0
        while time.perf_counter() < deadline:
            tasks.append(asyncio.ensure_future(one_poison(i)))
            i += 1
            await asyncio.sleep(1 / poison_rate)
        done, pending = await asyncio.wait(tasks, timeout=30)
        for task in pending:  # the stalled bodies, which the server cuts off after body_timeout_s anyway
            task.cancel()

    start = time.perf_counter()
    attack = asyncio.ensure_future(poisoner())
    await asyncio.gather(*(recommender() for _ in range(concurrency)), adder())
    wall = time.perf_counter() - start  # the good clients' window (the attack's tail is not theirs)
    await attack
    return {"concurrency": concurrency, "seconds": round(wall, 2), "poison_requests_per_s": poison_rate,
            "good_requests": len(rec_lat) + len(add_lat), "good_request_errors": len(good_errors),
            "good_error_examples": good_errors[:5], "recommend_qps": round(len(rec_lat) / wall, 1),
            "recommend": summary(rec_lat), "adds": len(add_lat), "add": summary(add_lat),
            "poison_status": poison_status}


def rss_mb(pid: int) -> float:
    """Resident memory of a process (MB), from /proc (Linux; None elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


async def add_many(url: str, objects: list[dict[str, Any]], total: int, per_request: int) -> float:
    """POST /items ``total`` new items (copies of ``objects`` under new ids); returns the seconds taken."""
    conn = Connection(url)
    start = time.perf_counter()
    for first in range(0, total, per_request):
        items = [{**objects[j % len(objects)], "id": f"mem-{j}"} for j in range(first, min(first + per_request, total))]
        status, payload = await conn.request("POST", "/items", {"items": items}, timeout=600)
        if status != 200:
            raise SystemExit(f"POST /items failed with {status}: {payload[:300]!r}")
    conn.close()
    return time.perf_counter() - start


def memory_run(args: argparse.Namespace, url: str, proc: subprocess.Popen, index: Path, work: Path,
               objects: list[dict[str, Any]]) -> dict[str, Any]:
    """RSS after ``--memory-adds`` live adds, against a fresh server on the same catalogue read from disk."""
    before = rss_mb(proc.pid)
    seconds = asyncio.run(add_many(url, objects, args.memory_adds, 256))
    asyncio.run(Connection(url).request("POST", "/recommend", {"history": [f"mem-{args.memory_adds - 1}"], "k": 10}))
    after = rss_mb(proc.pid)
    asyncio.run(Connection(url).request("POST", "/admin/save", timeout=600))
    fresh, fresh_url = start_server(args.model, index, work / "fresh.log", args.device)
    try:
        asyncio.run(Connection(fresh_url).request("POST", "/recommend", {"history": [f"mem-{args.memory_adds - 1}"],
                                                                         "k": 10}))
        loaded = rss_mb(fresh.pid)
        items = asyncio.run(get_json(fresh_url, "/health"))["items"]
    finally:
        fresh.send_signal(signal.SIGTERM)
        fresh.wait(timeout=120)
    return {"adds": args.memory_adds, "items_after": items, "add_seconds": round(seconds, 1),
            "rss_mb_before_adds": before, "rss_mb_after_adds": after, "rss_mb_same_index_loaded_from_disk": loaded,
            "ratio": round(after / loaded, 3) if after and loaded else None}


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
    parser.add_argument("--mixed-seconds", type=float, default=20.0,
                        help="length of the mixed run (recommends + adds + poisoning client; 0 = skip)")
    parser.add_argument("--mixed-concurrency", type=int, default=8, help="recommend workers of the mixed run")
    parser.add_argument("--poison-rate", type=float, default=10.0, help="hostile requests per second (mixed run)")
    parser.add_argument("--memory-adds", type=int, default=30000,
                        help="after the runs, add this many items live and compare the server's memory with the "
                             "same index loaded from disk (0 = skip)")
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
            health = asyncio.run(get_json(url, "/health"))  # the catalogue the levels ran on, before the adds
            mixed_row = None
            if args.mixed_seconds:
                objects = [dict(o) for h in bodies[True] for o in h][:200]
                mixed_row = asyncio.run(mixed(url, bodies[False], objects, args.mixed_concurrency,
                                              args.mixed_seconds, args.poison_rate, args.seed))
                print(json.dumps(mixed_row), flush=True)
            memory = None
            if args.memory_adds:
                memory = memory_run(args, url, proc, index, work, [dict(o) for h in bodies[True] for o in h][:500])
                print(json.dumps(memory), flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        result = {"benchmark": "bench/serve_load.py: POST /recommend over loopback HTTP (asyncio HTTP/1.1 client)",
                  "machine": {**machine(args.device), "load_average_1m_at_start": load_at_start}, "model": manifest["model"], "index": health["index"],
                  "items": health["items"], "max_history": health["max_history"], "k": 10,
                  "history_items_sent": "each user's last 20 training items (the model reads its last "
                                        f"{health['max_history']})",
                  "bounds": {"requests": args.requests, "seconds": args.seconds},
                  "client": "asyncio streams, one keep-alive HTTP/1.1 connection per worker (not httpx: see "
                            "the module docstring)",
                  "embed_s": embed_s, "server_startup_s": startup_s, "levels": rows, "mixed": mixed_row,
                  "memory": memory}
        print(f"wrote {write_result(args.out, result)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
