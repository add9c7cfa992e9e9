"""`reolm serve` against hostile clients and damaged index folders.

One bad request never hurts another (a poisoned request inside a concurrent burst fails alone;
a job that breaks the model inside a shared batch fails alone), every error has the one JSON
shape, slow clients are cut off, and an index folder is verified like a checkpoint: damaged
files, escaping paths and SIGKILL during saves. The server is the real `reolm serve`
subprocess (serve_helpers.Server); folder checks use the real Catalogue and FAISS files.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_helpers import REPO, Server, build_assets, object_of
from single_thread import one_thread  # noqa: F401  (autouse, module-scoped)

from reolm.precision import resolve_precision
from reolm.serve.catalogue import MANIFEST, Catalogue, write_revision
from reolm.serve.config import ServeConfig
from reolm.serve.index import IndexFileError
from reolm.serve.model import ServingModel
from reolm.serve.service import INTERNAL_ERROR, AddJob, ItemSpec, RecommendJob, RequestError, Service

LIMITS = ("max_attribute_chars=200", "max_item_chars=400", "body_timeout_s=1", "header_timeout_s=1", "max_k=100",
          "batch_wait_ms=20")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    return build_assets(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def server(assets):
    index = assets["root"] / "served-index"
    shutil.copytree(assets["index"], index)
    srv = Server(assets["run"], index, assets["root"] / "server.log", *LIMITS)
    yield srv
    srv.stop()


def _post_raw(server: Server, path: str, raw: bytes) -> httpx.Response:
    return httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=60)


def _assert_error_shape(r: httpx.Response, status: int, field: str, assets: dict) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error", "field"} and body["field"] == field and body["error"], body
    assert "Traceback" not in r.text and str(assets["root"]) not in r.text and str(REPO) not in r.text


# ----------------------------------------------------------------------------- isolation

def test_poisoned_requests_in_a_burst_fail_alone(server, assets):
    ids = assets["domain"].item_ids()
    good = [{"history": [ids[j], ids[(j * 7 + 3) % 40]], "k": 6} for j in range(8)] + \
           [{"history": [object_of(assets, (j * 5) % 40), ids[j + 20]], "k": 6} for j in range(8)]
    alone = [[i["id"] for i in server.post("/recommend", body)["items"]] for body in good]
    poison = [  # (path, body, field): each must get its own 422 while the good ones are answered
        ("/recommend", {"history": [{"attributes": {"title": "x\udc80"}}]}, "history[0].attributes.title"),
        ("/recommend", {"history": [{"attributes": {"\ud800": "x"}}]}, "history[0].attributes"),
        ("/recommend", {"history": ["tiny-i1\udfff"]}, "history[0]"),
        ("/items", {"items": [{"id": "bad\udc80", "attributes": {"title": "x"}}]}, "items[0].id"),
        ("/items", {"items": [{"id": "long", "attributes": {"title": "y" * 201}}]}, "items[0].attributes.title"),
    ]

    async def burst() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            def post(path: str, body: dict):  # the body as the client wrote it (lone surrogates escaped)
                return client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
            good_calls = [post("/recommend", body) for body in good]
            bad_calls = [post(path, bad) for path, bad, _ in poison]
            interleaved = [c for j, g in enumerate(good_calls) for c in (g, *bad_calls[j:j + 1])]
            done = await asyncio.gather(*interleaved)
            kinds = [k for j in range(len(good)) for k in ("good", *(["bad"] if j < len(poison) else []))]
            return [r for r, k in zip(done, kinds) if k == "good"], [r for r, k in zip(done, kinds) if k == "bad"]

    good_responses, bad_responses = asyncio.run(burst())
    assert [r.status_code for r in good_responses] == [200] * len(good)
    assert [[i["id"] for i in r.json()["items"]] for r in good_responses] == alone  # as if alone
    assert [(r.status_code, r.json()["field"]) for r in bad_responses] == [(422, f) for _, _, f in poison]
    assert server.get("/health")["items"] == 40  # nothing of the poisoned adds was added


def test_a_job_that_breaks_the_model_fails_alone_in_its_batch(assets, tmp_path):
    """Inside one shared batch: a history and an add whose token ids the model has no embedding
    for (past text validation, as a tokenizer bug would produce) fail with a bare 500; the other
    jobs of the batch get exactly the answers they get alone."""
    shutil.copytree(assets["index"], tmp_path / "index")
    model = ServingModel(assets["run"])
    service = Service(model, Catalogue.open(tmp_path / "index"), ServeConfig(batch_wait_ms=300))
    try:
        ids = assets["domain"].item_ids()
        jobs = lambda: [RecommendJob([ids[1], ids[2]], 5), RecommendJob([ids[30]], 5),  # noqa: E731
                        AddJob([ItemSpec({"category": "c", "title": "fresh", "brand": "b"}, id="ok-add")])]
        alone = [service.submit(j).result(timeout=120) for j in jobs()[:2]]
        broken = service.catalogue.content([0])[0]
        broken.ids[:] = model.vocab_size + 7  # an id past the embedding table: IndexError in the forward pass
        bad_history = RecommendJob([ItemSpec({"title": "x"}, tokens=broken)], 5)
        bad_add = AddJob([ItemSpec({"title": "x"}, id="bad-add", tokens=broken)])
        batch = [bad_history, *jobs(), bad_add]
        futures = [service.submit(j) for j in batch]
        results = []
        for f in futures:
            try:
                results.append(f.result(timeout=120))
            except RequestError as err:
                results.append(err)
        assert service.largest_batch >= 5  # they really shared one batch
        assert results[1:3] == alone and results[3] == {"added": 1, "replaced": 0, "items": 41}
        for err in (results[0], results[4]):
            assert isinstance(err, RequestError) and err.status == 500 and err.message == INTERNAL_ERROR
        assert service.catalogue.row_of("bad-add") is None and service.catalogue.row_of("ok-add") is not None
    finally:
        service.close(save=False)


def test_recommends_are_answered_between_the_passes_of_a_long_add(assets, tmp_path):
    shutil.copytree(assets["index"], tmp_path / "index")
    service = Service(ServingModel(assets["run"], item_batch_size=16), Catalogue.open(tmp_path / "index"),
                      ServeConfig(item_batch_size=16, max_items_per_request=2000))
    try:
        ids = assets["domain"].item_ids()
        alone = service.submit(RecommendJob([ids[1], ids[2]], 5)).result(timeout=120)
        finished: list[str] = []
        specs = [ItemSpec({"title": f"bulk item {j}"}, id=f"bulk-{j}") for j in range(400)]  # 25 passes
        service.tokenize(specs)
        add = service.submit(AddJob(specs))
        add.add_done_callback(lambda _: finished.append("add"))
        deadline = time.time() + 60
        while not service.running:  # the worker has taken the add
            assert time.time() < deadline
            time.sleep(0.001)
        rec = service.submit(RecommendJob([ids[1], ids[2]], 5))
        rec.add_done_callback(lambda _: finished.append("recommend"))
        assert rec.result(timeout=120) == alone and add.result(timeout=120)["added"] == 400
        assert finished == ["recommend", "add"]  # answered while the add was still being encoded
        assert service.catalogue.row_of("bulk-399") is not None
    finally:
        service.close(save=False)


# ----------------------------------------------------------------------------- one error contract

DEEP = b'{"history": ' + b"[" * 5000 + b"]" * 5000 + b"}"


@pytest.mark.parametrize("raw,status,field", [
    (b'{"history": ["\xff\xfe"], "k": 5}', 422, "body"),  # invalid UTF-8
    (DEEP, 422, "body"),
    (b'{"history": ["tiny-i1"], "k": ' + b"9" * 5000 + b"}", 422, "body"),
    (b'{"history": ["tiny-i1"], "k": "10"}', 422, "k"),  # strict: no coercion
    (b'{"history": ["tiny-i1"], "k": true}', 422, "k"),
    (b'{"history": ["tiny-i1"], "exclude_history": "yes"}', 422, "exclude_history"),
    (b'{"history": ["tiny-i1"], "k": 5.0}', 422, "k"),
    (b'{"history": [{"attributes": {"title": "x\\udc80"}}]}', 422, "history[0].attributes.title"),
    (b'{"history": [{"attributes": {"title": "' + b"a" * 201 + b'"}}]}', 422, "history[0].attributes.title"),
    (b'{"history": [{"attributes": {"title": "' + b"a" * 150 + b'", "brand": "' + b"b" * 150
     + b'", "category": "' + b"c" * 150 + b'"}}]}', 422, "history[0].attributes"),
    (b'{"history": ["' + b"i" * 513 + b'"]}', 422, "history[0]"),  # not echoed back at length
    (b"[1, 2]", 422, "body"),
    (b"", 422, "body"),
])
def test_every_bad_body_gets_the_json_error_shape(server, assets, raw, status, field):
    _assert_error_shape(_post_raw(server, "/recommend", raw), status, field, assets)


def test_unknown_paths_and_methods_get_the_json_error_shape(server, assets):
    _assert_error_shape(httpx.get(server.url + "/no/such/path"), 404, "path", assets)
    _assert_error_shape(httpx.get(server.url + "/recommend"), 405, "method", assets)
    _assert_error_shape(httpx.delete(server.url + "/items/never-there"), 404, "id", assets)


def test_an_escaped_exception_is_a_bare_500_that_closes_the_connection(tmp_path):
    """A handler bug: the client gets the error shape without the exception's text or paths, and
    `Connection: close`, instead of a response followed by a reset (Starlette re-raises)."""
    from fastapi import FastAPI

    from reolm.serve.http import CatchAll

    app = FastAPI()
    app.add_middleware(CatchAll)

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError(f"secret detail in {tmp_path}")

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/boom")

    r = asyncio.run(call())
    assert r.status_code == 500 and r.headers["connection"] == "close"
    assert r.json() == {"error": "internal error (the server logged it)", "field": ""}
    assert "secret" not in r.text and str(tmp_path) not in r.text


def test_health_names_model_and_index_by_identity(server, assets):
    r = httpx.get(server.url + "/health")
    manifest = json.loads((assets["index"] / MANIFEST).read_text())
    health = r.json()
    assert health["model"]["user_encoder_sha256"] == manifest["model"]["user_encoder"]["weights_sha256"]
    assert health["model"]["item_encoder_sha256"] == manifest["model"]["item_encoder"]["weights_sha256"]
    assert health["index"]["revision"] == manifest["revision"] and health["index"]["kind"] == "flat"
    # the precision the service runs in, as `auto` resolves it on this CPU; the index records its own
    width = manifest["model"]["hidden_size"]
    assert health["precision"] == manifest["precision"] == resolve_precision("auto", "cpu", hidden_size=width)
    assert str(assets["root"]) not in r.text and "/tmp" not in r.text and str(REPO) not in r.text


def _http(sock: socket.socket, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one request on a raw socket and read one response (status, headers, body)."""
    sock.sendall(raw)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def _request(body: bytes, content_length: int | None = None) -> bytes:
    n = len(body) if content_length is None else content_length
    return (b"POST /recommend HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: "
            + str(n).encode() + b"\r\n\r\n" + body)


def test_errors_keep_the_connection_and_a_closing_server_says_so(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        status, headers, _ = _http(sock, _request(b'{"history": ['))
        assert status == 422 and headers.get("connection") != "close"
        status, _, body = _http(sock, _request(b'{"history": ["tiny-i1"], "k": 3}'))  # same connection
        assert status == 200 and len(json.loads(body)["items"]) == 3
        status, headers, _ = _http(sock, _request(b"", content_length=10**9))  # over the body limit: not read
        assert status == 413 and headers["connection"] == "close"
        assert sock.recv(1024) == b""  # and the server did close it


def test_slow_clients_are_cut_off_without_stalling_others(server):
    started = time.perf_counter()
    slow_headers = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    slow_headers.sendall(b"POST /recommend HTTP/1.1\r\nhost: x\r\n")  # ...and the rest never comes
    slow_body = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    slow_body.sendall(_request(b"0123456789", content_length=1000))  # 10 of 1,000 bytes
    assert server.post("/recommend", {"history": ["tiny-i1"], "k": 2})["items"]  # others are served meanwhile
    status, headers, body = _http(slow_body, b"")
    assert status == 408 and headers["connection"] == "close" and json.loads(body)["field"] == "body"
    assert slow_body.recv(1024) == b""
    assert slow_headers.recv(1024) == b""  # closed after header_timeout_s
    assert time.perf_counter() - started < 10  # 1 s limits, not held for minutes
    slow_headers.close()
    slow_body.close()


# ----------------------------------------------------------------------------- the index folder

def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("target", ["index-000000.faiss", "vectors-000000.safetensors", "tokens-000000/ids.npy",
                                    "images-000000/features.npy", "tokens-000000/offsets.npy"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_index_file_is_refused_naming_it(assets, tmp_path, target, damage):
    folder = tmp_path / "index"
    shutil.copytree(assets["index"], folder)
    path = folder / target
    if damage == "flip":
        _flip_byte(path)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-8])
    else:
        path.unlink()
    with pytest.raises(IndexFileError, match=target.replace(".", r"\.")):
        Catalogue.open(folder)


def test_reolm_serve_refuses_a_damaged_index_in_one_line(assets, tmp_path):
    folder = tmp_path / "index"
    shutil.copytree(assets["index"], folder)
    _flip_byte(folder / "index-000000.faiss")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "reolm", "serve", "--model", str(assets["run"]), "--index",
                          str(folder), "--port", "0"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if "index-000000.faiss" in line]
    assert len(lines) == 1 and "sha256" in lines[0] and "Traceback" not in out.stderr


def _rewrite(assets: dict, folder: Path, **change) -> None:
    """Write revision 0 of ``folder`` from the test index with one array changed (valid checksums)."""
    cat = Catalogue.open(assets["index"])
    arrays = {"ids": list(cat.ids), "alive": cat.alive.copy(), "vectors": cat.index.vectors(),
              "tokens": cat.base_tokens}
    arrays.update(change)
    write_revision(folder, 0, arrays["ids"], arrays["alive"], arrays["vectors"], arrays["tokens"], cat.base_images,
                   cat.index, cat.manifest)


def test_arrays_are_checked_even_when_their_checksums_match(assets, tmp_path):
    cat = Catalogue.open(assets["index"])
    alive = cat.alive.astype(np.uint8)
    alive[3] = 2
    ids = list(cat.ids)
    ids[5] = ids[6]
    vectors = cat.index.vectors()
    vectors[7] *= 125.0  # a vector FAISS would score far above any cosine
    for name, change, message in [("alive", {"alive": alive}, "alive must be"),
                                  ("ids", {"ids": ids}, "is live in rows 5 and 6"),
                                  ("vectors", {"vectors": vectors}, "unit length")]:
        folder = tmp_path / name
        _rewrite(assets, folder, **change)
        with pytest.raises(IndexFileError, match=message):
            Catalogue.open(folder)


def test_token_ids_the_model_cannot_embed_are_refused_at_startup(assets, tmp_path):
    cat = Catalogue.open(assets["index"])
    tokens = cat.content(np.arange(cat.num_rows))[0]  # an in-memory copy
    tokens.ids[4] = 10**6  # the tiny vocabulary has 300 entries
    _rewrite(assets, tmp_path / "index", tokens=tokens)
    cat = Catalogue.open(tmp_path / "index")
    with pytest.raises(IndexFileError, match=r"tokens-000000: token ids span .* vocabulary"):
        cat.check_token_ids(300)


@pytest.mark.parametrize("escape", ["../victim", "/tmp/victim-abs", "symlink"])
def test_manifest_paths_outside_the_folder_are_refused_before_anything_is_touched(assets, tmp_path, escape):
    folder = tmp_path / "index"
    shutil.copytree(assets["index"], folder)
    victim = tmp_path / "victim"
    shutil.copytree(folder / "tokens-000000", victim)
    manifest = json.loads((folder / MANIFEST).read_text())
    if escape == "symlink":
        shutil.rmtree(folder / "tokens-000000")
        (folder / "tokens-000000").symlink_to(victim)
    else:
        manifest["files"]["tokens"] = escape
        (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IndexFileError, match="outside the index folder|not a path inside"):
        Catalogue.open(folder)
    assert sorted(p.name for p in victim.iterdir()) == ["ids.npy", "offsets.npy", "table.json", "types.npy",
                                                        "word_starts.npy"]


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(rows="40"), "rows must be a non-negative integer"),
    (lambda m: m["checksums"].update({"vectors-000000.safetensors": "abc"}), "every checksums entry"),
    (lambda m: m["files"].pop("images"), "files must name exactly"),
    (lambda m: m["checksums"].pop("index-000000.faiss"), r"no checksum recorded for files\.faiss"),
    (lambda m: m.update(format_version=1), "rebuild the folder"),
])
def test_a_malformed_manifest_is_refused_in_one_line(assets, tmp_path, edit, message):
    folder = tmp_path / "index"
    shutil.copytree(assets["index"], folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IndexFileError, match=message) as err:
        Catalogue.open(folder)
    assert str(folder / MANIFEST) in str(err.value) and "\n" not in str(err.value)


def test_a_save_removes_the_previous_revision_and_stale_temporaries(assets, tmp_path):
    folder = tmp_path / "index"
    shutil.copytree(assets["index"], folder)
    # what killed saves leave behind: temporaries, and a previous revision whose removal never ran
    (folder / ".vectors-000004.safetensors.tmp").write_bytes(b"half")
    (folder / ".tokens-000003.partial").mkdir()
    (folder / ".index.json.tmp").write_text("{")
    shutil.copy(folder / "index-000000.faiss", folder / "index-000009.faiss")
    (folder / "notes.txt").write_text("not ours: kept")
    cat = Catalogue.open(folder)
    tokens, images = cat.content([2])
    cat.add(["copy-of-2"], tokens, images, cat.index.vectors()[2:3])
    cat.save()
    assert sorted(p.name for p in folder.iterdir()) == ["images-000001", "index-000001.faiss", "index.json",
                                                        "notes.txt", "tokens-000001", "vectors-000001.safetensors"]
    again = Catalogue.open(folder)
    assert again.num_items == 41 and again.row_of("copy-of-2") == 40


SAVER = """
import sys, numpy as np
from reolm.serve.catalogue import Catalogue
cat = Catalogue.open(sys.argv[1])
n = 0
while True:  # add two items, save, report: the parent SIGKILLs at a random point of some save
    tokens, images = cat.content([n % 40, (n + 1) % 40])
    cat.add([f"k{n}", f"k{n + 1}"], tokens, images, cat.index.vectors()[[n % 40, (n + 1) % 40]])
    n += 2
    cat.save()
    print(n, flush=True)
"""


def test_sigkill_at_any_point_of_a_save_keeps_every_saved_item(assets, tmp_path):
    """A save that returned is never undone by a later save being killed, wherever the kill lands."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    rng = np.random.default_rng(0)
    for attempt in range(4):
        folder = tmp_path / f"index{attempt}"
        shutil.copytree(assets["index"], folder)
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
        saved = int(proc.stdout.readline())  # the first save has returned
        time.sleep(float(rng.uniform(0, 0.4)))
        proc.send_signal(signal.SIGKILL)
        saved = max([saved, *(int(line) for line in proc.stdout.read().split())])
        proc.wait()
        cat = Catalogue.open(folder)  # verified: checksums and arrays
        assert {f"k{j}" for j in range(saved)} <= set(cat.rows)


def test_sigkill_of_the_server_after_admin_save_returned_loses_no_acknowledged_add(assets, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(assets["index"], index)
    srv = Server(assets["run"], index, tmp_path / "server.log")
    acked = [f"acked-{j}" for j in range(30)]
    try:
        srv.post("/items", {"items": [{"id": i, **object_of(assets, j % 40)} for j, i in enumerate(acked)]})
        assert srv.post("/admin/save", {})["revision"] == 1
        srv.post("/items", {"items": [{"id": "unsaved", **object_of(assets, 3)}]})
        second = threading.Thread(target=_post_ignoring_errors, args=(srv.url + "/admin/save",), daemon=True)
        second.start()  # a second save, killed while it runs (or just after)
        time.sleep(0.02)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(timeout=60)
        second.join(timeout=60)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    cat = Catalogue.open(index)  # verified: checksums and arrays
    assert set(acked) <= set(cat.rows)


def _post_ignoring_errors(url: str) -> None:
    try:
        httpx.post(url, timeout=30)
    except httpx.TransportError:  # the server was killed under it
        pass
